import math

import pytest
import torch

from sp_grpo.policies.diffusers_helpers import build_pipeline, unpack_text
from sp_grpo.policies.ltx import (
    LTXVideoPolicy,
    pack_latents,
    save_ltx_folder,
    sequence_shift,
    tiny_ltx_components,
    unpack_latents,
)
from sp_grpo.policies.protocol import VideoPolicy
from sp_grpo.rollout import DenoisingConfig, sample_ode

TINY = {"max_sequence_length": 16, "torch_dtype": "float32"}


def make_policy(seed=0, components=None, **kwargs):
    return LTXVideoPolicy(components=components or tiny_ltx_components(seed), **{**TINY, **kwargs})


def make_pipeline(components):
    from diffusers import LTXPipeline

    pipe = build_pipeline(LTXPipeline, components)
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


def test_latent_packing_matches_the_pipeline_and_round_trips():
    from diffusers import LTXPipeline

    x = torch.randn(2, 8, 4, 6, 4)
    for p, p_t in ((1, 1), (2, 2)):
        packed = pack_latents(x, p, p_t)
        torch.testing.assert_close(packed, LTXPipeline._pack_latents(x, p, p_t), rtol=0, atol=0)
        assert torch.equal(unpack_latents(packed, 4, 6, 4, p, p_t), x)
    # Token order is frame-major: token (f, h, w) sits at f * H * W + h * W + w.
    tokens = pack_latents(x)
    assert torch.equal(tokens[1, 2 * 24 + 3 * 4 + 1], x[1, :, 2, 3, 1])


def test_prompt_encoding_matches_ltx_pipeline():
    """Independent reference: diffusers' own LTXPipeline.encode_prompt on the same components."""
    components = tiny_ltx_components(0)
    policy = make_policy(components=components, lora_rank=None, negative_prompt="blurry low quality")
    pipe = make_pipeline(components)
    prompts = ["a red square moving left", "a blue circle"]
    cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(
        prompts, negative_prompt="blurry low quality", do_classifier_free_guidance=True, max_sequence_length=16, device=torch.device("cpu")
    )
    ours = policy.encode_prompts(prompts, guidance=True)
    for rows, embeds, mask in ((ours.cond, cond, cond_mask), (ours.uncond, uncond, uncond_mask)):
        tokens, our_mask, pooled = unpack_text(rows)
        torch.testing.assert_close(tokens, embeds)
        torch.testing.assert_close(our_mask, mask.float())
        assert pooled is None
    assert policy.encode_prompts(prompts, guidance=False).uncond is None


def test_batched_guidance_matches_the_raw_transformer(policy):
    """Reference: the transformer on packed latents as LTXPipeline calls it, guidance written out."""
    perturb(policy.trainable_parameters())
    embeds = policy.encode_prompts(["a red square", "a blue circle"], guidance=True)
    x = torch.randn(2, *policy.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])

    def raw(rows):
        tokens, mask, _ = unpack_text(rows)
        out = policy.transformer(
            hidden_states=x.permute(0, 2, 3, 4, 1).reshape(2, -1, 8), encoder_hidden_states=tokens, timestep=sigma * 1000,
            encoder_attention_mask=mask, num_frames=3, height=8, width=8, rope_interpolation_scale=(4 / 25, 4, 4), return_dict=False,
        )[0]
        return out.reshape(2, 3, 8, 8, 8).permute(0, 4, 1, 2, 3)

    expected = raw(embeds.uncond) + 3.0 * (raw(embeds.cond) - raw(embeds.uncond))
    with torch.no_grad():
        policy.cfg_batched = True
        batched = policy.velocity(x, sigma, embeds, 3.0)
        policy.cfg_batched = False
        separate = policy.velocity(x, sigma, embeds, 3.0)
        policy.cfg_batched = True
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-5)


def test_ode_sampling_matches_ltx_pipeline():
    """Independent reference: LTXPipeline (Euler, batched CFG, sequence-length shift) on the same noise."""
    components = tiny_ltx_components(0)
    policy = make_policy(components=components, lora_rank=None)
    pipe = make_pipeline(components)
    config = DenoisingConfig(num_steps=3, guidance_scale=3.0, num_frames=9, height=32, width=32)
    ours = sample_ode(policy, ["a red square moving left"], config, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((1, *policy.latent_shape(9, 32, 32)), generator=torch.Generator().manual_seed(0))
    theirs = pipe(
        "a red square moving left", negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=3,
        guidance_scale=3.0, latents=pack_latents(noise), max_sequence_length=16, output_type="pt",
    ).frames
    assert ours.shape == (1, 9, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_sigmas_use_the_sequence_length_shift():
    policy = make_policy(lora_rank=None)
    shape = (8, 3, 8, 8)
    n = 3 * 8 * 8
    mu = 0.95 + (2.05 - 0.95) * (n - 1024) / (4096 - 1024)
    assert sequence_shift(n, 1024, 4096, 0.95, 2.05) == pytest.approx(mu)
    # Exponential time shift, then the terminal stretch to 0.1, as LTX-Video's scheduler config says.
    u = torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.1))
    expected = torch.cat([stretched, torch.zeros(1, dtype=torch.float64)]).float()
    torch.testing.assert_close(policy.sigmas(3, latent_shape=shape), expected)
    with pytest.raises(RuntimeError, match="needs the latent shape"):
        policy.sigmas(3)


