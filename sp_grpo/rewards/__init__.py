"""Video rewards, torchmetrics-style: the maths is in :mod:`sp_grpo.functional`, the modules are thin."""

from sp_grpo.rewards.backbones import Backbone, SharedModel, resolve_backbone
from sp_grpo.rewards.base import ASPECTS, VideoReward, check_videos
from sp_grpo.rewards.fidelity import AestheticScore, Contrast, Exposure, NoiseLevel, Sharpness, load_linear_head
from sp_grpo.rewards.judge_server import JudgeServerError, ServerJudge
from sp_grpo.rewards.judges import CallableJudge, VideoJudge
from sp_grpo.rewards.mixture import RewardOutput, RewardSet
from sp_grpo.rewards.semantic import ColorPromptAlignment, JudgeReward, TextVideoAlignment
from sp_grpo.rewards.temporal import DynamicDegree, FeatureConsistency, MotionSmoothness, TemporalFlickering
from sp_grpo.rewards.videoalign import VideoAlignJudge
from sp_grpo.rewards.vlm_judge import FrozenVLM, QwenVLJudge

__all__ = [
    "ASPECTS",
    "AestheticScore",
    "Backbone",
    "CallableJudge",
    "ColorPromptAlignment",
    "Contrast",
    "DynamicDegree",
    "Exposure",
    "FeatureConsistency",
    "FrozenVLM",
    "JudgeReward",
    "JudgeServerError",
    "MotionSmoothness",
    "NoiseLevel",
    "QwenVLJudge",
    "RewardOutput",
    "RewardSet",
    "ServerJudge",
    "SharedModel",
    "Sharpness",
    "TemporalFlickering",
    "TextVideoAlignment",
    "VideoAlignJudge",
    "VideoJudge",
    "VideoReward",
    "check_videos",
    "load_linear_head",
    "resolve_backbone",
]
