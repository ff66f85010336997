import pytest
import torch

from sp_grpo.policies import PromptEmbeds, TinyWanPolicy, VideoPolicy, WanPolicy, save_wan_folder, tiny_wan_components
from sp_grpo.toy.pixel_vae import PixelSpaceVAE


@pytest.fixture(scope="module")
def policy():
    return TinyWanPolicy(seed=0)


def _perturb_lora(policy, scale=0.1):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_is_a_video_policy(policy):
    assert isinstance(policy, VideoPolicy)


def test_tiny_is_deterministic_in_its_seed():
    a, b, c = TinyWanPolicy(seed=3), TinyWanPolicy(seed=3), TinyWanPolicy(seed=4)
    sa, sb, sc = a.transformer.state_dict(), b.transformer.state_dict(), c.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora" not in k)


def test_prompt_encoding_matches_wan_pipeline():
    """Independent reference: diffusers' own WanPipeline.encode_prompt on the same components."""
    components = tiny_wan_components(0)
    policy = WanPolicy(components=components, lora_rank=None, max_sequence_length=16, negative_prompt="blurry low quality")
    pipe = components.pipeline()
    prompts = ["a red square moving left", "a  blue circle"]
    cond, uncond = pipe.encode_prompt(
        prompts, negative_prompt=["blurry low quality"] * 2, do_classifier_free_guidance=True, max_sequence_length=16, device=torch.device("cpu")
    )
    ours = policy.encode_prompts(prompts, guidance=True)
    torch.testing.assert_close(ours.cond, cond)
    torch.testing.assert_close(ours.uncond, uncond)
    assert policy.encode_prompts(prompts, guidance=False).uncond is None


def test_batched_guidance_equals_two_passes(policy):
    _perturb_lora(policy)
    embeds = policy.encode_prompts(["a red square", "a blue circle"], guidance=True)
    x = torch.randn(2, *policy.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    t = sigma * 1000
    raw = lambda text: policy.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731
    expected = raw(embeds.uncond) + 3.0 * (raw(embeds.cond) - raw(embeds.uncond))
    policy.cfg_batched = True
    batched = policy.velocity(x, sigma, embeds, 3.0)
    policy.cfg_batched = False
    separate = policy.velocity(x, sigma, embeds, 3.0)
    policy.cfg_batched = True
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.velocity(x, sigma, embeds, 1.0), raw(embeds.cond), atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_reference_disables_them():
    policy = TinyWanPolicy(seed=0, lora_rank=4)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    assert policy.has_reference
    base = TinyWanPolicy(seed=0, lora_rank=None)  # same weights, no adapter: the independent reference
    _perturb_lora(policy)
    embeds = policy.encode_prompts(["a red square"], guidance=False)
    x = torch.randn(1, *policy.latent_shape(5, 32, 32))
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        adapted = policy.velocity(x, sigma, embeds, 1.0)
        with policy.reference():
            reference = policy.velocity(x, sigma, embeds, 1.0)
        expected = base.velocity(x, sigma, embeds, 1.0)
        again = policy.velocity(x, sigma, embeds, 1.0)
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(again, adapted)  # the adapter is back on after the context


def test_full_finetuning_reference():
    policy = TinyWanPolicy(seed=0, lora_rank=None)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    assert not policy.has_reference
    with pytest.raises(RuntimeError, match="reference_copy"):
        with policy.reference():
            pass
    copy = WanPolicy(components=tiny_wan_components(0), lora_rank=None, reference_copy=True, max_sequence_length=16)
    assert copy.has_reference
    with torch.no_grad():
        for p in copy.transformer.parameters():
            p.add_(0.05)
    embeds = copy.encode_prompts(["a red square"], guidance=False)
    x, sigma = torch.randn(1, *copy.latent_shape(5, 32, 32)), torch.tensor([0.5])
    with torch.no_grad(), copy.reference():
        ref = copy.velocity(x, sigma, embeds, 1.0)
    torch.testing.assert_close(ref, TinyWanPolicy(seed=0, lora_rank=None).velocity(x, sigma, embeds, 1.0))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = TinyWanPolicy(seed=0, lora_rank=4, gradient_checkpointing=checkpointing)
        assert policy.transformer.gradient_checkpointing is checkpointing
        _perturb_lora(policy)
        policy.train()
        embeds = policy.encode_prompts(["a red square"], guidance=True)
        x = torch.randn(2, *policy.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.8, 0.3]), embeds.repeat_interleave(2), 2.0).square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_frozen_parts_stay_in_eval_mode(policy):
    policy.train()
    assert policy.transformer.training
    assert not policy.text_encoder.training and not policy.vae.training