def test_sigmas_depend_only_on_their_arguments():
    policy = make_policy(lora_rank=None)
    shape = policy.latent_shape(9, 32, 32)
    before = policy.sigmas(3, latent_shape=shape)
    policy.latent_shape(17, 64, 64)  # another size asked for in between changes nothing
    assert torch.equal(policy.sigmas(3, latent_shape=shape), before)
    # Without the shape there is no schedule: not one left over from the last latent_shape call.
    with pytest.raises(RuntimeError, match="needs the latent shape"):
        policy.sigmas(3)


def test_lora_trains_only_adapters_and_reference_disables_them():
    policy = make_policy(lora_rank=4)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    base = make_policy(lora_rank=None)
    perturb(policy.trainable_parameters())
    embeds = policy.encode_prompts(["a red square"], guidance=False)
    x, sigma = torch.randn(1, *policy.latent_shape(9, 32, 32)), torch.tensor([0.7])
    with torch.no_grad():
        adapted = policy.velocity(x, sigma, embeds, 1.0)
        with policy.reference():
            reference = policy.velocity(x, sigma, embeds, 1.0)
        expected = base.velocity(x, sigma, embeds, 1.0)
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, reference)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = make_policy(lora_rank=4, gradient_checkpointing=checkpointing)
        perturb(policy.trainable_parameters())
        policy.train()
        assert not policy.text_encoder.training and not policy.vae.training
        embeds = policy.encode_prompts(["a red square"], guidance=True)
        x = torch.randn(2, *policy.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.8, 0.3]), embeds.repeat_interleave(2), 2.0).square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_decode_denormalises_and_chunks(policy):
    latents = torch.randn(3, *policy.latent_shape(9, 32, 16), generator=torch.Generator().manual_seed(0))
    videos = policy.decode(latents)
    assert videos.shape == (3, 9, 3, 32, 16)
    vae = policy.vae
    z = latents * vae.latents_std.view(1, -1, 1, 1, 1) / vae.config.scaling_factor + vae.latents_mean.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        raw = vae.decode(z, None).sample
    torch.testing.assert_close(videos, ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))
    policy.decode_chunk_size = 2
    chunked = policy.decode(latents)
    policy.decode_chunk_size = None
    torch.testing.assert_close(chunked, videos, atol=1e-5, rtol=1e-5)


def timestep_conditioned_policy(**kwargs):
    """The tiny LTX-Video with a timestep-conditioned VAE (LTX-Video 0.9.1+), which mixes noise in when decoding."""
    from diffusers import AutoencoderKLLTXVideo

    components = tiny_ltx_components(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components.vae = AutoencoderKLLTXVideo(**{**components.vae.config, "timestep_conditioning": True})
    return make_policy(components=components, lora_rank=None, decode_timestep=0.05, **kwargs)


def test_decode_noise_comes_from_the_generator_not_the_global_rng():
    policy = timestep_conditioned_policy(decode_noise_scale=0.5)
    latents = torch.randn(2, *policy.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = policy.decode(latents, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    second = policy.decode(latents, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert not torch.equal(first, policy.decode(latents, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match="pass `generator`"):
        policy.decode(latents)
    # Sampling from a seed gives the same videos whatever the global RNG's state.
    config = DenoisingConfig(num_steps=2, guidance_scale=1.0, num_frames=9, height=32, width=32)
    videos = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        videos.append(sample_ode(policy, ["a red square"], config, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(*videos)


@pytest.mark.parametrize("frames, height, width, match", [(8, 32, 32, "num_frames"), (9, 18, 32, "height"), (9, 32, 2, "width")])
def test_latent_shape_errors(policy, frames, height, width, match):
    with pytest.raises(ValueError, match=match):
        policy.latent_shape(frames, height, width)


def test_loads_a_local_diffusers_folder(tmp_path):
    save_ltx_folder(tiny_ltx_components(0), tmp_path / "ltx")
    loaded = LTXVideoPolicy(str(tmp_path / "ltx"), lora_rank=4, **TINY)
    built = make_policy(lora_rank=4)
    assert loaded.scheduler.config.use_dynamic_shifting
    embeds = built.encode_prompts(["a red square moving left"], guidance=True)
    torch.testing.assert_close(loaded.encode_prompts(["a red square moving left"], guidance=True).cond, embeds.cond)
    x, sigma = torch.randn(1, *built.latent_shape(9, 32, 32)), torch.tensor([0.6])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, embeds, 2.0), built.velocity(x, sigma, embeds, 2.0))


def test_bad_paths_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path.*does not exist"):
        LTXVideoPolicy(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers LTX-Video folder.*model_index.json"):
        LTXVideoPolicy(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs weights"):
        LTXVideoPolicy()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"frame_rate": 0}, "frame_rate"),
        ({"decode_timestep": -1.0}, "decode_timestep"),
        ({"decode_noise_scale": 2.0}, "decode_noise_scale"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_policy(**kwargs)
