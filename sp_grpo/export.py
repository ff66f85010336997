"""``sp-grpo export``: a trained checkpoint as weights that diffusers loads.

Example::

    sp-grpo export --config configs/wan2.1_t2v_1.3b_lora.yaml --ckpt runs/wan2.1_1.3b_lora/checkpoints/last.ckpt --out wan_grpo_lora

* A LoRA run becomes ``pytorch_lora_weights.safetensors``, written by the backbone pipeline's own
  ``save_lora_weights`` with peft's adapter config as metadata (rank, alpha, target modules), so
  ``pipe.load_lora_weights(folder)`` on ``WanPipeline``, ``HunyuanVideoPipeline`` or ``LTXPipeline``
  restores exactly the trained adapter.
* A full fine-tuning run becomes a complete pipeline folder (``save_pretrained``): the trained
  transformer and the run's other components, which training never changes. The scheduler is the
  flow-matching Euler scheduler the run sampled with, so the pipeline samples what the run sampled.

Beside the weights: ``README.md`` (base model, LoRA rank, steps trained, which weights, how to load),
``sp_grpo_config.yaml`` (the run's config as given) and ``sp_grpo_export.json`` (the same facts for
programs). When the run used Lightning's ``EMAWeightAveraging`` the EMA weights are exported unless
``--weights current`` asks for the live ones; the README says which.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser
from torch import nn

from sp_grpo.checkpoint import CheckpointError
from sp_grpo.trained import RunInputError, TrainedPolicy, check_output_folder, load_trained_policy, replace_folder

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CONFIG_NAME = "sp_grpo_config.yaml"
INFO_NAME = "sp_grpo_export.json"

_WEIGHT_WORDS = {
    "ema": "the EMA average of the weights (the run used EMAWeightAveraging; `--weights current` exports the live ones)",
    "current": "the weights as trained (no EMA average)",
}


def pipeline_class(policy: nn.Module) -> type:
    """The diffusers pipeline class of a policy's backbone family.

    Raises:
        RunInputError: The policy is not one of the diffusers adapters (Wan, HunyuanVideo, LTX-Video).
    """
    from diffusers import HunyuanVideoPipeline, LTXPipeline, WanPipeline

    from sp_grpo.policies.hunyuan import HunyuanVideoPolicy
    from sp_grpo.policies.ltx import LTXVideoPolicy
    from sp_grpo.policies.wan import WanPolicy

    for policy_cls, pipe_cls in ((WanPolicy, WanPipeline), (HunyuanVideoPolicy, HunyuanVideoPipeline), (LTXVideoPolicy, LTXPipeline)):
        if isinstance(policy, policy_cls):
            return pipe_cls
    raise RunInputError(
        f"`model.policy` ({type(policy).__name__}) has no diffusers pipeline to export to: `sp-grpo export` supports"
        " WanPolicy, HunyuanVideoPolicy and LTXVideoPolicy and their subclasses."
    )


def lora_state(policy: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The transformer's LoRA weights in diffusers' naming, and peft's adapter config as a dict.

    Returns:
        ``(weights, adapter_config)``: keys like ``blocks.0.attn1.to_q.lora_A.weight`` (what
        ``save_lora_weights`` prefixes with ``transformer.``), and rank, alpha and target modules.
    """
    from peft.utils import get_peft_model_state_dict

    transformer = policy.transformer
    weights = {key: value.detach().contiguous() for key, value in get_peft_model_state_dict(transformer).items()}
    return weights, transformer.peft_config["default"].to_dict()


def pipeline_components(policy: nn.Module, pipe_cls: type) -> dict[str, Any]:
    """The policy's modules under the names the pipeline's constructor takes (shared, not copied)."""
    import inspect

    from sp_grpo.toy.pixel_vae import pipeline_vae

    names = [name for name in inspect.signature(pipe_cls.__init__).parameters if name != "self"]
    # The adapters keep each part under the pipeline's own name; a pixel-space Wan's identity VAE is `vae=None` there.
    parts = {name: getattr(policy, name) for name in names if hasattr(policy, name)}
    if "vae" in parts:
        parts["vae"] = pipeline_vae(parts["vae"])
    return parts


