"""RadSynthPipeline: shapes, ranges, determinism, batch invariance, save/load, SD layout, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.models.model_folder import load_pipeline, read_model_info
from generator.models.samplers import make_sampler


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p, _ = load_pipeline(tiny_model, device="cpu")
    return p


def test_shapes_and_range(pipe):
    out = pipe(["bright square", "dark field", "bright square"], seeds=[1, 2, 3], num_inference_steps=4)
    assert out.images.shape == (3, 16, 16) and out.images.dtype == np.float32
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    assert out.seeds == [1, 2, 3]
    assert pipe.resolution == 16


def test_same_seed_same_pixels_and_batch_invariance(pipe):
    a = pipe(["bright square", "dark field"], seeds=[7, 8], num_inference_steps=4).images
    b = pipe(["bright square", "dark field"], seeds=[7, 8], num_inference_steps=4).images
    np.testing.assert_array_equal(a, b)
    alone = pipe(["dark field"], seeds=[8], num_inference_steps=4).images
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)
    other = pipe(["dark field"], seeds=[9], num_inference_steps=4).images
    assert np.abs(other[0] - a[1]).max() > 1e-3


#: name -> (scheduler class, options the name must set). Written out here, not read from samplers.py,
#: so that a make_sampler that ignores its argument or drops an option fails.
EXPECTED_SAMPLERS = {
    "dpm": ("DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False,
             "timestep_spacing": "linspace"}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler",
              {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "use_karras_sigmas": False,
               "timestep_spacing": "linspace"}),
    "unipc-karras": ("UniPCMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "linspace"}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False, "timestep_spacing": "linspace"}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_small"}),
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def test_sampler_names_are_all_tested():
    from generator.models.samplers import SAMPLERS, Sampler

    assert sorted(map(str, Sampler)) == sorted(EXPECTED_SAMPLERS) == sorted(map(str, SAMPLERS))


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLERS))
def test_sampler_class_and_config(pipe, name):
    from generator.models.samplers import sampler_name

    cls_name, options = EXPECTED_SAMPLERS[name]
    sched = make_sampler(name, pipe.scheduler)
    assert type(sched).__name__ == cls_name
    assert {k: sched.config[k] for k in options} == options
    assert {k: sched.config[k] for k in SCHEDULE} == SCHEDULE  # the model's noise schedule is kept
    assert sampler_name(sched) == name
    # The name alone decides: built from any other sampler, the config is the same.
    for other in EXPECTED_SAMPLERS:
        again = make_sampler(name, make_sampler(other, pipe.scheduler))
        assert type(again) is type(sched) and dict(again.config) == dict(sched.config), other


def test_karras_sigmas_change_the_timesteps(pipe):
    plain, karras = make_sampler("dpm", pipe.scheduler), make_sampler("dpm++2m-karras", pipe.scheduler)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert len(plain.timesteps) == len(karras.timesteps) == 10
    assert int(plain.timesteps[0]) == int(karras.timesteps[0]) == 999  # both start from pure noise
    # Karras spends more steps at low noise: its last steps reach far smaller noise levels.
    assert int(karras.timesteps[-1]) < int(plain.timesteps[-1]) and int(karras.timesteps[-3]) < int(plain.timesteps[-3])
    assert float(karras.sigmas[-2]) < 0.2 * float(plain.sigmas[-2])


@pytest.fixture(scope="module")
def sampler_images(pipe):
    """name -> two runs of the same (prompts, seeds) at 4 steps in float32, and one image alone."""
    old = pipe.scheduler
    out = {}
    try:
        for name in EXPECTED_SAMPLERS:
            pipe.scheduler = make_sampler(name, old)
            kw = {"num_inference_steps": 4, "precision": "fp32"}
            a = pipe(["bright square", "dark field"], seeds=[0, 1], **kw).images
            b = pipe(["bright square", "dark field"], seeds=[0, 1], **kw).images
            alone = pipe(["dark field"], seeds=[1], **kw).images
            out[name] = (a, b, alone)
    finally:
        pipe.scheduler = old
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLERS))
def test_sampler_deterministic_and_batch_invariant(sampler_images, name):
    a, b, alone = sampler_images[name]
    assert a.shape == (2, 16, 16) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)  # also DDPM: per-image step noise


def test_samplers_give_different_pixels(sampler_images):
    names = sorted(sampler_images)
    for i, m in enumerate(names):
        for n in names[i + 1 :]:
            diff = np.abs(sampler_images[m][0] - sampler_images[n][0]).max()
            assert diff > 1e-4, (m, n, diff)


def test_save_load_same_output(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again, _ = load_pipeline(tmp_path / "copy", device="cpu")
    a = pipe(["bright square"], seeds=[3], num_inference_steps=3).images
    b = again(["bright square"], seeds=[3], num_inference_steps=3).images
    np.testing.assert_array_equal(a, b)


def test_output_types(pipe):
    pil = pipe("dark field", num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (16, 16) and pil[0].mode == "L"
    pt = pipe("dark field", num_inference_steps=2, output_type="pt").images
    assert tuple(pt.shape) == (1, 1, 16, 16)


@pytest.mark.parametrize("kwargs, msg", [
    ({"prompt": []}, "prompt must not be empty"),
    ({"prompt": ["  "]}, "non-empty string"),
    ({"prompt": ["a"], "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": ["a"], "seeds": [1, 2]}, "seeds"),
    ({"prompt": ["a"], "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": ["a"], "output_type": "png"}, "output_type"),
])
def test_input_errors(pipe, kwargs, msg):
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=msg):
        pipe(prompt, **kwargs)


def test_unknown_sampler_suggests(pipe):
    with pytest.raises(ValueError, match="did you mean 'euler'"):
        make_sampler("eular", pipe.scheduler)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        read_model_info(tmp_path / "empty")


def test_stable_diffusion_layout_folder(tmp_path, tiny_text_encoder):
    """A tiny random 3-channel SD pipeline (CLIP text tower) loads and gives grayscale output."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    tok = AutoTokenizer.from_pretrained(tiny_text_encoder)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    sd = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text, tokenizer=tok,
                                 scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    pipe, info = load_pipeline(tmp_path / "sd", device="cpu")
    assert info.channels == 3 and info.resolution == 16 and len(info.model_hash) == 16
    pipe.scheduler = make_sampler("dpm", pipe.scheduler)
    img = pipe(["frontal chest radiograph"], seeds=[0], num_inference_steps=2).images
    assert img.shape == (1, 16, 16) and 0.0 <= img.min() <= img.max() <= 1.0


