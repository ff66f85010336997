"""The shapes world: prompts and videos whose truth is known, exact rewards, a gold evaluation and a
tiny pre-trained Wan generator, so Self-Paced GRPO can be run and *seen* to work on a CPU."""

from sp_grpo.toy.callbacks import GoldEvaluation, SampleVideos, video_grid, write_gif
from sp_grpo.toy.gold import gold_scores, gold_summary, read_attributes
from sp_grpo.toy.model import (
    CHECKPOINT_DIR,
    WEAK_CHECKPOINT_DIR,
    ShapesWanPolicy,
    ShapesWanTransformer,
    load_shapes_components,
    shapes_wan_components,
)
from sp_grpo.toy.pixel_vae import PixelSpaceVAE
from sp_grpo.toy.rewards import ShapesFidelity, ShapesSemantic, ShapesTemporal
from sp_grpo.toy.world import ShapePrompt, parse_prompt, prompts_for_split, render, render_batch

__all__ = [
    "PixelSpaceVAE",
    "CHECKPOINT_DIR",
    "GoldEvaluation",
    "SampleVideos",
    "ShapePrompt",
    "ShapesFidelity",
    "ShapesSemantic",
    "ShapesTemporal",
    "ShapesWanPolicy",
    "ShapesWanTransformer",
    "WEAK_CHECKPOINT_DIR",
    "gold_scores",
    "gold_summary",
    "load_shapes_components",
    "parse_prompt",
    "prompts_for_split",
    "read_attributes",
    "render",
    "render_batch",
    "shapes_wan_components",
    "video_grid",
    "write_gif",
]
