"""Shard build throughput with 1 and 2 worker processes on generated paired images.

    .venv/bin/python bench/shards.py [--pairs 96] [--size 256] [--shard-size-mb 4] [--workers 1 2] [--repeats 5]

Writes a paired-folder dataset of noisy PNGs (incompressible, so bytes are realistic) to a
temporary folder, builds it once per worker count untimed (warm-up: lazy imports, page cache), then
`--repeats` times per worker count, alternating, each into a fresh output folder, and prints the
median samples/s, MB/s (shard bytes written per wall-clock second, process start-up included) and
the ratio to the first worker count. The work per sample is what a real build does: read both
files, fully decode both to check them, write the tar, hash it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uniremoval.data.readers import ReaderOptions, read_dataset
from uniremoval.data.shardwriter import FileSampleBuilder, build_shards


def make_dataset(root: Path, pairs: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for sub in ("input", "target"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        clean = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        noisy = np.clip(clean.astype(int) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "input" / f"{i:05d}.png", compress_level=1)
        Image.fromarray(clean).save(root / "target" / f"{i:05d}.png", compress_level=1)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(root: Path, out: Path, workers: int, shard_mb: float) -> tuple[float, float, float, int, float]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = read_dataset("paired-folder", root, ReaderOptions(degradation="rain"))
    summary = build_shards(
        result.items,
        result.issues,
        FileSampleBuilder(root=str(root), dataset="bench"),
        out,
        dataset="bench",
        source={"format": "paired-folder", "root": str(root)},
        shard_bytes=int(shard_mb * 1e6),
        workers=workers,
        progress=False,
    )
    seconds = time.perf_counter() - start
    cpu_ms = (_cpu_seconds() - cpu) / max(summary.samples, 1) * 1e3
    return summary.samples / seconds, summary.bytes / 1e6 / seconds, seconds, summary.shards_built, cpu_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--size", type=int, default=256, help="image side, pixels")
    ap.add_argument("--shard-size-mb", type=float, default=4.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed builds per worker count (median kept)")
    args = ap.parse_args()
    for name in ("pairs", "size", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.shard_size_mb <= 0:
        ap.error("--shard-size-mb must be positive")
    if min(args.workers) < 1:
        ap.error("--workers must be at least 1")
    workers = list(dict.fromkeys(args.workers))  # a count given twice is the same setting
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, args.pairs, args.size)
        data_mb = sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"dataset: {args.pairs} pairs of {args.size}x{args.size} PNG, {data_mb:.1f} MB; "
            f"{os.cpu_count()} CPU(s) visible, load average {load:.1f} (other work shares the CPUs)"
        )
        # Untimed warm-up per worker count: the first build in a process pays one-off costs (lazy
        # imports that forked workers then inherit, the page cache), which made the ratio depend
        # on the order of --workers (1 then 2 read 3.7x on 2 cores, 2 then 1 read 0.44x).
        runs = itertools.count()
        for w in workers:
            run(root, Path(tmp) / f"out{next(runs)}", w, args.shard_size_mb)
        timed: dict[int, list[tuple[float, float, float, int, float]]] = {w: [] for w in workers}
        for _ in range(args.repeats):
            for w in workers:  # alternate, so load drift on a shared machine hits every count alike
                # a fresh folder per build: a finished one is resumed, building nothing
                timed[w].append(run(root, Path(tmp) / f"out{next(runs)}", w, args.shard_size_mb))
        results = []
        for w in workers:
            sps, mbps, secs, shards, cpu_ms = (statistics.median(r[i] for r in timed[w]) for i in range(5))
            results.append((w, sps, mbps))
            print(
                f"workers={w}: {sps:7.1f} samples/s  {mbps:7.1f} MB/s  ({secs:.2f} s, {shards:.0f} shards, "
                f"{cpu_ms:.1f} CPU ms/sample; median of {args.repeats})"
            )
        base = results[0]
        for w, sps, mbps in results[1:]:
            print(
                f"ratio workers={w} / workers={base[0]}: {sps / base[1]:.2f}x samples/s, {mbps / base[2]:.2f}x MB/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
