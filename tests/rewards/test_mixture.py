import logging
from pathlib import Path

import pytest
import torch

from sp_grpo.rewards.backbones import Backbone
from sp_grpo.rewards.base import VideoReward
from sp_grpo.rewards.fidelity import NoiseLevel, Sharpness
from sp_grpo.rewards.judges import CallableJudge
from sp_grpo.rewards.mixture import RewardSet
from sp_grpo.rewards.semantic import ColorPromptAlignment, JudgeReward, TextVideoAlignment
from sp_grpo.rewards.temporal import DynamicDegree, FeatureConsistency, TemporalFlickering

# The judge configs need a Qwen folder or a running server; tests/rewards/test_judge_configs.py runs them.
JUDGE_CONFIGS = ("qwen_vl_judge.yaml", "judge_server.yaml")
CONFIGS = [
    c for c in sorted((Path(__file__).parents[2] / "configs" / "rewards").glob("*.yaml")) if c.name not in JUDGE_CONFIGS
]


class Constant(VideoReward):
    def __init__(self, values, aspect="fidelity", higher_is_better=True):
        object.__setattr__(self, "aspect", aspect)
        object.__setattr__(self, "higher_is_better", higher_is_better)
        super().__init__()
        self.values = torch.tensor(values)

    def score(self, videos, prompts):
        return self.values.clone()


def _videos(b=4):
    return torch.rand(b, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_per_aspect_is_weighted_mean_with_lower_is_better_negated_in_curriculum_order():
    rewards = RewardSet(
        {
            "c": Constant([0.5, 0.0], aspect="semantic"),
            "a": Constant([1.0, 2.0]),
            "b": Constant([3.0, 5.0], higher_is_better=False),
        },
        weights={"a": 3.0},
    )
    assert rewards.aspects == ["fidelity", "semantic"]
    out = rewards(_videos(2), ["x", "y"])
    assert out.per_reward["b"].tolist() == [3.0, 5.0]
    # fidelity: (3 * a - 1 * b) / 4
    assert out.per_aspect["fidelity"].tolist() == pytest.approx([(3 * 1 - 3) / 4, (3 * 2 - 5) / 4])
    assert out.per_aspect["semantic"].tolist() == [0.5, 0.0]
    assert list(out.per_aspect) == ["fidelity", "semantic"] and out.keep.all()


def test_running_normalization_in_training_mode_only():
    rewards = RewardSet({"a": Constant([1.0, 3.0])}, normalize=True, momentum=0.5)
    out = rewards(_videos(2), ["x", "y"])  # first batch: mean 2, var 1
    assert out.per_aspect["fidelity"].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert out.per_reward["a"].tolist() == [1.0, 3.0]  # raw
    rewards.rewards["a"].values = torch.tensor([5.0, 5.0])
    rewards(_videos(2), ["x", "y"])  # mean -> 2 + 0.5 * (5 - 2) = 3.5, var -> 1 + 0.5 * (0 - 1) = 0.5
    assert rewards.running_mean.item() == pytest.approx(3.5) and rewards.running_var.item() == pytest.approx(0.5)
    rewards.eval()
    out = rewards(_videos(2), ["x", "y"])
    assert rewards.running_mean.item() == pytest.approx(3.5)
    assert out.per_aspect["fidelity"].tolist() == pytest.approx([1.5 / 0.5**0.5] * 2, rel=1e-4)
    assert {"running_mean", "running_var", "num_updates"} <= set(rewards.state_dict())


def test_nonfinite_raises_naming_the_reward():
    rewards = RewardSet({"fine": Constant([1.0, 1.0]), "broken": Constant([1.0, float("nan")])})
    with pytest.raises(ValueError, match="reward 'broken' returned NaN or inf for samples \\[1\\]"):
        rewards(_videos(2), ["x", "y"])


def test_nonfinite_drops_the_group_with_a_warning(caplog):
    rewards = RewardSet(
        {"a": Constant([1.0, 2.0, 3.0, float("inf")]), "b": Constant([1.0] * 4, aspect="temporal")},
        on_nonfinite="drop_group",
    )
    with caplog.at_level(logging.WARNING):
        out = rewards(_videos(4), ["p", "p", "q", "q"], group_size=2)
    assert "reward 'a' returned NaN or inf for samples [3]; dropping groups [1]" in caplog.text
    assert out.keep.tolist() == [True, True, False, False]
    assert out.per_aspect["fidelity"].tolist() == [1.0, 2.0, 0.0, 0.0]
    assert out.per_aspect["temporal"].tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="on_nonfinite='drop_group' needs `group_size`"):
        rewards(_videos(4), ["p"] * 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rewards": {}}, ValueError, "`rewards` is empty"),
        ({"rewards": {"a": torch.nn.Identity()}}, TypeError, "reward 'a' is a Identity, expected a VideoReward"),
        ({"weights": {"z": 1.0}}, ValueError, "`weights` names unknown rewards \\['z'\\]; known rewards are \\['a'\\]"),
        ({"weights": {"a": -1.0}}, ValueError, "weight of 'a' \\(-1.0\\) must be non-negative"),
        ({"weights": {"a": 0.0}}, ValueError, "the weights of aspect 'fidelity' sum to zero"),
        ({"momentum": 0.0}, ValueError, "`momentum` \\(0.0\\) must be in \\(0, 1\\]"),
        ({"on_nonfinite": "ignore"}, ValueError, "`on_nonfinite` \\('ignore'\\) must be one of 'raise', 'drop_group'"),
    ],
)
def test_init_errors(kwargs, error, match):
    kwargs = {"rewards": {"a": Constant([1.0])}, **kwargs}
    with pytest.raises(error, match=match):
        RewardSet(**kwargs)


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="`group_size` \\(3\\) must be a positive divisor of the batch size \\(4\\)"):
        RewardSet({"a": Constant([1.0] * 4)})(_videos(4), ["x"] * 4, group_size=3)


