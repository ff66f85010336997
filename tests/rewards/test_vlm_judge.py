"""QwenVLJudge on a tiny random Qwen2.5-VL saved to a folder and loaded through the local-folder path."""

import numpy as np
import pytest
import torch

from sp_grpo.functional.judges import (
    QWEN_VIDEO_MAX_PIXELS,
    QWEN_VIDEO_MIN_PIXELS,
    patchify_video,
    resize_for_patches,
    smart_size,
    yes_probability,
)
from sp_grpo.rewards import JudgeReward, RewardSet
from sp_grpo.rewards.vlm_judge import DEFAULT_QUESTIONS, QwenVLJudge
from tests.rewards.conftest import QWEN_SPECIAL, build_tiny_qwen2_vl, build_tiny_qwen_vl

PROMPTS = ["a red ball", "a dog", "a blue cat video"]


def videos(n=3, frames=6, size=32, seed=0):
    return torch.rand(n, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_yes_probability_is_softmax_restricted_to_yes_and_no():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1)) * 3
    probs = logits.softmax(-1)
    reference = (probs[:, 2] + probs[:, 7]) / (probs[:, 2] + probs[:, 7] + probs[:, 4])
    torch.testing.assert_close(yes_probability(logits, [2, 7], [4]), reference)
    assert yes_probability(logits.bfloat16(), [2, 7], [4]).dtype == torch.float32


@pytest.mark.parametrize("size", [(32, 32), (480, 832), (17, 250), (4000, 3000), (30, 30)])
def test_smart_size_matches_transformers(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    bounds = dict(factor=28, min_pixels=56 * 56, max_pixels=360 * 420)
    assert smart_size(*size, **bounds) == tuple(smart_resize(*size, **bounds))


def test_patches_match_the_transformers_image_processor():
    # An image is a video of `temporal_patch_size` identical frames: same patch layout, independent code.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=4096)
    frame = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(2))
    ref = processor(images=[frame.permute(1, 2, 0).numpy()], do_resize=False, do_rescale=False, return_tensors="pt")
    pixels = resize_for_patches(frame.expand(2, 3, 16, 24), 8, 64, 4096, processor.image_mean, processor.image_std)
    patches, grid = patchify_video(pixels, patch_size=4, merge_size=2, temporal_patch_size=2)
    assert grid == tuple(ref["image_grid_thw"][0].tolist()) == (1, 4, 6)
    torch.testing.assert_close(patches, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_resize_keeps_values_and_lands_on_the_patch_grid():
    frames = torch.rand(2, 5, 3, 20, 44, generator=torch.Generator().manual_seed(3))
    out = resize_for_patches(frames, 8, 64, 1024, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (2, 5, 3, *smart_size(20, 44, 8, 64, 1024)) and out.shape[-1] % 8 == 0
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_odd_frame_counts_repeat_the_last_frame():
    video = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    padded, grid = patchify_video(video, 4, 2, 2)
    even, _ = patchify_video(torch.cat([video, video[-1:]]), 4, 2, 2)
    assert grid == (2, 2, 2)
    assert torch.equal(padded, even)


def test_judge_loads_from_folder_and_scores_every_head(tiny_qwen_vl_dir):
    judge = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4)
    out = judge(videos(), PROMPTS)
    assert judge.heads == tuple(DEFAULT_QUESTIONS) == ("VQ", "MQ", "TA")
    assert set(out) == set(judge.heads)
    for scores in out.values():
        assert scores.shape == (3,) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    # Settings come from the saved preprocessor config and the model config.
    assert (judge.min_pixels, judge.max_pixels, judge.patch_size, judge.merge_size) == (64, 1024, 4, 2)


def test_batching_gives_the_same_scores_as_one_at_a_time(tiny_qwen_vl_dir):
    clips = videos(seed=5)
    prompts = ["a red ball", "a dog", "a blue cat video of a yellow dog"]  # different lengths: left padding differs
    together = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, batch_size=9)(clips, prompts)
    split = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, batch_size=2)(clips, prompts)
    alone = [QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, batch_size=1)(clips[i : i + 1], [p]) for i, p in enumerate(prompts)]
    for head in together:
        single = torch.cat([a[head] for a in alone])
        # fp32 on CPU: only the summation order of padded vs unpadded rows differs.
        torch.testing.assert_close(together[head], single, atol=1e-5, rtol=0)
        torch.testing.assert_close(split[head], single, atol=1e-5, rtol=0)


