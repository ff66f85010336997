"""VideoAlignJudge on a tiny random Qwen2-VL and a checkpoint written in VideoReward's released layout.

The layout, as VideoAlign's training code writes it (transformers 4.45, peft): ``model_config.json``
and ``checkpoint-<step>/`` with a PEFT LoRA adapter (``adapter_config.json``,
``adapter_model.safetensors``) and ``non_lora_state_dict.pth`` (trainable parameters outside LoRA,
named as the ``PeftModel`` names them), all under transformers 4.45's parameter names (``model.*``
for the language model, ``visual.*`` for the vision tower). The reference scores come from peft's own
(unmerged) LoRA model; the judge merges the adapter into transformers 5's Qwen2-VL itself.
"""

import json
import shutil

import pytest
import torch
from torch import nn

from sp_grpo.rewards import JudgeReward, RewardSet
from sp_grpo.rewards.videoalign import VIDEOALIGN_TOKENS, VideoAlignJudge
from sp_grpo.rewards.vlm_loading import load_frozen_vlm
from tests.rewards.conftest import build_tiny_qwen2_vl

TEMPLATE = "Rate the video of {prompt} . quality : <|VQ_reward|> motion : <|MQ_reward|> text : <|TA_reward|>"
STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
PROMPTS = ["a red ball", "a dog", "a blue cat video"]


