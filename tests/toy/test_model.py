import copy

import pytest
import torch

from sp_grpo.policies.wan import WanPolicy
from sp_grpo.rollout import sample_ode
from sp_grpo.toy.gold import gold_summary
from sp_grpo.toy.model import CHECKPOINT_DIR, ShapesWanPolicy, shapes_wan_components
from sp_grpo.toy.pretrain import EVAL_SAMPLER
from sp_grpo.toy.world import prompts_for_split


def test_shipped_checkpoint_loads_offline_and_is_partly_competent():
    assert sum(f.stat().st_size for f in CHECKPOINT_DIR.rglob("*") if f.is_file()) < 4 * 2**20  # a few MB at most
    policy = ShapesWanPolicy(lora_rank=None)
    prompts = prompts_for_split("test") * 2
    videos = sample_ode(policy, prompts, EVAL_SAMPLER, generator=torch.Generator().manual_seed(0))
    gold = gold_summary(videos, prompts)
    # Chance is 1/4 per attribute and 1/64 for all three.
    assert gold["colour_acc"] > 0.5
    assert gold["shape_acc"] > 0.3 and gold["direction_acc"] > 0.4
    assert 0.05 < gold["all_correct"] < 0.9


def test_absolute_positions_break_translation_symmetry_and_survive_deepcopy():
    policy = WanPolicy(components=shapes_wan_components(), lora_rank=None, reference_copy=True)
    copy_ = copy.deepcopy(policy.transformer)
    copy_.absolute_position.data.zero_()
    x = torch.randn(1, 3, 4, 16, 16)
    embeds = policy.encode_prompts(["a red x moving left"], guidance=False)
    own = policy.velocity(x, torch.tensor([0.5]), embeds, 1.0)
    with torch.no_grad():
        policy.reference_transformer.absolute_position.data.zero_()
        with policy.reference():
            ref = policy.velocity(x, torch.tensor([0.5]), embeds, 1.0)
    assert not torch.allclose(own, ref)  # the copy's hook uses the copy's (zeroed) embedding


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="pre-train one with `python -m sp_grpo.toy.pretrain"):
        ShapesWanPolicy(str(tmp_path))
