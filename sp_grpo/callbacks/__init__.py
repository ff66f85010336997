"""Lightning callbacks of sp_grpo; each works with any LightningModule that follows its contract."""

from sp_grpo.callbacks.curriculum import SelfPacedCurriculum, StaticWeights
from sp_grpo.callbacks.group_weighting import GroupRewardWeighting, GroupWeighting
from sp_grpo.callbacks.guard import OverOptimizationGuard
from sp_grpo.callbacks.plot import plot_curriculum
from sp_grpo.callbacks.prompt_difficulty import DifficultyAwareSampler, PromptDifficulty

__all__ = [
    "DifficultyAwareSampler",
    "GroupRewardWeighting",
    "GroupWeighting",
    "OverOptimizationGuard",
    "PromptDifficulty",
    "SelfPacedCurriculum",
    "StaticWeights",
    "plot_curriculum",
]
