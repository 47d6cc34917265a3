"""``radsynth train`` flag checks: one-line errors naming the flag and value, exit status 2, nothing written."""

from __future__ import annotations

import json
import re

import pytest

from radsynth.cli import main


@pytest.mark.parametrize("flags, expected", [
    (["--max-minutes", "nan"], "--max-minutes must be a finite number in (0, 1e+06], got nan"),
    (["--max-minutes", "inf"], "--max-minutes must be a finite number in (0, 1e+06], got inf"),
    (["--max-minutes", "-1"], "--max-minutes must be a finite number in (0, 1e+06], got -1.0"),
    (["--max-minutes", "0"], "--max-minutes must be a finite number in (0, 1e+06], got 0.0"),
    (["--max-steps", "0"], "--max-steps must be an integer in [1, 1000000000], got 0"),
    (["--max-steps", "-5"], "--max-steps must be an integer in [1, 1000000000], got -5"),
    (["--max-steps", str(10**10)], f"--max-steps must be an integer in [1, 1000000000], got {10**10}"),
    (["--resolution", "1"], "--resolution must be an integer in [8, 4096], got 1"),
    (["--resolution", "0"], "--resolution must be an integer in [8, 4096], got 0"),
    (["--resolution", "100000"], "--resolution must be an integer in [8, 4096], got 100000"),
    (["--resolution", "24"], "--resolution must be latent_size (8) of preset 'tiny' times a power of two"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number in (0, 1], got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number in (0, 1], got inf"),
    (["--learning-rate", "0"], "--learning-rate must be a finite number in (0, 1], got 0.0"),
    (["--learning-rate=-1e-4"], "--learning-rate must be a finite number in (0, 1], got -0.0001"),
    (["--learning-rate", "2"], "--learning-rate must be a finite number in (0, 1], got 2.0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**64)], f"--seed must be an integer in [0, 4294967295], got {2**64}"),
    (["--seed", str(2**32)], f"--seed must be an integer in [0, 4294967295], got {2**32}"),
    (["--seed", str(10**400)], f"--seed must be an integer in [0, 4294967295], got {10**400}"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be an integer in [1, 1024], got 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be an integer in [1, 1000000000], got 0"),
    (["--ct-window", "40", "0"], "--ct-window WIDTH must be a finite number in (0, 100000], got 0.0"),
    (["--ct-window", "40", "inf"], "--ct-window WIDTH must be a finite number in (0, 100000], got inf"),
    (["--ct-window", "nan", "400"], "--ct-window CENTER must be a finite number in [-100000, 100000], got nan"),
    (["--preset", "tinny"], "did you mean 'tiny'"),
    (["--oversample", "nodule"], "argument --oversample: expected TERM=WEIGHT (e.g. nodule=2), got 'nodule'"),
    (["--oversample", "nodule=0"], "the weight of 'nodule' must be in (0, 1000], got '0'"),
    (["--oversample", "nodule=x"], "the weight of 'nodule' must be a number, got 'x'"),
    (["--oversample", "a=2", "--oversample", "A =3"], "--oversample names the term 'a' twice"),
    (["--dims", "3", "--oversample", "a=2", "--oversample", "A=3"], "--oversample names the term 'a' twice"),
])
def test_bad_numeric_flags(tmp_path, capsys, square_data, flags, expected):
    out = tmp_path / "model"
    argv = ["train", "--data", str(square_data), "--output", str(out), "--preset", "tiny", "--quiet", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("radsynth train: error: ")
    assert expected in err
    assert not out.exists()  # checked before anything is read or written


def test_resume_with_other_options_is_refused(tmp_path, capsys, square_data, tiny_text_encoder):
    out = tmp_path / "model"
    base = ["train", "--data", str(square_data), "--output", str(out), "--preset", "tiny", "--resolution", "16",
            "--max-steps", "3", "--checkpoint-every", "2", "--text-encoder", str(tiny_text_encoder),
            "--mixed-precision", "no", "--quiet"]
    assert main([*base, "--keep-checkpoints"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume", "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"--resume: the checkpoints in .* come from a different run \(seed: 0 in the checkpoints, "
                     r"7 now\)", err), err
    assert main([*base, "--resume", "--learning-rate", "0.01"]) == 2
    assert "unet_lr: 0.0005 in the checkpoints, 0.01 now" in capsys.readouterr().err
    assert main([*base, "--resume", "--oversample", "bright=3"]) == 2  # other draws: another run
    assert "oversample: [] in the checkpoints, [['bright', 3.0]] now" in capsys.readouterr().err
    run_json = out / "checkpoints" / "run.json"  # checkpoints from before the field drew uniformly
    saved = json.loads(run_json.read_text())
    del saved["train_config"]["oversample"]
    run_json.write_text(json.dumps(saved))
    capsys.readouterr()
    # the same options resume fine, and the model folder says how it was trained
    assert main([*base, "--resume"]) == 0
    info = json.loads((out / "radsynth.json").read_text())
    assert info["training"]["mixed_precision"] == "no"


def test_oversample_is_recorded_and_checked_against_the_texts(tmp_path, capsys, square_data, tiny_text_encoder):
    base = ["train", "--data", str(square_data), "--preset", "tiny", "--resolution", "16", "--max-steps", "2",
            "--text-encoder", str(tiny_text_encoder), "--mixed-precision", "no", "--quiet"]
    assert main([*base, "--output", str(tmp_path / "a"), "--oversample", "Bright Square=3"]) == 0
    info = json.loads((tmp_path / "a" / "radsynth.json").read_text())
    assert info["train_config"]["oversample"] == [["bright square", 3.0]]
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "b"), "--oversample", "nodule=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "oversample term 'nodule' is in none of the 24 training texts" in err, err
