"""Generator adapters behind one protocol, :class:`VideoPolicy`: Wan, HunyuanVideo, LTX-Video.

- ``protocol.py``: :class:`VideoPolicy`, what the rollout and the training step call, and :class:`PromptEmbeds`.
- ``settings.py``: :class:`PolicySettings`, the settings every backbone shares (dtype, LoRA, guidance, decoding).
- ``diffusers_base.py``: :class:`DiffusersVideoPolicy`, the base class that implements them for diffusers models.
- ``diffusers_helpers.py``, ``guidance.py``: what the backbone files share besides the base class.
- ``wan.py``, ``hunyuan.py``, ``ltx.py``: one file per backbone family; ``tiny.py``: offline tiny Wans.
"""

from sp_grpo.policies.diffusers_base import DiffusersVideoPolicy, LatentLayout
from sp_grpo.policies.diffusers_helpers import (
    check_diffusers_folder,
    omit_frozen_from_state_dict,
    pack_text,
    unpack_text,
)
from sp_grpo.policies.guidance import cfg_velocity
from sp_grpo.policies.hunyuan import (
    HunyuanVideoPolicy,
    load_hunyuan_components,
    save_hunyuan_folder,
    tiny_hunyuan_components,
)
from sp_grpo.policies.ltx import LTXVideoPolicy, load_ltx_components, save_ltx_folder, tiny_ltx_components
from sp_grpo.policies.protocol import PromptEmbeds, VideoPolicy
from sp_grpo.policies.settings import DEFAULT_LORA_TARGETS, PolicySettings
from sp_grpo.policies.tiny import TinyWanPolicy, build_tokenizer, save_wan_folder, tiny_wan_components
from sp_grpo.policies.wan import WanComponents, WanPolicy, load_wan_components

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DiffusersVideoPolicy",
    "HunyuanVideoPolicy",
    "LTXVideoPolicy",
    "LatentLayout",
    "PolicySettings",
    "PromptEmbeds",
    "TinyWanPolicy",
    "VideoPolicy",
    "WanComponents",
    "WanPolicy",
    "build_tokenizer",
    "cfg_velocity",
    "check_diffusers_folder",
    "load_hunyuan_components",
    "load_ltx_components",
    "load_wan_components",
    "omit_frozen_from_state_dict",
    "pack_text",
    "save_hunyuan_folder",
    "save_ltx_folder",
    "save_wan_folder",
    "tiny_hunyuan_components",
    "tiny_ltx_components",
    "tiny_wan_components",
    "unpack_text",
]
