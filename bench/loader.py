"""KT-loader throughput: webdataset shards vs a folder-of-images torch Dataset, same images.

The folder baselines are how MPRNet and BasicSR users load paired data: a map-style Dataset
that opens `input/<name>` and `target/<name>` per item, takes a random crop and a random flip,
and a shuffled DataLoader batches them; MPRNet decodes with PIL, BasicSR with OpenCV
(cv2.imdecode), so both are timed. The shard side is `kt_loader` (teacher-stage
fields: input + target) over the same encoded bytes split into k degradation sources, so it
also pays for per-batch mixing. Both decode the full image and crop afterwards.

    .venv/bin/python bench/loader.py                      # synthetic 256x256 PNG pairs
    .venv/bin/python bench/loader.py --images DIR         # DIR/input/* and DIR/target/* (same names)

Prints samples/s per loader and worker count, and the ratios shards/folder (>= 1 means the shard
loader is not slower). Timings are the best of `--repeats` alternating runs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEGS = ("haze", "rain", "blur")


def synth_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """Photo-like PNG pairs (smooth colour fields plus mild noise: compress like real images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 6, size=(3, 2))
        ph = rng.uniform(0, 6.28, size=3)
        clean = np.stack([np.sin(f[c, 0] * xx * 6.28 + ph[c]) * np.cos(f[c, 1] * yy * 6.28) for c in range(3)], -1)
        clean = (clean * 90 + 128 + rng.normal(0, 4, clean.shape)).clip(0, 255).astype(np.uint8)
        hazy = (clean * 0.6 + 90 + rng.normal(0, 3, clean.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(hazy).save(root / "input" / f"{i:05d}.png")
        Image.fromarray(clean).save(root / "target" / f"{i:05d}.png")


def write_shards(folder: Path, out: Path, per_shard: int) -> list[Path]:
    """The folder's files, bytes unchanged, dealt round-robin into one shard set per degradation."""
    import webdataset as wds

    names = sorted(p.name for p in (folder / "input").iterdir())
    dirs = []
    for d_i, deg in enumerate(DEGS):
        mine = names[d_i :: len(DEGS)]
        d = out / deg
        d.mkdir(parents=True)
        entries = []
        for s in range(0, len(mine), per_shard):
            fname = f"{deg}-{s // per_shard:06d}.tar"
            with wds.TarWriter(str(d / fname)) as sink:
                for name in mine[s : s + per_shard]:
                    stem, ext = os.path.splitext(name)
                    sink.write({
                        "__key__": stem,
                        f"input{ext}": (folder / "input" / name).read_bytes(),
                        f"target{ext}": (folder / "target" / name).read_bytes(),
                        "json": json.dumps({"degradation": deg, "domain": "synthetic", "source": "bench",
                                            "split": "train"}).encode(),
                    })
            entries.append({"name": fname})
        (d / "manifest.json").write_text(json.dumps({"shards": entries}))
        dirs.append(d)
    return dirs


class FolderPairs:
    """MPRNet/BasicSR-style paired folder dataset (map-style, one file open per image)."""

    def __init__(self, folder: Path, crop: int, decoder: str = "pil"):
        self.folder, self.crop, self.decoder = folder, crop, decoder
        self.names = sorted(p.name for p in (folder / "input").iterdir())

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        name = self.names[i]
        if self.decoder == "cv2":  # BasicSR: read bytes, cv2.imdecode, BGR -> RGB
            import cv2

            def read(p: Path) -> np.ndarray:
                return cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        else:  # MPRNet: PIL.Image.open(...).convert("RGB")

            def read(p: Path) -> np.ndarray:
                return np.asarray(Image.open(p).convert("RGB"))
        inp, tgt = read(self.folder / "input" / name), read(self.folder / "target" / name)
        h, w = inp.shape[:2]
        y, x = np.random.randint(0, h - self.crop + 1), np.random.randint(0, w - self.crop + 1)
        inp, tgt = inp[y : y + self.crop, x : x + self.crop], tgt[y : y + self.crop, x : x + self.crop]
        if np.random.rand() < 0.5:
            inp, tgt = inp[:, ::-1], tgt[:, ::-1]
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 127.5 - 1
        return {"input": to_t(inp), "target": to_t(tgt)}


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_batches(make_iter, n_batches: int, warmup: int) -> tuple[float, float]:
    """(wall seconds for n_batches after `warmup` batches, CPU seconds of the whole run).

    Wall time is what training sees but swings with other load on a shared machine; CPU seconds
    per sample (workers included, start-up and prefetch included) is the steadier cost measure.
    """
    gc.collect()
    cpu0 = _cpu_seconds()
    it = make_iter()
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    for _ in it:  # nothing is left; ends the DataLoader, whose workers are joined: their CPU time counts
        raise RuntimeError("the loader made more batches than were asked for")
    del it
    gc.collect()
    return dt, _cpu_seconds() - cpu0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="folder with input/ and target/ (same file names)")
    ap.add_argument("--n", type=int, default=192, help="synthetic image pairs")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per run")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per setting; best is kept")
    args = ap.parse_args(argv)
    for name in ("n", "size", "crop", "batch", "batches", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0 or min(args.workers) < 0:
        ap.error("--warmup and --workers must not be negative")
    if args.images is None and args.crop > args.size:  # the random crop needs room (was: numpy 'high <= 0')
        ap.error(f"--crop {args.crop} is larger than the synthetic images (--size {args.size})")
    if args.images is not None and not ((args.images / "input").is_dir() and (args.images / "target").is_dir()):
        ap.error(f"--images {args.images} needs input/ and target/ folders (same file names)")
    n_pairs = args.n if args.images is None else len(list((args.images / "input").iterdir()))
    if n_pairs < args.batch:  # the folder loader drops the last partial batch: an empty epoch loops forever
        ap.error(f"{n_pairs} image pair(s) make no full batch of --batch {args.batch}")

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from uniremoval.data.pipelines import kt_loader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.images
        if folder is None:
            folder = tmp / "folder"
            synth_images(folder, args.n, args.size)
        n_images = len(list((folder / "input").iterdir()))
        dirs = write_shards(folder, tmp / "shards", per_shard=16)
        print(f"{n_images} image pairs, crop {args.crop}, batch {args.batch}, {args.batches} timed batches")

        def folder_iter(workers: int, decoder: str):
            ds = FolderPairs(folder, args.crop, decoder)
            # Exactly the samples a run takes, in shuffled passes over the set: one epoch of the
            # DataLoader (no re-fork per pass, fair to small sets), and its workers' read-ahead decodes
            # nothing that is not consumed (as kt_loader, which stops at its step count).
            sampler = RandomSampler(ds, num_samples=n_all)
            return iter(DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=workers, drop_last=True))

        def shard_iter(workers: int):
            ld = kt_loader([(d.name, d, d.name, 1.0) for d in dirs], list(DEGS), args.batch, args.crop,
                           args.batches + args.warmup, workers, seed=0, rank=0, world_size=1,
                           require=("target",), shuffle_buffer=32)
            return iter(ld)

        runs = {
            "folder-PIL (MPRNet)": lambda w: folder_iter(w, "pil"),
            "folder-cv2 (BasicSR)": lambda w: folder_iter(w, "cv2"),
            "shards (kt_loader)": shard_iter,
        }
        print(f"{'':>7} " + " ".join(f"{k:>21}" for k in runs) + "   shards/PIL  shards/cv2")
        n_all = (args.batches + args.warmup) * args.batch
        for w in args.workers:
            wall = dict.fromkeys(runs, 0.0)
            cpu = dict.fromkeys(runs, 0.0)
            for _ in range(args.repeats):  # alternate so machine-load drift hits all alike
                for name, fn in runs.items():
                    dt, c = time_batches(functools.partial(fn, w), args.batches, args.warmup)
                    wall[name] = max(wall[name], args.batches * args.batch / dt)
                    cpu[name] = max(cpu[name], n_all / c)
            for label, d in ((f"{w} worker{'s' if w > 1 else ''}: samples/s (wall)", wall),
                             (f"{w} worker{'s' if w > 1 else ''}: samples/CPU-s", cpu)):
                a, b, c = d.values()
                print(f"{label}\n{'':>7} " + " ".join(f"{v:>21.1f}" for v in d.values())
                      + f"   {c / a:>10.2f}  {c / b:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
