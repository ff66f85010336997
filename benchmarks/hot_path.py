"""One GRPO iteration four ways, interleaved in one process: ours, ours with the other update, ours as it was, and a plain loop.

* ``ours``: ``SelfPacedGRPO.training_step`` under a Lightning ``Trainer``, as the config ships it
  (``micro_batch_size: auto``, ``cfg_batched: auto``; ``reuse_rollout_forward`` true for the shapes
  model as in ``configs/demo.yaml``: the on-policy update backpropagates through the rollout's
  forward passes; false for the tiny model as in ``configs/tiny.yaml``: the update runs the network
  again on every trained pair, in micro-batches).
* ``reuse`` / ``recompute``: the same with ``reuse_rollout_forward`` flipped (``recompute`` for the
  shapes model, ``reuse`` for the tiny one).
* ``before``: the same, with the hot path as it was before issue 19, kept here as a reference
  implementation: ``network.dtype`` read on every network call, the guided text concatenated on
  every call, sigma checks (host syncs) in every step and micro-batch, the whole trajectory and the
  videos copied after inference mode, the sigmas moved per micro-batch, and the configs' old fixed
  micro-batch (8 for tiny.yaml, 64 for the demo), recomputing.
* ``plain``: the straightforward loop most GRPO code writes, here on the same model and work:
  sample with per-step log-probs (one network call per step on the whole batch), decode, rewards,
  group advantages, then for every timestep one forward of the whole batch at that timestep (and
  one of the reference for the KL), backward, and one optimizer step per iteration.

Two models: the random tiny Wan with LoRA of ``configs/tiny.yaml`` (its sampler, group size,
prompts and model-free rewards) and the shipped shapes-world model of ``configs/demo.yaml`` (full
fine-tuning with a frozen reference copy, its sampler and rewards), each with the KL term on and
off. Each round times every arm once, back to back (ours and before: iterations 2 and 3 of a fresh
``Trainer.fit``; plain: two iterations); printed are medians and the medians of the per-round
ratios of ours to each other arm.

    python benchmarks/hot_path.py [--rounds 5] [--threads 1] [--models tiny shapes] [--kl 0 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import lightning as L
import torch

TINY_PROMPTS = ["a red square moving left", "a blue circle moving right"]
SHAPES_PROMPTS = ["a red square moving up", "a green ring moving left", "a blue plus moving down", "a yellow x moving right"]


# --- the models, as the shipped configs build them -------------------------------------------------
#: ``reuse_rollout_forward`` as each model's config ships it.
SHIPPED_REUSE = {"tiny": False, "shapes": True}


def build(model: str, kl_coef: float, micro_batch_size, reuse_rollout_forward=None):
    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.rollout import DenoisingConfig

    if model == "tiny":
        from sp_grpo import rewards as r
        from sp_grpo.policies import TinyWanPolicy

        policy = TinyWanPolicy(seed=0, lora_rank=4)
        rewards = r.RewardSet(
            {
                "sharpness": r.Sharpness(saturation=0.01), "noise": r.NoiseLevel(), "exposure": r.Exposure(),
                "flicker": r.TemporalFlickering(), "smoothness": r.MotionSmoothness(), "dynamic": r.DynamicDegree(threshold=0.05),
                "colour": r.ColorPromptAlignment(),
            }
        )
        sampler = DenoisingConfig(num_steps=6, guidance_scale=3.0, noise_level=0.7, num_frames=5, height=32, width=32)
        settings = dict(group_size=4, clip_range=0.001, learning_rate=0.001)
        prompts = TINY_PROMPTS
    else:
        from sp_grpo.rewards import RewardSet
        from sp_grpo.toy import ShapesFidelity, ShapesSemantic, ShapesTemporal, ShapesWanPolicy

        policy = ShapesWanPolicy(lora_rank=None, reference_copy=True)
        rewards = RewardSet({"fidelity": ShapesFidelity(), "temporal": ShapesTemporal(), "semantic": ShapesSemantic()})
        sampler = DenoisingConfig(num_steps=8, guidance_scale=1.0, noise_level=0.7, num_frames=4, height=16, width=16)
        settings = dict(group_size=8, clip_range=0.01, learning_rate=1e-4)
        prompts = SHAPES_PROMPTS
    reuse = SHIPPED_REUSE[model] if reuse_rollout_forward is None else reuse_rollout_forward
    module = SelfPacedGRPO(
        policy, rewards, sampler=sampler, kl_coef=kl_coef, micro_batch_size=micro_batch_size, reuse_rollout_forward=reuse, **settings
    )
    return module, prompts


# --- "before": the hot path as it was, kept as a reference implementation -------------------------
def _before_forward(self, latents, sigma, text):
    network = self._network()
    timestep = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
    out = network(
        hidden_states=latents.to(network.dtype),  # diffusers walks every submodule on each read
        timestep=timestep,
        encoder_hidden_states=text.to(network.dtype),
        return_dict=False,
    )[0]
    return out.to(latents.dtype)


def _before_velocity(self, latents, sigma, embeds, guidance_scale):
    if guidance_scale == 1.0 or embeds.uncond is None:
        return self._forward(latents, sigma, embeds.cond)
    text = torch.cat([embeds.cond, embeds.uncond])  # on every call
    v_cond, v_uncond = self._forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), text).chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def _before_sde_step(model_output, sample, sigma, sigma_next, **kwargs):
    from sp_grpo.functional.sde import _check_sigmas, _per_sample_sigma, sde_step

    batch, ndim = sample.shape[0], sample.ndim
    # the old check: three reductions read back on every call
    _check_sigmas(_per_sample_sigma(sigma, "sigma", batch, ndim, sample.device), _per_sample_sigma(sigma_next, "sigma_next", batch, ndim, sample.device))
    return sde_step(model_output, sample, sigma, sigma_next, check_sigmas=False, **kwargs)


def _before_sample_rollout(
    policy, prompts, group_size, config, *, generator, iteration=0, device="cpu", latent_dtype=torch.float32, inference_mode=True,
    keep_graph=False,
):
    assert not keep_graph, "the old hot path always recomputed the update's forward passes"
    from sp_grpo.policies import PromptEmbeds
    from sp_grpo.rollout import Rollout, select_steps

    device = torch.device(device)
    with torch.inference_mode():
        n = len(prompts) * group_size
        embeds = policy.encode_prompts(list(prompts), guidance=config.guidance_scale != 1.0).repeat_interleave(group_size)
        shape = policy.latent_shape(config.num_frames, config.height, config.width)
        noise = torch.randn((n, *shape), generator=generator, device=device)
        choice_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
        stochastic, train_mask = select_steps(config, n, iteration, choice_gen)
        sigmas = policy.sigmas(config.num_steps, latent_shape=shape)
        steps = len(sigmas) - 1
        latents = torch.empty((n, steps + 1, *shape), device=device, dtype=latent_dtype)
        log_probs = torch.zeros((n, steps), device=device)
        deterministic = torch.zeros(steps, dtype=torch.bool)
        x = noise
        latents[:, 0] = x
        for i in range(steps):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            velocity = policy.velocity(x, torch.full((n,), sigma, device=device), embeds, config.guidance_scale)
            level = config.noise_level if bool(stochastic[i]) else 0.0
            step = _before_sde_step(velocity, x, sigma, sigma_next, kind=config.sde_kind, noise_level=level, generator=generator)
            x = step.prev_sample
            latents[:, i + 1] = x
            log_probs[:, i] = step.log_prob
            deterministic[i] = not bool((step.std > 0).all())  # read back every step
        train_mask[:, deterministic] = False
        videos = policy.decode(latents[:, -1])
    # the copies out of inference mode
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)], group_size=group_size, latents=latents.clone(),
        log_probs=log_probs.clone(), sigmas=sigmas.clone(), stochastic=stochastic.clone(), train_mask=train_mask.clone(),
        embeds=PromptEmbeds(embeds.cond.clone(), None if embeds.uncond is None else embeds.uncond.clone()), videos=videos.clone(),
    )


def _before_pair_loss(self, rollout, advantages, pairs):
    from sp_grpo.functional.losses import clipped_surrogate, gaussian_kl

    sample, step = pairs[:, 0], pairs[:, 1]
    sigmas = rollout.sigmas.to(self.device)  # per micro-batch
    x, x_next = rollout.latents[sample, step], rollout.latents[sample, step + 1]
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    embeds = rollout.embeds.index(sample)
    guidance = self.sampler.guidance_scale
    args = dict(kind=self.sampler.sde_kind, noise_level=self.sampler.noise_level, prev_sample=x_next)
    ref = None
    if self.kl_coef > 0:
        with torch.no_grad(), self.policy.reference():
            ref = _before_sde_step(self.policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **args)
    out = _before_sde_step(self.policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **args)
    log_ratio = out.log_prob - rollout.log_probs[sample, step]
    surrogate = clipped_surrogate(log_ratio, advantages[sample], self.clip_range)
    loss, kl_ref = surrogate.loss, torch.zeros(())
    if ref is not None:
        kl_ref = gaussian_kl(out.prev_mean, ref.prev_mean, out.std).mean()
        loss = loss + self.kl_coef * kl_ref
    return {"loss": loss, "log_ratio": log_ratio, "clip_frac": surrogate.clip_frac, "approx_kl": surrogate.approx_kl,
            "ratio_mean": surrogate.ratio_mean, "kl_ref": kl_ref.detach()}


@contextlib.contextmanager
def before_hot_path(module):
    """Swap the old hot path in for the duration (instance attributes and the module's rollout function)."""
    import types

    import sp_grpo.module as module_file

    policy = module.policy
    policy._forward = types.MethodType(_before_forward, policy)
    policy.velocity = types.MethodType(_before_velocity, policy)
    module.pair_loss = types.MethodType(_before_pair_loss, module)
    sample_rollout = module_file.sample_rollout
    module_file.sample_rollout = _before_sample_rollout
    try:
        yield
    finally:
        module_file.sample_rollout = sample_rollout
        for name in ("_forward", "velocity"):
            del policy.__dict__[name]
        del module.__dict__["pair_loss"]


# --- "plain": the per-timestep loop ----------------------------------------------------------------
def plain_iteration(module, prompts, optimizer, seed: int) -> None:
    """One GRPO iteration written the plain way, on the module's policy, rewards and settings."""
    from sp_grpo.functional.advantages import group_advantages
    from sp_grpo.functional.losses import clipped_surrogate, gaussian_kl
    from sp_grpo.functional.sde import sde_step

    policy, config, group = module.policy, module.sampler, module.group_size
    guidance = config.guidance_scale
    generator = torch.Generator().manual_seed(seed)

    def network(x, sigma, text):  # the transformer called directly, guidance halves concatenated
        transformer = policy.reference_transformer if policy._use_reference and policy.reference_transformer is not None else policy.transformer
        timestep = sigma * policy.scheduler.config.num_train_timesteps
        if guidance == 1.0:
            return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text[0], return_dict=False)[0]
        both = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                           encoder_hidden_states=torch.cat(text), return_dict=False)[0]
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    with torch.no_grad():
        embeds = policy.encode_prompts(prompts, guidance=guidance != 1.0).repeat_interleave(group)
        text = [embeds.cond] if embeds.uncond is None else [embeds.cond, embeds.uncond]
        n = len(prompts) * group
        x = torch.randn((n, *policy.latent_shape(config.num_frames, config.height, config.width)), generator=generator)
        sigmas = policy.sigmas(config.num_steps)
        trajectory, log_probs = [x], []
        for i in range(config.num_steps):
            sigma = torch.full((n,), float(sigmas[i]))
            out = sde_step(network(x, sigma, text), x, float(sigmas[i]), float(sigmas[i + 1]), kind=config.sde_kind,
                           noise_level=config.noise_level, generator=generator)
            x = out.prev_sample
            trajectory.append(x)
            log_probs.append(out.log_prob)
        videos = policy.decode(x)
        scores = module.rewards(videos, [p for p in prompts for _ in range(group)], group_size=group)
        advantages = sum(group_advantages(s, group) for s in scores.per_aspect.values()) / len(scores.per_aspect)
    policy.train()
    for i in range(config.num_steps):
        sigma = torch.full((n,), float(sigmas[i]))
        args = dict(kind=config.sde_kind, noise_level=config.noise_level, prev_sample=trajectory[i + 1])
        out = sde_step(network(trajectory[i], sigma, text), trajectory[i], float(sigmas[i]), float(sigmas[i + 1]), **args)
        surrogate = clipped_surrogate(out.log_prob - log_probs[i], advantages, module.clip_range)
        loss = surrogate.loss
        if module.kl_coef > 0:
            with torch.no_grad(), policy.reference():
                ref = sde_step(network(trajectory[i], sigma, text), trajectory[i], float(sigmas[i]), float(sigmas[i + 1]), **args)
            loss = loss + module.kl_coef * gaussian_kl(out.prev_mean, ref.prev_mean, out.std).mean()
        (loss / config.num_steps).backward()
    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), module.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- timing -------------------------------------------------------------------------------------
