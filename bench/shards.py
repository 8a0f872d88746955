"""Shard build throughput with 1 and 2 worker processes on generated paired images.

    .venv/bin/python bench/shards.py [--pairs 96] [--size 256] [--shard-size-mb 4] [--workers 1 2]

Writes a paired-folder dataset of noisy PNGs (incompressible, so bytes are realistic) to a
temporary folder, builds it once per worker count into fresh output folders, and prints samples/s,
MB/s (shard bytes written per wall-clock second, process start-up included) and the ratio to the
first worker count. The work per sample is what a real build does: read both files, fully decode
both to check them, write the tar, hash it.
"""

from __future__ import annotations

import argparse
import os
import resource
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, args.pairs, args.size)
        data_mb = sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"dataset: {args.pairs} pairs of {args.size}x{args.size} PNG, {data_mb:.1f} MB; "
            f"{os.cpu_count()} CPU(s) visible, load average {load:.1f} (other work shares the CPUs)"
        )
        results = []
        for w in args.workers:
            sps, mbps, secs, shards, cpu_ms = run(root, Path(tmp) / f"out{w}", w, args.shard_size_mb)
            results.append((w, sps, mbps))
            print(
                f"workers={w}: {sps:7.1f} samples/s  {mbps:7.1f} MB/s  ({secs:.2f} s, {shards} shards, "
                f"{cpu_ms:.1f} CPU ms/sample)"
            )
        base = results[0]
        for w, sps, mbps in results[1:]:
            print(
                f"ratio workers={w} / workers={base[0]}: {sps / base[1]:.2f}x samples/s, {mbps / base[2]:.2f}x MB/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