def test_scores_follow_the_video_and_only_the_alignment_head_reads_the_prompt(tiny_qwen_vl_dir):
    judge = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4)
    clip = videos(n=1, seed=6)
    first, second = judge(clip, ["a red ball"]), judge(clip, ["a yellow dog"])
    assert torch.equal(first["VQ"], second["VQ"]) and torch.equal(first["MQ"], second["MQ"])
    assert not torch.equal(first["TA"], second["TA"])
    other = judge(videos(n=1, seed=7), ["a red ball"])
    assert not torch.equal(first["VQ"], other["VQ"])


def test_frozen_judge_stays_out_of_checkpoints_and_runs_once_per_batch(tiny_qwen_vl_dir):
    # Three YAML-style judges from one folder: one model, one forward pass per chunk, no weights in the state.
    judges = [QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, batch_size=16) for _ in range(3)]
    assert judges[0].vlm is judges[1].vlm is judges[2].vlm
    rewards = RewardSet({
        "judge_vq": JudgeReward(judges[0], "VQ", aspect="fidelity"),
        "judge_mq": JudgeReward(judges[1], "MQ", aspect="temporal"),
        "judge_ta": JudgeReward(judges[2], "TA", aspect="semantic"),
    })
    model = judges[0].vlm.model
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        rewards.train()
        out = rewards(videos(n=2), PROMPTS[:2])
    finally:
        handle.remove()
    assert len(calls) == 1  # 2 videos x 3 questions in one chunk of 16
    assert set(rewards.state_dict()) == {"running_mean", "running_var", "num_updates"}
    assert not list(rewards.parameters())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    direct = judges[0](videos(n=2), PROMPTS[:2])
    torch.testing.assert_close(out.per_reward["judge_ta"], direct["TA"])


def test_custom_questions_become_heads(tiny_qwen_vl_dir):
    judge = QwenVLJudge(str(tiny_qwen_vl_dir), {"colour": "Is the {prompt} red?"}, num_frames=2, yes_tokens=["Yes", "yes"], no_tokens=["No", "no"])
    out = judge(videos(n=2, frames=3), ["ball", "dog"])
    assert list(out) == ["colour"] and out["colour"].shape == (2,)


def test_bad_settings_say_what_to_fix(tiny_qwen_vl_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        QwenVLJudge(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="yes_tokens entry 'Yes please' is 2 tokens"):
        QwenVLJudge(str(tiny_qwen_vl_dir), yes_tokens=["Yes please"])
    with pytest.raises(ValueError, match="`questions` is empty"):
        QwenVLJudge(str(tiny_qwen_vl_dir), {})
    with pytest.raises(ValueError, match="`dtype` \\('int8'\\) must be one of"):
        QwenVLJudge(str(tiny_qwen_vl_dir), dtype="int8")
    with pytest.raises(ValueError, match=r"`num_frames` \(5\) must be a multiple of the model's temporal patch size \(2\).*set `num_frames` to 4"):
        QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=5)
    with pytest.raises(ValueError, match=r"token ids \[\d+\] spell both a yes_tokens and a no_tokens word"):
        QwenVLJudge(str(tiny_qwen_vl_dir), yes_tokens=["Yes"], no_tokens=["No", "yes"])


def test_bfloat16_judge_stays_close_to_fp32(tiny_qwen_vl_dir):
    clip = videos(n=2, seed=8)
    fp32 = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, dtype="float32")(clip, PROMPTS[:2])
    bf16_judge = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, dtype="bfloat16")
    assert bf16_judge.vlm.dtype == torch.bfloat16
    bf16 = bf16_judge(clip, PROMPTS[:2])
    for head in fp32:
        assert np.allclose(bf16[head].numpy(), fp32[head].numpy(), atol=0.05)


