"""`uniremoval demo [--workdir DIR] [--clean] [--quick]`: the whole method end to end on CPU.

Photos bundled with scikit-image -> synthetic haze/rain/blur pairs and a shifted "real-like"
domain -> shards -> three tiny teachers -> cache -> KT -> DA -> eval -> report, all tracked in an
MLflow store inside the work directory. A second run reuses what is done; --clean starts over.
"""

from __future__ import annotations

import argparse
import os

from uniremoval.commands import whole_number

DEFAULT_WORKDIR = "demo_workspace"  # = uniremoval.demo.DEFAULT_WORKDIR (not imported: --help stays fast)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole method end to end on a tiny embedded dataset (CPU, minutes)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help=f"where everything is written (default: ./{DEFAULT_WORKDIR})")
    p.add_argument("--clean", action="store_true", help="delete the work directory first and start over")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (fewer images, steps and pixels) for tests and a first look")
    p.add_argument("--config-dir", help="folder with demo.yaml and the stage configs (default: configs/demo)")
    p.add_argument("--threads", type=whole_number(1, "threads"), default=None,
                   help="torch CPU threads (default: all cores); lower it on a busy machine")
    p.set_defaults(func=handler)


def handler(args) -> int:
    # Before torch is imported: idle OpenMP threads sleep instead of spinning (a busy or small
    # machine otherwise loses most of its time to spin-waits).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from uniremoval.demo import run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(args.workdir, clean=args.clean, quick=args.quick, config_dir=args.config_dir)
    return 0
