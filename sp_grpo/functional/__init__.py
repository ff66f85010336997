"""Pure tensor-in, tensor-out maths of sp_grpo: no state, no ``nn.Module``."""

from sp_grpo.functional import curriculum
from sp_grpo.functional.advantages import (
    AdvantageScale,
    AggregationMode,
    aggregate_advantages,
    clip_advantages,
    group_advantages,
)
from sp_grpo.functional.aspects import aspect_means, standardize
from sp_grpo.functional.losses import SurrogateOutput, clipped_surrogate, gaussian_kl
from sp_grpo.functional.ppo import accumulate_gradients, pair_loss, ppo_update
from sp_grpo.functional.reward_weighting import group_reward_weights, hoyer_sparsity
from sp_grpo.functional.sde import SDEKind, SDEStepOutput, sde_step
from sp_grpo.functional.semantic import colour_affinity, find_colours, linear_head_score, text_video_similarity
from sp_grpo.functional.video import (
    clipped_fraction,
    dynamic_degree,
    feature_consistency,
    laplacian_variance,
    luma,
    motion_smoothness,
    noise_sigma,
    rms_contrast,
    temporal_flickering,
)

__all__ = [
    "AdvantageScale",
    "AggregationMode",
    "SDEKind",
    "SDEStepOutput",
    "SurrogateOutput",
    "accumulate_gradients",
    "aggregate_advantages",
    "aspect_means",
    "clip_advantages",
    "clipped_fraction",
    "clipped_surrogate",
    "colour_affinity",
    "curriculum",
    "dynamic_degree",
    "feature_consistency",
    "find_colours",
    "gaussian_kl",
    "group_advantages",
    "group_reward_weights",
    "hoyer_sparsity",
    "laplacian_variance",
    "linear_head_score",
    "luma",
    "motion_smoothness",
    "noise_sigma",
    "pair_loss",
    "ppo_update",
    "rms_contrast",
    "sde_step",
    "standardize",
    "temporal_flickering",
    "text_video_similarity",
]