def test_latent_shape_and_decode(policy):
    shape = policy.latent_shape(9, 64, 32)
    assert shape == (4, 3, 8, 4)
    videos = policy.decode(torch.randn(3, *shape))
    assert videos.shape == (3, 9, 3, 64, 32)
    assert videos.min() >= 0 and videos.max() <= 1
    latents = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    whole = policy.decode(latents)
    policy.decode_chunk_size = 2
    chunked = policy.decode(latents)
    policy.decode_chunk_size = None
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "frames, height, width, match",
    [(8, 32, 32, "num_frames"), (9, 20, 32, "height"), (9, 32, 8, "width")],
)
def test_latent_shape_errors(policy, frames, height, width, match):
    with pytest.raises(ValueError, match=match):
        policy.latent_shape(frames, height, width)


def test_sigmas_follow_the_scheduler(policy):
    sigmas = policy.sigmas(8)
    assert sigmas.shape == (9,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    # Flow shift s maps t to s t / (1 + (s - 1) t); the tiny model uses s = 3. diffusers spaces the
    # grid uniformly between 1 and the smallest shifted training sigma (t = 1/1000).
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    t = torch.linspace(1.0, shift(torch.tensor(1e-3)).item(), 8)
    torch.testing.assert_close(sigmas[:-1], shift(t), atol=1e-4, rtol=1e-4)


def test_loads_a_local_diffusers_folder(tmp_path):
    components = tiny_wan_components(0)
    save_wan_folder(components, tmp_path / "wan")
    loaded = WanPolicy(str(tmp_path / "wan"), lora_rank=4, max_sequence_length=16)
    built = TinyWanPolicy(seed=0, lora_rank=4)
    assert loaded.scheduler.config.shift == pytest.approx(3.0)
    embeds = built.encode_prompts(["a red square moving left"], guidance=True)
    torch.testing.assert_close(loaded.encode_prompts(["a red square moving left"], guidance=True).cond, embeds.cond)
    x, sigma = torch.randn(1, *built.latent_shape(5, 32, 32)), torch.tensor([0.6])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, embeds, 2.0), built.velocity(x, sigma, embeds, 2.0))


def test_bad_paths_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path.*does not exist"):
        WanPolicy(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers Wan folder.*model_index.json"):
        WanPolicy(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs weights"):
        WanPolicy()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"decode_chunk_size": 0}, "decode_chunk_size"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WanPolicy(components=tiny_wan_components(0), **kwargs)


def test_prompt_embeds_helpers():
    embeds = PromptEmbeds(torch.arange(6.0).view(2, 3, 1), torch.zeros(2, 3, 1))
    rep = embeds.repeat_interleave(2)
    assert rep.cond[:, 0, 0].tolist() == [0.0, 0.0, 3.0, 3.0]
    assert rep.index(torch.tensor([3])).cond[0, 0, 0] == 3.0


def test_pixel_space_with_the_identity_vae(tmp_path):
    components = tiny_wan_components(0, latent_channels=3)
    components.vae = PixelSpaceVAE()
    policy = WanPolicy(components=components, lora_rank=4, max_sequence_length=16)
    assert policy.latent_shape(4, 16, 16) == (3, 4, 16, 16)
    latents = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    video = policy.decode(latents)
    torch.testing.assert_close(video, ((latents + 1) / 2).permute(0, 2, 1, 3, 4))
    save_wan_folder(components, tmp_path / "pixels")
    loaded = WanPolicy(str(tmp_path / "pixels"), lora_rank=4, max_sequence_length=16)
    assert not (tmp_path / "pixels" / "vae").exists()  # diffusers knows it as no VAE
    assert isinstance(loaded.vae, PixelSpaceVAE) and loaded.latent_shape(4, 16, 16) == (3, 4, 16, 16)
    assert policy.state_dict().keys() == WanPolicy(components=tiny_wan_components(0, latent_channels=3), lora_rank=4).state_dict().keys()
