"""The hot path does no per-call waste: counted host syncs, dtype walks, concatenations, copies and forwards.

Counts, never timings: a host sync on the CPU costs nothing, so what is counted is each operation
that would make the host wait for a GPU (reading a tensor's value back, a data-dependent shape).
"""

import dataclasses

import diffusers.models.modeling_utils as modeling_utils
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sp_grpo.functional.advantages import group_advantages
from sp_grpo.functional.sde import check_sigma_schedule
from sp_grpo.micro_batch import MicroBatchSizer
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.policies.guidance import cfg_batched_on
from sp_grpo.rewards import RewardSet, Sharpness
from sp_grpo.rollout import DenoisingConfig, sample_rollout

PROMPTS = ["a red square", "a blue circle"]
_aten = torch.ops.aten
# Ops that read device data back to the host: .item()/bool()/float() and data-dependent shapes.
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default, _aten.nonzero.default, _aten.masked_select.default}


class HostSyncs(TorchDispatchMode):
    """Counts sync ops outside the networks' forwards (their code is diffusers' and transformers')."""

    def __init__(self, *networks):
        super().__init__()
        self.count = 0
        self._inside = 0
        self._handles = [network.register_forward_pre_hook(lambda *_: self._enter()) for network in networks]
        self._handles += [network.register_forward_hook(lambda *_: self._leave()) for network in networks]

    def _enter(self):
        self._inside += 1

    def _leave(self):
        self._inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS and not self._inside:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)


def _sampler(steps, **overrides):
    return DenoisingConfig(num_steps=steps, num_frames=5, height=32, width=32, guidance_scale=3.0, **overrides)


def _rollout_syncs(policy, steps, **overrides):
    with HostSyncs(policy.transformer, policy.text_encoder) as syncs:
        sample_rollout(policy, PROMPTS, 2, _sampler(steps, **overrides), generator=torch.Generator().manual_seed(0))
    return syncs.count


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_reads_nothing_back_per_step(kind):
    policy = TinyWanPolicy()
    few, many = _rollout_syncs(policy, 2, sde_kind=kind), _rollout_syncs(policy, 6, sde_kind=kind)
    assert few == many  # a constant per rollout, none per step
    assert many <= 4  # the step-choice seed, and 3 checks of the schedule's CPU copy (no device sync)


def test_update_reads_nothing_back_per_micro_batch():
    module = SelfPacedGRPO(TinyWanPolicy(), RewardSet({"sharp": Sharpness()}), group_size=2, sampler=_sampler(3), kl_coef=0.1)
    rollout = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(0))
    pairs, advantages = rollout.train_mask.nonzero(), group_advantages(torch.rand(4), 2)
    counts = {}
    for size in (1, len(pairs)):
        module.micro_batch_size = size
        with HostSyncs(module.policy.transformer) as syncs:
            module.accumulate_gradients(rollout, advantages, pairs)
        counts[size] = syncs.count
    assert counts[1] == counts[len(pairs)] == 0


def test_network_dtype_is_read_once_per_network(monkeypatch):
    walks = []
    original = modeling_utils.get_parameter_dtype
    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", lambda module: walks.append(module) or original(module))
    policy = TinyWanPolicy(lora_rank=None, reference_copy=True)
    walks.clear()
    rollout = sample_rollout(policy, PROMPTS, 2, _sampler(4), generator=torch.Generator().manual_seed(0))
    with policy.reference():
        for _ in range(3):
            policy.velocity(rollout.latents[:, 0], torch.full((4,), 0.5), rollout.embeds, 3.0)
    transformer_walks = [m for m in walks if m is policy.transformer or m is policy.reference_transformer]
    assert len(transformer_walks) == 2  # the transformer once, its frozen copy once


def test_cached_dtype_follows_a_cast():
    policy = TinyWanPolicy()
    seen = []
    policy.transformer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].dtype), with_kwargs=True)
    embeds = policy.encode_prompts(PROMPTS, guidance=False)
    x = torch.randn(2, *policy.latent_shape(5, 32, 32))
    with torch.no_grad():
        policy.velocity(x, torch.full((2,), 0.5), embeds, 1.0)
        policy.to(torch.float64)
        policy.velocity(x, torch.full((2,), 0.5), embeds, 1.0)
        policy.transformer.to(torch.bfloat16)  # the network alone, behind the policy's back
        policy.velocity(x, torch.full((2,), 0.5), embeds, 1.0)
    assert seen == [torch.float32, torch.float64, torch.bfloat16]
    assert policy.transformer.dtype == torch.bfloat16


