"""`uniremoval report`: paper-style tables (and image grids) from an experiment's MLflow eval runs.

    uniremoval report --experiment NAME [--format md|csv|html] [--tracking-uri URI] [--out-dir DIR]

Rows are models, one per weights file (sha256; `best` and `last` of a training run are two, named
"kt (best)", "kt (last)" when they share a label) and "input" for `eval --checkpoint none`; a row
shows in each table the label its eval runs on that table's datasets carry (Hazy in the haze table,
Rainy in the rain table; different labels of one model on one dataset: the latest, with a warning).
Columns are dataset x metric with the better direction (down arrow: lower is better),
the best value of each column in bold: NR-IQA per degradation (Tables I-III), PSNR/SSIM (Table IV),
NR-IQA of ablation runs (Table V). With --out-dir the tables and grid-<dataset>.png (the same
images restored by every model, side by side) are written there; --log also stores them in an
MLflow run named "report". A rerun into the same --out-dir leaves exactly its own grids there: any
other grid-*.png (a dataset no longer in the report, --images 0) is removed, other files are kept;
report.<format> is written last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniremoval.commands import whole_number


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="paper-style tables and image grids from MLflow eval runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment holding the eval-<dataset> runs")
    p.add_argument("--format", default="md", choices=("md", "csv", "html"),
                   help="table format on stdout and in --out-dir (default md)")
    p.add_argument(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
    )
    p.add_argument("--out-dir", help="also write report.<format> and grid-<dataset>.png here (grid-*.png files "
                   "this report did not write are removed from it; nothing else is)")
    p.add_argument("--images", type=int, default=4, help="images per grid (default 4; 0: no image grids)")
    p.add_argument("--decimals", type=whole_number(0, "digits"), help="digits shown (default: 4 for SSIM, 2 otherwise)")
    p.add_argument("--log", action="store_true", help="log the --out-dir files to an MLflow run 'report'")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from uniremoval.errors import UniremovalError
    from uniremoval.eval.report import make_report

    if args.images < 0:
        raise UniremovalError(f"--images must be >= 0 (images per grid; 0 for no image grids), got {args.images}")
    if args.log and not args.out_dir:
        raise UniremovalError("--log needs --out-dir (the files it logs)")
    if args.out_dir:
        from uniremoval.io import check_output

        check_output(args.out_dir, "--out-dir", folder=True)
    text, grids = make_report(
        args.experiment, args.format, args.tracking_uri, args.out_dir, args.images, args.decimals
    )
    import sys

    print(text, end="")  # stdout holds the report alone (`--format csv > r.csv`); the rest goes to stderr
    for g in grids:
        print(f"image grid: {g}", file=sys.stderr)
    if args.out_dir and not grids and args.images > 0:
        print("no image grid: a grid needs the restored images of two or more models on one dataset "
              "(run their `uniremoval eval` with --save-images DIR)", file=sys.stderr)
    if args.log:
        from uniremoval import __version__
        from uniremoval.tracking import git_tags, mlflow_client, set_terminated, stopped_status

        client = mlflow_client(args.tracking_uri)
        exp = client.get_experiment_by_name(args.experiment)
        run = client.create_run(exp.experiment_id, run_name="report",
                                tags={"stage": "report", "uniremoval_version": __version__, **git_tags()})
        try:  # what this report wrote, not whatever else the folder holds
            for key, value in (("format", args.format), ("images", args.images), ("decimals", args.decimals)):
                client.log_param(run.info.run_id, key, str(value))
            for path in [Path(args.out_dir) / f"report.{args.format}", *grids]:
                client.log_artifact(run.info.run_id, str(path), "report")
        except BaseException as exc:  # a stopped upload: the run says so instead of RUNNING forever
            set_terminated(client, run.info.run_id, stopped_status(exc))
            raise
        set_terminated(client, run.info.run_id)
        print(f"MLflow run: {run.info.run_id}", file=sys.stderr)
    return 0
