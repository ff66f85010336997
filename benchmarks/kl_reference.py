"""Can the KL reference under LoRA come from the policy's own pass? Exactness and time, measured.

Today (``SelfPacedGRPO.pair_loss``) the reference is a second forward of the micro-batch with the
adapters switched off, under ``no_grad``, before the policy's forward with grad. Under LoRA the
base weights are shared, but the two outputs part at the first adapted layer (every later layer
sees different inputs), so the only way to get both from one pass is to batch them: one forward of
the reference rows and the policy rows together, with each adapter's output zeroed on the
reference rows (a forward hook on every ``lora_B``; adding an exact zero leaves the base result
bit for bit). That is what is measured here against the two passes, on the tiny Wan of
``configs/tiny.yaml`` with LoRA, guidance batched as shipped:

* exactness: the reference and policy velocities, and the LoRA gradient of the same loss, from
  one pass against two;
* time: reference + policy forward and the backward, median of interleaved repeats.

Full fine-tuning with a frozen copy (the demo) cannot share a pass at all: the copy's weights differ
from the first layer.

    python benchmarks/kl_reference.py [--repeats 9] [--pairs 8 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


@contextlib.contextmanager
def adapters_off_on_rows(transformer, reference_rows: torch.Tensor):
    """Zero every LoRA adapter's output on the rows where ``reference_rows`` is True."""
    keep = (~reference_rows).float()
    hooks = []
    for name, module in transformer.named_modules():
        if name.endswith("lora_B.default"):
            hooks.append(module.register_forward_hook(lambda mod, args, out: out * keep.view(-1, *([1] * (out.ndim - 1)))))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 48], help="(sample, step) pairs per micro-batch (48: tiny.yaml's whole minibatch)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sp_grpo.policies import TinyWanPolicy

    policy = TinyWanPolicy(seed=0, lora_rank=4, cfg_batched=True)
    with torch.no_grad():  # adapters away from their zero init, so policy and reference differ
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    params = policy.trainable_parameters()
    guidance = 3.0
    print(f"tiny.yaml's Wan with LoRA r4, guidance {guidance} batched, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    for pairs in args.pairs:
        gen = torch.Generator().manual_seed(pairs)
        x = torch.randn(pairs, *policy.latent_shape(5, 32, 32), generator=gen)
        sigma = torch.rand(pairs, generator=gen) * 0.9 + 0.05
        embeds = policy.encode_prompts(["a red square moving left"] * pairs, guidance=True)
        target = torch.randn(x.shape, generator=gen)

        def loss_of(v, v_ref):
            return ((v - target) ** 2).mean() + 0.1 * ((v - v_ref) ** 2).mean()

        def two_passes():
            with torch.no_grad(), policy.reference():
                v_ref = policy.velocity(x, sigma, embeds, guidance)
            v = policy.velocity(x, sigma, embeds, guidance)
            loss_of(v, v_ref).backward()
            return v.detach(), v_ref

        both_embeds = type(embeds)(torch.cat([embeds.cond, embeds.cond]), torch.cat([embeds.uncond, embeds.uncond]))
        # Network rows with guidance batched: [ref cond, policy cond, ref uncond, policy uncond].
        reference_rows = torch.cat([torch.ones(pairs), torch.zeros(pairs)]).bool().repeat(2)

        def one_pass():
            with adapters_off_on_rows(policy.transformer, reference_rows):
                v_ref, v = policy.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both_embeds, guidance).chunk(2)
            v_ref = v_ref.detach()
            loss_of(v, v_ref).backward()
            return v.detach(), v_ref

        def grads_of(fn):
            for p in params:
                p.grad = None
            v, v_ref = fn()
            return v, v_ref, [p.grad.clone() for p in params]

        v2, r2, g2 = grads_of(two_passes)
        v1, r1, g1 = grads_of(one_pass)
        grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g1, g2))
        print(f"{pairs} pairs ({4 * pairs} network rows in one pass, {2 * pairs} in each of two):")
        print(
            f"  max |difference| one pass vs two: reference velocity {float((r1 - r2).abs().max()):.2e},"
            f" policy velocity {float((v1 - v2).abs().max()):.2e}, LoRA gradient (relative to its max) {grad_diff:.2e};"
            f" policy minus reference velocity {float((v2 - r2).abs().max()):.2e}"
        )
        times: dict[str, list[float]] = {"two passes": [], "one pass": []}
        for _ in range(args.repeats):
            for name, fn in (("two passes", two_passes), ("one pass", one_pass)):
                for p in params:
                    p.grad = None
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            print(f"  {name:10s} median {statistics.median(values) * 1000:7.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")
        ratios = [a / b for a, b in zip(times["one pass"], times["two passes"])]
        print(f"  ratio one pass / two passes = {statistics.median(ratios):.3f}  (per-repeat {min(ratios):.3f}..{max(ratios):.3f})")


if __name__ == "__main__":
    main()
