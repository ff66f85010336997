"""Old home of the diffusers base class, kept so that existing imports work: see :mod:`sp_grpo.policies.diffusers_base`.

Import from :mod:`sp_grpo.policies` instead; this module goes once nothing imports it.
"""

from sp_grpo.policies.diffusers_base import DiffusersVideoPolicy
from sp_grpo.policies.diffusers_helpers import build_pipeline, check_diffusers_folder, flow_sigmas, pack_text, unpack_text
from sp_grpo.policies.settings import DType, resolve_dtype

__all__ = ["DType", "DiffusersVideoPolicy", "build_pipeline", "check_diffusers_folder", "flow_sigmas", "pack_text", "resolve_dtype", "unpack_text"]
