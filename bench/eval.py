"""Throughput of uniremoval's batched scoring versus pyiqa called once per image, same images.

    python bench/eval.py [--data DIR] [--metrics piqe,brisque_live] [--device cpu|cuda]
                         [--batch-size 8] [--images 16] [--size 256] [--repeat 2]

Images: `--data` (resized to --size x --size so they batch), else the pyiqa calibration images in
../shared/realdata when present, else smooth random images. Both paths see identical tensors on the
same device; the scores are checked to agree. Prints images/s of each and the ratio.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--repeat", type=int, default=2, help="timed passes (best kept)")
    ap.add_argument("--iqa-dir")
    args = ap.parse_args()

    import torch

    from uniremoval.eval.metrics import METRICS, Scorer, parse_metrics

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = parse_metrics(args.metrics)
    if any(METRICS[m].kind != "nr" for m in metrics):
        ap.error("bench/eval.py times no-reference metrics only")
    x, source = load_images(args.data, args.images, args.size)
    x = x.to(device)
    scorer = Scorer(metrics, device=device, iqa_dir=args.iqa_dir)
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

    def timed(fn):
        best, res = float("inf"), None
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            res = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, res

    batched()  # warm-up (kernels, caches)
    t_b, s_b = timed(batched)
    t_l, s_l = timed(loop)
    diff = max(abs(a - b) for m in metrics for a, b in zip(s_b[m], s_l[m]))
    n = len(x)
    print(f"device={device} torch_threads={torch.get_num_threads()} metrics={','.join(metrics)} "
          f"images={n} size={args.size} batch={args.batch_size} ({source})")
    print(f"batched (uniremoval): {n / t_b:8.2f} images/s  ({t_b:.2f} s)")
    print(f"per image (pyiqa):    {n / t_l:8.2f} images/s  ({t_l:.2f} s)")
    print(f"ratio batched/per-image: {t_l / t_b:.2f}x   max |score difference| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
