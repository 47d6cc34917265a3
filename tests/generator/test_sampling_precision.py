"""Sampling speed levers that must not change what is computed: precision, the prompt cache, the
reduced-precision UNet copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.models.model_folder import load_pipeline
from generator.models.pipeline import cpu_has_bf16


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p, _ = load_pipeline(tiny_model, device="cpu")
    return p


PROMPTS = ["bright square", "dark field", "bright square", "bright square"]
KW = {"seeds": [4, 5, 6, 7], "num_inference_steps": 4}


def test_auto_precision_follows_the_cpu(pipe):
    assert pipe.resolve_precision("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    assert pipe.resolve_precision("fp32") == "fp32" and pipe.resolve_precision("bf16") == "bf16"
    assert pipe(PROMPTS[:1], seeds=[0], num_inference_steps=2).precision == pipe.resolve_precision("auto")


@pytest.mark.parametrize("value, msg", [
    ("bf61", "precision must be one of .* did you mean 'bf16'"),
    ("fp16", "fp16.* needs a CUDA or MPS device"),
])
def test_precision_errors(pipe, value, msg):
    with pytest.raises(ValueError, match=msg):
        pipe(PROMPTS[:1], num_inference_steps=2, precision=value)


def test_bf16_close_to_fp32_and_the_old_switch(pipe):
    fp32 = pipe(PROMPTS, precision="fp32", **KW)
    bf16 = pipe(PROMPTS, precision="bf16", **KW)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    diff = np.abs(fp32.images - bf16.images)
    assert 0 < diff.max() and diff.mean() < 0.01, (diff.max(), diff.mean())
    np.testing.assert_array_equal(pipe(PROMPTS, autocast_bf16=False, **KW).images, fp32.images)
    np.testing.assert_array_equal(pipe(PROMPTS, autocast_bf16=True, **KW).images, bf16.images)
    # bf16 is deterministic too.
    np.testing.assert_array_equal(pipe(PROMPTS, precision="bf16", **KW).images, bf16.images)


def test_bf16_unet_copy_is_kept_and_refreshed(pipe):
    first, dtype, autocast = pipe.denoiser("bf16")
    assert dtype == torch.bfloat16 and not autocast and first is not pipe.unet
    assert first.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32  # the UNet itself is untouched
    assert pipe.denoiser("bf16")[0] is first
    assert pipe.denoiser("fp32")[0] is pipe.unet
    before = pipe(PROMPTS[:1], seeds=[1], num_inference_steps=2, precision="bf16").images
    p = next(pipe.unet.parameters())
    with torch.no_grad():
        p.mul_(1.5)  # an in-place weight change (like an optimizer step or load_state_dict)
    try:
        second = pipe.denoiser("bf16")[0]
        assert second is not first
        torch.testing.assert_close(next(second.parameters()).float(), p.detach().to(torch.bfloat16).float())
        changed = pipe(PROMPTS[:1], seeds=[1], num_inference_steps=2, precision="bf16").images
        assert np.abs(changed - before).max() > 1e-4
    finally:
        with torch.no_grad():
            p.div_(1.5)


def test_prompts_are_encoded_once(pipe):
    pipe.clear_prompt_cache()
    calls: list[int] = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, kw, out: calls.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    try:
        a = pipe(PROMPTS, precision="fp32", **KW).images
        assert sorted(calls) == [1, 2]  # "bright square" + "dark field", then the null prompt
        calls.clear()
        b = pipe(PROMPTS, precision="fp32", **KW).images
        assert calls == []  # cached across calls
        np.testing.assert_array_equal(a, b)
    finally:
        hook.remove()
    # The cached states equal a fresh encoding of each prompt.
    from conditioning.text_encoder import encode_prompts

    fresh = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["dark field", "bright square"])
    torch.testing.assert_close(pipe.encode_prompt(["dark field", "bright square"]), fresh, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ float16 VAE (issue 9: CUDA paths)
def _half_vae_pipeline(pipe, force_upcast: bool):
    """``pipe`` with a float16 copy of its VAE (as ``load_pipeline`` gives on CUDA), and the float32 VAE
    holding the same (float16-rounded) weights."""
    import copy

    from generator.models.pipeline import RadSynthPipeline

    vae16 = copy.deepcopy(pipe.vae)
    torch.nn.Module.to(vae16, dtype=torch.float16)
    vae16.register_to_config(force_upcast=force_upcast)
    rounded = copy.deepcopy(vae16)
    torch.nn.Module.to(rounded, dtype=torch.float32)
    make = lambda vae: RadSynthPipeline(vae=vae, unet=pipe.unet, text_encoder=pipe.text_encoder,  # noqa: E731
                                        tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    return make(vae16), make(rounded)


def _decoder_input_dtypes(vae):
    seen: list[torch.dtype] = []
    return seen, vae.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))


def test_float16_vae_with_force_upcast_decodes_in_float32(pipe):
    """diffusers' Stable Diffusion pattern: a float16 VAE whose config says force_upcast runs in float32
    (float16 decoder activations overflow on CUDA) and is float16 again afterwards."""
    p16, p32 = _half_vae_pipeline(pipe, force_upcast=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    seen, hook = _decoder_input_dtypes(p16.vae)
    try:
        a = p16.decode_latents(z)
    finally:
        hook.remove()
    assert seen == [torch.float32] and p16.vae.dtype == torch.float16
    torch.testing.assert_close(a, p32.decode_latents(z), rtol=0, atol=0)  # same float32 arithmetic
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p16.encode_images(x), p32.encode_images(x), rtol=0, atol=0)
    assert p16.vae.dtype == torch.float16
    out = p16(PROMPTS[:2], seeds=[0, 1], num_inference_steps=2, precision="fp32")
    ref = p32(PROMPTS[:2], seeds=[0, 1], num_inference_steps=2, precision="fp32")
    np.testing.assert_array_equal(out.images, ref.images)


def test_float16_vae_without_force_upcast_stays_float16(pipe):
    p16, p32 = _half_vae_pipeline(pipe, force_upcast=False)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen, hook = _decoder_input_dtypes(p16.vae)
    try:
        a = p16.decode_latents(z)
    finally:
        hook.remove()
    assert seen == [torch.float16] and a.dtype == torch.float32
    diff = (a - p32.decode_latents(z)).abs().max()
    assert 0 < diff < 0.02, diff  # float16 rounding, not float32
