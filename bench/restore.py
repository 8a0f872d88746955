"""`uniremoval restore` over a folder of same-size photos: one image per forward pass vs batches, side by side.

    python bench/restore.py [--preset tiny] [--size 480x320] [--images 16] [--batch-size 4]
                            [--repeat 3] [--device cpu|cuda] [--threads N] [--cpu-pass-pixels N]

Writes `--images` photo-like PNGs of one size and a checkpoint of the preset (random weights) into a
temporary folder, then runs the real command (`uniremoval.cli.main`: reading ahead, writing behind)
with `--batch-size 1` (one image a pass: what restore did before it batched) and with `--batch-size N`,
alternating, `--repeat` times after one untimed pass of each. Prints the median images/s of each, the
ratio, and the largest difference between the two runs' PNGs in 8-bit levels (float summation order
only: exit 1 above 1 level). On the CPU restore caps a pass at `eval.restore.CPU_PASS_PIXELS`, which
this bench measured: `--cpu-pass-pixels 0` lifts the cap (batches as asked), another value replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="MPRNet preset (deblur: the paper's width)")
    ap.add_argument("--size", default="480x320", help="WxH of the photos")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per path, alternating (median kept)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cpu-pass-pixels", type=int, default=None,
                    help="pixels a CPU pass may hold (default: restore's; 0: no cap)")
    args = ap.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r} is not WxH, e.g. 480x320")
    if min(args.images, args.batch_size, args.repeat, width, height) < 1 or (args.threads or 1) < 1:
        ap.error("--images, --batch-size, --repeat, --threads and the size must be positive")

    import numpy as np
    import torch
    from PIL import Image

    import uniremoval.eval.restore as restore_mod
    from uniremoval.cli import main as cli
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_pass_pixels is not None:
        if args.cpu_pass_pixels < 0:
            ap.error("--cpu-pass-pixels must be >= 0 (0: no cap)")
        restore_mod.CPU_PASS_PIXELS = args.cpu_pass_pixels or 1 << 62
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_restore_") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        ckpt = save_checkpoint(root / "ck" / "student", MPRNet(args.preset).eval(), {"step": 0})
        photos = root / "in"
        photos.mkdir()
        yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
        rng = np.random.default_rng(0)
        for i in range(args.images):  # smooth colour fields with a little noise: photo-like PNG sizes
            a, b = rng.uniform(2, 8, 2)
            rgb = np.stack([np.sin(a * xx + i), np.cos(b * yy), xx * yy], -1) * 100 + 128
            rgb += rng.normal(0, 4, rgb.shape)
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(photos / f"photo_{i:03d}.png")

        def run(batch: int) -> float:
            out = root / f"out_b{batch}"
            quiet = io.StringIO()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with contextlib.redirect_stderr(quiet):
                rc = cli(["restore", "--checkpoint", str(ckpt), "--input", str(photos), "--output", str(out),
                          "--batch-size", str(batch), "--device", device])
            elapsed = time.perf_counter() - t
            if rc != 0:
                raise SystemExit(f"restore --batch-size {batch} failed (exit {rc}):\n{quiet.getvalue()}")
            return elapsed

        paths = {"one a pass": 1, f"batches of {args.batch_size}": args.batch_size}
        for batch in paths.values():
            run(batch)  # untimed: model load, kernels, the allocator, the page cache
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeat):
            for name, batch in paths.items():
                times[name].append(run(batch))
        diff = max(
            int(np.abs(np.asarray(Image.open(root / "out_b1" / p.name), dtype=int)
                       - np.asarray(Image.open(root / f"out_b{args.batch_size}" / p.name), dtype=int)).max())
            for p in sorted(photos.iterdir()))
    t_one, t_batch = (statistics.median(times[name]) for name in paths)
    n = args.images
    print(f"device={device} torch_threads={torch.get_num_threads()} preset={args.preset} images={n} "
          f"size={width}x{height} cpu_pass_pixels={restore_mod.CPU_PASS_PIXELS}")
    print(f"one image a pass:   {n / t_one:8.2f} images/s  ({t_one:.2f} s)")
    print(f"batches of {args.batch_size:<7d} {n / t_batch:8.2f} images/s  ({t_batch:.2f} s)")
    print(f"ratio batched/one-a-pass: {t_one / t_batch:.2f}x   max |PNG difference| = {diff} level(s)   "
          f"(medians of {args.repeat} alternating passes)")
    if diff > 1:
        print("the two runs' PNGs differ by more than float summation order: the comparison is void",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
