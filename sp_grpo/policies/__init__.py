"""Generator adapters behind one protocol, :class:`VideoPolicy`."""

from sp_grpo.policies.base import PromptEmbeds, VideoPolicy, cfg_velocity
from sp_grpo.policies.tiny import TinyWanPolicy, build_tokenizer, save_wan_folder, tiny_wan_components
from sp_grpo.policies.wan import WanComponents, WanPolicy, load_wan_components

__all__ = [
    "PromptEmbeds",
    "TinyWanPolicy",
    "VideoPolicy",
    "WanComponents",
    "WanPolicy",
    "build_tokenizer",
    "cfg_velocity",
    "load_wan_components",
    "save_wan_folder",
    "tiny_wan_components",
]