def test_guided_embeddings_are_concatenated_once_per_rollout():
    policy = TinyWanPolicy(cfg_batched=True)
    texts = []
    policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: texts.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    rollout = sample_rollout(policy, PROMPTS, 2, _sampler(4), generator=torch.Generator().manual_seed(0))
    assert len(texts) == 4 and all(text is texts[0] for text in texts)
    assert not rollout.embeds.guided().is_inference()  # the rollout's cached halves are not kept out of inference mode


def test_rollout_keeps_its_buffers_without_copies():
    policy = TinyWanPolicy()
    decoded = []
    decode = policy.decode
    policy.decode = lambda latents, **kwargs: decoded.append((latents, decode(latents, **kwargs))) or decoded[-1][1]
    rollout = sample_rollout(policy, PROMPTS, 2, _sampler(3), generator=torch.Generator().manual_seed(0))
    latents_in, videos_out = decoded[0]
    assert latents_in.untyped_storage().data_ptr() == rollout.latents.untyped_storage().data_ptr()
    assert videos_out is rollout.videos
    assert not any(t.is_inference() for t in (rollout.latents, rollout.log_probs, rollout.videos, rollout.train_mask, rollout.embeds.cond))
    rollout.train_mask &= torch.tensor([True, False, True, False]).unsqueeze(1)  # in place, as training_step does


def test_forwards_per_iteration_with_auto_micro_batch():
    module = SelfPacedGRPO(
        TinyWanPolicy(cfg_batched=True), RewardSet({"sharp": Sharpness()}), group_size=2, sampler=_sampler(3), kl_coef=0.1
    )
    rollout = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(0))
    rows = []
    handle = module.policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    advantages, pairs = group_advantages(torch.rand(4), 2), rollout.train_mask.nonzero()
    module.accumulate_gradients(rollout, advantages, pairs)
    assert rows == [2, 2, 4, 4, 24, 24]  # first update: probes of 1 and 2 pairs (reference, policy; x2 rows for guidance)
    rows.clear()
    module.accumulate_gradients(rollout, advantages, pairs)
    handle.remove()
    assert rows == [2 * 12, 2 * 12]  # the tiny model's whole minibatch at once: reference pass, policy pass


def test_result_does_not_depend_on_the_micro_batch():
    module = SelfPacedGRPO(TinyWanPolicy(), RewardSet({"sharp": Sharpness()}), group_size=2, sampler=_sampler(3), kl_coef=0.1)
    rollout = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(0))
    advantages, pairs = group_advantages(torch.rand(4), 2), rollout.train_mask.nonzero()
    grads, stats = {}, {}
    for size in (1, 5, "auto"):
        module.micro_batch_size = size
        stats[size] = module.accumulate_gradients(rollout, advantages, pairs)
        grads[size] = [p.grad.clone() for p in module.policy.trainable_parameters()]
        module.policy.zero_grad(set_to_none=True)
    for size in (1, 5):
        for got, want in zip(grads[size], grads["auto"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        for key in ("loss", "kl_ref", "log_ratio"):
            torch.testing.assert_close(stats[size][key], stats["auto"][key], rtol=1e-4, atol=1e-6)


class _FakeCuda:
    """The torch.cuda memory calls the sizer makes, driven by a script of peaks."""

    def __init__(self, free, per_pair, fixed):
        self.free, self.per_pair, self.fixed, self.allocated, self.peak = free, per_pair, fixed, 0, 0

    def run(self, pairs):  # what a micro-batch of `pairs` does to the allocator
        self.peak = max(self.peak, self.allocated + self.fixed + self.per_pair * pairs)

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", 0))
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self.free, 10 * self.free))


def _drive(sizer, total, fake, **kwargs):
    sizes = []
    for size in sizer.split(total, "auto", torch.device("cuda", 0), **kwargs):
        fake.run(size)
        sizes.append(size)
    return sizes


