import pytest
import torch

from sp_grpo.functional.aspects import ASPECTS, aspect_means, standardize


def reference_aspect_means(scores, weights, higher_is_better, reward_aspects, aspects):
    """Loop over aspects and samples, python floats only."""
    out = []
    for aspect in aspects:
        members = [i for i, a in enumerate(reward_aspects) if a == aspect]
        total = sum(weights[i] for i in members)
        row = []
        for b in range(len(scores[0])):
            row.append(sum(weights[i] * (1 if higher_is_better[i] else -1) * scores[i][b] for i in members) / total)
        out.append(row)
    return torch.tensor(out)


def test_aspect_means_match_loop_reference():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 6, generator=generator)
    weights = [3.0, 1.0, 0.0, 2.0, 0.5]
    higher = [True, False, True, True, False]
    reward_aspects = ["fidelity", "fidelity", "semantic", "semantic", "temporal"]
    got = aspect_means(scores, weights, higher, reward_aspects, ASPECTS)
    expected = reference_aspect_means(scores.tolist(), weights, higher, reward_aspects, ASPECTS)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, expected)


def test_aspect_means_returns_the_requested_aspects_in_order():
    scores = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    got = aspect_means(scores, [1.0, 1.0], [True, True], ["semantic", "fidelity"], ["semantic"])
    assert got.tolist() == [[1.0, 2.0]]


def test_standardize_matches_reference():
    scores = torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.5, 1.0]])
    mean, var = torch.tensor([3.0, 0.5]), torch.tensor([4.0, 0.25])
    expected = [[(x - 3.0) / (4.0 + 1e-6) ** 0.5 for x in (1.0, 3.0, 5.0)], [(x - 0.5) / (0.25 + 1e-6) ** 0.5 for x in (0.0, 0.5, 1.0)]]
    torch.testing.assert_close(standardize(scores, mean, var, 1e-6), torch.tensor(expected))


def test_aspects_are_defined_once():
    from sp_grpo.functional import curriculum
    from sp_grpo.rewards import base

    assert base.ASPECTS is curriculum.ASPECTS is ASPECTS == ("fidelity", "temporal", "semantic")
