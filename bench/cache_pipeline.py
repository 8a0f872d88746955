"""The cache stage's CPU side with and without encoder threads, side by side (runs on CPU).

    python bench/cache_pipeline.py [--frames 24] [--size 1280x720] [--workers 2] [--repeats 3]

`uniremoval cache` decodes each input, runs the teacher, PNG-encodes the teacher image and writes
the tar. On a GPU the teacher takes ~0.1 s a 720p frame and the CPU work about as long, so done in
between the teacher's batches it leaves the GPU idle half the time. This times `cache_shard` with a
stand-in teacher that costs nothing (the limit a fast GPU approaches), serial (`cache.workers: 0`)
against decoding and encoding in threads (`cache.workers`), checks the two shards are the same
bytes, and prints frames/s and the ratio as JSON. Each side runs once untimed (warm-up), then
`--repeats` times, the two sides alternating; the medians are printed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from uniremoval.data.transforms import BULK_PNG_LEVEL, encode_png
from uniremoval.stages import fast
from uniremoval.stages.cache import _want, cache_shard
from uniremoval.stages.teachers import pool_feature


class FreeTeacher:
    """The teacher's interface (image in [-1, 1], pooled feature) at no cost: the input itself."""

    sha256 = "0" * 64
    input_range = "minus_one_one"

    def __call__(self, x: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clamp(-1, 1), pool_feature(x, cell)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", default="1280x720")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--png-level", type=int, default=BULK_PNG_LEVEL, help="zlib level of the stored PNGs")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median kept)")
    args = p.parse_args()
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, e.g. 1280x720 (got {args.size!r})")
    if w < 16 or h < 16:
        p.error(f"--size must be at least 16x16, the feature grid's cell (got {args.size})")
    for name in ("frames", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.workers < 1:
        p.error("--workers must be at least 1 (the threaded side; the serial side has none)")
    if not 0 <= args.png_level <= 9:
        p.error(f"--png-level is a zlib level, 0 to 9 (got {args.png_level})")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu import photo_like_frames

    with tempfile.TemporaryDirectory(prefix="cache_pipeline_") as tmp:
        src = Path(tmp) / "src.tar"
        frames = [encode_png(f) for f in photo_like_frames(4, w, h)]
        with tarfile.open(src, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(args.frames):
                for ext, data in (("input.png", frames[i % 4]), ("json", b'{"degradation": "blur"}')):
                    info = tarfile.TarInfo(f"f{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        teacher = FreeTeacher()
        want = _want({"url": str(src), "source_sha256": "0" * 64}, teacher, 16, "no")
        speed = fast.Speed(device=torch.device("cpu"))
        out: dict = {"frames": args.frames, "size": args.size, "batch": args.batch, "workers": args.workers,
                     "png_level": args.png_level}
        shas: dict[str, set] = {"serial": set(), "threads": set()}
        times: dict[str, list[float]] = {"serial": [], "threads": []}
        # one untimed run per side first (imports, thread start-up, page cache), then alternate the
        # sides so load drift on a shared machine hits both alike
        for i in range(1 + args.repeats):
            for label, workers in (("serial", 0), ("threads", args.workers)):
                d = Path(tmp) / f"{label}{i}"
                d.mkdir()
                t0 = time.perf_counter()
                rec = cache_shard(str(src), d, "c.tar", teacher, 16, speed, want, batch_size=args.batch,
                                  workers=workers, png_level=args.png_level)
                if i:
                    times[label].append(rec["samples"] / (time.perf_counter() - t0))
                shas[label].add(rec["sha256"])
        for label, v in times.items():
            out[f"{label}_frames_s"] = round(statistics.median(v), 2)
    out["repeats"] = args.repeats
    out["same_bytes"] = len(shas["serial"] | shas["threads"]) == 1  # every run, both sides
    out["ratio"] = round(out["threads_frames_s"] / out["serial_frames_s"], 2)
    print(json.dumps(out))
    return 0 if out["same_bytes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
