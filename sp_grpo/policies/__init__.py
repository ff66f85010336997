"""Generator adapters behind one protocol, :class:`VideoPolicy`: Wan, HunyuanVideo, LTX-Video."""

from sp_grpo.policies.base import PromptEmbeds, VideoPolicy, cfg_velocity, omit_frozen_from_state_dict
from sp_grpo.policies.common import DiffusersVideoPolicy, check_diffusers_folder, pack_text, unpack_text
from sp_grpo.policies.hunyuan import HunyuanVideoPolicy, load_hunyuan_components, save_hunyuan_folder, tiny_hunyuan_components
from sp_grpo.policies.ltx import LTXVideoPolicy, load_ltx_components, save_ltx_folder, tiny_ltx_components
from sp_grpo.policies.tiny import TinyWanPolicy, build_tokenizer, save_wan_folder, tiny_wan_components
from sp_grpo.policies.wan import WanComponents, WanPolicy, load_wan_components

__all__ = [
    "DiffusersVideoPolicy",
    "HunyuanVideoPolicy",
    "LTXVideoPolicy",
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