def test_shared_backbone_runs_once_per_batch(tiny_clip_dir):
    backbone = Backbone(str(tiny_clip_dir))
    calls = {"vision": 0, "text": 0}
    backbone.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    backbone.model.text_model.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    rewards = RewardSet(
        {
            "consistency": FeatureConsistency(backbone, num_frames=4),
            "alignment": TextVideoAlignment(backbone, num_frames=4),
            "alignment_again": TextVideoAlignment(backbone, num_frames=4),
        }
    )
    videos = torch.rand(4, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red ball"] * 2 + ["a blue ball"] * 2
    out = rewards(videos, prompts)
    assert calls == {"vision": 1, "text": 1}
    torch.testing.assert_close(out.per_reward["alignment"], out.per_reward["alignment_again"])
    rewards(videos, prompts)  # the memo lives for one call only
    assert calls == {"vision": 2, "text": 2}


def test_judge_runs_once_for_all_its_heads():
    calls = []

    def judge_fn(videos, prompts):
        calls.append(len(prompts))
        mean = videos.mean(dim=(1, 2, 3, 4))
        return {"VQ": mean, "MQ": 1 - mean, "TA": mean * 2}

    judge = CallableJudge(judge_fn, heads=["VQ", "MQ", "TA"])
    rewards = RewardSet(
        {
            "vq": JudgeReward(judge, "VQ", aspect="fidelity"),
            "mq": JudgeReward(judge, "MQ", aspect="temporal"),
            "ta": JudgeReward(judge, "TA", aspect="semantic"),
        }
    )
    out = rewards(_videos(2), ["x", "y"])
    assert calls == [2]
    torch.testing.assert_close(out.per_aspect["semantic"], 2 * out.per_aspect["fidelity"])


def test_differently_subsampled_users_of_one_backbone_are_reported(tiny_clip_dir, caplog):
    backbone = Backbone(str(tiny_clip_dir))
    with caplog.at_level(logging.WARNING):
        RewardSet({"a": FeatureConsistency(backbone, num_frames=4), "b": TextVideoAlignment(backbone, num_frames=8)})
    assert "share Backbone but subsample frames differently" in caplog.text


def test_model_free_set_varies_with_video_and_prompt():
    rewards = RewardSet(
        {"sharp": Sharpness(), "noise": NoiseLevel(), "flicker": TemporalFlickering(), "dyn": DynamicDegree(), "colour": ColorPromptAlignment()}
    )
    red = torch.zeros(1, 4, 3, 8, 8)
    red[:, :, 0] = 1.0
    out = rewards(torch.cat([red, 1 - red]), ["a red box", "a red box"])
    assert out.per_aspect["semantic"][0] > out.per_aspect["semantic"][1]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_reward_configs_parse_as_reward_set(path, tiny_clip_dir, tmp_path):
    from jsonargparse import ArgumentParser

    torch.save({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    text = path.read_text().replace("/path/to/aesthetic_head.pth", str(tmp_path / "head.pth"))
    text = text.replace("/path/to/clip", str(tiny_clip_dir)).replace("/path/to/dinov2", str(tiny_clip_dir))
    config = tmp_path / path.name
    config.write_text(text)
    parser = ArgumentParser()
    parser.add_argument("--rewards", type=RewardSet, enable_path=True)
    rewards = parser.instantiate(parser.parse_args(["--rewards", str(config)])).rewards
    assert isinstance(rewards, RewardSet) and rewards.aspects == ["fidelity", "temporal", "semantic"]
    out = rewards(torch.rand(2, 4, 3, 32, 32), ["a red ball", "a blue ball"])
    assert all(torch.isfinite(v).all() for v in out.per_aspect.values())


def _normalize_on_rank(rank, init_file, out_dir):
    """One rank of the 2-process test: rank-specific scores; rank 1 drops every sample of its second batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rewards = RewardSet({"a": Constant([0.0] * 4), "b": Constant([0.0] * 4, aspect="temporal")},
                            normalize=True, momentum=0.5, on_nonfinite="drop_group")
        # Per batch, per rank: the scores of reward "a", then of reward "b".
        batches = [
            {0: ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]), 1: ([10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 7.0])},
            {0: ([2.0, 2.0, 4.0, 4.0], [1.0, 3.0, 1.0, 3.0]), 1: ([1.0, float("nan"), 1.0, float("nan")], [0.0, 1.0, 2.0, 3.0])},
        ]
        for batch in batches:
            a, b = batch[rank]
            rewards.rewards["a"].values, rewards.rewards["b"].values = torch.tensor(a), torch.tensor(b)
            out = rewards(_videos(4), ["p", "p", "q", "q"], group_size=2)
        torch.save({"mean": rewards.running_mean, "var": rewards.running_var, "per_aspect": out.per_aspect},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_running_statistics_are_pooled_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_normalize_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # Reference: one process that sees both ranks' kept samples of each batch.
    first = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 1.0, 1.0, 5.0, 5.0, 5.0, 7.0]])
    second = torch.tensor([[2.0, 2.0, 4.0, 4.0], [1.0, 3.0, 1.0, 3.0]])  # rank 1 dropped both its groups
    mean = 0.5 * first.mean(1) + 0.5 * second.mean(1)
    var = 0.5 * first.var(1, unbiased=False) + 0.5 * second.var(1, unbiased=False)
    for rank in ranks:
        torch.testing.assert_close(rank["mean"], mean)
        torch.testing.assert_close(rank["var"], var)
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"]) and torch.equal(ranks[0]["var"], ranks[1]["var"])
