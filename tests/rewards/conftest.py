"""A tiny CLIP built offline, trained for a few steps to tell colours apart, saved to disk."""

import json

import pytest
import torch

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 1.0)}
WORDS = ["a", "video", "of", "the", "ball", "red", "green", "blue", "yellow", "dog", "cat"]


def colour_video(rgb, frames=4, size=32, seed=0):
    """A noisy video of one colour, (T, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(rgb).view(1, 3, 1, 1).expand(frames, 3, size, size)
    return (base + 0.1 * torch.randn(frames, 3, size, size, generator=g)).clamp(0, 1)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in WORDS:
        vocab[word] = len(vocab)
    vocab["[BOS]"] = len(vocab)
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from sp_grpo.rewards.backbones import Backbone

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    backbone = Backbone(model, tokenizer)
    prompts = [f"a {name} ball" for name in COLOURS]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    model.train().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(40):  # contrastive training: each colour video with its own prompt
        frames = torch.stack([colour_video(rgb, frames=1, seed=step)[0] for rgb in COLOURS.values()])
        out = model(**tokens, pixel_values=backbone.preprocess(frames), return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def colour_batch():
    """Three held-out colour videos (3, T, 3, 32, 32) and their colour names, in the same order."""
    return torch.stack([colour_video(rgb, seed=123) for rgb in COLOURS.values()]), list(COLOURS)


# A tiny random Qwen2.5-VL chat judge, built offline and saved like a hub folder.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
QWEN_WORDS = ["Yes", "No", "yes", "no", "system", "user", "assistant", "You", "are", "a", "helpful", "video", "Is", "Does",
              "this", "show", "sharp", "smooth", "motion", "quality", "?", ".", ":", ",", '"', "Answer", "or", *WORDS]


def build_qwen_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for word in QWEN_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return fast


def build_tiny_qwen_vl(path, tokenizer=None):
    """Save a random Qwen2.5-VL (2 text + 2 vision layers, width 32), its tokenizer and processor settings."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tokenizer = build_qwen_tokenizer() if tokenizer is None else tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, window_size=16, out_hidden_size=32, fullatt_block_indexes=[1], tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The image processor's limits differ from the video processor's, as in Qwen's hub folders: the judge reads video's.
    Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64).save_pretrained(path)
    save_video_processor_config(path, min_pixels=8 * 8, max_pixels=32 * 32)  # frames of 16-32 px: factor 8
    return path


def save_video_processor_config(path, min_pixels, max_pixels):
    """Write video_preprocessor_config.json as `Qwen2VLVideoProcessor.save_pretrained` does (it needs torchvision)."""
    config = {
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": 4, "merge_size": 2,
        "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True, "do_normalize": True,
    }
    (path / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def tiny_qwen_vl_dir(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"))


def build_tiny_qwen2_vl(path):
    """Save a random Qwen2-VL (VideoAlign's base family; no `second_per_grid_ts`), its tokenizer and video settings."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = build_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=4, spatial_merge_size=2),
        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_video_processor_config(path, min_pixels=8 * 8, max_pixels=32 * 32)
    return path
