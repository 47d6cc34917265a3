"""More than one process: ``torchrun`` with two "nodes" on this machine (DESIGN.md §9).

Every multi-process run here starts two ``torchrun`` launchers (``--nnodes 2 --nproc_per_node 1``,
c10d rendezvous on a free local port), i.e. two workers with global ranks 0 and 1 that both have
``LOCAL_RANK`` 0, as on two single-GPU machines. They use gloo on the CPU, one thread each. The
single-process runs they are compared with run in this process through ``radsynth.cli.main``.

What is checked:
- ``train``: one model folder, checkpoints written once (no temporary folders left), the process
  count recorded, the same weights from the same command twice; a checkpoint resumes at another
  world size (2 -> 1 and 1 -> 2) and exactly at the same one (2 -> 2).
- ``generate``: 2 processes and 1 process give the same files, byte-identical PNGs and the same
  sorted manifest.
- ``audit``: split across 2 processes, the same verdicts, report and manifest as one process.
- the device comes from ``LOCAL_RANK``, never from the global rank.

The runs take tens of seconds each on two shared cores, so the tests are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generator.phantoms import write_phantom_folder
from privacy.embedding import torch_threads
from radsynth.cli import main

RES = 32
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def torchrun_two_nodes(args: list[str], cwd: Path, module: bool = True) -> list[str]:
    """Run ``python -m <args>`` (or the script ``args[0]``) under two torchrun launchers, one worker
    each, rendezvous c10d on ``127.0.0.1:<free port>``; returns the two launchers' outputs.

    Fails the test (after killing both launchers' process groups) on a non-zero exit or after
    ``TIMEOUT_S`` seconds.
    """
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "radsynth-test",
           "--max-restarts", "0", *(["-m"] if module else []), *args]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for _ in range(2)]
    return _wait_all(procs, f"torchrun {' '.join(args[:2])}")


def _wait_all(procs: list[subprocess.Popen], what: str) -> list[str]:
    """The launchers' outputs once all exited 0; fails the test (after killing every launcher's process
    group) on a non-zero exit or after ``TIMEOUT_S`` seconds."""
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{what}: a launcher exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "slurm" / "accelerate_multi_machine.yaml"


def accelerate_two_machines(args: list[str], cwd: Path) -> list[str]:
    """Run ``python -m <args>`` under two ``accelerate launch`` launchers that use the documented
    multi-machine config (``docs/slurm/accelerate_multi_machine.yaml``), machine ranks 0 and 1 on
    ``127.0.0.1:<free port>``; returns their outputs (:func:`_wait_all`)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "--machine_rank", str(rank), "--main_process_port", port, "-m", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return _wait_all(procs, f"accelerate launch {' '.join(args[:2])}")


def run_here(argv: list[str]) -> None:
    """``radsynth <argv>`` in this process, on one thread."""
    with torch_threads(1):
        assert main(argv) == 0


