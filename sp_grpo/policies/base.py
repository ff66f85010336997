"""Old home of the generator protocol, kept so that existing imports work: see :mod:`sp_grpo.policies.protocol`.

Import from :mod:`sp_grpo.policies` instead; this module goes once nothing imports it.
"""

from sp_grpo.policies.diffusers_helpers import omit_frozen_from_state_dict
from sp_grpo.policies.guidance import BATCHED_CFG_IS_FASTER, CFGBatching, cfg_batched_on, cfg_velocity
from sp_grpo.policies.protocol import PromptEmbeds, VideoPolicy

__all__ = ["BATCHED_CFG_IS_FASTER", "CFGBatching", "PromptEmbeds", "VideoPolicy", "cfg_batched_on", "cfg_velocity", "omit_frozen_from_state_dict"]
