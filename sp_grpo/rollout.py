"""Sample groups of videos with a stochastic flow-matching sampler, keeping what GRPO trains on.

diffusers pipelines return only the final video; GRPO needs every intermediate latent and the
log-probability of each stochastic step, so the denoising loop is written here around the
policy's :meth:`~sp_grpo.policies.VideoPolicy.velocity` and :func:`~sp_grpo.functional.sde.sde_step`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
from torch import Tensor

from sp_grpo.functional.sde import SDEKind, check_sigma_schedule, sde_step
from sp_grpo.policies.protocol import PromptEmbeds, VideoPolicy

StepSelection = Literal["all", "random", "window"]
WindowPlacement = Literal["fixed", "random", "sliding"]
_SDE_KINDS = ("sde", "cps", "dance")


@dataclass(frozen=True)
class DenoisingConfig:
    """How videos are denoised (steps, guidance, SDE kind and noise, size) and which steps are trained.

    The training loop's settings are ``model.sampler``; the validation loop's ``model.val_sampler``
    (:class:`ValDenoisingConfig`: the same fields, its errors name ``model.val_sampler``). An error
    names the setting as ``<config_key>.<field>``.

    Args:
        num_steps: Denoising steps per video.
        guidance_scale: Classifier-free guidance scale; 1 turns guidance off.
        sde_kind: Stochastic step: ``"sde"`` (Flow-GRPO), ``"cps"`` (coefficients-preserving),
            ``"dance"`` (DanceGRPO).
        noise_level: Noise of the stochastic steps (``a`` of Flow-GRPO, ``eta`` of DanceGRPO, the
            angle fraction of CPS).
        num_frames: Frames per video (1 more than a multiple of the VAE's temporal stride).
        height: Video height in pixels.
        width: Video width in pixels.
        same_noise_in_group: Start every sample of a group from the same initial noise, so the group
            differs only through the sampler's noise.
        train_steps: Which steps are trained: ``"all"``; ``"random"``, a random ``train_fraction``
            of the steps per sample (DanceGRPO); or ``"window"``, ``window_size`` consecutive steps
            that alone are stochastic and trained, ODE elsewhere (Flow-GRPO-Fast, MixGRPO).
        train_fraction: Fraction of steps trained per sample with ``train_steps="random"``.
        window_size: Steps in the window with ``train_steps="window"``.
        window_placement: ``"fixed"`` at ``window_start``; ``"random"``, a new start each
            iteration; ``"sliding"``, moving one step later every ``window_slide_every`` iterations
            and wrapping around (MixGRPO).
        window_start: First step of a fixed window, and where a sliding window starts.
        window_slide_every: Iterations between moves of a sliding window.

    Example:
        >>> config = DenoisingConfig(num_steps=10, train_steps="window", window_size=2, window_placement="fixed", window_start=3)
        >>> stochastic, train_mask = select_steps(config, num_samples=2, iteration=0, generator=torch.Generator())
        >>> stochastic.nonzero().flatten().tolist()
        [3, 4]
        >>> DenoisingConfig(noise_level=0.0)
        Traceback (most recent call last):
        ...
        ValueError: `model.sampler.noise_level` (0.0) must be positive: GRPO needs stochastic steps to have a likelihood; typical values are 0.7 (sde), 0.3 (dance), 0.8 (cps).
    """

    num_steps: int = 10
    guidance_scale: float = 4.5
    sde_kind: SDEKind = "sde"
    noise_level: float = 0.7
    num_frames: int = 9
    height: int = 64
    width: int = 64
    same_noise_in_group: bool = False
    train_steps: StepSelection = "all"
    train_fraction: float = 0.5
    window_size: int = 2
    window_placement: WindowPlacement = "random"
    window_start: int = 0
    window_slide_every: int = 1

    #: Where the settings live in a config, for the error messages.
    config_key: ClassVar[str] = "model.sampler"

    def __post_init__(self) -> None:
        self.check(self.config_key)

    def check(self, prefix: str) -> None:
        """Check every field; an error names it as ``{prefix}.{field}``.

        Raises:
            ValueError: a field is out of range or the fields disagree.
        """
        if self.num_steps < 1:
            raise ValueError(f"`{prefix}.num_steps` ({self.num_steps}) must be at least 1.")
        if self.guidance_scale < 1.0:
            raise ValueError(
                f"`{prefix}.guidance_scale` ({self.guidance_scale}) must be at least 1 (1 turns guidance off)."
            )
        if self.sde_kind not in _SDE_KINDS:
            raise ValueError(f"`{prefix}.sde_kind` ({self.sde_kind!r}) must be one of {list(_SDE_KINDS)}.")
        if self.noise_level <= 0:
            raise ValueError(
                f"`{prefix}.noise_level` ({self.noise_level}) must be positive: GRPO needs stochastic steps to"
                " have a likelihood; typical values are 0.7 (sde), 0.3 (dance), 0.8 (cps)."
            )
        if self.sde_kind == "cps" and self.noise_level > 1:
            raise ValueError(f"`{prefix}.noise_level` ({self.noise_level}) must be at most 1 with sde_kind 'cps'.")
        if self.train_steps not in ("all", "random", "window"):
            raise ValueError(f"`{prefix}.train_steps` ({self.train_steps!r}) must be one of ['all', 'random', 'window'].")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"`{prefix}.train_fraction` ({self.train_fraction}) must be in (0, 1].")
        if self.window_placement not in ("fixed", "random", "sliding"):
            raise ValueError(
                f"`{prefix}.window_placement` ({self.window_placement!r}) must be one of ['fixed', 'random', 'sliding']."
            )
        if self.train_steps == "window":
            if not 1 <= self.window_size <= self.num_steps:
                raise ValueError(
                    f"`{prefix}.window_size` ({self.window_size}) must be between 1 and `num_steps` ({self.num_steps})."
                )
            if not 0 <= self.window_start <= self.num_steps - self.window_size:
                raise ValueError(
                    f"`{prefix}.window_start` ({self.window_start}) must be between 0 and num_steps - window_size"
                    f" ({self.num_steps - self.window_size}) so the window fits in the {self.num_steps} steps."
                )
        if self.window_slide_every < 1:
            raise ValueError(f"`{prefix}.window_slide_every` ({self.window_slide_every}) must be at least 1.")


@dataclass(frozen=True)
class ValDenoisingConfig(DenoisingConfig):
    """:class:`DenoisingConfig` of the validation loop (``model.val_sampler``), whose errors name that key.

    Example:
        >>> ValDenoisingConfig(num_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `model.val_sampler.num_steps` (0) must be at least 1.
    """

    config_key: ClassVar[str] = "model.val_sampler"


#: The former name of :class:`DenoisingConfig`, kept for existing imports.
SamplerConfig = DenoisingConfig


@dataclass
class StepGraph:
    """One denoising step's trained rows, still attached to the autograd graph of the rollout's forward pass.

    Kept by :func:`sample_rollout` with ``keep_graph=True`` so that an on-policy update can
    backpropagate through the rollout's own forward pass instead of recomputing it.

    Attributes:
        rows: ``(m,)`` the samples trained at this step.
        log_prob: ``(m,)`` fp32 log-probability of each row's sampled latent, differentiable in the
            policy's weights (equal in value to the rollout's ``log_probs`` at this step).
        prev_mean: ``(m, *latent_shape)`` fp32 mean of the transition, differentiable (for the KL term).
        std: ``(m, 1, ..., 1)`` fp32 standard deviation of the transition.
    """

    rows: Tensor
    log_prob: Tensor
    prev_mean: Tensor
    std: Tensor


@dataclass
class Rollout:
    """Everything one GRPO iteration needs from sampling.

    ``N = P * G`` samples, prompt-major; ``S`` denoising steps.

    Attributes:
        prompts: ``N`` prompts, each repeated ``G`` times.
        group_size: ``G``.
        latents: ``(N, S + 1, *latent_shape)``: the initial noise, then the latent after each step.
        log_probs: ``(N, S)`` fp32 log-probabilities of each step under the sampling policy
            (0 for deterministic steps).
        sigmas: ``(S + 1,)`` fp32 noise levels.
        stochastic: ``(S,)`` bool, steps sampled with noise (the others are ODE steps).
        train_mask: ``(N, S)`` bool, the (sample, step) pairs that are trained.
        embeds: conditioning with ``N`` rows.
        videos: ``(N, T, 3, H, W)`` decoded videos in ``[0, 1]``.
        graph: step index -> :class:`StepGraph` for every step with trained pairs, when sampled with
            ``keep_graph=True``; ``None`` otherwise.
    """

    prompts: list[str]
    group_size: int
    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    stochastic: Tensor
    train_mask: Tensor
    embeds: PromptEmbeds
    videos: Tensor
    graph: dict[int, StepGraph] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.prompts)


def select_steps(config: DenoisingConfig, num_samples: int, iteration: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which steps are stochastic, and which (sample, step) pairs are trained.

    Args:
        config: The sampler settings.
        num_samples: ``N``.
        iteration: The training iteration (places sliding windows).
        generator: CPU generator for random choices.

    Returns:
        ``stochastic`` ``(S,)`` and ``train_mask`` ``(N, S)``, both bool on the CPU.
    """
    steps = config.num_steps
    if config.train_steps == "window":
        if config.window_placement == "fixed":
            start = config.window_start
        elif config.window_placement == "random":
            start = int(torch.randint(0, steps - config.window_size + 1, (1,), generator=generator))
        else:
            positions = steps - config.window_size + 1
            start = (config.window_start + iteration // config.window_slide_every) % positions
        stochastic = torch.zeros(steps, dtype=torch.bool)
        stochastic[start : start + config.window_size] = True
        return stochastic, stochastic.expand(num_samples, steps).clone()
    stochastic = torch.ones(steps, dtype=torch.bool)
    if config.train_steps == "all":
        return stochastic, torch.ones(num_samples, steps, dtype=torch.bool)
    k = max(1, round(config.train_fraction * steps))
    order = torch.rand(num_samples, steps, generator=generator).argsort(dim=1)
    train_mask = torch.zeros(num_samples, steps, dtype=torch.bool)
    train_mask.scatter_(1, order[:, :k], True)
    return stochastic, train_mask


def sample_rollout(
    policy: VideoPolicy,
    prompts: Sequence[str],
    group_size: int,
    config: DenoisingConfig,
    *,
    generator: torch.Generator,
    iteration: int = 0,
    device: torch.device | str = "cpu",
    latent_dtype: torch.dtype = torch.float32,
    inference_mode: bool = True,
    keep_graph: bool = False,
) -> Rollout:
    """Sample ``group_size`` videos for each of ``prompts`` and record the trajectory.

    Each unique prompt is encoded once and its embedding repeated for its group.

    Args:
        policy: The generator.
        prompts: ``P`` unique prompts.
        group_size: ``G`` samples per prompt.
        config: Sampler settings.
        generator: Source of all randomness (initial noise, step noise, step choice, a decoder's
            noise); on ``device``. The same seed gives the same rollout.
        iteration: Training iteration, for sliding windows.
        device: Where latents live.
        latent_dtype: Dtype of the stored latents.
        inference_mode: Run the denoising loop under ``torch.inference_mode`` (no autograd
            bookkeeping at all, faster than ``no_grad``). The trajectory is written into buffers
            made before the loop, and prompts are encoded and videos decoded under ``no_grad``, so
            nothing the training step uses is an inference tensor and nothing is copied. ``False``
            runs the loop under ``no_grad``. Ignored with ``keep_graph``.
        keep_graph: Run each step's forward pass with autograd on for the samples trained at that
            step and keep the result in :attr:`Rollout.graph`, so that an update made before the
            weights change (one inner epoch, one minibatch) backpropagates through it instead of
            running the network again. The samples, latents and log-probabilities are the ones
            sampled without it (the same random draws); the activations of every trained step stay
            in memory until the graph is freed. A step with a trained subset of samples runs two
            forward passes, the trained rows with autograd and the rest without.

    Returns:
        The :class:`Rollout`, with ``N = P * G`` samples, prompt-major.
    """
    return _sample_rollout(
        policy, prompts, group_size, config, generator, iteration, torch.device(device), latent_dtype, inference_mode, keep_graph
    )


@torch.no_grad()
def _sample_rollout(
    policy: VideoPolicy,
    prompts: Sequence[str],
    group_size: int,
    config: DenoisingConfig,
    generator: torch.Generator,
    iteration: int,
    device: torch.device,
    latent_dtype: torch.dtype,
    inference_mode: bool,
    keep_graph: bool,
) -> Rollout:
    num_prompts = len(prompts)
    n = num_prompts * group_size
    guidance = config.guidance_scale != 1.0
    embeds = policy.encode_prompts(list(prompts), guidance=guidance).repeat_interleave(group_size)
    shape = policy.latent_shape(config.num_frames, config.height, config.width)

    if config.same_noise_in_group:
        noise = torch.randn((num_prompts, *shape), generator=generator, device=device, dtype=torch.float32)
        noise = noise.repeat_interleave(group_size, dim=0)
    else:
        noise = torch.randn((n, *shape), generator=generator, device=device, dtype=torch.float32)
    # Step choices come from a CPU generator seeded from the main one, so they are the same on any device.
    choice_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
    stochastic, train_mask = select_steps(config, n, iteration, choice_gen)

    sigmas = policy.sigmas(config.num_steps, latent_shape=shape)
    check_sigma_schedule(sigmas)
    # Buffers made outside inference mode and filled in place inside it stay ordinary tensors, which
    # the training step can index and save for backward without a copy of the whole trajectory.
    latents = torch.empty((n, config.num_steps + 1, *shape), device=device, dtype=latent_dtype)
    log_probs = torch.zeros((n, config.num_steps), device=device, dtype=torch.float32)
    graph = _trained_rows(train_mask, device) if keep_graph else None
    # (not `inference_mode(False)`: that turns autograd on, and the loop would record a graph of every step)
    with torch.inference_mode() if inference_mode and not keep_graph else contextlib.nullcontext():
        deterministic = _denoise(policy, embeds, noise, sigmas, stochastic, config, generator, latents, log_probs, graph)
    # A step the sampler made deterministic (e.g. CPS's last step) has no likelihood to train.
    train_mask[:, deterministic] = False
    if graph is not None:
        graph = {step: part for step, part in graph.items() if isinstance(part, StepGraph) and not deterministic[step]}
    videos = policy.decode(latents[:, -1], generator=generator)
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        group_size=group_size,
        latents=latents,
        log_probs=log_probs,
        sigmas=sigmas,
        stochastic=stochastic,
        train_mask=train_mask.to(device),
        embeds=embeds,
        videos=videos,
        graph=graph,
    )


def _trained_rows(train_mask: Tensor, device: torch.device) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Step -> (the samples trained at it, the others or ``None`` when all are), on ``device``, for the
    steps with any; computed on the CPU copy of the mask, so the loop reads nothing back."""
    out = {}
    for step in range(train_mask.shape[1]):
        trained = train_mask[:, step]
        if trained.any():
            others = None if trained.all() else (~trained).nonzero().flatten().to(device)
            out[step] = (trained.nonzero().flatten().to(device), others)
    return out


def _velocity_with_graph(
    policy: VideoPolicy, x: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance: float, rows: Tensor, others: Tensor | None
) -> Tensor:
    """The velocity of all samples, with autograd on for ``rows`` only (all: one pass; a subset: two)."""
    if others is None:
        with torch.enable_grad():
            return policy.velocity(x, sigma, embeds, guidance)
    rest = policy.velocity(x[others], sigma[others], embeds.index(others), guidance)
    with torch.enable_grad():
        trained = policy.velocity(x[rows], sigma[rows], embeds.index(rows), guidance)
        return torch.cat([trained, rest])[torch.cat([rows, others]).argsort()]


def _denoise(
    policy: VideoPolicy,
    embeds: PromptEmbeds,
    noise: Tensor,
    sigmas: Tensor,
    stochastic: Tensor,
    config: DenoisingConfig,
    generator: torch.Generator | None,
    latents: Tensor,
    log_probs: Tensor,
    graph: dict[int, tuple[Tensor, Tensor | None] | StepGraph] | None = None,
) -> Tensor:
    """The denoising loop: ODE (Euler) steps where ``stochastic`` is False, ``config.sde_kind`` elsewhere.

    Fills ``latents`` ``(N, S + 1, ...)`` (the noise, then each step's result) and ``log_probs``
    ``(N, S)`` in place. The loop reads nothing back from the device: the schedule is read from its
    CPU copy once, and each step's std is kept on the device and checked once after the loop.
    ``graph`` (step -> trained rows and the others) has each of its steps run with autograd for those
    rows, and each entry replaced in place by the step's :class:`StepGraph`.

    Returns:
        ``deterministic`` ``(S,)`` bool on the CPU: the steps whose noise turned out to be zero.
    """
    n, steps = noise.shape[0], len(sigmas) - 1
    sigma_values, stochastic_steps = sigmas.tolist(), stochastic.tolist()
    stds = torch.zeros((steps, n), device=noise.device, dtype=torch.float32)
    x = noise.to(latents.dtype)
    latents[:, 0] = x
    for i in range(steps):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        sigma_b = torch.full((n,), sigma, device=x.device)
        split = graph.get(i) if graph is not None else None
        rows = None if split is None else split[0]
        if split is None:
            velocity = policy.velocity(x, sigma_b, embeds, config.guidance_scale)
        else:
            velocity = _velocity_with_graph(policy, x, sigma_b, embeds, config.guidance_scale, *split)
        noise_level = config.noise_level if stochastic_steps[i] else 0.0
        with torch.enable_grad() if rows is not None else contextlib.nullcontext():
            step = sde_step(
                velocity, x, sigma, sigma_next, kind=config.sde_kind, noise_level=noise_level, generator=generator, check_sigmas=False
            )
            if rows is not None:
                graph[i] = StepGraph(rows, step.log_prob[rows], step.prev_mean[rows], step.std[rows].detach())
        x = step.prev_sample.detach().to(latents.dtype)
        latents[:, i + 1] = x
        log_probs[:, i] = step.log_prob.detach()
        stds[i] = step.std.detach().flatten()
    return ~(stds > 0).all(dim=1).cpu()


@torch.no_grad()
def sample_ode(
    policy: VideoPolicy,
    prompts: Sequence[str],
    config: DenoisingConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Deterministic sampling (Euler steps of the probability-flow ODE), one video per prompt.

    This is what ``WanPipeline`` computes with a ``FlowMatchEulerDiscreteScheduler``; it is used for
    evaluation, where sampler noise would only blur comparisons.

    Returns:
        ``(P, T, 3, H, W)`` videos in ``[0, 1]``.
    """
    device = torch.device(device)
    embeds = policy.encode_prompts(list(prompts), guidance=config.guidance_scale != 1.0)
    shape = policy.latent_shape(config.num_frames, config.height, config.width)
    noise = torch.randn((len(prompts), *shape), generator=generator, device=device, dtype=torch.float32)
    sigmas = policy.sigmas(config.num_steps, latent_shape=shape)
    check_sigma_schedule(sigmas)
    stochastic = torch.zeros(config.num_steps, dtype=torch.bool)
    latents = torch.empty((len(prompts), config.num_steps + 1, *shape), device=device, dtype=torch.float32)
    log_probs = torch.zeros((len(prompts), config.num_steps), device=device, dtype=torch.float32)
    _denoise(policy, embeds, noise, sigmas, stochastic, config, None, latents, log_probs)
    return policy.decode(latents[:, -1], generator=generator)


__all__ = [
    "DenoisingConfig",
    "Rollout",
    "SamplerConfig",
    "StepGraph",
    "StepSelection",
    "ValDenoisingConfig",
    "WindowPlacement",
    "sample_ode",
    "sample_rollout",
    "select_steps",
]
