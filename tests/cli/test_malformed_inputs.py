"""A hostile user's malformed inputs, for every verb: each ends in ONE line on stderr naming the flag
or file and the problem, exit status 2 (bad input) or 1 (run-time failure), no traceback, and no
output left behind. Cases are generated from tables below; the suite runs in well under a minute
because almost every case fails before any model is built.

What it covers (see README, "Malformed input"): every numeric flag of every verb with non-numbers,
NaN, infinities, out-of-range, huge and overflowing values; missing, wrong-kind (file vs folder),
empty and corrupt paths (zero-byte and truncated safetensors, invalid or wrong-type JSON, non-UTF-8
and torn metadata lines, malformed CSV); malformed manifest lines for ``generate --from-manifest``;
unknown choices (sampler, device, format, modality, preset); conflicting flags.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from radsynth.cli import main

# ------------------------------------------------------------------------------------ fixtures
BAD_INTS = ["nan", "inf", "-inf", "-1", "1e308", "abc", "", "18446744073709551616", "0x10", "1.5", "-0.5",
            "99999999999999999999999"]
BAD_FLOATS = ["nan", "inf", "-inf", "1e308", "abc", "", "-1", "--", "1,5"]


class Env:
    """Paths the cases refer to (built once per module)."""

    def __init__(self, root: Path, model: Path, data: Path) -> None:
        self.root, self.model, self.data = root, model, data
        self.out = root / "out_never_written"
        self.file = root / "a_file.txt"
        self.file.write_text("not a folder\n")
        self.empty = root / "empty_dir"
        self.empty.mkdir()
        self.broken: dict[str, Path] = {}
        self.folders: dict[str, Path] = {}
        self.prompts: dict[str, Path] = {}
        self._broken_models()
        self._bad_folders()
        self._prompt_files()

    def _broken_models(self) -> None:
        def copy(name: str) -> Path:
            dst = self.root / f"model_{name}"
            shutil.copytree(self.model, dst)
            self.broken[name] = dst
            return dst

        (copy("index_not_json") / "model_index.json").write_text("{not json")
        (copy("index_list") / "model_index.json").write_text("[1, 2]")
        (copy("no_index") / "model_index.json").unlink()
        for part in ("unet", "vae"):
            weights = next((copy(f"{part}_zero") / part).glob("*.safetensors"))
            weights.write_bytes(b"")
            weights = next((copy(f"{part}_truncated") / part).glob("*.safetensors"))
            weights.write_bytes(weights.read_bytes()[:100])
        (copy("radsynth_json_bad") / "radsynth.json").write_text("[")
        (copy("radsynth_json_list") / "radsynth.json").write_text("[]")
        (copy("unet_config_bad") / "unet" / "config.json").write_text("{")
        shutil.rmtree(copy("no_unet") / "unet")

    def _bad_folders(self) -> None:
        def folder(name: str, meta_name: str | None, meta: bytes | None, image: bool = True) -> None:
            d = self.root / f"data_{name}"
            d.mkdir()
            if image:
                Image.fromarray(np.full((16, 16), 100, np.uint8)).save(d / "a.png")
            if meta_name is not None:
                (d / meta_name).write_bytes(meta or b"")
            self.folders[name] = d

        folder("no_metadata", None, None)
        folder("list_line", "metadata.jsonl", b'["a.png", "x"]\n')
        folder("not_utf8", "metadata.jsonl", b'{"file_name": "a.png", "text": "\xff"}\n')
        folder("not_json", "metadata.jsonl", b"{file_name: a.png}\n")
        folder("no_text", "metadata.jsonl", b'{"file_name": "a.png", "caption": "x"}\n')
        folder("csv_quote", "metadata.csv", b'file_name,text\na.png,"open\n')
        folder("csv_no_header", "metadata.csv", b"")
        folder("outside", "metadata.jsonl", b'{"file_name": "../../etc/passwd", "text": "x"}\n')
        folder("missing_file", "metadata.jsonl", b'{"file_name": "nope.png", "text": "x"}\n')
        folder("tiny_image", "metadata.jsonl", b'{"file_name": "dot.png", "text": "x"}\n', image=False)
        Image.fromarray(np.zeros((1, 1), np.uint8)).save(self.folders["tiny_image"] / "dot.png")
        folder("truncated_png", "metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n')
        png = self.folders["truncated_png"] / "a.png"
        png.write_bytes(png.read_bytes()[:40])
        folder("both_meta", "metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n')
        (self.folders["both_meta"] / "metadata.csv").write_text("file_name,text\na.png,x\n")

    def _prompt_files(self) -> None:
        def pf(name: str, suffix: str, content: bytes) -> None:
            p = self.root / f"prompts_{name}{suffix}"
            p.write_bytes(content)
            self.prompts[name] = p

        pf("empty", ".csv", b"")
        pf("list_line", ".jsonl", b'["x"]\n')
        pf("not_utf8", ".jsonl", b'{"text": "\xff"}\n')
        pf("not_json", ".jsonl", b"{text: x}\n")
        pf("no_text", ".csv", b"caption\nx\n")
        pf("neg_count", ".csv", b"text,num_images\nx,-3\n")
        pf("nan_count", ".csv", b"text,num_images\nx,nan\n")
        pf("huge_count", ".csv", b"text,num_images\nx,1e12\n")
        pf("empty_text", ".jsonl", b'{"text": "  "}\n')
        pf("wrong_suffix", ".txt", b"x\n")
        pf("csv_quote", ".csv", b'text\n"open\n')


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, square_data) -> Env:
    return Env(tmp_path_factory.mktemp("malformed"), tiny_model, square_data)


# ------------------------------------------------------------------------------------ cases
Case = tuple[str, Callable[[Env], list[str]]]


def _numeric_cases() -> list[Case]:
    cases: list[Case] = []
    base: dict[str, Callable[[Env], list[str]]] = {
        "generate": lambda e: ["generate", "--model", str(e.model), "--prompt", "x", "--output", str(e.out)],
        "demo": lambda e: ["demo", "--output", str(e.out)],
        "index": lambda e: ["index", "--data", str(e.data), "--output", str(e.out)],
        "audit": lambda e: ["audit", "--index", str(e.empty), "--synthetic", str(e.data)],
        "phantoms": lambda e: ["phantoms", "--num-images", "2", "--output", str(e.out)],
        "train": lambda e: ["train", "--data", str(e.data), "--output", str(e.out)],
        "export": lambda e: ["export", "--input", str(e.data), "--format", "dicom", "--output", str(e.out)],
        "prepare": lambda e: ["prepare", "--data", str(e.data), "--output", str(e.out), "--resolution", "16"],
    }
    ints = {
        "generate": ["--num-images", "--seed", "--steps", "--batch-size", "--max-resample", "--images-per-study"],
        "demo": ["--images-per-prompt", "--steps", "--seed", "--reference-images"],
        "index": ["--resolution", "--embedder-steps", "--seed"],
        "phantoms": ["--num-images", "--size", "--seed"],
        "train": ["--resolution", "--max-steps", "--seed"],
        "export": ["--images-per-study"],
        "prepare": ["--resolution", "--workers", "--shard-size"],
    }
    floats = {
        "generate": ["--guidance-scale"],
        "demo": ["--guidance-scale"],
        "index": ["--alpha", "--review-alpha", "--holdout-fraction"],
        "audit": ["--alpha"],
        "train": ["--max-minutes"],
    }
    for table, values in ((ints, BAD_INTS), (floats, BAD_FLOATS)):
        for verb, flags in table.items():
            for flag in flags:
                for v in values:
                    cases.append((f"{verb} {flag}={v!r}",
                                  lambda e, verb=verb, flag=flag, v=v: base[verb](e) + [flag + "=" + v]))
    # values that are numbers but out of range for the flag
    out_of_range = [
        ("generate", "--steps", "0"), ("generate", "--steps", "100000"), ("generate", "--num-images", "0"),
        ("generate", "--guidance-scale", "1000"), ("generate", "--batch-size", "0"),
        ("generate", "--seed", "4294967296"), ("demo", "--steps", "0"), ("demo", "--images-per-prompt", "0"),
        ("index", "--alpha", "0"), ("index", "--alpha", "1"), ("index", "--resolution", "2"),
        ("index", "--holdout-fraction", "1"), ("audit", "--alpha", "0.9"), ("phantoms", "--size", "8"),
        ("phantoms", "--size", "100000"), ("phantoms", "--num-images", "0"), ("phantoms", "--seed", "4294967296"),
        ("train", "--resolution", "1"), ("train", "--max-steps", "0"), ("train", "--max-minutes", "0"),
        ("export", "--images-per-study", "0"),
    ]
    for verb, flag, v in out_of_range:
        cases.append((f"{verb} {flag}={v} (range)", lambda e, verb=verb, flag=flag, v=v: base[verb](e) + [flag, v]))
    return cases


def _path_cases() -> list[Case]:
    g = lambda e, *extra: ["generate", "--model", str(e.model), "--output", str(e.out), *extra]  # noqa: E731
    cases: list[Case] = [
        ("generate no prompt", lambda e: g(e)),
        ("generate empty prompt", lambda e: g(e, "--prompt", " ")),
        ("generate prompt and prompts", lambda e: g(e, "--prompt", "x", "--prompts", str(e.prompts["no_text"]))),
        ("generate model missing", lambda e: ["generate", "--model", str(e.root / "nope"), "--prompt", "x",
                                              "--output", str(e.out)]),
        ("generate model is a file", lambda e: ["generate", "--model", str(e.file), "--prompt", "x",
                                                "--output", str(e.out)]),
        ("generate model empty dir", lambda e: ["generate", "--model", str(e.empty), "--prompt", "x",
                                                "--output", str(e.out)]),
        ("generate output is a file", lambda e: ["generate", "--model", str(e.model), "--prompt", "x",
                                                 "--output", str(e.file)]),
        ("generate grid is a dir", lambda e: g(e, "--prompt", "x", "--grid", str(e.empty))),
        ("generate grid under a file", lambda e: g(e, "--prompt", "x", "--grid", str(e.file / "g.png"))),
        ("generate privacy index missing", lambda e: g(e, "--prompt", "x", "--privacy-index", str(e.root / "nope"))),
        ("generate privacy index is a file", lambda e: g(e, "--prompt", "x", "--privacy-index", str(e.file))),
        ("generate privacy index empty", lambda e: g(e, "--prompt", "x", "--privacy-index", str(e.empty))),
        ("generate sampler unknown", lambda e: g(e, "--prompt", "x", "--sampler", "zzz")),
        ("generate device cuda", lambda e: g(e, "--prompt", "x", "--device", "cuda")),
        ("generate device unknown", lambda e: g(e, "--prompt", "x", "--device", "tpu")),
        ("generate format unknown", lambda e: g(e, "--prompt", "x", "--format", "bmp")),
        ("generate unknown flag", lambda e: g(e, "--prompt", "x", "--stpes", "3")),
        ("generate prompts missing", lambda e: g(e, "--prompts", str(e.root / "nope.csv"))),
        ("generate prompts is a dir", lambda e: g(e, "--prompts", str(e.empty))),
    ]
    for name in ("empty", "list_line", "not_utf8", "not_json", "no_text", "neg_count", "nan_count",
                 "huge_count", "empty_text", "wrong_suffix", "csv_quote"):
        cases.append((f"generate prompts {name}", lambda e, name=name: g(e, "--prompts", str(e.prompts[name]))))
    for name in ("index_not_json", "index_list", "no_index", "unet_zero", "unet_truncated", "vae_zero",
                 "vae_truncated", "radsynth_json_bad", "radsynth_json_list", "unet_config_bad", "no_unet"):
        cases.append((f"generate model {name}", lambda e, name=name: ["generate", "--model", str(e.broken[name]),
                                                                      "--prompt", "x", "--output", str(e.out)]))
        cases.append((f"demo model {name}", lambda e, name=name: ["demo", "--model", str(e.broken[name]),
                                                                  "--output", str(e.out)]))
    manifest_lines = [
        "[]", "{}", "not json", "1", '"text"', '{"text": "x"}',
        '{"text": "x", "seed": -1, "steps": 2, "guidance_scale": 2}',
        '{"text": "x", "seed": "1", "steps": 2, "guidance_scale": 2}',
        '{"text": "x", "seed": 1, "steps": 0, "guidance_scale": 2}',
        '{"text": "x", "seed": 1, "steps": 2.5, "guidance_scale": 2}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": NaN}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": Infinity}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": 1e308}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": "2"}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": 2, "sampler": "zzz"}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": 2, "precision": "fp8"}',
        '{"text": "", "seed": 1, "steps": 2, "guidance_scale": 2}',
        '{"text": 5, "seed": 1, "steps": 2, "guidance_scale": 2}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": 2, "file_name": ".."}',
        '{"text": "x", "seed": 1, "steps": 2, "guidance_scale": 2, "negative_prompt": 3}',
    ]
    for i, line in enumerate(manifest_lines):
        cases.append((f"generate from-manifest #{i} {line[:40]}", lambda e, line=line: [
            "generate", "--model", str(e.model), "--from-manifest", line, "--output", str(e.out)]))
    for verb, flag, extra in (("index", "--data", ["--output"]), ("train", "--data", ["--output"]),
                              ("audit", "--synthetic", None)):
        for name in ("no_metadata", "list_line", "not_utf8", "not_json", "no_text", "csv_quote", "csv_no_header",
                     "outside", "missing_file", "tiny_image", "truncated_png", "both_meta"):
            def build(e, verb=verb, flag=flag, extra=extra, name=name):
                if verb == "audit":
                    return ["audit", "--index", str(e.empty), "--synthetic", str(e.folders[name])]
                return [verb, flag, str(e.folders[name]), "--output", str(e.out)]
            cases.append((f"{verb} data {name}", build))
        cases.append((f"{verb} data missing", lambda e, verb=verb: (
            ["audit", "--index", str(e.empty), "--synthetic", str(e.root / "nope")] if verb == "audit"
            else [verb, "--data", str(e.root / "nope"), "--output", str(e.out)])))
        cases.append((f"{verb} data empty", lambda e, verb=verb: (
            ["audit", "--index", str(e.empty), "--synthetic", str(e.empty)] if verb == "audit"
            else [verb, "--data", str(e.empty), "--output", str(e.out)])))
    cases += [
        ("index output is a file", lambda e: ["index", "--data", str(e.data), "--output", str(e.file)]),
        ("index holdout missing", lambda e: ["index", "--data", str(e.data), "--holdout", str(e.root / "nope"),
                                             "--output", str(e.out)]),
        ("index holdout empty", lambda e: ["index", "--data", str(e.data), "--holdout", str(e.empty),
                                           "--output", str(e.out)]),
        ("audit index missing", lambda e: ["audit", "--index", str(e.root / "nope"), "--synthetic", str(e.data)]),
        ("audit index is a file", lambda e: ["audit", "--index", str(e.file), "--synthetic", str(e.data)]),
        ("audit index empty", lambda e: ["audit", "--index", str(e.empty), "--synthetic", str(e.data)]),
        ("audit index is a model", lambda e: ["audit", "--index", str(e.model), "--synthetic", str(e.data)]),
        ("audit json is a dir", lambda e: ["audit", "--index", str(e.empty), "--synthetic", str(e.data),
                                           "--json", str(e.empty)]),
        ("audit html under a file", lambda e: ["audit", "--index", str(e.empty), "--synthetic", str(e.data),
                                               "--html", str(e.file / "x.html")]),
        ("phantoms output is a file", lambda e: ["phantoms", "--num-images", "2", "--output", str(e.file)]),
        ("phantoms output not empty", lambda e: ["phantoms", "--num-images", "2", "--output", str(e.data)]),
        ("phantoms no num-images", lambda e: ["phantoms", "--output", str(e.out)]),
        ("demo output is a file", lambda e: ["demo", "--output", str(e.file)]),
        ("demo output not empty", lambda e: ["demo", "--output", str(e.data)]),
        ("demo model missing", lambda e: ["demo", "--model", str(e.root / "nope"), "--output", str(e.out)]),
        ("demo model empty", lambda e: ["demo", "--model", str(e.empty), "--output", str(e.out)]),
        ("train output is a file", lambda e: ["train", "--data", str(e.data), "--output", str(e.file)]),
        ("train preset unknown", lambda e: ["train", "--data", str(e.data), "--output", str(e.out), "--preset", "huge"]),
        ("train text encoder missing", lambda e: ["train", "--data", str(e.data), "--output", str(e.out),
                                                  "--text-encoder", str(e.root / "nope")]),
        ("train text encoder empty", lambda e: ["train", "--data", str(e.data), "--output", str(e.out),
                                                "--text-encoder", str(e.empty)]),
        ("train mixed precision unknown", lambda e: ["train", "--data", str(e.data), "--output", str(e.out),
                                                     "--mixed-precision", "fp8"]),
        ("export input missing", lambda e: ["export", "--input", str(e.root / "nope"), "--format", "dicom",
                                            "--output", str(e.out)]),
        ("export input empty", lambda e: ["export", "--input", str(e.empty), "--format", "dicom",
                                          "--output", str(e.out)]),
        ("export format unknown", lambda e: ["export", "--input", str(e.data), "--format", "bmp",
                                             "--output", str(e.out)]),
        ("export modality unknown", lambda e: ["export", "--input", str(e.data), "--format", "dicom",
                                               "--modality", "XX", "--output", str(e.out)]),
        ("export output is a file", lambda e: ["export", "--input", str(e.data), "--format", "dicom",
                                               "--output", str(e.file)]),
        ("prepare data missing", lambda e: ["prepare", "--data", str(e.root / "nope"), "--output", str(e.out),
                                            "--resolution", "16"]),
        ("prepare data empty", lambda e: ["prepare", "--data", str(e.empty), "--output", str(e.out),
                                          "--resolution", "16"]),
        ("prepare data list line", lambda e: ["prepare", "--data", str(e.folders["list_line"]), "--output",
                                              str(e.out), "--resolution", "16"]),
        ("prepare data csv quote", lambda e: ["prepare", "--data", str(e.folders["csv_quote"]), "--output",
                                              str(e.out), "--resolution", "16"]),
        ("prepare output is a file", lambda e: ["prepare", "--data", str(e.data), "--output", str(e.file),
                                                "--resolution", "16"]),
        ("prepare no resolution", lambda e: ["prepare", "--data", str(e.data), "--output", str(e.out)]),
        ("unknown verb", lambda e: ["generat"]),
    ]
    return cases


CASES = _numeric_cases() + _path_cases()


def test_suite_size() -> None:
    assert len(CASES) >= 300, len(CASES)


@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(env: Env, name: str, build: Callable[[Env], list[str]], capsys) -> None:
    argv = build(env)
    try:
        rc = main(argv)
    finally:
        left = env.out.exists()
        shutil.rmtree(env.out, ignore_errors=True)  # one failure must not cascade into the next cases
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc in (1, 2), f"{name}: exit {rc}, stderr {err!r}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error:" in ln or "unknown verb" in ln]
    assert len(errors) == 1, f"{name}: expected one error line on stderr, got {lines}"
    assert lines[-1] == errors[0] and errors[0].startswith("radsynth"), lines  # progress lines may precede it
    assert not left, f"{name}: left {env.out} behind"