def export(trained: TrainedPolicy, out: Path) -> dict[str, Any]:
    """Write the trained policy into the (empty) folder ``out``.

    Args:
        trained: The policy with its trained weights loaded.
        out: The folder to fill.

    Returns:
        What was written: the facts also stored in ``sp_grpo_export.json``.
    """
    policy = trained.policy
    pipe_cls = pipeline_class(policy)
    info = _facts(trained, pipe_cls)
    if info["kind"] == "lora":
        weights, adapter = lora_state(policy)
        pipe_cls.save_lora_weights(
            str(out),
            transformer_lora_layers=weights,
            transformer_lora_adapter_metadata=adapter,
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        # The scheduler the run sampled with (a base folder may ship another, e.g. Wan's UniPC), so the
        # loading snippet can put it in the pipeline and sample what the run sampled.
        scheduler = getattr(policy, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "save_pretrained"):
            scheduler.save_pretrained(str(out / "scheduler"))
            info["scheduler_class"] = type(scheduler).__name__
        info["files"] = [LORA_WEIGHT_NAME] + (["scheduler"] if "scheduler_class" in info else [])
    else:
        pipe_cls(**pipeline_components(policy, pipe_cls)).save_pretrained(str(out), safe_serialization=True)
        info["files"] = sorted(p.name for p in out.iterdir())
    shutil.copyfile(trained.config_path, out / CONFIG_NAME)
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(readme(info))
    return info


def _facts(trained: TrainedPolicy, pipe_cls: type) -> dict[str, Any]:
    from sp_grpo.toy.pixel_vae import PixelSpaceVAE

    policy = trained.policy
    spec = trained.policy_config
    init_args = spec.get("init_args", {}) or {}
    lora = getattr(policy, "lora_rank", None) is not None
    sampler = trained.sampler
    info: dict[str, Any] = {
        "kind": "lora" if lora else "pipeline",
        "pipeline": pipe_cls.__name__,
        "policy": spec.get("class_path"),
        # A policy that picks its own default folder (the shapes world's shipped checkpoint) says which.
        "base_model": init_args.get("pretrained_path") or getattr(policy, "pretrained_path", None),
        "policy_init_args": init_args,
        "transformer_class": f"{type(policy.transformer).__module__}.{type(policy.transformer).__name__}",
        "checkpoint": str(trained.checkpoint_path) if trained.checkpoint_path else None,
        "weights": trained.weights,
        "global_step": trained.global_step,
        "iterations": trained.iterations,
        "config": str(trained.config_path),
        "pixel_space": isinstance(getattr(policy, "vae", None), PixelSpaceVAE),
        "sampler": {
            "num_inference_steps": sampler.num_steps,
            "guidance_scale": sampler.guidance_scale,
            "num_frames": sampler.num_frames,
            "height": sampler.height,
            "width": sampler.width,
            "max_sequence_length": getattr(policy, "max_sequence_length", None),
        },
    }
    if lora:
        adapter = policy.transformer.peft_config["default"]
        info["lora"] = {"rank": adapter.r, "alpha": adapter.lora_alpha, "target_modules": sorted(adapter.target_modules)}
    return info


def readme(info: dict[str, Any]) -> str:
    """The export folder's README: what it is, where it came from, how to load it with diffusers."""
    lora = info["kind"] == "lora"
    base = info["base_model"] or f"built in code by {info['policy']} with {json.dumps(info['policy_init_args'])} (no folder)"
    sampler = info["sampler"]
    lines = [
        f"# Self-Paced GRPO {'LoRA adapter' if lora else 'fine-tuned pipeline'} ({info['pipeline']})",
        "",
        f"- base model: {base}",
        f"- steps trained: {info['global_step']} optimizer steps ({info['iterations']} GRPO iterations), checkpoint"
        f" `{info['checkpoint']}`" if info["checkpoint"] else "- steps trained: 0 (the base model, no checkpoint)",
        f"- weights exported: {_WEIGHT_WORDS.get(info['weights'], 'the untrained base model')}",
    ]
    if lora:
        adapter = info["lora"]
        lines.append(f"- LoRA: rank {adapter['rank']}, alpha {adapter['alpha']}, on {', '.join(adapter['target_modules'])}")
    else:
        lines.append("- contents: the trained transformer; every other component as the run used it (training leaves them unchanged)")
    lines += [
        f"- config: `{CONFIG_NAME}` (a copy of `{info['config']}`); the same facts as JSON in `{INFO_NAME}`",
        f"- the run sampled with {sampler['num_inference_steps']} steps, guidance {sampler['guidance_scale']},"
        f" {sampler['num_frames']} frames of {sampler['height']}x{sampler['width']}, max_sequence_length"
        f" {sampler['max_sequence_length']}",
        "",
        "## Load it with diffusers",
        "",
        "```python",
        "import diffusers",
        "",
    ]
    module = info["transformer_class"].rsplit(".", 1)[0]
    if not module.startswith("diffusers"):
        lines.append(f"import {module}  # defines {info['transformer_class'].rsplit('.', 1)[1]}, which diffusers loads from there")
    extra = ", vae=None" if info["pixel_space"] else ""
    if lora:
        where = info["base_model"] or "<a diffusers folder of the base model>"
        lines += [
            f"pipe = diffusers.{info['pipeline']}.from_pretrained({where!r}{extra})",
            "pipe.load_lora_weights('<this folder>')",
        ]
        if info.get("scheduler_class"):
            lines.append(
                f"pipe.scheduler = diffusers.{info['scheduler_class']}.from_pretrained('<this folder>', subfolder='scheduler')"
                "  # the run's sampler"
            )
    else:
        lines.append(f"pipe = diffusers.{info['pipeline']}.from_pretrained('<this folder>'{extra})")
    call = (
        f"num_inference_steps={sampler['num_inference_steps']}, guidance_scale={sampler['guidance_scale']},"
        f" num_frames={sampler['num_frames']}, height={sampler['height']}, width={sampler['width']},"
        f" max_sequence_length={sampler['max_sequence_length']}"
    )
    if info["pipeline"] == "HunyuanVideoPipeline":
        call = call.replace("guidance_scale=", "true_cfg_scale=")  # its guidance_scale is the distilled one
    if info["pixel_space"]:
        # No VAE: the "latents" are the RGB frames in [-1, 1], laid out (B, 3, T, H, W).
        shape = f"(1, 3, {sampler['num_frames']}, {sampler['height']}, {sampler['width']})"
        lines += [
            "import torch",
            "",
            f"noise = torch.randn({shape}, generator=torch.Generator().manual_seed(0))",
            f"out = pipe('<your prompt>', latents=noise, output_type='latent', {call}).frames",
            "video = ((out + 1) / 2).clamp(0, 1)  # pixel space, no VAE: (1, 3, frames, height, width) in [0, 1]",
        ]
    else:
        lines.append(f"video = pipe('<your prompt>', {call}).frames[0]")
    lines += ["```", ""]
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The ``sp-grpo export`` argument parser."""
    parser = ArgumentParser(prog="sp-grpo export", description="Export a trained checkpoint as LoRA weights or a diffusers pipeline folder.")
    parser.add_argument("--config", type=str, required=True, help="The run's config YAML (what `sp-grpo fit --config` read, or the config.yaml in its log folder).")
    parser.add_argument("--ckpt", type=str, required=True, help="A checkpoint written by `sp-grpo fit`, e.g. runs/<run>/checkpoints/last.ckpt.")
    parser.add_argument("--out", type=str, required=True, help="Output folder; must not exist or be empty unless --overwrite.")
    parser.add_argument("--weights", type=str, default="auto", help="auto (EMA when the run averaged, else the trained weights), ema, or current.")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Replace the contents of a non-empty --out folder.")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """Run ``sp-grpo export``.

    Args:
        argv: Arguments after ``export``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        0 on success, 1 on bad input (one line on stderr, nothing written).
    """
    cfg = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    try:
        out = check_output_folder(cfg.out, cfg.overwrite, {"--config": cfg.config, "--ckpt": cfg.ckpt})
        trained = load_trained_policy(cfg.config, cfg.ckpt, cfg.weights)
        pipeline_class(trained.policy)
        with replace_folder(out) as staging:
            info = export(trained, staging)
    except (RunInputError, CheckpointError) as err:
        print(f"sp-grpo export: error: {err}", file=sys.stderr)
        return 1
    what = "LoRA adapter" if info["kind"] == "lora" else f"{info['pipeline']} folder"
    print(
        f"sp-grpo export: wrote the {what} of {trained.checkpoint_path} (step {trained.global_step},"
        f" {trained.weights} weights) to {out}/"
    )
    return 0


__all__ = ["build_parser", "export", "export_main", "lora_state", "pipeline_class", "pipeline_components", "readme"]
