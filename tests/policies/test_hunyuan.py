import pytest
import torch

from sp_grpo.policies.diffusers_helpers import build_pipeline, pack_text, unpack_text
from sp_grpo.policies.hunyuan import (
    TINY_CROP_START,
    TINY_PROMPT_TEMPLATE,
    HunyuanVideoPolicy,
    save_hunyuan_folder,
    tiny_hunyuan_components,
)
from sp_grpo.policies.protocol import PromptEmbeds, VideoPolicy
from sp_grpo.rollout import DenoisingConfig, sample_ode

TINY = {"prompt_template": TINY_PROMPT_TEMPLATE, "template_crop_start": TINY_CROP_START, "max_sequence_length": 16, "torch_dtype": "float32"}


def make_policy(seed=0, components=None, **kwargs):
    return HunyuanVideoPolicy(components=components or tiny_hunyuan_components(seed), **{**TINY, **kwargs})


def make_pipeline(components):
    from diffusers import HunyuanVideoPipeline

    pipe = build_pipeline(HunyuanVideoPipeline, components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb(params, scale=0.1):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def policy():
    return make_policy(lora_rank=4)


def test_is_a_video_policy(policy):
    assert isinstance(policy, VideoPolicy)


def test_state_dict_holds_only_trainable_weights(policy):
    keys = list(policy.state_dict())
    assert keys and all("lora_" in k for k in keys)


def test_pack_text_round_trip():
    tokens, mask, pooled = torch.randn(2, 5, 6), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]), torch.randn(2, 4)
    packed = pack_text(tokens, mask, pooled)
    assert packed.shape == (2, 6, 7)
    t, m, p = unpack_text(packed, 4)
    assert torch.equal(t, tokens) and torch.equal(m, mask.float()) and torch.equal(p, pooled)
    t, m, p = unpack_text(pack_text(tokens, mask))
    assert torch.equal(t, tokens) and p is None
    with pytest.raises(ValueError, match="must not be wider"):
        pack_text(tokens, mask, torch.randn(2, 7))


def test_prompt_encoding_matches_hunyuan_pipeline():
    """Independent reference: diffusers' own HunyuanVideoPipeline.encode_prompt on the same components."""
    components = tiny_hunyuan_components(0)
    policy = make_policy(components=components, lora_rank=None, negative_prompt="blurry low quality")
    pipe = make_pipeline(components)
    prompts = ["a red square moving left", "a blue circle"]
    template = {"template": TINY_PROMPT_TEMPLATE, "crop_start": TINY_CROP_START}
    ours = policy.encode_prompts(prompts, guidance=True)
    for rows, texts in ((ours.cond, prompts), (ours.uncond, ["blurry low quality"] * 2)):
        embeds, pooled, mask = pipe.encode_prompt(texts, prompt_template=template, max_sequence_length=16, device=torch.device("cpu"))
        tokens, our_mask, our_pooled = unpack_text(rows, 8)
        torch.testing.assert_close(tokens, embeds)
        torch.testing.assert_close(our_mask, mask.float())
        torch.testing.assert_close(our_pooled, pooled)
    assert policy.encode_prompts(prompts, guidance=False).uncond is None


def test_velocity_and_batched_guidance_match_the_raw_transformer(policy):
    """Reference: the transformer called as HunyuanVideoPipeline calls it, guidance written out."""
    perturb(policy.trainable_parameters())
    components = policy  # the policy holds the same modules the pipeline would
    embeds = policy.encode_prompts(["a red square", "a blue circle"], guidance=True)
    x = torch.randn(2, *policy.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])

    def raw(rows):
        tokens, mask, pooled = unpack_text(rows, 8)
        return components.transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=tokens, encoder_attention_mask=mask,
            pooled_projections=pooled, guidance=torch.full((2,), 6000.0), return_dict=False,
        )[0]

    expected = raw(embeds.uncond) + 3.0 * (raw(embeds.cond) - raw(embeds.uncond))
    with torch.no_grad():
        policy.cfg_batched = True
        batched = policy.velocity(x, sigma, embeds, 3.0)
        policy.cfg_batched = False
        separate = policy.velocity(x, sigma, embeds, 3.0)
        policy.cfg_batched = True
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(policy.velocity(x, sigma, embeds, 1.0), raw(embeds.cond), atol=1e-5, rtol=1e-5)