class _Timer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def lightning_iteration(module, prompts, iterations: int = 3) -> float:
    """Mean wall time of iterations 2.. of a fresh fit: the first pays once-per-run costs (Lightning
    creates its logged-metric objects, ``micro_batch_size: auto`` measures), as in a long run."""
    from sp_grpo.data.prompts import PromptDataModule

    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=iterations, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(prompts=prompts, batch_size=len(prompts), shuffle=False))
    return statistics.mean(timer.seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (other jobs share this machine); 0 keeps torch's default")
    parser.add_argument("--models", nargs="+", choices=["tiny", "shapes"], default=["tiny", "shapes"])
    parser.add_argument("--kl", nargs="+", type=float, default=[0.0, 0.1])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    old_micro = {"tiny": 8, "shapes": 64}
    print(f"torch threads {torch.get_num_threads()}, rounds {args.rounds}; seconds per iteration, median (min..max)")
    for model in args.models:
        for kl in args.kl:
            ours, prompts = build(model, kl, "auto")
            other, _ = build(model, kl, "auto", reuse_rollout_forward=not SHIPPED_REUSE[model])
            other_name = "recompute" if SHIPPED_REUSE[model] else "reuse"
            before, _ = build(model, kl, old_micro[model], reuse_rollout_forward=False)
            plain, _ = build(model, kl, "auto")
            optimizer = torch.optim.AdamW(plain.policy.trainable_parameters(), lr=plain.learning_rate)

            def run_before():
                with before_hot_path(before):
                    return lightning_iteration(before, prompts)

            def run_plain(iterations: int = 2):
                start = time.perf_counter()
                for seed in range(iterations):
                    plain_iteration(plain, prompts, optimizer, seed=seed)
                return (time.perf_counter() - start) / iterations

            arms = {
                "ours": lambda: lightning_iteration(ours, prompts), other_name: lambda: lightning_iteration(other, prompts),
                "before": run_before, "plain": run_plain,
            }
            for fn in arms.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(args.rounds):
                for name, fn in arms.items():
                    times[name].append(fn())
            print(f"{model} (kl_coef {kl}):")
            for name, values in times.items():
                print(f"  {name:9s} {statistics.median(values):7.3f} s  ({min(values):.3f}..{max(values):.3f})")
            for name in ("plain", other_name, "before"):
                ratios = [a / b for a, b in zip(times["ours"], times[name])]
                print(f"  ratio ours / {name:9s} = {statistics.median(ratios):.3f}  (per-round {min(ratios):.3f}..{max(ratios):.3f})")


if __name__ == "__main__":
    main()