def weights(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in WEIGHT_FILES:
        out.update({f"{name}:{k}": v for k, v in load_file(str(model / name)).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ between {a.name} and {b.name}, e.g. {different[:3]}"


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (names starting with '.') anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def train_args(data: Path, output: Path, text_encoder: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--preset", "tiny",
            "--resolution", str(RES), "--max-steps", "6", "--checkpoint-every", "3",
            "--text-encoder", str(text_encoder), "--mixed-precision", "no", "--seed", "3", "--quiet", *extra]


def copy_checkpoints(run: Path, dest: Path) -> Path:
    """A model folder that was interrupted after its last checkpoint: only ``checkpoints/`` exists."""
    dest.mkdir()
    shutil.copytree(run / "checkpoints", dest / "checkpoints")
    return dest


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_text_encoder) -> dict[str, Path]:
    """Phantoms (24 at 32 px), the tiny text encoder, and one 2-process training run that keeps its
    checkpoints (``unet-3``, ``vae-final``)."""
    root = tmp_path_factory.mktemp("dist")
    data = write_phantom_folder(root / "phantoms", 24, size=RES, seed=0)
    run_a = root / "run_a"
    torchrun_two_nodes(["radsynth", *train_args(data, run_a, tiny_text_encoder, "--keep-checkpoints")], cwd=root)
    listing = sorted(p.name for p in root.iterdir())
    return {"root": root, "data": data, "te": tiny_text_encoder, "run_a": run_a, "listing": listing}


# ---------------------------------------------------------------------- train
def test_two_node_training_writes_one_model_once_and_is_reproducible(work):
    root, run_a = work["root"], work["run_a"]
    # exactly one model folder, complete, and nothing else written beside it
    assert work["listing"] == ["phantoms", "run_a"]
    for name in ("model_index.json", "radsynth.json", "README.md", *WEIGHT_FILES):
        assert (run_a / name).is_file(), name
    assert hidden_leftovers(run_a) == []
    # the checkpoints were written once each: the final VAE, the latest UNet step, run.json
    ckpts = run_a / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latents-mean.npy", "latents-std.npy", "latents.json", "run.json", "text-embeds.json", "text-embeds.npy",
        "unet-3", "vae-final"]
    state = json.loads((ckpts / "unet-3" / "state.json").read_text())
    assert state["step"] == 3 and state["num_processes"] == 2
    # the process count is recorded the same way everywhere
    info = json.loads((run_a / "radsynth.json").read_text())
    assert info["training"]["num_processes"] == 2
    assert info["training"]["steps"] == {"vae": 6, "unet": 6}
    assert "processes: 2" in (run_a / "README.md").read_text()
    # the log is written by the main process only: one header, one row per logged step
    rows = (run_a / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step,") and rows[1:] and len(rows[1:]) == len(set(rows[1:]))
    assert [r.split(",")[:2] for r in rows[1:]] == [["vae", "6"], ["unet", "6"]]
    # same command again -> same weights
    run_b = root / "run_b"
    torchrun_two_nodes(["radsynth", *train_args(work["data"], run_b, work["te"])], cwd=root)
    try:
        assert_same_weights(run_a, run_b)
        assert not (run_b / "checkpoints").exists()  # removed at the end without --keep-checkpoints
        assert hidden_leftovers(run_b) == []
    finally:
        shutil.rmtree(run_b, ignore_errors=True)


def test_accelerate_launch_two_machines_equals_torchrun(work):
    """The documented ``accelerate launch`` multi-machine config (two launchers, machine ranks 0 and 1)
    trains the same weights as the two torchrun nodes: same world size, same (seed, stage, step, rank)
    batches."""
    run_c = work["root"] / "run_accelerate"
    try:
        accelerate_two_machines(["radsynth", *train_args(work["data"], run_c, work["te"])], cwd=work["root"])
        info = json.loads((run_c / "radsynth.json").read_text())
        assert info["training"]["num_processes"] == 2
        assert_same_weights(work["run_a"], run_c)
        assert hidden_leftovers(run_c) == []
    finally:
        shutil.rmtree(run_c, ignore_errors=True)


def test_resume_at_the_same_world_size_is_exact(work):
    """A 2-process run interrupted after its step-3 checkpoint and resumed by 2 processes ends with the
    weights of the uninterrupted run."""
    resumed = copy_checkpoints(work["run_a"], work["root"] / "resume_2_2")
    torchrun_two_nodes(["radsynth", *train_args(work["data"], resumed, work["te"], "--resume")], cwd=work["root"])
    rows = (resumed / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["unet", "6"]]  # VAE finished, UNet went on from 3
    assert_same_weights(work["run_a"], resumed)


def test_resume_two_processes_to_one(work):
    """A 2-process checkpoint continues in one process (the checkpoint format has no world size)."""
    resumed = copy_checkpoints(work["run_a"], work["root"] / "resume_2_1")
    run_here(train_args(work["data"], resumed, work["te"], "--resume"))
    rows = (resumed / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["unet", "6"]]
    info = json.loads((resumed / "radsynth.json").read_text())
    assert info["training"]["num_processes"] == 1 and info["training"]["steps"] == {"vae": 6, "unet": 6}
    # it started from the checkpoint: same VAE as the 2-process run, a UNet that moved on from step 3
    vae = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(work["run_a"] / vae)), load_file(str(resumed / vae))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hidden_leftovers(resumed) == []


def test_resume_one_process_to_two(work, tmp_path):
    single = tmp_path / "single"
    run_here(train_args(work["data"], single, work["te"], "--keep-checkpoints"))
    assert json.loads((single / "checkpoints" / "unet-3" / "state.json").read_text())["num_processes"] == 1
    resumed = copy_checkpoints(single, tmp_path / "resume_1_2")
    torchrun_two_nodes(["radsynth", *train_args(work["data"], resumed, work["te"], "--resume")], cwd=tmp_path)
    rows = (resumed / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["unet", "6"]]
    info = json.loads((resumed / "radsynth.json").read_text())
    assert info["training"]["num_processes"] == 2
    vae = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(single / vae)), load_file(str(resumed / vae))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_schedule_counts_optimizer_steps(work):
    """The learning-rate schedule of a checkpoint is at its step, whatever the number of processes."""
    state = json.loads((work["run_a"] / "checkpoints" / "unet-3" / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == state["step"] == 3


# ---------------------------------------------------------------------- device
PROBE = """
import json, os
from accelerate import Accelerator, PartialState
from generator._utils import cpu_only
state = PartialState(cpu=cpu_only())
acc = Accelerator(cpu=cpu_only())
print("PROBE " + json.dumps({"rank": state.process_index, "local_rank": state.local_process_index,
      "env_local_rank": int(os.environ["LOCAL_RANK"]), "world": state.num_processes,
      "state_device": str(state.device), "acc_device": str(acc.device),
      "index": state.device.index, "acc_index": acc.device.index}))
"""


def test_device_comes_from_local_rank_not_global_rank(tmp_path):
    """Two nodes with one worker each: global ranks 0 and 1, both LOCAL_RANK 0; the device that
    accelerate gives RadSynth (training, generation and audit all take it from PartialState /
    Accelerator) has index LOCAL_RANK (or none), never the global rank 1."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    outputs = torchrun_two_nodes([str(script)], cwd=tmp_path, module=False)
    found = [json.loads(line.split("PROBE ", 1)[1]) for out in outputs for line in out.splitlines()
             if line.startswith("PROBE ")]
    assert sorted(f["rank"] for f in found) == [0, 1]
    for f in found:
        assert f["world"] == 2 and f["local_rank"] == f["env_local_rank"] == 0
        assert f["state_device"] == f["acc_device"] and f["state_device"].startswith("cpu")
        assert f["index"] in (None, f["local_rank"]) and f["acc_index"] in (None, f["local_rank"])


# ---------------------------------------------------------------------- generate
def _generate_args(model: Path, prompts: Path, output: Path) -> list[str]:
    return ["generate", "--model", str(model), "--prompts", str(prompts), "--output", str(output),
            "--steps", "3", "--seed", "11", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def generated(work) -> dict[str, Path]:
    """The same requests made by 2 processes (torchrun) and by 1 process (here)."""
    root = work["root"]
    prompts = root / "requests.jsonl"
    prompts.write_text(
        json.dumps({"text": "frontal chest radiograph, cardiomegaly", "num_images": 4}) + "\n"
        + json.dumps({"text": "frontal chest radiograph, no acute findings", "num_images": 3}) + "\n"
    )
    two, one = root / "gen2", root / "gen1"
    torchrun_two_nodes(["radsynth", *_generate_args(work["run_a"], prompts, two)], cwd=root)
    run_here(_generate_args(work["run_a"], prompts, one))
    return {"two": two, "one": one}


def test_generate_two_processes_equals_one(generated):
    two, one = generated["two"], generated["one"]
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    for name in pngs:
        assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} differs"
    lines_one = (one / "metadata.jsonl").read_text().splitlines()
    lines_two = (two / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(x)["file_name"] for x in lines_two] == pngs  # one merged manifest, sorted
    assert lines_one == lines_two


# ---------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def audit_index(tmp_path_factory) -> Path:
    """A reference index of 48 phantoms (half of them held out for calibration)."""
    root = tmp_path_factory.mktemp("audit")
    data = write_phantom_folder(root / "train", 48, size=RES, seed=1)
    out = root / "index"
    run_here(["index", "--data", str(data), "--output", str(out), "--resolution", str(RES),
              "--holdout-fraction", "0.5", "--embedder-steps", "5", "--alpha", "0.05", "--review-alpha", "0.1",
              "--quiet"])
    return out


def _audit(folder: Path, index: Path, two: bool, cwd: Path) -> None:
    argv = ["audit", "--index", str(index), "--synthetic", str(folder), "--json", str(folder.parent / f"{folder.name}.json"),
            "--html", str(folder.parent / f"{folder.name}.html"), "--quiet"]
    if two:
        torchrun_two_nodes(["radsynth", *argv], cwd=cwd)
    else:
        run_here(argv)


def _close(a, b, path: str = "") -> list[str]:
    """Paths where two JSON values differ beyond float noise (1e-6 absolute)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if abs(a - b) <= 1e-6 else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def embedder_batch_invariant(index: Path, n: int, world: int) -> bool:
    """Whether the index's copy-detection embedder gives each of ``n`` images the same float32
    embedding alone in one call as in the shares ``i % world`` of a split audit (the split audit is
    byte-identical to one process exactly then)."""
    from privacy.index import ReferenceIndex

    idx = ReferenceIndex.load(index)
    imgs = np.asarray(idx.images[:n], dtype=np.float32)
    with torch_threads(1):
        whole = idx.embedder.embed(imgs)
        return all(np.array_equal(whole[r::world], idx.embedder.embed(imgs[r::world])) for r in range(world))


def test_split_audit_equals_one_process(audit_index, tmp_path):
    """The same synthetic folder audited by 2 processes and by 1: same verdicts, report and manifest."""
    from privacy.index import ReferenceIndex

    root = tmp_path
    one, two = root / "audit1", root / "audit2"
    write_phantom_folder(one, 9, size=RES, seed=2)
    # plant an exact copy of a training image, so that at least one verdict is 'reject'
    train_id = ReferenceIndex.load(audit_index).ids[0]
    shutil.copy(audit_index.parent / "train" / Path(train_id).name, one / "phantom_000002.png")
    shutil.copytree(one, two)
    _audit(one, audit_index, False, root)
    _audit(two, audit_index, True, root)
    assert hidden_leftovers(two) == []  # the per-process parts are merged and deleted
    j1, j2 = json.loads((root / "audit1.json").read_text()), json.loads((root / "audit2.json").read_text())
    assert [v["file_name"] for v in j2["images"]] == [v["file_name"] for v in j1["images"]]
    assert [v["verdict"] for v in j2["images"]] == [v["verdict"] for v in j1["images"]]
    assert j1["images"][2]["file_name"] == "phantom_000002.png" and j1["images"][2]["verdict"] == "reject"
    assert j2["summary"]["counts"] == j1["summary"]["counts"] and "self_test" in j2["summary"]
    m1 = [json.loads(x) for x in (one / "metadata.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metadata.jsonl").read_text().splitlines()]
    assert [x["privacy_verdict"] for x in m2] == [x["privacy_verdict"] for x in m1]
    assert _close(j1, j2) == [] and _close(m1, m2) == []
    if embedder_batch_invariant(audit_index, n=9, world=2):
        assert (root / "audit1.json").read_bytes() == (root / "audit2.json").read_bytes()
        assert (root / "audit1.html").read_bytes() == (root / "audit2.html").read_bytes()
        assert (one / "metadata.jsonl").read_bytes() == (two / "metadata.jsonl").read_bytes()


def test_embedder_is_batch_invariant(audit_index):
    assert embedder_batch_invariant(audit_index, n=24, world=2)


# ---------------------------------------------------------------------- volumes (train --dims 3)
def volume_train_args(data: Path, output: Path, text_encoder: Path, *extra: str) -> list[str]:
    return ["train", "--dims", "3", "--data", str(data), "--output", str(output), "--preset", "tiny",
            "--resolution", "16", "--max-steps", "4", "--checkpoint-every", "2", "--text-encoder", str(text_encoder),
            "--mixed-precision", "no", "--seed", "3", "--quiet", *extra]


VOLUME_WEIGHT_FILES = ("vae/model.safetensors", "unet/model.safetensors")


def test_volume_training_two_processes_equals_one(tmp_path, tiny_text_encoder):
    """``train --dims 3`` under two torchrun nodes: one model folder and log written once, and the same
    weights as one process (each process trains on its share of the same batch) up to float rounding."""
    data = tmp_path / "vols"
    run_here(["phantoms", "--dims", "3", "--num-images", "8", "--shape", "16", "--seed", "0", "--output", str(data)])
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun_two_nodes(["radsynth", *volume_train_args(data, two, tiny_text_encoder, "--keep-checkpoints")],
                       cwd=tmp_path)
    run_here(volume_train_args(data, one, tiny_text_encoder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "vols"]
    assert hidden_leftovers(two) == []
    rows = (two / "train_log.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,seconds"
    assert [r.split(",")[:2] for r in rows[1:]] == [["vae", str(s)] for s in range(1, 5)] + [
        ["unet", str(s)] for s in range(1, 5)]
    # the logged loss is the whole batch's, whatever the number of processes
    losses = {run: [float(r.split(",")[2]) for r in (run / "train_log.csv").read_text().splitlines()[1:]]
              for run in (one, two)}
    np.testing.assert_allclose(losses[two], losses[one], rtol=1e-3)
    state = json.loads((two / "checkpoints" / "latest" / "state.json").read_text())
    assert state["vae_step"] == 4 and state["unet_step"] == 4 and state["unet_done"]
    # Float rounding differs (two half-batch gradients averaged vs one whole-batch gradient), and Adam's
    # first steps move a weight by about the learning rate whatever the size of its gradient, so weights
    # whose gradient is ~0 may end a few learning rates apart; all others must agree.
    for name in VOLUME_WEIGHT_FILES:
        a, b = load_file(str(two / name)), load_file(str(one / name))
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert float(diff.mean()) < 1e-5, f"{name}: 2 processes and 1 differ by {float(diff.mean())} on average"
        assert float((diff > 1e-4).float().mean()) < 0.01, f"{name}: {float((diff > 1e-4).float().mean()):.2%} differ"
