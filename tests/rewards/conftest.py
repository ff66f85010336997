"""A tiny CLIP built offline, trained for a few steps to tell colours apart, saved to disk."""

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