def test_a_qwen2_vl_folder_works_too(tmp_path):
    # Qwen2-VL (VideoAlign's base) has no `second_per_grid_ts`; the judge leaves it out.
    build_tiny_qwen2_vl(tmp_path)
    clips = videos(n=2, frames=5, seed=10)
    together = QwenVLJudge(str(tmp_path), num_frames=4, min_pixels=64, max_pixels=1024)(clips, PROMPTS[:2])
    alone = QwenVLJudge(str(tmp_path), num_frames=4, min_pixels=64, max_pixels=1024, batch_size=1)(clips[1:], PROMPTS[1:2])
    for head, scores in together.items():
        assert scores.shape == (2,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
        torch.testing.assert_close(scores[1:], alone[head], atol=1e-5, rtol=0)


def hub_like_copy(folder, tmp_path):
    """The folder without its video processor config, as Qwen's hub folders ship (image processor only)."""
    copy = tmp_path / "hub_like"
    copy.mkdir()
    for item in folder.iterdir():
        if item.name != "video_preprocessor_config.json":
            (copy / item.name).symlink_to(item)
    return copy


def test_frames_take_the_video_processor_limits_not_the_image_ones(tiny_qwen_vl_dir, tmp_path):
    clip = videos(n=1, frames=6, size=48, seed=11)
    # Without a video config: Qwen's video defaults (128..768 tokens of 28x28 px per frame), not the
    # image processor's limits (64..64*64 px here). 48x48 (2304 px) grows to the smallest multiple of 8
    # above 128*28*28 px per frame.
    hub = QwenVLJudge(str(hub_like_copy(tiny_qwen_vl_dir, tmp_path)), num_frames=4)
    assert (hub.min_pixels, hub.max_pixels) == (QWEN_VIDEO_MIN_PIXELS, QWEN_VIDEO_MAX_PIXELS) == (100352, 602112)
    # With a video config: its limits, 8*8..32*32 pixels per frame: 48x48 shrinks to 32x32, i.e. 8x8
    # patches of 4 px, 4 frames in 2 temporal patches.
    (patches, grid), = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4).video_inputs(clip)
    assert grid == (2, 8, 8) and patches.shape == (2 * 8 * 8, 3 * 2 * 4 * 4)
    (patches, grid), = hub.video_inputs(clip)
    assert grid == (2, 80, 80) and patches.shape == (2 * 80 * 80, 3 * 2 * 4 * 4)
    assert QWEN_VIDEO_MIN_PIXELS <= (80 * 4) ** 2 <= QWEN_VIDEO_MAX_PIXELS


def test_frame_count_is_a_whole_number_of_temporal_patches(tiny_qwen_vl_dir):
    judge = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=8)
    assert judge.frame_indices(16) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert judge.frame_indices(5) == [0, 1, 3, 4]  # 5 frames: 4 of them, two whole temporal patches
    assert judge.frame_indices(1) == [0]  # shorter than one patch: the frame is repeated
    (_, grid), = judge.video_inputs(videos(n=1, frames=5))
    assert grid[0] == 2


def test_scores_sum_every_one_token_spelling_of_yes_and_no(tiny_qwen_vl_dir):
    judge = QwenVLJudge(str(tiny_qwen_vl_dir), {"q": "Is this a video?"}, num_frames=4)
    tokenizer = judge.vlm.tokenizer
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "yes", "No", "no")}
    # " Yes" is the same word-level token as "Yes" here: it counts once.
    assert judge.yes_ids == [ids["Yes"], ids["yes"]] and judge.no_ids == [ids["No"], ids["no"]]
    captured = []
    handle = judge.vlm.model.register_forward_hook(lambda module, args, out: captured.append(out.logits[:, -1]))
    try:
        scores = judge(videos(n=2, seed=12), ["a", "b"])["q"]
    finally:
        handle.remove()
    probs = captured[0].float().softmax(-1)
    yes, no = probs[:, ids["Yes"]] + probs[:, ids["yes"]], probs[:, ids["No"]] + probs[:, ids["no"]]
    torch.testing.assert_close(scores, yes / (yes + no))


def byte_level_tokenizer():
    """A byte-level BPE tokenizer whose only one-token answers are " Yes", " yes" and " No" (as after a space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "Y"), ("e", "s"), ("ĠY", "es"), ("Ġ", "y"), ("Ġy", "es"), ("Ġ", "N"), ("ĠN", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=QWEN_SPECIAL[0])
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return fast


def test_a_tokenizer_with_only_the_leading_space_spelling_still_scores(tmp_path):
    tokenizer = byte_level_tokenizer()
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) == 2  # "Y" + "es": not one token
    folder = build_tiny_qwen_vl(tmp_path / "bpe_qwen", tokenizer)
    judge = QwenVLJudge(str(folder), {"q": "Is this a video?"}, num_frames=2)
    one = {text: tokenizer.encode(text, add_special_tokens=False)[0] for text in (" Yes", " yes", " No")}
    assert judge.yes_ids == [one[" Yes"], one[" yes"]] and judge.no_ids == [one[" No"]]
    scores = judge(videos(n=2, frames=2, seed=13), ["a", "b"])["q"]
    assert torch.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