def test_auto_micro_batch_on_a_gpu_fits_the_stated_budget(monkeypatch):
    fake = _FakeCuda(free=10**12, per_pair=2**30, fixed=0)
    fake.install(monkeypatch)
    sizer = MicroBatchSizer(memory_gib=10.0)
    assert _drive(sizer, 40, fake) == [1, 2, 10, 9, 9, 9]  # probes of 1 and 2, then at most 10 GiB / 1 GiB, evenly
    assert sizer.bytes_per_pair == 2**30
    assert _drive(sizer, 25, fake) == [9, 8, 8]  # measured once per run
    assert list(sizer.split(25, 4, torch.device("cuda", 0))) == [4, 4, 4, 4, 4, 4, 1]  # a number wins


def test_auto_micro_batch_on_a_gpu_uses_free_memory_less_optimizer_states_and_agrees_across_ranks(monkeypatch):
    fake = _FakeCuda(free=20 * 2**30, per_pair=2**30, fixed=0)
    fake.install(monkeypatch)
    sizes = _drive(MicroBatchSizer(), 40, fake, pending_bytes=lambda: 2 * 2**30, agree=lambda size: min(size, 12))
    assert sizes == [1, 2, 10, 9, 9, 9]  # 0.9 * 20 - 2 = 16 GiB -> 16 pairs; another rank says 12; 37 in 4 even parts
    fake_small = _FakeCuda(free=2**30, per_pair=2**30, fixed=0)
    fake_small.install(monkeypatch)
    assert _drive(MicroBatchSizer(), 5, fake_small)[2:] == [1, 1]  # never below one pair


def test_auto_micro_batch_on_a_cpu_measures_saved_activations():
    weight = torch.randn(64, 64, requires_grad=True)
    calls = []

    def probe(pairs):  # saves the input and 4 tanh outputs (each the next matmul's input): 5 x 256 bytes per pair
        calls.append(pairs)
        x = torch.randn(pairs, 64)
        for _ in range(4):
            x = torch.tanh(x @ weight)
        return x

    sizer = MicroBatchSizer(memory_gib=40 * 1024 / 2**30)  # 40 KiB
    assert list(sizer.split(100, "auto", torch.device("cpu"), probe=probe)) == [25, 25, 25, 25]  # at most 32, evenly
    assert calls == [1, 2] and sizer.bytes_per_pair == 1280  # the weight, saved by both probes, cancels
    assert list(MicroBatchSizer().split(37, "auto", torch.device("cpu"), probe=probe)) == [37]  # fits 0.25 GiB: whole


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"micro_batch_size": 0}, r"`model.micro_batch_size` \(0\) must be at least 1, or 'auto'"),
        ({"micro_batch_size": "all"}, r"`model.micro_batch_size` \('all'\) must be at least 1, or 'auto'"),
        ({"micro_batch_memory_gib": 0.0}, r"`model.micro_batch_memory_gib` \(0.0\) must be positive"),
    ],
)
def test_micro_batch_setting_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        SelfPacedGRPO(TinyWanPolicy(), RewardSet({"sharp": Sharpness()}), **overrides)


def test_cfg_batching_setting():
    assert cfg_batched_on(torch.device("cpu"), True) and not cfg_batched_on(torch.device("cuda", 0), False)
    assert cfg_batched_on(torch.device("cuda", 0), "auto")
    with pytest.raises(ValueError, match=r"cfg_batched` \('yes'\) must be true, false or 'auto'"):
        TinyWanPolicy(cfg_batched="yes")


def test_sigma_schedule_is_checked_once_and_names_the_problem():
    check_sigma_schedule(torch.tensor([1.0, 0.6, 0.0]))
    with pytest.raises(ValueError, match=r"`sigma` must lie in \[0, 1\].*got \[1.5\]"):
        check_sigma_schedule(torch.tensor([1.5, 0.6, 0.0]))
    with pytest.raises(ValueError, match=r"must be 1-d with at least 2 values"):
        check_sigma_schedule(torch.tensor([1.0]))
    module = SelfPacedGRPO(TinyWanPolicy(), RewardSet({"sharp": Sharpness()}), group_size=2, sampler=_sampler(2))
    rollout = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(0))
    bad = dataclasses.replace(rollout, sigmas=torch.tensor([1.0, 0.7, 0.7]))
    module.optimizers = lambda: None
    module.lr_schedulers = lambda: None
    with pytest.raises(ValueError, match=r"must be smaller than `sigma`"):
        module.policy_updates(bad, group_advantages(torch.rand(4), 2))
