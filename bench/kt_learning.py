"""Learning curves of the KT stage: per-type PSNR of the student vs. the degraded input, over steps.

The suite's learning test (tests/test_kt_da.py::test_kt_student_learns_every_degradation) runs 500
CPU steps; this script runs the same data, oracle teacher and config (tests/dist_kt_common.py,
`learning_run_config`) for as long as you like and validates every `--val-every` steps, to show how
far each degradation type gets with more training. It prints one JSON line per validation and a
final JSON summary (also written to `--out`).

    python bench/kt_learning.py --steps 3000 --val-every 500 --out kt_learning.json
    python bench/kt_learning.py --steps 3000 --set data.augment.rot90=false   # any config override
    python bench/kt_learning.py --steps 3000 --blur box --blur-stripes 0   # box blur, flat scenes

Runs on CUDA when available (`--cpu` to force the CPU); on CPU one step of the tiny preset costs
about 0.35 s per thread-bound process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dist_kt_common import BLUR_SCENE_STRIPES, BLURS  # tests/ is on the path only from here


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--blur", choices=BLURS, default="defocus",
                    help="the synthetic blur: defocus (the suite's test), horizontal gaussian motion, or an 11-px box")
    ap.add_argument("--blur-stripes", type=int, default=BLUR_SCENE_STRIPES,
                    help="striped patches per blur scene (0: flat-shaded blur scenes, like the other types')")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="data and outputs, kept (default: a temporary dir, removed at the end)")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args(argv)
    for name in ("steps", "val_every", "threads"):  # --val-every 0 trained 3000 steps validating never
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.blur_stripes < 0:
        ap.error("--blur-stripes must not be negative")
    if args.workdir is not None:
        return run(args, ap, args.workdir)
    with tempfile.TemporaryDirectory(prefix="kt_learning_") as tmp:  # ~6 MB of data and checkpoints a run
        return run(args, ap, Path(tmp))


def run(args: argparse.Namespace, ap: argparse.ArgumentParser, root: Path) -> int:
    import torch
    from dist_kt_common import TYPES, learning_run_config, oracle_kt_class

    from uniremoval.errors import UniremovalError
    from uniremoval.stages.trainer import Trainer

    torch.set_num_threads(args.threads)
    overrides = [*args.set] + (["train.cpu=true"] if args.cpu or not torch.cuda.is_available() else [])
    try:
        cfg, _ = learning_run_config(root, args.steps, args.val_every, overrides, blur=args.blur,
                                    blur_stripes=args.blur_stripes)
    except UniremovalError as exc:  # a bad --set override
        ap.error(str(exc))

    curve: list[dict] = []
    t0 = time.time()

    class Recorder(oracle_kt_class()):
        """Keeps each validation's per-type PSNR (input and student) as it happens."""

        def validate(self, ctx):  # type: ignore[override]
            metrics = super().validate(ctx)
            row = {"step": ctx.step, "seconds": round(time.time() - t0, 1)}
            for k in TYPES:
                row[k] = {"input": round(metrics[f"val/val_{k}/psnr_input"], 2),
                          "student": round(metrics[f"val/val_{k}/psnr"], 2)}
            curve.append(row)
            print(json.dumps(row), flush=True)
            return metrics

    Trainer(cfg, Recorder(cfg)).fit()
    summary = {"steps": args.steps, "blur": args.blur, "blur_stripes": args.blur_stripes, "overrides": overrides, "curve": curve,
               "gain_db": {k: round(curve[-1][k]["student"] - curve[-1][k]["input"], 2) for k in TYPES} if curve else {}}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
