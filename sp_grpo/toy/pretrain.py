"""Pre-train the shapes world's generator by flow matching on rendered videos.

Reproduces the shipped checkpoint (README, "The demo", has the exact command; the logs are in
``benchmarks/results/shapes/``)::

    python -m sp_grpo.toy.pretrain --device cuda --minutes 5.5 --out runs/pretrain --eval-every 200

Every ``--eval-every`` steps the model samples the validation and test prompts with the same ODE
sampler the demo evaluates with, scores them with the gold evaluation
(:func:`~sp_grpo.toy.gold.gold_summary`), appends a line to ``OUT/log.jsonl`` and saves a
diffusers folder ``OUT/step_NNNNNN/`` that :class:`~sp_grpo.toy.model.ShapesWanPolicy` loads.
The shipped checkpoint is the one whose *validation* all-three-correct rate is partly competent
(chosen by validation, never by the test split the demo reports).

Training goes through :meth:`WanPolicy.velocity` and :meth:`WanPolicy.encode_prompts`, so it uses
exactly the conventions GRPO samples with: ``x_sigma = (1 - sigma) x0 + sigma * noise``, target
velocity ``noise - x0``, timestep ``1000 * sigma``, latents ``(3, T, H, W)`` in ``[-1, 1]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sp_grpo.policies.tiny import save_wan_folder
from sp_grpo.policies.wan import WanComponents, WanPolicy
from sp_grpo.rollout import DenoisingConfig, sample_ode
from sp_grpo.toy.gold import gold_summary
from sp_grpo.toy.model import MAX_SEQUENCE_LENGTH, shapes_wan_components
from sp_grpo.toy.world import NUM_FRAMES, SIZE, parse_prompt, prompts_for_split, random_layouts, render_batch

#: The sampler the demo evaluates with (and pre-training evaluates checkpoints with).
EVAL_SAMPLER = DenoisingConfig(num_steps=8, guidance_scale=1.0, num_frames=NUM_FRAMES, height=SIZE, width=SIZE)


def videos_to_latents(videos: torch.Tensor) -> torch.Tensor:
    """``(B, T, 3, H, W)`` videos in ``[0, 1]`` to pixel-space latents ``(B, 3, T, H, W)`` in ``[-1, 1]``.

    .. math:: x_0 = 2 v - 1

    The inverse of :meth:`WanPolicy.decode` without a VAE.
    """
    return (2.0 * videos - 1.0).permute(0, 2, 1, 3, 4)


def flow_matching_loss(policy: WanPolicy, x0: torch.Tensor, embeds, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss with uniformly drawn noise levels.

    .. math:: \\mathcal{L} = \\mathbb{E}_{\\sigma, \\epsilon} \\| v_\\theta(x_\\sigma, \\sigma) - (\\epsilon - x_0) \\|^2,
              \\quad x_\\sigma = (1 - \\sigma) x_0 + \\sigma \\epsilon

    Args:
        policy: The generator (its transformer is trained).
        x0: ``(B, 3, T, H, W)`` clean latents.
        embeds: Conditioning with ``B`` rows.
        generator: Source of the noise and noise levels, on ``x0``'s device.

    Returns:
        The scalar loss, fp32.
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    sigma = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_sigma = (1.0 - s) * x0 + s * noise
    velocity = policy.velocity(x_sigma, sigma, embeds, guidance_scale=1.0)
    # The loss in fp32 whatever the network's dtype: small velocity errors matter late in training.
    return (velocity.float() - (noise - x0)).pow(2).mean()


@torch.no_grad()
def evaluate(policy: WanPolicy, split: str, seeds: int, device: torch.device) -> dict[str, float]:
    """Gold evaluation of ODE samples of a split's prompts, ``seeds`` fixed seeds each."""
    prompts = prompts_for_split(split) * seeds
    generator = torch.Generator(device=device).manual_seed(1234)
    policy.eval()
    videos = sample_ode(policy, prompts, EVAL_SAMPLER, generator=generator, device=device)
    policy.train()
    return gold_summary(videos, prompts)


