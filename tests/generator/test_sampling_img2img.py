"""Image-to-image (SDEdit ``strength``), region keeping (``keep_mask``) and the seed-only initial noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.models.model_folder import load_pipeline
from generator.models.samplers import make_sampler

STEPS = 8


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p, _ = load_pipeline(tiny_model, device="cpu")
    return p


@pytest.fixture(scope="module")
def start():
    """Two 16x16 starting images in [0, 1]: a bright square on dark, and a left-right ramp."""
    a = np.full((16, 16), 0.1, np.float32)
    a[4:12, 4:12] = 0.9
    b = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1))
    return np.stack([a, b])


def reconstruction(pipe, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).unsqueeze(1)
    return pipe.decode_latents(pipe.encode_images(x))[:, 0].numpy()


def test_initial_noise_depends_on_the_seed_only(pipe):
    both = pipe.make_noise([5, 6])
    np.testing.assert_array_equal(pipe.make_noise([5])[0].numpy(), both[0].numpy())
    assert both.shape == (1 * 2, 4, 8, 8) and both.dtype == torch.float32
    assert not torch.equal(both[0], both[1])
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(pipe.prepare_latents([5]), both[:1] * pipe.scheduler.init_noise_sigma)
    # Unconditional sampling (guidance 0) of the same seed under two different prompts: only the
    # initial noise can reach the pixels, so they are equal; another seed differs.
    a = pipe(["bright square"], seeds=[5], num_inference_steps=4, guidance_scale=0.0).images
    b = pipe(["dark field, small left pleural effusion"], seeds=[5], num_inference_steps=4,
             guidance_scale=0.0).images
    c = pipe(["bright square"], seeds=[6], num_inference_steps=4, guidance_scale=0.0).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_strength_one_equals_text_to_image(pipe, start):
    prompts, seeds = ["bright square", "dark field"], [11, 12]
    t2i = pipe(prompts, seeds=seeds, num_inference_steps=STEPS).images
    i2i = pipe(prompts, seeds=seeds, num_inference_steps=STEPS, image=start, strength=1.0).images
    np.testing.assert_array_equal(i2i, t2i)


def test_strength_zero_returns_the_reconstruction(pipe, start):
    prompts, seeds = ["bright square", "dark field"], [11, 12]
    recon = reconstruction(pipe, start)
    steps_run = []
    out = pipe(prompts, seeds=seeds, num_inference_steps=STEPS, image=start, strength=0.0,
               callback=lambda i, n: steps_run.append(n)).images
    assert steps_run == []
    np.testing.assert_allclose(out, recon, atol=1e-6)
    # Less strength keeps more of the image: distance to the reconstruction grows with strength.
    dist = []
    for s in (0.25, 0.5, 1.0):
        img = pipe(prompts, seeds=seeds, num_inference_steps=STEPS, image=start, strength=s).images
        dist.append(float(np.abs(img - recon).mean()))
    assert 0 < dist[0] < dist[2] and dist[1] < dist[2], dist


def test_strength_runs_the_last_steps(pipe, start):
    seen: list[tuple[int, int]] = []
    pipe(["bright square"] * 2, num_inference_steps=STEPS, image=start, strength=0.5,
         callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, STEPS // 2) for i in range(STEPS // 2)]


def test_keep_mask_everywhere_keeps_the_image(pipe, start):
    recon = reconstruction(pipe, start)
    ones = np.ones_like(start)
    out = pipe(["dark field", "bright square"], seeds=[3, 4], num_inference_steps=STEPS, image=start,
               keep_mask=ones).images
    np.testing.assert_allclose(out, recon, atol=1e-5)
    # keep_mask 0 everywhere is plain image-to-image.
    plain = pipe(["dark field", "bright square"], seeds=[3, 4], num_inference_steps=STEPS, image=start,
                 strength=0.75).images
    zeros = pipe(["dark field", "bright square"], seeds=[3, 4], num_inference_steps=STEPS, image=start,
                 strength=0.75, keep_mask=np.zeros_like(start)).images
    np.testing.assert_allclose(zeros, plain, atol=1e-6)


def test_keep_mask_half_keeps_that_half(pipe, start):
    mask = np.zeros((16, 16), np.float32)
    mask[:, :8] = 1.0  # keep the left half (latent columns 0-3), redo the right half
    kw = {"seeds": [3, 4], "num_inference_steps": STEPS, "output_type": "latent"}
    out = pipe(["dark field"] * 2, image=start, keep_mask=mask, **kw).images
    free = pipe(["dark field"] * 2, **kw).images
    original = pipe.encode_images(torch.from_numpy(start).unsqueeze(1))
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out[..., :4], original[..., :4], rtol=0, atol=1e-6)
    assert (out[..., 4:] - original[..., 4:]).abs().mean() > 0.1
    # The edited half is sampled under the prompt: nearer the unconstrained sample than the original.
    assert (out[..., 5:] - free[..., 5:]).abs().mean() < (out[..., 5:] - original[..., 5:]).abs().mean()
    # Decoded, the kept half stays nearer the original's reconstruction than the edited half.
    recon = reconstruction(pipe, start)
    pixels = pipe.decode_latents(out)[:, 0].numpy()
    assert np.abs(pixels - recon)[..., :6].mean() < np.abs(pixels - recon)[..., 10:].mean()


def test_img2img_batch_invariance_and_determinism(pipe, start):
    kw = {"num_inference_steps": STEPS, "strength": 0.6, "precision": "fp32"}
    a = pipe(["bright square", "dark field"], seeds=[1, 2], image=start, **kw).images
    b = pipe(["bright square", "dark field"], seeds=[1, 2], image=start, **kw).images
    np.testing.assert_array_equal(a, b)
    alone = pipe(["dark field"], seeds=[2], image=start[1:], **kw).images
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)
    same_image = pipe(["bright square", "dark field"], seeds=[1, 2], image=start[0], **kw).images
    np.testing.assert_allclose(same_image[0], a[0], atol=1e-5)  # a (H, W) image serves every prompt


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++2m-karras", "unipc"])
def test_img2img_other_samplers(pipe, start, sampler):
    old = pipe.scheduler
    pipe.scheduler = make_sampler(sampler, old)
    try:
        recon = reconstruction(pipe, start)
        zero = pipe(["dark field"] * 2, num_inference_steps=STEPS, image=start, strength=0.0).images
        np.testing.assert_allclose(zero, recon, atol=1e-6)
        half = pipe(["dark field"] * 2, num_inference_steps=STEPS, image=start, strength=0.5).images
        full = pipe(["dark field"] * 2, num_inference_steps=STEPS, image=start, strength=1.0).images
        assert np.isfinite(half).all() and np.abs(half - recon).mean() < np.abs(full - recon).mean()
    finally:
        pipe.scheduler = old


@pytest.mark.parametrize("kwargs, msg", [
    ({"strength": -0.1}, "strength must be a number in"),
    ({"strength": 1.5}, "strength must be a number in"),
    ({"strength": float("nan")}, "strength must be a number in"),
    ({"strength": 0.5, "image": None}, "needs an image"),
    ({"keep_mask": np.ones((2, 16, 16)), "image": None}, "keep_mask needs an image"),
    ({"image": np.zeros((3, 16, 16))}, r"image must have shape \(2, 16, 16\)"),
    ({"image": np.zeros((2, 32, 32))}, r"image must have shape"),
    ({"image": np.zeros((2, 1, 16, 16))}, r"got \(2, 1, 16, 16\)"),
    ({"image": np.full((2, 16, 16), 255.0)}, r"image must hold finite values in \[0, 1\]"),
    ({"image": np.full((2, 16, 16), np.nan)}, r"image must hold finite values"),
    ({"keep_mask": np.ones((2, 8, 8))}, r"keep_mask must have shape"),
    ({"keep_mask": -np.ones((2, 16, 16))}, r"keep_mask must hold finite values"),
])
def test_img2img_errors(pipe, start, kwargs, msg):
    kwargs = {"image": start, **kwargs}
    with pytest.raises(ValueError, match=msg):
        pipe(["a", "b"], num_inference_steps=2, **kwargs)
