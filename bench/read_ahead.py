"""Reading and writing images around the model, in the loop (as before) and overlapped with it in
threads (what validation, `uniremoval eval` and `uniremoval restore` do now), side by side.

eval: eval's folder reader (`iter_folder`: decode, EXIF orientation, to a float tensor), then a sleep
of --restore-ms for each image (on a GPU the host waits that long for the model), in the loop vs read
ahead. restore: the same, plus the output's PNG (what `restore` and `eval --save-images` write), in
the loop (`write_png`) vs read ahead with the PNGs encoded in 2 threads and written behind the loop.

    .venv/bin/python bench/read_ahead.py                    # 24 photo-like 1280x720 PNGs, 100 ms restore
    .venv/bin/python bench/read_ahead.py --data DIR --restore-ms 50

Prints images/s both ways for each (best of --repeats, alternating), the ratios, and the read and
write times per image.
"""

from __future__ import annotations

import argparse
import contextlib
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
    from uniremoval.eval.restore import png_bytes, write_png
    from uniremoval.io import WriteBehind

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="read_ahead_") as tmp:
        folder = args.data
        if folder is None:
            folder = Path(tmp) / "images"
            photo_like(folder, args.images, width, height)

        def run(ahead: bool, write: bool) -> float:
            items = iter_folder(str(folder), 0, 1, need_target=False)
            if ahead:
                items = read_ahead(items, depth=args.depth)
            t0 = time.perf_counter()
            with WriteBehind(workers=2, pending=2) if ahead and write else contextlib.nullcontext() as writer:
                for i, item in enumerate(items):
                    time.sleep(args.restore_ms / 1000)  # the host waiting for the GPU's restore
                    if write:
                        out = Path(tmp) / "out" / f"{i}.png"
                        if writer is not None:
                            writer.submit(out, png_bytes, item.image)
                        else:
                            write_png(out, item.image)
            return time.perf_counter() - t0

        (Path(tmp) / "out").mkdir()
        t0 = time.perf_counter()
        images = list(iter_folder(str(folder), 0, 1, need_target=False))  # warm-up: page cache, imports
        n = len(images)
        read_ms = (time.perf_counter() - t0) / n * 1000
        t0 = time.perf_counter()
        for i, item in enumerate(images):
            write_png(Path(tmp) / "out" / f"{i}.png", item.image)
        write_ms = (time.perf_counter() - t0) / n * 1000
        del images
        best = {(a, w): float("inf") for a in (False, True) for w in (False, True)}
        for _ in range(args.repeats):
            for key, so_far in best.items():
                best[key] = min(so_far, run(*key))
    print(f"{n} images from {folder if args.data else f'synthetic {width}x{height} PNGs'}: reading "
          f"{read_ms:.1f} ms an image, writing its PNG {write_ms:.1f} ms (alone); restore stand-in {args.restore_ms:g} ms")
    for write, label in ((False, "eval (read)"), (True, "restore (read + write)")):
        loop, overlapped = n / best[(False, write)], n / best[(True, write)]
        print(f"{label:<24} in the loop: {loop:6.2f} images/s   overlapped: {overlapped:6.2f} images/s   "
              f"ratio {overlapped / loop:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
