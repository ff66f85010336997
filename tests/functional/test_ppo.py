"""The PPO update over a rollout, as plain functions, against short references written here."""

import pytest
import torch

from sp_grpo.functional.losses import clipped_surrogate
from sp_grpo.functional.ppo import STATISTICS, accumulate_gradients, check_update_settings, pair_loss, ppo_update
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.rollout import DenoisingConfig, sample_rollout


def _recording_accumulate(calls):
    """An ``accumulate`` that records its pairs and returns distinct statistics per call."""

    def accumulate(pairs):
        calls.append(pairs.clone())
        value = torch.tensor(float(len(calls)))
        return {**{key: value for key in STATISTICS}, "log_ratio": torch.full((len(pairs),), -value)}

    return accumulate


def test_ppo_update_visits_every_trained_pair_once_per_epoch_in_shuffled_minibatches():
    train_mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) > 0.4
    train_mask[:, 0] = True  # every sample has a trained pair, so no minibatch is skipped
    calls, steps = [], []
    stats = ppo_update(
        train_mask, _recording_accumulate(calls), lambda: steps.append(len(calls)),
        num_inner_epochs=2, num_minibatches=3, generator=torch.Generator().manual_seed(7),
    )
    # Reference: the same shuffles, split in thirds; each minibatch's pairs are its samples' trained steps.
    order = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(2):
        for minibatch in torch.randperm(6, generator=order).tensor_split(3):
            expected.append(sorted((int(i), int(t)) for i in minibatch for t in train_mask[i].nonzero().flatten()))
    assert [sorted(map(tuple, pairs.tolist())) for pairs in calls] == expected
    assert steps == [1, 2, 3, 4, 5, 6]  # one optimizer step after each minibatch's backward
    assert stats["loss"] == 3.5 and stats["first_log_ratio_abs_max"] == 1.0  # mean over 6 updates; the first one's
    assert stats["trained_pairs"] == train_mask.sum()


def test_ppo_update_skips_a_minibatch_without_trained_pairs():
    train_mask = torch.tensor([[True, False], [False, False], [False, True], [False, False]])
    calls, steps = [], []
    stats = ppo_update(
        train_mask, _recording_accumulate(calls), lambda: steps.append(1),
        num_inner_epochs=1, num_minibatches=4, generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) == len(steps) == 2  # samples 1 and 3 train nothing: no backward, no optimizer step
    assert sorted(tuple(p) for pairs in calls for p in pairs.tolist()) == [(0, 0), (2, 1)]
    assert stats["loss"] == 1.5


def test_ppo_update_without_any_trained_pair_reports_zeros():
    stats = ppo_update(torch.zeros(2, 3, dtype=torch.bool), _recording_accumulate([]), lambda: None,
                       num_inner_epochs=1, num_minibatches=1, generator=torch.Generator())
    assert all(stats[key] == 0 for key in (*STATISTICS, "first_log_ratio_abs_max", "trained_pairs"))


def test_accumulate_gradients_equals_the_mean_over_all_pairs_whatever_the_micro_batches():
    weight = torch.randn(3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    features = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    pairs = torch.stack([torch.arange(7), torch.zeros(7, dtype=torch.long)], dim=1)

    def loss_fn(micro):
        per_pair = (features[micro[:, 0]] @ weight) ** 2
        return {"loss": per_pair.mean(), "log_ratio": per_pair, "clip_frac": per_pair.detach().mean()}

    results = {}
    for sizes in ([7], [1, 2, 4], [3, 3, 1]):
        weight.grad = None
        stats = accumulate_gradients(loss_fn, pairs, iter(sizes), torch.Tensor.backward)
        results[tuple(sizes)] = (weight.grad.clone(), stats)
    weight.grad = None
    ((features @ weight) ** 2).mean().backward()  # reference: the mean over all pairs at once
    for grad, stats in results.values():
        torch.testing.assert_close(grad, weight.grad)
        torch.testing.assert_close(stats["loss"], ((features @ weight) ** 2).mean().detach())
        torch.testing.assert_close(stats["clip_frac"], stats["loss"])
        torch.testing.assert_close(stats["log_ratio"], ((features @ weight) ** 2).detach())
        assert not stats["loss"].requires_grad


def test_pair_loss_is_the_clipped_surrogate_of_each_steps_log_ratio():
    sampler = DenoisingConfig(num_steps=3, num_frames=5, height=32, width=32, guidance_scale=2.0)
    policy = TinyWanPolicy(seed=0, lora_rank=4)
    rollout = sample_rollout(policy, ["a red square", "a blue circle"], 2, sampler, generator=torch.Generator().manual_seed(0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    pairs = rollout.train_mask.nonzero()
    out = pair_loss(policy, rollout, advantages, pairs, sampler=sampler, clip_range=0.05, kl_coef=0.0)
    assert out["log_ratio"].shape == (len(pairs),) and out["log_ratio"].abs().max() < 1e-4  # on-policy
    reference = clipped_surrogate(out["log_ratio"], advantages[pairs[:, 0]], 0.05)
    torch.testing.assert_close(out["loss"], reference.loss)
    assert out["loss"].requires_grad and out["kl_ref"] == 0
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    moved = pair_loss(policy, rollout, advantages, pairs, sampler=sampler, clip_range=0.05, kl_coef=0.5)
    surrogate = clipped_surrogate(moved["log_ratio"], advantages[pairs[:, 0]], 0.05).loss
    assert moved["kl_ref"] > 0
    torch.testing.assert_close(moved["loss"], surrogate + 0.5 * moved["kl_ref"])


SETTINGS = dict(
    group_size=2, num_inner_epochs=1, num_minibatches=1, clip_range=0.01, advantage_scale="group",
    aggregation="normalize_then_sum", advantage_clip=None, kl_coef=0.0, has_reference=False, learning_rate=1e-4,
    lr_warmup_steps=0, max_grad_norm=None, reward_weights=None, aspects=["fidelity"], trainable=True,
)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"trainable": False}, r"`model.policy` has no trainable parameters: set a `lora_rank`"),
        ({"kl_coef": 0.1}, r"`model.kl_coef` \(0.1\) needs a reference model.*`reference_copy: true`"),
        ({"reward_weights": {"temporal": 1.0}}, r"`model.reward_weights` names aspects \['temporal'\].*cover \['fidelity'\]"),
        ({"aggregation": "mean"}, r"`model.aggregation` \('mean'\) must be one of \['normalize_then_sum', 'sum_then_normalize'\]"),
    ],
)
def test_update_settings_errors_name_the_setting(overrides, match):
    check_update_settings(**SETTINGS)
    with pytest.raises(ValueError, match=match):
        check_update_settings(**{**SETTINGS, **overrides})
