import pytest
import torch

from sp_grpo.functional.semantic import COLOUR_PROTOTYPES, find_colours, margin_credit, text_video_similarity
from sp_grpo.rewards.backbones import Backbone, resolve_backbone
from sp_grpo.rewards.judges import CallableJudge, VideoJudge
from sp_grpo.rewards.semantic import ColorPromptAlignment, JudgeReward, TextVideoAlignment


def _solid(rgb, b=1, t=2, size=4):
    return torch.tensor(rgb).view(1, 1, 3, 1, 1).expand(b, t, 3, size, size).clone()


def test_find_colours():
    assert find_colours("A Blue ball beside a red, RED box") == ["blue", "red"]
    assert find_colours("reddish bluebird") == []
    assert find_colours("a teal cup", vocabulary=["teal"]) == ["teal"]


def test_colour_alignment_by_hand_and_neutral():
    reward = ColorPromptAlignment(bandwidth=0.5)
    video = _solid((1.0, 0.0, 0.0))
    half = video.clone()
    half[..., :2, :] = 0.0  # top half black
    prompts_red, prompts_blue = ["a red car"], ["a blue car"]
    assert reward(video, prompts_red).item() == pytest.approx(1.0)
    # Pure red vs blue prototype: squared distance 2 -> exp(-2 / (2 * 0.25)).
    assert reward(video, prompts_blue).item() == pytest.approx(torch.exp(torch.tensor(-4.0)).item(), rel=1e-5)
    # Half red, half black: (1 + exp(-1 / 0.5)) / 2.
    assert reward(half, prompts_red).item() == pytest.approx((1 + torch.exp(torch.tensor(-2.0)).item()) / 2, rel=1e-5)
    # Two colours named: the mean of the two affinities.
    both = reward(video, ["red and blue"]).item()
    assert both == pytest.approx((1 + torch.exp(torch.tensor(-4.0)).item()) / 2, rel=1e-5)
    assert ColorPromptAlignment(neutral=0.3)(video, ["a car"]).item() == pytest.approx(0.3)


def test_colour_alignment_varies_with_video_and_prompt():
    videos = torch.cat([_solid(COLOUR_PROTOTYPES["green"]), _solid(COLOUR_PROTOTYPES["yellow"])])
    reward = ColorPromptAlignment()
    green = reward(videos, ["green", "green"])
    yellow = reward(videos, ["yellow", "yellow"])
    assert green[0] > green[1] and yellow[1] > yellow[0]


def test_colour_alignment_errors():
    with pytest.raises(ValueError, match="`bandwidth` \\(0\\) must be positive"):
        ColorPromptAlignment(bandwidth=0)
    with pytest.raises(ValueError, match="colour 'teal' \\(\\(0, 2, 2\\)\\) must be three RGB values in \\[0, 1\\]"):
        ColorPromptAlignment(colours={"teal": (0, 2, 2)})


def test_text_video_similarity_reference():
    g = torch.Generator().manual_seed(0)
    frames, text = torch.randn(2, 3, 5, generator=g), torch.randn(2, 5, generator=g)
    expected = [
        sum(torch.nn.functional.cosine_similarity(f, text[b], dim=0).item() for f in frames[b]) / 3 for b in range(2)
    ]
    assert text_video_similarity(frames, text).tolist() == pytest.approx(expected, rel=1e-5)


def test_matching_prompt_scores_higher_with_tiny_clip_from_disk(tiny_clip_dir, colour_batch):
    reward = TextVideoAlignment(str(tiny_clip_dir), num_frames=3)
    videos, names = colour_batch
    for shift in (1, 2):
        matching = reward(videos, [f"a {n} ball" for n in names])
        mismatching = reward(videos, [f"a {n} ball" for n in names[shift:] + names[:shift]])
        assert (matching > mismatching).all()


def test_margin_credit_reference():
    import math

    sims = torch.tensor([-0.2, 0.1, 0.25, 0.4])
    expected = [0.02 * math.log1p(math.exp((s - 0.25) / 0.02)) for s in sims.tolist()]
    assert margin_credit(sims, 0.25, 0.02).tolist() == pytest.approx(expected, rel=1e-5)


