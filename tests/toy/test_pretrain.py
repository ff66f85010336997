import json

import torch

from sp_grpo.policies.wan import WanPolicy
from sp_grpo.toy.model import ShapesWanPolicy, shapes_wan_components
from sp_grpo.toy.pretrain import candidates, main, videos_to_latents
from sp_grpo.toy.world import render


def test_latents_are_the_inverse_of_pixel_space_decode():
    policy = WanPolicy(components=shapes_wan_components(), lora_rank=None)
    video = render("a blue plus moving down", 0)[None]
    assert torch.allclose(policy.decode(videos_to_latents(video)), video)


def test_pretrain_writes_a_loadable_checkpoint_and_log(tmp_path):
    main(["--out", str(tmp_path), "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-seeds", "1"])
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert record["step"] == 2 and set(record) >= {"loss", "val", "test", "train"}
    ShapesWanPolicy(str(tmp_path / "step_000002"), lora_rank=None)
    assert candidates(tmp_path, 0.0, 1.0) == [tmp_path / "step_000002"]