def save_checkpoint(policy: WanPolicy, components: WanComponents, folder: Path) -> None:
    """Write the current weights as a diffusers Wan folder (pixel space, no ``vae/``)."""
    components.transformer = policy.transformer
    components.text_encoder = policy.text_encoder
    # Saved on the CPU in fp32, so the folder loads anywhere.
    device = next(policy.transformer.parameters()).device
    policy.to("cpu")
    save_wan_folder(components, folder)
    policy.to(device)


def candidates(out: str | Path, low: float = 0.1, high: float = 0.7, split: str = "val") -> list[Path]:
    """Checkpoint folders of a run whose gold all-three-correct rate on ``split`` lies in ``[low, high]``.

    The shipped checkpoint is chosen among these: partly competent, so GRPO has a signal.

    Args:
        out: The ``--out`` folder of a run.
        low: Lowest all-correct rate kept.
        high: Highest all-correct rate kept.
        split: ``"val"`` (used for the choice) or ``"test"``.

    Returns:
        The folders, in step order.
    """
    folder = Path(out)
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [folder / f"step_{r['step']:06d}" for r in records if low <= r[split]["all_correct"] <= high]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for step_NNNNNN/ checkpoints and log.jsonl.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--minutes", type=float, default=60.0, help="Wall-clock training budget.")
    parser.add_argument("--max-steps", type=int, default=10**9, help="Stop after this many steps.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="Linear warm-up steps.")
    parser.add_argument("--eval-every", type=int, default=500, help="Steps between gold evaluations and checkpoints.")
    parser.add_argument("--eval-seeds", type=int, default=8, help="Samples per prompt in each evaluation.")
    parser.add_argument("--layers", type=int, default=2, help="Transformer blocks.")
    parser.add_argument("--heads", type=int, default=2, help="Attention heads of width 32.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default="train", help="Split to pre-train on (train keeps val/test unseen).")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    components = shapes_wan_components(args.seed, num_layers=args.layers, num_attention_heads=args.heads, ffn_dim=64 * args.heads)
    policy = WanPolicy(components=components, lora_rank=None, max_sequence_length=MAX_SEQUENCE_LENGTH).to(device)
    policy.train()

    prompts = prompts_for_split(args.prompts)
    attrs = torch.tensor([parse_prompt(p).index for p in prompts])  # (P, 3)
    table = policy.encode_prompts(prompts, guidance=False)  # the text encoder is frozen: encode once
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    cpu_gen = torch.Generator().manual_seed(args.seed)
    dev_gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"pre-training on {len(prompts)} prompts ({args.prompts}); {sum(p.numel() for p in policy.trainable_parameters())} parameters")

    start, step, losses = time.perf_counter(), 0, []
    log = (out / "log.jsonl").open("a")
    while step < args.max_steps:
        pick = torch.randint(0, len(prompts), (args.batch_size,), generator=cpu_gen)
        c, s, d = attrs[pick].unbind(dim=1)
        x, y = random_layouts(d, cpu_gen)
        videos = render_batch(*(t.to(device) for t in (c, s, d, x, y)))
        loss = flow_matching_loss(policy, videos_to_latents(videos), table.index(pick.to(device)), dev_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - start
        done = elapsed > 60 * args.minutes or step >= args.max_steps
        if step % args.eval_every == 0 or done:
            record = {"step": step, "minutes": round(elapsed / 60, 2), "loss": sum(losses) / len(losses)}
            record["val"] = evaluate(policy, "val", args.eval_seeds, device)
            record["test"] = evaluate(policy, "test", args.eval_seeds, device)
            record["train"] = evaluate(policy, "train", max(1, args.eval_seeds // 2), device)
            losses = []
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            save_checkpoint(policy, components, out / f"step_{step:06d}")
        if done:
            break
    log.close()


if __name__ == "__main__":
    main()
