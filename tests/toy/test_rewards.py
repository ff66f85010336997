import pytest
import torch

from sp_grpo.toy.rewards import ShapesFidelity, ShapesSemantic, ShapesTemporal, pixel_purity
from sp_grpo.toy.world import prompts_for_split, render

PROMPTS = prompts_for_split("test")


def _videos():
    return torch.stack([render(p, seed=i) for i, p in enumerate(PROMPTS)])


def test_fidelity_ranks_clean_above_noisy_speckled_and_empty():
    clean = _videos()
    noisy = (clean + 0.08 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    speckled = clean.clone()
    speckled[:, :, 0, 0, 0] = 1.0  # a stray bright pixel: a second object
    empty = torch.zeros_like(clean)
    reward = ShapesFidelity()
    good = reward(clean, PROMPTS)
    assert torch.all(good == 1.0)
    for bad in (noisy, speckled, empty):
        assert torch.all(reward(bad, PROMPTS) < good)


def test_pixel_purity_against_explicit_formula():
    video = torch.zeros(1, 1, 3, 1, 2)
    video[0, 0, :, 0, 1] = torch.tensor([0.9, 0.05, 0.0])  # near red: L-inf distance 0.1
    assert abs(pixel_purity(video).item() - (1.0 + (1 - 0.1 / 0.25)) / 2) < 1e-6


def test_temporal_ranks_moving_above_frozen_jumping_and_changing():
    clean = _videos()
    frozen = clean[:, :1].expand_as(clean).clone()
    jumping = clean[:, [0, 2, 1, 3]]
    changing = clean.clone()
    changing[:, 2] = changing[:, 2].roll(1, dims=1)  # another colour in frame 2
    reward = ShapesTemporal()
    good = reward(clean, PROMPTS)
    assert torch.all(good == 1.0)
    for bad in (frozen, jumping, changing):
        assert torch.all(reward(bad, PROMPTS) < good)


def test_semantic_ranks_the_prompt_above_each_wrong_attribute():
    reward = ShapesSemantic()
    video = render("a red ring moving left", 0)[None]
    right = reward(video, ["a red ring moving left"])
    for wrong in ("a blue ring moving left", "a red plus moving left", "a red ring moving right"):
        assert reward(video, [wrong]) < right
    assert right > 0.9


def test_semantic_temperature_must_be_positive():
    with pytest.raises(ValueError, match=r"`temperature` \(0\) must be positive"):
        ShapesSemantic(temperature=0)
