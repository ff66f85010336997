"""Lightning callbacks of sp_grpo; each works with any LightningModule that follows its contract."""

from sp_grpo.callbacks.curriculum import SelfPacedCurriculum
from sp_grpo.callbacks.group_weighting import GroupRewardWeighting, GroupWeighting
from sp_grpo.callbacks.guard import OverOptimizationGuard
from sp_grpo.callbacks.plot import plot_curriculum
from sp_grpo.callbacks.prompt_difficulty import PromptDifficulty
from sp_grpo.callbacks.static_weights import StaticWeights

__all__ = [
    "GroupRewardWeighting",
    "GroupWeighting",
    "OverOptimizationGuard",
    "PromptDifficulty",
    "SelfPacedCurriculum",
    "StaticWeights",
    "plot_curriculum",
]