def test_ode_sampling_matches_hunyuan_pipeline():
    """Independent reference: HunyuanVideoPipeline (Euler, true CFG with a negative prompt) on the same noise."""
    components = tiny_hunyuan_components(0)
    policy = make_policy(components=components, lora_rank=None)
    pipe = make_pipeline(components)
    config = DenoisingConfig(num_steps=3, guidance_scale=2.0, num_frames=5, height=32, width=32)
    ours = sample_ode(policy, ["a red square moving left"], config, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((1, *policy.latent_shape(5, 32, 32)), generator=torch.Generator().manual_seed(0))
    theirs = pipe(
        "a red square moving left", negative_prompt="", height=32, width=32, num_frames=5, num_inference_steps=3,
        true_cfg_scale=2.0, guidance_scale=6.0, latents=noise, max_sequence_length=16, output_type="pt",
        prompt_template={"template": TINY_PROMPT_TEMPLATE, "crop_start": TINY_CROP_START},
    ).frames
    assert ours.shape == (1, 5, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_sigmas_follow_the_pipeline_schedule(policy):
    sigmas = policy.sigmas(4)
    shift = lambda u: 7 * u / (1 + 6 * u)  # noqa: E731
    expected = torch.tensor([shift(1.0), shift(0.75), shift(0.5), shift(0.25), 0.0])
    torch.testing.assert_close(sigmas, expected)


def test_lora_trains_only_adapters_and_reference_disables_them():
    policy = make_policy(lora_rank=4)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    base = make_policy(lora_rank=None)
    perturb(policy.trainable_parameters())
    embeds = policy.encode_prompts(["a red square"], guidance=False)
    x, sigma = torch.randn(1, *policy.latent_shape(5, 32, 32)), torch.tensor([0.7])
    with torch.no_grad():
        adapted = policy.velocity(x, sigma, embeds, 1.0)
        with policy.reference():
            reference = policy.velocity(x, sigma, embeds, 1.0)
        expected = base.velocity(x, sigma, embeds, 1.0)
        again = policy.velocity(x, sigma, embeds, 1.0)
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(again, adapted)


def test_full_finetuning_reference_copy():
    policy = make_policy(lora_rank=None)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    with pytest.raises(RuntimeError, match="reference_copy"):
        with policy.reference():
            pass
    copy = make_policy(lora_rank=None, reference_copy=True)
    perturb(copy.trainable_parameters(), 0.05)
    embeds = copy.encode_prompts(["a red square"], guidance=False)
    x, sigma = torch.randn(1, *copy.latent_shape(5, 32, 32)), torch.tensor([0.5])
    with torch.no_grad(), copy.reference():
        ref = copy.velocity(x, sigma, embeds, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(ref, make_policy(lora_rank=None).velocity(x, sigma, embeds, 1.0))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = make_policy(lora_rank=4, gradient_checkpointing=checkpointing)
        assert policy.transformer.gradient_checkpointing is checkpointing
        perturb(policy.trainable_parameters())
        policy.train()
        assert not policy.text_encoder.training and not policy.text_encoder_2.training and not policy.vae.training
        embeds = policy.encode_prompts(["a red square"], guidance=True)
        x = torch.randn(2, *policy.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.8, 0.3]), embeds.repeat_interleave(2), 2.0).square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_decode_matches_the_vae_and_chunks(policy):
    latents = torch.randn(3, *policy.latent_shape(5, 32, 16), generator=torch.Generator().manual_seed(0))
    videos = policy.decode(latents)
    assert videos.shape == (3, 5, 3, 32, 16)
    with torch.no_grad():
        raw = policy.vae.decode(latents / policy.vae.config.scaling_factor).sample
    torch.testing.assert_close(videos, ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))
    policy.decode_chunk_size = 2
    chunked = policy.decode(latents)
    policy.decode_chunk_size = None
    torch.testing.assert_close(chunked, videos, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames, height, width, match", [(6, 32, 32, "num_frames"), (5, 20, 32, "height"), (5, 32, 4, "width")])
def test_latent_shape_errors(policy, frames, height, width, match):
    with pytest.raises(ValueError, match=match):
        policy.latent_shape(frames, height, width)


def test_loads_a_local_diffusers_folder(tmp_path):
    components = tiny_hunyuan_components(0)
    save_hunyuan_folder(components, tmp_path / "hunyuan")
    loaded = HunyuanVideoPolicy(str(tmp_path / "hunyuan"), lora_rank=4, **TINY)
    built = make_policy(lora_rank=4)
    assert loaded.scheduler.config.shift == pytest.approx(7.0)
    embeds = built.encode_prompts(["a red square moving left"], guidance=True)
    torch.testing.assert_close(loaded.encode_prompts(["a red square moving left"], guidance=True).cond, embeds.cond)
    x, sigma = torch.randn(1, *built.latent_shape(5, 32, 32)), torch.tensor([0.6])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, embeds, 2.0), built.velocity(x, sigma, embeds, 2.0))


def test_a_folder_without_a_scheduler_needs_the_shift_set(tmp_path):
    import shutil

    save_hunyuan_folder(tiny_hunyuan_components(0, shift=5.0), tmp_path / "hunyuan")
    shutil.rmtree(tmp_path / "hunyuan" / "scheduler")
    # No silent fallback to a guessed shift: the error names the setting.
    with pytest.raises(ValueError, match=r"no scheduler/ folder.*`model.policy.init_args.shift`"):
        HunyuanVideoPolicy(str(tmp_path / "hunyuan"), lora_rank=4, **TINY)
    loaded = HunyuanVideoPolicy(str(tmp_path / "hunyuan"), lora_rank=4, shift=7.0, **TINY)
    assert loaded.scheduler.config.shift == pytest.approx(7.0)


def test_shift_overrides_the_folders_scheduler(tmp_path):
    save_hunyuan_folder(tiny_hunyuan_components(0), tmp_path / "hunyuan")
    loaded = HunyuanVideoPolicy(str(tmp_path / "hunyuan"), lora_rank=4, shift=3.0, **TINY)
    assert loaded.scheduler.config.shift == pytest.approx(3.0)


def test_bad_paths_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path.*does not exist"):
        HunyuanVideoPolicy(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers HunyuanVideo folder.*model_index.json"):
        HunyuanVideoPolicy(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs weights"):
        HunyuanVideoPolicy()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"decode_chunk_size": 0}, "decode_chunk_size"),
        ({"template_crop_start": -1}, "template_crop_start"),
        ({"prompt_template": "no slot"}, "prompt_template"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_policy(**kwargs)


def test_prompt_embeds_rows_survive_indexing(policy):
    """The rollout and the training step only repeat and index rows: packed text must survive that."""
    embeds = policy.encode_prompts(["a red square", "a blue circle"], guidance=True).repeat_interleave(2)
    picked = embeds.index(torch.tensor([3]))
    single = policy.encode_prompts(["a blue circle"], guidance=True)
    assert isinstance(picked, PromptEmbeds)
    torch.testing.assert_close(picked.cond, single.cond)
    torch.testing.assert_close(picked.uncond, single.uncond)
