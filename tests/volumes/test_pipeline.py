"""VolumePipeline: per-volume seeds, batch-size invariance, prompts matter, samplers, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from generator.volumes.pipeline import VolumePipeline

PROMPTS = ["chest CT, 20 mm nodule in the right upper lobe, 60 year old woman",
           "chest CT, no acute findings, 40 year old man", "chest CT, 30 mm liver lesion"]


@pytest.fixture(scope="module")
def pipe(tiny_volume_model):
    return VolumePipeline.from_pretrained(tiny_volume_model)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm"])
def test_seed_and_batch_invariance(pipe, sampler):
    full = pipe(PROMPTS, seeds=[11, 12, 13], num_inference_steps=4, sampler=sampler, batch_size=3)
    ones = pipe(PROMPTS, seeds=[11, 12, 13], num_inference_steps=4, sampler=sampler, batch_size=1)
    np.testing.assert_allclose(full.volumes, ones.volumes, atol=1e-5)
    alone = pipe(PROMPTS[1:2], seeds=[12], num_inference_steps=4, sampler=sampler)
    np.testing.assert_allclose(alone.volumes[0], full.volumes[1], atol=1e-5)
    other = pipe(PROMPTS[1:2], seeds=[99], num_inference_steps=4, sampler=sampler)
    assert np.abs(other.volumes[0] - full.volumes[1]).max() > 1e-3
    assert full.seeds == [11, 12, 13] and full.sampler == sampler


def test_prompts_change_the_volume(pipe):
    a = pipe([PROMPTS[0]], seeds=[3], num_inference_steps=4, guidance_scale=3.0)
    b = pipe([PROMPTS[1]], seeds=[3], num_inference_steps=4, guidance_scale=3.0)
    assert np.abs(a.volumes - b.volumes).max() > 1e-4
    c = pipe([PROMPTS[0]], seeds=[3], num_inference_steps=4, guidance_scale=3.0, negative_prompt=[PROMPTS[1]])
    assert np.abs(a.volumes - c.volumes).max() > 1e-4


def test_output_geometry(pipe):
    out = pipe([PROMPTS[0]], num_inference_steps=2)
    centre = out.affine @ np.array([7.5, 7.5, 7.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert np.linalg.norm(out.affine[:3, :3], axis=0) == pytest.approx(out.spacing)
    assert out.intensity.unit == "HU" and out.seeds == [0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt="chest CT"), "prompt"),
    (dict(prompt=["ok", " "]), "non-empty"),
    (dict(prompt=["a"], num_inference_steps=0), "num_inference_steps"),
    (dict(prompt=["a"], guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt=["a"], seeds=[1, 2]), "seeds"),
    (dict(prompt=["a"], seeds=[-1]), "seeds"),
    (dict(prompt=["a"], sampler="ddimm"), "did you mean 'ddim'"),
    (dict(prompt=["a"], batch_size=0), "batch_size"),
])
def test_bad_inputs(pipe, kwargs, match):
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=match):
        pipe(prompt, **kwargs)


def test_output_volume_is_a_physical_volume(pipe):
    out = pipe([PROMPTS[2]], seeds=[4], num_inference_steps=2)
    vol = out.volume(0, text=PROMPTS[2])
    np.testing.assert_allclose(vol.array, -1024 + out.volumes[0] * 2048, atol=1e-3)
    assert vol.spacing == out.spacing and vol.extra["seed"] == 4 and vol.text == PROMPTS[2]
    np.testing.assert_allclose(vol.to_model(), out.volumes[0], atol=1e-6)
    with pytest.raises(ValueError, match="index"):
        out.volume(1)


def test_text_encoder_must_fit_the_unet(tiny_volume_model):
    from conditioning.text_encoder import DEFAULT_TEXT_ENCODER
    from generator.volumes.model_folder import load_volume_model

    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_volume_model(tiny_volume_model, text_encoder=DEFAULT_TEXT_ENCODER)


def test_not_a_volume_model(tmp_path):
    from generator.volumes.model_folder import read_volume_info

    with pytest.raises(ValueError, match="not a model folder"):
        read_volume_info(tmp_path)
    (tmp_path / "radsynth.json").write_text('{"resolution": 64}')
    with pytest.raises(ValueError, match="not a volume model"):
        read_volume_info(tmp_path)