def videos(n=3, frames=6, size=32, seed=0):
    return torch.rand(n, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def released_name(name):
    """transformers 5's parameter name as transformers 4.45 wrote it (the release's names)."""
    return name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


@pytest.fixture(scope="module")
def videoreward(tmp_path_factory):
    """(base folder, VideoReward folder, the peft model that wrote it) for a tiny Qwen2-VL."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    base = build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl_base"))
    vlm = load_frozen_vlm(base, "float32", shared=False)
    model, tokenizer = vlm.model, vlm.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEOALIGN_TOKENS)})
    model.resize_token_embeddings(len(tokenizer))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained reward-token embeddings, as the release stores them
        model.get_input_embeddings().weight[-3:] = torch.randn(3, 32, generator=g)
    model.rm_head = nn.Linear(32, 1, bias=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B (or the embedding's A) at zero: give every update a value
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
        peft_model.base_model.model.rm_head.weight.copy_(torch.randn(1, 32, generator=g))
    peft_model.base_model.model.rm_head.requires_grad_(True)
    peft_model.get_input_embeddings().weight.requires_grad_(True)

    folder = tmp_path_factory.mktemp("VideoReward")
    (folder / "model_config.json").write_text(json.dumps({
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "use_special_tokens": True},
        "data_config": {"max_frame_pixels": 32 * 32, "fps": 2.0, "prompt_template_type": "detailed_special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
        "inference_config": STATS,
    }))
    (folder / "checkpoint-2").mkdir()  # an older step, without weights: the loader takes the highest
    weights = folder / "checkpoint-7"
    weights.mkdir()
    adapter = {released_name(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(adapter, weights / "adapter_model.safetensors")
    (weights / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False}))
    non_lora = {released_name(k): v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad and "lora_" not in k}
    assert set(non_lora) == {"base_model.model.rm_head.weight", "base_model.model.model.embed_tokens.base_layer.weight"}
    torch.save(non_lora, weights / "non_lora_state_dict.pth")
    return base, folder, peft_model


def reference(judge, peft_model, clips, prompts):
    """Raw rewards from peft's unmerged model on the judge's own inputs, (B, 3)."""
    patched = judge.video_inputs(clips)
    sequences = [judge.chat_ids(TEMPLATE.replace("{prompt}", p), patched[b][1]) for b, p in enumerate(prompts)]
    inputs = judge.model_inputs(sequences, patched)
    inner = peft_model.base_model.model
    with torch.no_grad():
        hidden = inner.model(**inputs).last_hidden_state
    ids = [judge.vlm.tokenizer.convert_tokens_to_ids(t) for t in VIDEOALIGN_TOKENS]
    return torch.stack([inner.rm_head(hidden[inputs["input_ids"] == i])[:, 0] for i in ids], dim=1)


def test_videoalign_checkpoint_loads_and_scores_three_heads(videoreward):
    base, folder, peft_model = videoreward
    judge = VideoAlignJudge(str(folder), str(base), TEMPLATE, num_frames=4, dtype="float32")
    clips = videos(seed=3)
    out = judge(clips, PROMPTS)
    assert judge.heads == ("VQ", "MQ", "TA") and judge.max_pixels == 32 * 32  # from data_config
    raw = reference(judge, peft_model, clips, PROMPTS)
    for h, head in enumerate(judge.heads):
        expected = (raw[:, h] - STATS[f"{head}_mean"]) / STATS[f"{head}_std"]
        # fp32; merged LoRA weights vs peft's separate low-rank path: rounding only.
        torch.testing.assert_close(out[head], expected, atol=1e-4, rtol=1e-4)
    unnormalized = VideoAlignJudge(str(folder), str(base), TEMPLATE, num_frames=4, dtype="float32", normalize=False)
    torch.testing.assert_close(unnormalized(clips, PROMPTS)["TA"], raw[:, 2], atol=1e-4, rtol=1e-4)


def test_videoalign_batching_heads_and_checkpoint_state(videoreward):
    base, folder, _ = videoreward
    clips = videos(seed=4)
    judges = [VideoAlignJudge(str(folder), str(base), TEMPLATE, num_frames=4, dtype="float32", batch_size=2) for _ in range(3)]
    assert judges[0].vlm is judges[1].vlm  # three YAML blocks load the model once
    rewards = RewardSet({
        "vq": JudgeReward(judges[0], "VQ", aspect="fidelity"),
        "mq": JudgeReward(judges[1], "MQ", aspect="temporal"),
        "ta": JudgeReward(judges[2], "TA", aspect="semantic"),
    })
    out = rewards(clips, PROMPTS)
    alone = VideoAlignJudge(str(folder), str(base), TEMPLATE, num_frames=4, dtype="float32", batch_size=1)
    for name, head in (("vq", "VQ"), ("mq", "MQ"), ("ta", "TA")):
        single = torch.cat([alone(clips[i : i + 1], [p])[head] for i, p in enumerate(PROMPTS)])
        torch.testing.assert_close(out.per_reward[name], single, atol=1e-5, rtol=0)
    assert not any("rm_head" in key or "judge" in key for key in rewards.state_dict())
    assert not list(rewards.parameters())


def test_videoalign_errors_name_the_fix(videoreward, tmp_path):
    base, folder, _ = videoreward
    with pytest.raises(ValueError, match=r"`prompt_template` must hold each of \['<\|TA_reward\|>'\] exactly once"):
        VideoAlignJudge(str(folder), str(base), "Rate {prompt}: <|VQ_reward|> <|MQ_reward|>")
    with pytest.raises(FileNotFoundError, match="model_config.json.*not found; `checkpoint` must be the VideoReward folder"):
        VideoAlignJudge(str(tmp_path), str(base), TEMPLATE)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-5 in .* \(found \[2, 7\]\)"):
        VideoAlignJudge(str(folder), str(base), TEMPLATE, step=5)
    # A checkpoint with a weight the base model lacks (another model's layers): refused, naming the setting.
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    state = torch.load(odd / "checkpoint-7" / "non_lora_state_dict.pth", weights_only=True)
    state["base_model.model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(64, 32)
    torch.save(state, odd / "checkpoint-7" / "non_lora_state_dict.pth")
    with pytest.raises(ValueError, match=r"1 checkpoint weights have no place in .*model\.layers\.9\.mlp.*`base_model` must be"):
        VideoAlignJudge(str(odd), str(base), TEMPLATE)
