"""Throughput of uniremoval's batched scoring versus pyiqa called once per image, same images.

    python bench/eval.py [--data DIR] [--metrics piqe,brisque_live] [--device cpu|cuda]
                         [--batch-size 8] [--images 16] [--size 256] [--repeat 5]

Images: `--data` (resized to --size x --size so they batch), else the pyiqa calibration images in
../shared/realdata when present, else smooth random images. Both paths see identical tensors on the
same device; the scores are checked to agree (exit 1 if not). Both paths run once untimed (warm-up),
then `--repeat` times, alternating; prints the median images/s of each and the ratio.

On a CPU the bench runs one torch thread unless `--threads` says otherwise: on a CPU that other
jobs share, the ratio with more threads measures their contention. On this 2-core machine with
another job holding about one core, PIQE at 256 px gave 6.5x with torch's 2 threads (per-image
calls, each many small ops, wait on the busy core) and 0.67x with one thread, where both paths ran
3-30x faster: batching the scores pays on a GPU, not on a CPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_images(data: str | None, n: int, size: int):
    import torch
    import torch.nn.functional as F

    from uniremoval.eval.restore import list_images, read_image

    default = REPO.parent / "shared" / "realdata" / "pyiqa_calibration" / "dist_dir"
    files = list_images(data) if data else (list_images(default) if default.is_dir() else [])
    if files:
        imgs = [F.interpolate(read_image(f)[None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0] for f in files]
        source = f"{len(files)} file(s) from {data or default}"
    else:
        g = torch.Generator().manual_seed(0)
        imgs = [F.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                              mode="bicubic", align_corners=False)[0].clamp(0, 1) for _ in range(4)]
        source = "random smooth images"
    x = torch.stack([imgs[i % len(imgs)] for i in range(n)])
    return (x * 255).round() / 255, source  # on the 8-bit grid, as eval scores them


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--metrics", default="piqe")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per path, alternating (median kept)")
    ap.add_argument("--iqa-dir")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on a CPU, where more measure their contention)")
    args = ap.parse_args()
    for name in ("batch_size", "images", "size", "repeat", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data and not Path(args.data).is_dir():
        ap.error(f"--data {args.data} is not a folder")

    import torch

    from uniremoval.errors import UniremovalError
    from uniremoval.eval.metrics import METRICS, Scorer, parse_metrics

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None and torch.device(device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        metrics = parse_metrics(args.metrics)
        if any(METRICS[m].kind != "nr" for m in metrics):
            ap.error("bench/eval.py times no-reference metrics only")
        if args.size < max(METRICS[m].min_size for m in metrics):
            ap.error(f"--size {args.size} is below what {args.metrics} needs "
                     f"({max(METRICS[m].min_size for m in metrics)} px)")
        x, source = load_images(args.data, args.images, args.size)
        x = x.to(device)
        scorer = Scorer(metrics, device=device, iqa_dir=args.iqa_dir)
    except (UniremovalError, RuntimeError) as exc:  # unknown metric, missing IQA files, bad --device
        ap.error(str(exc))
    per_image = scorer._nr  # the very pyiqa objects, so both paths differ only in how they are called

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def batched() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {m: [] for m in metrics}
        for i in range(0, len(x), args.batch_size):
            for m, v in scorer.score(x[i:i + args.batch_size]).items():
                out[m].extend(v)
        return out

    def loop() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {m: [] for m in metrics}
        with torch.no_grad():
            for img in x:
                for m, metric in per_image.items():
                    out[m].append(float(metric(img[None]).reshape(-1)[0]))
        return out

    # Warm both paths up (kernels, allocator, the batch-1 shapes too), then alternate them: a block
    # of one then a block of the other let a change in machine load (another job on these cores
    # makes torch's threads wait on each other) land on one side only; with 2 passes each the
    # ratio read 0.2x in one run and 4.8x in the next.
    batched(), loop()
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for _ in range(args.repeat):
        for name, fn in (("batched", batched), ("loop", loop)):
            sync()
            t = time.perf_counter()
            res = fn()
            sync()
            times[name].append(time.perf_counter() - t)
            if name == "batched":
                s_b = res
            else:
                s_l = res
    t_b, t_l = statistics.median(times["batched"]), statistics.median(times["loop"])

    def gap(a: float, b: float) -> float:
        return 0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b)  # NaN on both paths agrees

    diff = max(gap(a, b) for m in metrics for a, b in zip(s_b[m], s_l[m]))
    n = len(x)
    print(f"device={device} torch_threads={torch.get_num_threads()} metrics={','.join(metrics)} "
          f"images={n} size={args.size} batch={args.batch_size} ({source})")
    print(f"batched (uniremoval): {n / t_b:8.2f} images/s  ({t_b:.2f} s)")
    print(f"per image (pyiqa):    {n / t_l:8.2f} images/s  ({t_l:.2f} s)")
    print(f"ratio batched/per-image: {t_l / t_b:.2f}x   max |score difference| = {diff:.2e}   "
          f"(medians of {args.repeat} alternating passes)")
    if not diff <= 1e-4:  # the same images through the same pyiqa objects: only summation order may differ
        print("the two paths' scores differ: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