def test_alignment_margin_rises_with_strictness(tiny_clip_dir, colour_batch):
    videos, names = colour_batch
    prompts = [f"a {n} ball" for n in names]
    plain = TextVideoAlignment(str(tiny_clip_dir), num_frames=3)(videos, prompts)
    low, high = plain.min().item(), plain.max().item()
    graded = TextVideoAlignment(str(tiny_clip_dir), margin=(low - 0.5, high + 0.5), margin_temperature=1e-3, num_frames=3)
    assert graded.graded and graded.current_margin == pytest.approx(low - 0.5)
    # Below every similarity: the credit is the similarity above the margin, so the order is kept.
    assert torch.allclose(graded(videos, prompts), plain - (low - 0.5), atol=1e-3)
    graded.set_strictness(1.0)  # above every similarity: no sample earns credit
    assert graded.current_margin == pytest.approx(high + 0.5)
    assert graded(videos, prompts).max().item() < 1e-6
    assert not TextVideoAlignment(str(tiny_clip_dir)).graded
    with pytest.raises(ValueError, match=r"`margin` \(\(0.3, 0.1\)\) must be two similarities"):
        TextVideoAlignment(str(tiny_clip_dir), margin=(0.3, 0.1))


def test_backbone_paths_resolve_to_one_shared_object(tiny_clip_dir):
    first = TextVideoAlignment(str(tiny_clip_dir))
    second = TextVideoAlignment(tiny_clip_dir)
    assert first.backbone is second.backbone
    assert resolve_backbone(first.backbone) is first.backbone
    assert "backbone" not in "".join(first.state_dict())  # frozen weights stay out of checkpoints
    with pytest.raises(FileNotFoundError, match="is not a directory; point it at a local model"):
        resolve_backbone(tiny_clip_dir / "missing")


def test_backbone_preprocess_resizes_crops_and_normalizes(tiny_clip_dir):
    backbone = Backbone(str(tiny_clip_dir), image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    frames = torch.zeros(1, 3, 64, 128)
    frames[..., 16:112] = 1.0  # white around the centre square, black at the far sides
    out = backbone.preprocess(frames)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def test_text_needs_a_text_tower_and_a_tokenizer(tiny_clip_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(tiny_clip_dir))
    with pytest.raises(ValueError, match="text embeddings need a tokenizer"):
        Backbone(clip).embed_text(["a"])
    with pytest.raises(TypeError, match="has no text tower"):
        Backbone(clip.vision_model).embed_text(["a"])
    assert Backbone(clip.vision_model).embed_images(torch.rand(2, 3, 32, 32)).shape == (2, 32)


class TinyVideoAlign(VideoJudge):
    """A VideoAlign-shaped judge: pooled pixel features -> three linear heads (VQ, MQ, TA)."""

    heads = ("VQ", "MQ", "TA")

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.calls = 0

    def judge(self, videos, prompts):
        self.calls += 1
        out = self.proj(videos.mean(dim=(1, 3, 4)))
        return {"VQ": out[:, 0], "MQ": out[:, 1], "TA": out[:, 2] + torch.tensor([len(p) for p in prompts])}


def test_judge_reward_reads_one_head():
    judge = TinyVideoAlign()
    videos = torch.rand(2, 3, 3, 4, 4)
    expected = judge.proj(videos.mean(dim=(1, 3, 4)))
    reward = JudgeReward(judge, "MQ", aspect="temporal", higher_is_better=False)
    assert reward.aspect == "temporal" and not reward.higher_is_better
    torch.testing.assert_close(reward(videos, ["a", "bb"]), expected[:, 1].detach())
    ta = JudgeReward(judge, "TA", aspect="semantic")(videos, ["a", "bb"])
    torch.testing.assert_close(ta, expected[:, 2].detach() + torch.tensor([1.0, 2.0]))


def test_judge_errors():
    with pytest.raises(ValueError, match="`head` \\('XX'\\) must be one of the judge's heads \\['VQ', 'MQ', 'TA'\\]"):
        JudgeReward(TinyVideoAlign(), "XX", aspect="fidelity")
    with pytest.raises(ValueError, match="`aspect` \\('style'\\) must be one of"):
        JudgeReward(TinyVideoAlign(), "VQ", aspect="style")
    with pytest.raises(ValueError, match="`heads` must name at least one score"):
        CallableJudge(lambda v, p: {}, heads=[])
    broken = CallableJudge(lambda v, p: {"TA": torch.zeros(3)}, heads=["TA"])
    with pytest.raises(RuntimeError, match="must return a \\(2,\\) tensor for head 'TA', got \\(3,\\)"):
        JudgeReward(broken, "TA", aspect="semantic")(torch.rand(2, 2, 3, 4, 4), ["a", "b"])
