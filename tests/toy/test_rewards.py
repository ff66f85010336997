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


# -- graded strictness ------------------------------------------------------------------------------


def test_coarse_semantic_credits_each_attribute_and_strict_needs_all_three():
    video = render("a red ring moving left", 0)[None]
    coarse, strict = ShapesSemantic(strictness=0.0), ShapesSemantic(strictness=1.0)
    # Right colour and shape, opposite direction: no credit when strict, two attributes' worth coarse.
    wrong_direction = ["a red ring moving right"]
    assert strict(video, wrong_direction).item() == pytest.approx(0.0, abs=1e-6)
    assert coarse(video, wrong_direction).item() == pytest.approx(2 / 3, abs=0.05)
    # Each attribute earns its own signal when coarse: fewer right attributes, less credit.
    ladder = ["a red ring moving left", "a red ring moving right", "a red plus moving right", "a blue plus moving right"]
    scores = [coarse(video, [p]).item() for p in ladder]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    # Strictness interpolates linearly between the mean and the product.
    videos = _videos()
    halfway = ShapesSemantic(strictness=0.5)(videos, PROMPTS)
    assert torch.allclose(halfway, 0.5 * (coarse(videos, PROMPTS) + strict(videos, PROMPTS)), atol=1e-6)
    assert ShapesSemantic().strictness == 1.0  # the default is the gold-like product


def test_fidelity_tolerance_tightens_with_strictness():
    clean = _videos()
    noisy = (clean + 0.08 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    loose, strict = ShapesFidelity(strictness=0.0), ShapesFidelity(strictness=1.0)
    assert loose.tolerance == 0.25 and strict.tolerance == pytest.approx(0.1)
    assert torch.all(strict(noisy, PROMPTS) < loose(noisy, PROMPTS))
    assert torch.all(strict(clean, PROMPTS) == 1.0)  # a clean video is clean at any strictness
    video = torch.zeros(1, 1, 3, 1, 2)
    video[0, 0, :, 0, 1] = torch.tensor([0.9, 0.05, 0.0])  # L-inf distance 0.1 from red
    assert pixel_purity(video, strict.tolerance).item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    loose.set_strictness(0.5)
    assert loose.tolerance == pytest.approx(0.175)


@pytest.mark.parametrize("cls", [ShapesFidelity, ShapesSemantic])
def test_strictness_must_be_in_unit_interval(cls):
    with pytest.raises(ValueError, match=r"`strictness` \(1.5\) must be in \[0, 1\]"):
        cls(strictness=1.5)
