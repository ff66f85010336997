"""Self-Paced GRPO post-training of text-to-video generators with PyTorch Lightning.

The public entry points: :class:`SelfPacedGRPO` (the LightningModule), :class:`SamplerConfig`,
:class:`~sp_grpo.data.PromptDataModule`, the rewards in :mod:`sp_grpo.rewards`, the curriculum
callbacks in :mod:`sp_grpo.callbacks`, generators in :mod:`sp_grpo.policies` and the maths in
:mod:`sp_grpo.functional`.
"""

from sp_grpo.data.prompts import PromptDataModule
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.rollout import Rollout, SamplerConfig, sample_ode, sample_rollout

__version__ = "0.1.0"

__all__ = ["PromptDataModule", "Rollout", "SamplerConfig", "SelfPacedGRPO", "__version__", "sample_ode", "sample_rollout"]