# ------------------------------------------------------------------ VAE slicing and tiling (issue 9)
def _with_vae(pipe, vae):
    """A pipeline sharing ``pipe``'s UNet, text encoder and scheduler, with another VAE."""
    from generator.models.pipeline import RadSynthPipeline

    return RadSynthPipeline(vae=vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                            scheduler=pipe.scheduler)


def _tiny_vae(mid_attention: bool, seed: int = 0):
    """A random 1-channel f=2 AutoencoderKL (tile-size defaults of a 16 px model: 8 latent cells)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, mid_block_add_attention=mid_attention).eval()


def _count_decoder_calls(vae):
    calls: list[tuple[int, ...]] = []
    hook = vae.decoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    return calls, hook


def test_sliced_decoding_matches_whole_batch(pipe):
    """Slicing decodes one image per VAE call; pixels equal the whole-batch decode within 1e-5 (not
    bit for bit: float32 convolution kernels are picked by batch shape; measured <= 1e-6 here)."""
    prompts = ["bright square", "dark field", "bright square", "dark field", "dark field"]
    kw = {"seeds": [0, 1, 2, 3, 4], "num_inference_steps": 3, "precision": "fp32"}
    calls, hook = _count_decoder_calls(pipe.vae)
    try:
        whole = pipe(prompts, vae_slicing=False, **kw)
        assert len(calls) == 1 and calls[0][0] == 5
        calls.clear()
        sliced = pipe(prompts, vae_slicing=True, **kw)
        assert [c[0] for c in calls] == [1] * 5
    finally:
        hook.remove()
    np.testing.assert_allclose(sliced.images, whole.images, rtol=0, atol=1e-5)
    assert not whole.vae_tiled and not sliced.vae_tiled
    assert pipe.vae.use_slicing is False and pipe.vae.use_tiling is False  # the VAE's own settings restored


def test_sliced_decoding_with_mid_attention(pipe):
    p = _with_vae(pipe, _tiny_vae(mid_attention=True))
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = p.decode_latents(z, vae_slicing=False)
    sliced = p.decode_latents(z, vae_slicing=True)
    assert whole.shape == (6, 1, 16, 16)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


def test_automatic_slicing_by_decoded_pixels(pipe, monkeypatch):
    import generator.models.pipeline as pipeline_module

    # tiny model: f=2, 8x8 latents -> 256 decoded pixels per image; 2**20 pixels = 4096 images
    assert pipe.vae_decode_plan((4096, 4, 8, 8)) == (False, None)
    assert pipe.vae_decode_plan((4097, 4, 8, 8)) == (True, None)
    assert pipe.vae_decode_plan((4097, 4, 8, 8), vae_slicing=False) == (False, None)
    assert pipe.vae_decode_plan((1, 4, 8, 8), vae_slicing=True) == (False, None)  # nothing to slice
    monkeypatch.setattr(pipeline_module, "VAE_SLICE_PIXELS", 2 * 256)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls, hook = _count_decoder_calls(pipe.vae)
    try:
        pipe.decode_latents(z[:2])
        assert [c[0] for c in calls] == [2]
        calls.clear()
        pipe.decode_latents(z)
        assert [c[0] for c in calls] == [1, 1, 1]
    finally:
        hook.remove()


def test_tiled_decoding_above_the_threshold_is_close_to_untiled(pipe):
    """A latent larger than VAE_TILE_LATENT (64) is decoded in 64-cell tiles by default. On white-noise
    latents through a random tiny VAE (GroupNorm statistics per tile, zero padding at tile borders) the
    tiled pixels stay within 0.1 of the untiled ones and within 0.01 on average (measured 0.041 / 0.003)."""
    vae = _tiny_vae(mid_attention=False)
    p = _with_vae(pipe, vae)
    z = torch.randn(2, 4, 80, 80, generator=torch.Generator().manual_seed(0))
    assert p.vae_decode_plan(tuple(z.shape)) == (False, 64)
    assert p.vae_decode_plan((2, 4, 64, 64)) == (False, None)  # at the threshold: whole
    assert p.vae_decode_plan((2, 4, 64, 64), vae_tiling=True) == (False, 32)  # forced: half the side
    assert p.vae_decode_plan((2, 4, 80, 80), vae_tiling=False) == (False, None)
    assert p.vae_decode_plan((2, 4, 80, 80), vae_tile_size=40) == (False, 40)
    calls, hook = _count_decoder_calls(vae)
    try:
        tiled = p.decode_latents(z)
        # tiles start every 48 cells (25 % overlap): rows and columns [0, 64) and [48, 80)
        assert calls == [(2, 4, 64, 64), (2, 4, 64, 32), (2, 4, 32, 64), (2, 4, 32, 32)]
        calls.clear()
        whole = p.decode_latents(z, vae_tiling=False)
        assert calls == [(2, 4, 80, 80)]
    finally:
        hook.remove()
    assert tiled.shape == whole.shape == (2, 1, 160, 160)
    diff = (tiled - whole).abs()
    assert 1e-4 < diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    # the VAE's own tile settings (diffusers' defaults from sample_size=16) are restored
    assert vae.use_tiling is False and vae.tile_latent_min_size == 8 and vae.tile_sample_min_size == 16


def test_forced_tiling_is_recorded(pipe):
    kw = {"seeds": [3, 4], "num_inference_steps": 2, "precision": "fp32"}
    plain = pipe(["bright square", "dark field"], **kw)
    tiled = pipe(["bright square", "dark field"], vae_tiling=True, **kw)  # 8x8 latents in 4-cell tiles
    assert not plain.vae_tiled and tiled.vae_tiled
    assert tiled.images.shape == (2, 16, 16) and np.isfinite(tiled.images).all()
    assert np.abs(tiled.images - plain.images).max() > 1e-3  # tiles change pixels: why it is recorded
    again = pipe(["bright square", "dark field"], vae_tiling=True, **kw)
    np.testing.assert_array_equal(again.images, tiled.images)


@pytest.mark.parametrize("kwargs, msg", [
    ({"vae_tiling": "yes"}, "vae_tiling must be True, False or None, got 'yes'"),
    ({"vae_slicing": 1}, "vae_slicing must be True, False or None, got 1"),
    ({"vae_tile_size": 1}, "vae_tile_size must be an integer >= 2"),
    ({"vae_tile_size": 8.0}, "vae_tile_size must be an integer >= 2"),
])
def test_vae_decode_option_errors(pipe, kwargs, msg):
    steps: list[int] = []
    with pytest.raises(ValueError, match=msg):
        pipe(["dark field"], num_inference_steps=2, callback=lambda i, n: steps.append(i), **kwargs)
    assert steps == []  # refused before sampling


@pytest.fixture(scope="module")
def attr_model(tmp_path_factory, square_data, tiny_text_encoder):
    """A tiny model trained with ``radsynth train --attribute-conditioning``."""
    from radsynth.cli import main

    out = tmp_path_factory.mktemp("attr") / "m"
    assert main(["train", "--data", str(square_data), "--output", str(out), "--resolution", "16", "--preset", "tiny",
                 "--text-encoder", str(tiny_text_encoder), "--max-steps", "3", "--mixed-precision", "no",
                 "--attribute-conditioning", "--quiet"]) == 0
    return out


def test_attribute_vectors_reach_the_unet(attr_model, tiny_model):
    """A model trained with attribute_conditioning gets, with each prompt, the attribute vector read
    back from its text (null prompt: zeros), in the order of the guidance batch; one without does not."""
    import json

    from conditioning.attributes import ATTRIBUTE_SCHEMA, prompt_vectors
    from generator.models.build import takes_attributes

    pipe, _ = load_pipeline(attr_model, device="cpu")
    assert takes_attributes(pipe.unet) and not takes_attributes(load_pipeline(tiny_model, device="cpu")[0].unet)
    assert json.loads((attr_model / "radsynth.json").read_text())["attributes"] == ATTRIBUTE_SCHEMA
    assert json.loads((tiny_model / "radsynth.json").read_text())["attributes"] is None
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    prompts = ["chest radiograph, small left pleural effusion", "chest radiograph, 20 mm nodule in the right upper lobe"]
    try:
        pipe(prompts, seeds=[0, 1], num_inference_steps=2, guidance_scale=3.0, precision="fp32")
        pipe(prompts[:1], seeds=[0], num_inference_steps=1, guidance_scale=1.0, precision="fp32")
    finally:
        hook.remove()
    want = torch.from_numpy(prompt_vectors(["", ""] + prompts))
    assert len(seen) == 3 and torch.equal(seen[0].float(), want) and torch.equal(seen[1].float(), want)
    assert torch.equal(seen[2].float(), want[2:3])  # no guidance: the prompt's vector only


def test_unknown_attribute_layout_is_refused(tmp_path, attr_model):
    import json
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(attr_model, copy)
    info = json.loads((copy / "radsynth.json").read_text())
    (copy / "radsynth.json").write_text(json.dumps({**info, "attributes": "radsynth-attributes-99"}))
    with pytest.raises(ValueError, match="radsynth-attributes-99"):
        load_pipeline(copy, device="cpu")


def test_guidance_interval(pipe):
    """Guidance in a noise interval: an interval holding every step's sigma changes nothing; one that
    holds none gives the unguided (guidance 1) images; one in between differs from both."""
    kw = {"seeds": [4, 5], "num_inference_steps": 4, "precision": "fp32", "guidance_scale": 3.0}
    prompts = ["bright square", "dark field"]
    full = pipe(prompts, **kw).images
    np.testing.assert_array_equal(pipe(prompts, guidance_interval=(0.0, float("inf")), **kw).images, full)
    sigmas = [pipe._sigma(t) for t in pipe.scheduler.timesteps]
    assert sigmas == sorted(sigmas, reverse=True) and len(sigmas) == 4
    none = pipe(prompts, guidance_interval=(sigmas[0] + 1.0, sigmas[0] + 2.0), **kw).images
    unguided = pipe(prompts, **{**kw, "guidance_scale": 1.0}).images
    np.testing.assert_allclose(none, unguided, atol=1e-5)
    middle = pipe(prompts, guidance_interval=(sigmas[2], sigmas[1]), **kw).images
    assert np.abs(middle - full).max() > 1e-4 and np.abs(middle - unguided).max() > 1e-4
    alone = pipe(prompts[1:], guidance_interval=(sigmas[2], sigmas[1]), **{**kw, "seeds": [5]}).images
    np.testing.assert_allclose(alone[0], middle[1], atol=1e-5)  # still batch invariant


def _first_step_predictions(pipe, monkeypatch, prompts, **kw) -> torch.Tensor:
    """The (guided) prediction the sampler receives at the first step."""
    seen = []
    step = pipe.scheduler.step

    def recording(model_output, *a, **k):
        seen.append(model_output.clone())
        return step(model_output, *a, **k)

    monkeypatch.setattr(pipe.scheduler, "step", recording)
    pipe(prompts, **kw)
    monkeypatch.undo()
    return seen[0]


def test_guidance_rescale(pipe, monkeypatch):
    """phi = 0 is plain guidance; phi = 1 gives each image's guided prediction the standard deviation of
    its conditional prediction (Lin et al. 2023); images stay batch invariant; no effect without guidance."""
    kw = {"seeds": [4, 5], "num_inference_steps": 3, "precision": "fp32", "guidance_scale": 4.0}
    prompts = ["bright square", "dark field"]
    plain = pipe(prompts, **kw).images
    np.testing.assert_array_equal(pipe(prompts, guidance_rescale=0.0, **kw).images, plain)
    strong = {**kw, "guidance_scale": 30.0}  # the tiny UNet's prompts differ little: guide hard
    cond = _first_step_predictions(pipe, monkeypatch, prompts, **{**kw, "guidance_scale": 1.0})
    guided = _first_step_predictions(pipe, monkeypatch, prompts, **strong)
    rescaled = _first_step_predictions(pipe, monkeypatch, prompts, guidance_rescale=1.0, **strong)
    per_image = lambda x: x.flatten(1).std(dim=1)  # noqa: E731
    assert float((per_image(guided) - per_image(cond)).abs().max()) > 1e-3
    torch.testing.assert_close(per_image(rescaled), per_image(cond), rtol=1e-5, atol=1e-6)
    half = pipe(prompts, guidance_rescale=0.7, **kw).images
    assert np.abs(half - plain).max() > 1e-4
    alone = pipe(prompts[1:], guidance_rescale=0.7, **{**kw, "seeds": [5]}).images
    np.testing.assert_allclose(alone[0], half[1], atol=1e-5)
    unguided = {**kw, "guidance_scale": 1.0}
    np.testing.assert_array_equal(pipe(prompts, guidance_rescale=0.7, **unguided).images,
                                  pipe(prompts, **unguided).images)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_guidance_rescale_errors(pipe, bad):
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(["bright square"], num_inference_steps=2, guidance_rescale=bad)


@pytest.mark.parametrize("bad", [(1.0, 0.5), (-1.0, 2.0), (float("nan"), 1.0), (1.0,), "ab"])
def test_guidance_interval_errors(pipe, bad):
    with pytest.raises(ValueError, match="guidance_interval"):
        pipe(["bright square"], num_inference_steps=2, guidance_interval=bad)
