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
