"""Eval's and validation's image reading, in the loop (as before) and read ahead in a thread (what
`uniremoval eval` and validation do now), side by side on the same images.

The images are read by eval's own folder reader (`iter_folder`: decode, EXIF orientation, to a
float tensor), and each one is then "restored" by a sleep of --restore-ms: on a GPU the host waits
that long for the model, which is the time read-ahead fills with the next decode.

    .venv/bin/python bench/read_ahead.py                    # 24 photo-like 1280x720 PNGs, 100 ms restore
    .venv/bin/python bench/read_ahead.py --data DIR --restore-ms 50

Prints images/s both ways (best of --repeats, alternating), the ratio, and the decode time per image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_like(folder: Path, n: int, width: int, height: int) -> None:
    """Smooth colour fields with mild noise (they compress like photos), saved as PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(n):
        f, ph = rng.uniform(1, 6, size=(3, 2)), rng.uniform(0, 6.28, size=3)
        img = np.stack([np.sin(f[c, 0] * xx * 6.28 + ph[c]) * np.cos(f[c, 1] * yy * 6.28) for c in range(3)], -1)
        img = (img * 90 + 128 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.png", compress_level=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a folder of images (default: synthetic PNGs)")
    ap.add_argument("--images", type=int, default=24, help="synthetic images")
    ap.add_argument("--size", default="1280x720", help="synthetic image size WxH")
    ap.add_argument("--restore-ms", type=float, default=100.0, help="the restore's stand-in, per image")
    ap.add_argument("--depth", type=int, default=2, help="items read ahead")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: give WxH, e.g. 1280x720")
    if args.images < 1 or args.repeats < 1 or args.depth < 1 or args.restore_ms < 0 or min(width, height) < 1:
        ap.error("--images, --repeats, --depth and the size must be positive, --restore-ms not negative")
    if args.data is not None and not args.data.is_dir():
        ap.error(f"--data {args.data} is not a folder")

    import torch

    from uniremoval.data.read_ahead import read_ahead
    from uniremoval.eval.evaluate import iter_folder

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="read_ahead_") as tmp:
        folder = args.data
        if folder is None:
            folder = Path(tmp) / "images"
            photo_like(folder, args.images, width, height)

        def run(ahead: bool) -> tuple[float, int]:
            items = iter_folder(str(folder), 0, 1, need_target=False)
            if ahead:
                items = read_ahead(items, depth=args.depth)
            t0, n = time.perf_counter(), 0
            for _ in items:
                time.sleep(args.restore_ms / 1000)  # the host waiting for the GPU's restore
                n += 1
            return time.perf_counter() - t0, n

        t0 = time.perf_counter()
        n = sum(1 for _ in iter_folder(str(folder), 0, 1, need_target=False))  # warm-up: page cache, imports
        decode_ms = (time.perf_counter() - t0) / n * 1000
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for ahead in (False, True):
                best[ahead] = min(best[ahead], run(ahead)[0])
    serial, ahead = n / best[False], n / best[True]
    print(f"{n} images from {folder if args.data else f'synthetic {width}x{height} PNGs'}: reading "
          f"{decode_ms:.1f} ms an image alone; restore stand-in {args.restore_ms:g} ms")
    print(f"in the loop: {serial:.2f} images/s   read ahead (depth {args.depth}): {ahead:.2f} images/s   "
          f"ratio {ahead / serial:.2f}x   (limit {(args.restore_ms + decode_ms) / max(args.restore_ms, decode_ms):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
