"""Self-Paced GRPO post-training of text-to-video generators with PyTorch Lightning.

The public entry points: :class:`SelfPacedGRPO` (the LightningModule), :class:`DenoisingConfig`,
:class:`~sp_grpo.data.PromptDataModule`, the rewards in :mod:`sp_grpo.rewards`, the curriculum
callbacks in :mod:`sp_grpo.callbacks`, generators in :mod:`sp_grpo.policies` and the maths in
:mod:`sp_grpo.functional`.
"""

from sp_grpo.data.prompts import PromptDataModule
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.rollout import DenoisingConfig, Rollout, ValDenoisingConfig, sample_ode, sample_rollout

__version__ = "0.1.0"

__all__ = [
    "DenoisingConfig",
    "PromptDataModule",
    "Rollout",
    "SelfPacedGRPO",
    "ValDenoisingConfig",
    "__version__",
    "sample_ode",
    "sample_rollout",
]
