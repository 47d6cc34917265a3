"""Benchmark ``radsynth prepare`` and ``radsynth train`` at scale (issue 9): peak RSS and speed against N.

For each N (default 2,000 and 20,000) and worker count (default 1 and 2) a fresh child process runs
:func:`generator.data.preparing.prepare` on an imagefolder of N phantom PNGs and reports its wall
time, its own peak RSS (``ru_maxrss`` of the process that plans, reads with one worker, and writes
the manifest), the largest RSS of any worker process and the largest sum over all its processes
(both sampled every 0.1 s with psutil; workers are forkserver grandchildren).

Data: ``--unique`` phantoms (default 2,000) are rendered with
:func:`generator.phantoms.write_phantom_folder`; a folder of N > unique images hard-links the
rendered PNGs under new names (``img_0001234.png`` -> phantom ``1234 % unique``) with one
metadata row each (the phantom's row, new ``file_name``). Every file is decoded as usual, but the
page cache holds at most ``unique`` distinct files, so disk reads are not measured. All data goes to
``--workdir`` (default ``/tmp/radsynth_bench_scale``), never into the repository.

Training rows (``--train-sizes``): for each N a fresh child process runs ``radsynth train --max-steps K``
(``--train-preset``, default tiny, float32, default text encoder) from a folder prepared at
``--resolution`` (prepared once, kept in ``--workdir``), and, for N <= ``--train-in-memory-max``, from the
raw imagefolder held in memory. Reported: wall time of the whole command (ingest or open, VAE stage,
latent caching, prompt encoding, UNet stage, saving), VAE and UNet steps/s from ``train_log.csv``, and
the child's peak RSS (``ru_maxrss``; DataLoader workers, if any, not counted).

Threads are pinned (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` = ``--threads``,
default 1) in every child: the CPUs here are shared (DESIGN.md §9).

Example::

    python scripts/bench_scale.py --sizes 2000 20000 --workers 1 2
    python scripts/bench_scale.py --sizes 2000 20000 100000 --workers 1 2 --json results.json
    python scripts/bench_scale.py --sizes --train-sizes 2000 20000 --train-steps 20   # training rows only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def _phantoms(workdir: Path, unique: int, size: int) -> Path:
    base = workdir / f"phantoms_{unique}_{size}"
    if not (base / "metadata.jsonl").is_file():
        from generator.phantoms import write_phantom_folder

        if base.exists():
            shutil.rmtree(base)
        t0 = time.time()
        write_phantom_folder(base, unique, size=size, seed=0)
        print(f"rendered {unique} phantoms at {size} px in {time.time() - t0:.0f} s", file=sys.stderr)
    return base


def _folder(workdir: Path, base: Path, n: int, unique: int, size: int) -> Path:
    """An imagefolder of ``n`` images hard-linked from ``base`` (built once, reused)."""
    if n <= unique:
        folder = workdir / f"src_{n}_{size}"
    else:
        folder = workdir / f"src_{n}_{size}_of_{unique}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = [json.loads(line) for line in (base / "metadata.jsonl").read_text().splitlines() if line.strip()]
    with open(folder / "metadata.tmp", "w") as f:
        for i in range(n):
            row = dict(rows[i % unique])
            src = base / row["file_name"]
            row["file_name"] = f"img_{i:07d}.png"
            os.link(src, folder / row["file_name"])
            f.write(json.dumps(row) + "\n")
    os.replace(folder / "metadata.tmp", folder / "metadata.jsonl")
    return folder


def _child(argv: Sequence[str]) -> int:
    """``--child SRC OUT RESOLUTION WORKERS SHARD_SIZE``: run one preparation and print a JSON line."""
    from generator.data.preparing import prepare

    import threading

    import psutil

    src, out, resolution, workers = argv[0], argv[1], int(argv[2]), int(argv[3])
    shard_size = int(argv[4]) if len(argv) > 4 and int(argv[4]) > 0 else None
    me = psutil.Process()
    peak = {"worker": 0, "total": 0}
    stop = threading.Event()

    def sample() -> None:  # worker processes are grandchildren (forkserver): poll their RSS
        while not stop.wait(0.1):
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    rss, parent = child.memory_info().rss, child.ppid()
                except psutil.Error:
                    continue
                if parent != me.pid:  # forked by the forkserver: a worker
                    peak["worker"] = max(peak["worker"], rss)
                total += rss
            peak["total"] = max(peak["total"], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = prepare(src, out, resolution=resolution, workers=workers, shard_size=shard_size, overwrite=True,
                     progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    print(json.dumps({
        "count": result.count, "shards": result.shards, "seconds": seconds,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": peak["worker"] / 2**20,
        "rss_total_sampled_mb": peak["total"] / 2**20,
    }))
    return 0


def _train_child(argv: Sequence[str]) -> int:
    """``--train-child DATA OUT RESOLUTION PRESET STEPS WORKERS``: one ``radsynth train``; prints a JSON line."""
    import csv

    from radsynth.cli import main as radsynth_main

    data, out, resolution, preset, steps, workers = argv[0], argv[1], argv[2], argv[3], argv[4], argv[5]
    t0 = time.perf_counter()
    rc = radsynth_main(["train", "--data", data, "--output", out, "--preset", preset, "--resolution", resolution,
                        "--max-steps", steps, "--mixed-precision", "no", "--dataloader-workers", workers,
                        "--overwrite", "--quiet"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        return rc
    rate: dict[str, float] = {}
    with open(Path(out) / "train_log.csv", newline="") as f:
        for row in csv.DictReader(f):
            rate[row["stage"]] = float(row["steps_per_s"])  # the last row of each stage
    info = json.loads((Path(out) / "radsynth.json").read_text())
    print(json.dumps({
        "count": info["data"]["num_images"], "read_from": info["data"]["read_from"], "seconds": seconds,
        "vae_steps_per_s": rate.get("vae"), "unet_steps_per_s": rate.get("unet"),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


def _train_rows(args: argparse.Namespace, base: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Training rows: prepared folder for every N, raw in memory for N <= ``--train-in-memory-max``."""
    from generator.data.prepared import is_prepared
    from generator.data.preparing import prepare

    rows: list[dict[str, Any]] = []
    for n in args.train_sizes:
        src = _folder(args.workdir, base, n, args.unique, args.size)
        prepared = args.workdir / f"train_prepared_{n}_{args.resolution}"
        if not is_prepared(prepared):
            t0 = time.time()
            prepare(src, prepared, resolution=args.resolution, workers=2, overwrite=True, progress=False)
            print(f"prepared N={n} in {time.time() - t0:.0f} s", file=sys.stderr)
        inputs = [("prepared", prepared)] + ([("memory", src)] if n <= args.train_in_memory_max else [])
        for mode, data in inputs:
            out = args.workdir / f"train_out_{n}_{mode}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--train-child", str(data), str(out),
                   str(args.resolution), args.train_preset, str(args.train_steps), str(args.train_workers)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(proc.returncode)
            row = {"n": n, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"train N={n} {mode}: {row['seconds']:.1f} s, RSS {row['rss_mb']:.0f} MB", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a Markdown table (and writes ``--json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    if argv[:1] == ["--train-child"]:
        return _train_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000], help="N of the prepare rows (none: skip)")
    p.add_argument("--train-sizes", type=int, nargs="*", default=[], help="N of the training rows (default none)")
    p.add_argument("--train-steps", type=int, default=20, help="--max-steps of each training run (default 20)")
    p.add_argument("--train-preset", default="tiny", help="preset of the training runs (default tiny)")
    p.add_argument("--train-workers", type=int, default=0, help="--dataloader-workers of the training runs")
    p.add_argument("--train-in-memory-max", type=int, default=2000,
                   help="largest N also trained from the raw folder in memory (default 2000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, default=128, help="phantom side in pixels (default 128)")
    p.add_argument("--resolution", type=int, default=128, help="prepared resolution (default 128)")
    p.add_argument("--unique", type=int, default=2000, help="distinct phantoms rendered (default 2000)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="files per shard (default 0: prepare's default, 2048 at 128 px)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per process (default 1)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/radsynth_bench_scale"))
    p.add_argument("--keep", action="store_true", help="keep the prepared outputs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    base = _phantoms(args.workdir, args.unique, args.size)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    results: list[dict[str, Any]] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads per process: {args.threads}; CPUs visible: {os.cpu_count()} (load average {load:.1f}); "
          f"phantoms {args.size} px "
          f"({args.unique} distinct), prepared at {args.resolution} px", file=sys.stderr)
    for n in args.sizes:
        src = _folder(args.workdir, base, n, args.unique, args.size)
        for w in args.workers:
            out = args.workdir / f"prepared_{n}_w{w}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(out),
                   str(args.resolution), str(w), str(args.shard_size)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            row = {"n": n, "workers": w, "shard_size": args.shard_size or None,
                   **json.loads(proc.stdout.strip().splitlines()[-1])}
            row["images_per_s"] = row["count"] / row["seconds"]
            row["images_per_s_per_worker"] = row["images_per_s"] / w
            results.append(row)
            print(f"N={n} workers={w}: {row['seconds']:.1f} s, {row['images_per_s']:.0f} images/s, "
                  f"RSS main {row['rss_main_mb']:.0f} MB, worker {row['rss_worker_mb']:.0f} MB", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    if results:
        print("| N | workers | seconds | images/s | images/s per worker | peak RSS main (MB) | peak RSS worker (MB) "
              "| peak RSS all processes (MB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            worker = f"{r['rss_worker_mb']:.0f}" if r["workers"] > 1 else "-"
            print(f"| {r['n']} | {r['workers']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
                  f"{r['images_per_s_per_worker']:.0f} | {r['rss_main_mb']:.0f} | {worker} | "
                  f"{r['rss_total_sampled_mb']:.0f} |")
        for w in args.workers:
            rss = [max(r["rss_main_mb"], r["rss_worker_mb"]) for r in results if r["workers"] == w]
            if len(rss) > 1:
                print(f"workers={w}: largest process peak RSS grows {100 * (rss[-1] / rss[0] - 1):+.1f}% "
                      f"from N={args.sizes[0]} to N={args.sizes[-1]}")
    train = _train_rows(args, base, env) if args.train_sizes else []
    if train:
        print(f"\ntraining: preset {args.train_preset}, {args.resolution} px, --max-steps {args.train_steps}, "
              f"{args.threads} thread(s), --dataloader-workers {args.train_workers}")
        print("| N | data read from | seconds (whole command) | VAE steps/s | UNet steps/s | peak RSS (MB) |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in train:
            print(f"| {r['n']} | {r['read_from']} | {r['seconds']:.1f} | {r['vae_steps_per_s']:.2f} | "
                  f"{r['unet_steps_per_s']:.2f} | {r['rss_mb']:.0f} |")
        disk = [r["rss_mb"] for r in train if r["read_from"] == "prepared"]
        if len(disk) > 1:
            print(f"prepared: peak RSS grows {100 * (disk[-1] / disk[0] - 1):+.1f}% from N={args.train_sizes[0]} "
                  f"to N={args.train_sizes[-1]}")
    if args.json is not None:
        args.json.write_text(json.dumps({"prepare": results, "train": train} if train else results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
