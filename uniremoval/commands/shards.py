"""`uniremoval shards build|synth|inspect|verify|merge`: datasets as downloaded -> webdataset shards.

Format and layouts: shards/README.md. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from uniremoval.commands import degradation_type, positive_number, split_name, whole_number
from uniremoval.errors import UniremovalError


def _cores() -> int:
    """Cores this process may use (a cluster job's allocation, not the whole node)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_workers = whole_number(1, "processes")


def _add_writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", help="folder for the tars, manifest.json and report.jsonl (default: shards/<name>)"
    )
    p.add_argument(
        "--name",
        help="dataset name, also the shard file prefix (default: the --out folder name, else the format "
        "or synth-<degradation>)",
    )
    p.add_argument(
        "--split", type=split_name, help="split recorded in each sample (for layouts with split folders: which one; "
        "default: each split the layout has, or its own, see shards/README.md; synth: train)"
    )
    p.add_argument("--shard-size-mb", type=positive_number("MB"), default=256.0,
                   help="target shard size in MB (default 256)")
    p.add_argument("--max-samples-per-shard", type=int, default=0, help="cap samples per shard (0: no cap)")
    p.add_argument(
        "--workers", type=_workers, default=_cores(), help="worker processes (default: all usable cores)"
    )
    p.add_argument("--num-jobs", type=int, default=1, help="cluster array: total number of jobs (default 1)")
    p.add_argument("--job-index", type=int, default=0, help="cluster array: this job's index, 0-based (default 0)")
    p.add_argument(
        "--strict", action="store_true", help="fail on the first bad input instead of reporting it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shards",
        help="build, synthesize, inspect, verify and merge webdataset shards",
        description="Turn datasets, as downloaded, into webdataset tar shards with a manifest.",
    )
    sub = p.add_subparsers(dest="shards_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="shards from a dataset in its own layout (see shards/README.md)")
    from uniremoval.data.readers import READERS  # (stdlib imports only: the CLI starts as fast)

    b.add_argument("--format", required=True, choices=list(READERS), help="the dataset's layout")
    b.add_argument("--root", required=True, help="the dataset folder as downloaded")
    b.add_argument("--degradation", type=degradation_type, help="degradation name to record (required for paired-folder/folder)")
    b.add_argument("--domain", choices=("synthetic", "real"), help="override the layout's domain (default: the layout's, see shards/README.md)")
    b.add_argument("--subset", help="reside-sots: indoor|outdoor (default both); realblur: J|R (default J)")
    b.add_argument("--blur-dir", default="blur", choices=("blur", "blur_gamma"), help="gopro input folder (default blur)")
    _add_writer_options(b)
    b.set_defaults(func=_build)

    s = sub.add_parser("synth", help="synthetic degraded/clean pairs from a folder of clean images")
    s.add_argument("--clean", required=True, help="folder of clean images (recursive)")
    s.add_argument("--degradation", required=True, choices=("haze", "rain", "blur"), help="the degradation synthesized")
    s.add_argument("--per-image", type=int, default=1, help="degraded versions per clean image (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the degradations (default 0)")
    s.add_argument(
        "--params",
        default="default",
        help="parameter ranges: default | real-like | a .json/.yaml file of SynthRanges fields (default: default)",
    )
    _add_writer_options(s)
    s.set_defaults(func=_synth)

    i = sub.add_parser("inspect", help="counts, sizes, resolutions, degradations of a shard folder or one tar")
    i.add_argument("dir", metavar="DIR|TAR", help="a shard folder (holding manifest.json) or one .tar shard")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_inspect)

    v = sub.add_parser("verify", help="checksums, every sample decodes, pairs match in size")
    v.add_argument("dir", metavar="DIR|TAR", help="a shard folder (holding manifest.json) or one .tar shard")
    v.add_argument("--workers", type=_workers, default=1, help="processes checking shards in parallel (default 1)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_verify)

    m = sub.add_parser("merge", help="combine the per-job manifests of an array build into manifest.json")
    m.add_argument("dir", metavar="DIR", help="the --out folder every job of the array build wrote into")
    m.set_defaults(func=_merge)


def _command(args) -> list[str]:
    """The command line, rebuilt from the parsed options (also right when called in-process)."""
    cmd = ["uniremoval", "shards", args.shards_command]
    for name, value in vars(args).items():
        if name in ("func", "command", "shards_command") or value is None or value is False:
            continue
        if name == "dir":
            cmd.append(str(value))
        else:
            cmd += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return cmd


def _dataset_name(args) -> str:
    if args.name:
        return args.name
    if args.out:
        return Path(args.out).resolve().name
    return args.format if args.shards_command == "build" else f"synth-{args.degradation}"


def _resolve_out(args) -> None:
    """--out defaults to shards/<name> (the project's shards/ folder when run from the repo)."""
    if not args.out:
        args.out = str(Path("shards") / _dataset_name(args))
    from uniremoval.io import check_output

    check_output(args.out, "--out", folder=True)


def _print_listing_issues(issues, strict: bool) -> None:
    if issues and not strict:
        print(
            f"{len(issues)} input(s) rejected while listing (first: {issues[0].message()})", file=sys.stderr
        )


def _check_same_dataset(out: Path, dataset: str, source: dict) -> None:
    """A folder that already holds another dataset (or a cache) is not rebuilt over: its manifest
    would be replaced and its tars overwritten or orphaned. The same dataset from the same source
    (a resumed or repeated build, or more images in the same root) goes on as designed."""
    from uniremoval.data.manifest import existing_manifest

    # manifest.json, or the per-job manifests of an array build not merged yet
    for folder in [out, *sorted(out.glob("manifest-job*of*.json"))] if out.is_dir() else [out]:
        have = existing_manifest(folder)
        if have is None:
            continue
        if "cache" in have:
            raise UniremovalError(f"--out {out} holds a teacher cache; choose another --out")
        theirs = have.get("source") or {}
        # Keys a manifest of an older version lacks are not compared.
        differ = [k for k in source if k in theirs and str(theirs[k]) != str(source[k])]
        if have.get("dataset") != dataset or differ:
            shown = dict.fromkeys(["format", "root", "degradation", *differ])
            was = ", ".join(f"{k}={theirs[k]}" for k in shown if theirs.get(k) is not None)
            raise UniremovalError(
                f"--out {out} holds dataset {have.get('dataset')!r} ({was}); this command builds "
                f"{dataset!r}" + (f" with another {', '.join(differ)}" if differ else "")
                + ": choose another --out (or delete the folder to replace it)")


def _run_writer(args, items, issues, builder, source: dict) -> int:
    from uniremoval.data.shardwriter import build_shards

    if items:  # with none, nothing is written over the folder (build_shards says why): no other dataset
        _check_same_dataset(Path(args.out), _dataset_name(args), source)
    summary = _write_shards(args, items, issues, builder, source, build_shards)
    print(summary.text())
    if args.num_jobs > 1:
        print(
            f"job {args.job_index} of {args.num_jobs} done; after all jobs: uniremoval shards merge {args.out}"
        )
    return 0


def _write_shards(args, items, issues, builder, source: dict, build_shards):
    return build_shards(
        items,
        issues,
        builder,
        args.out,
        dataset=_dataset_name(args),
        source=source,
        shard_bytes=int(args.shard_size_mb * 1e6),
        max_samples=args.max_samples_per_shard,
        workers=args.workers,
        strict=args.strict,
        num_jobs=args.num_jobs,
        job_index=args.job_index,
        command=_command(args),
        progress=not args.no_progress,
    )


def _build(args) -> int:
    _resolve_out(args)
    from uniremoval.data.readers import ReaderOptions, read_dataset
    from uniremoval.data.shardwriter import FileSampleBuilder

    opts = ReaderOptions(
        split=args.split,
        degradation=args.degradation,
        domain=args.domain,
        subset=args.subset,
        blur_dir=args.blur_dir,
    )
    # Listing a large dataset (SPA-Data: 638k list lines) takes a while before any bar shows: said
    # when it does (a quick listing, or a failing one, prints nothing more than its result).
    import threading

    note = threading.Timer(3.0, lambda: print(f"listing {args.root} as {args.format} ...", file=sys.stderr,
                                              flush=True))
    note.daemon = True
    if not args.no_progress:
        note.start()
    try:
        result = read_dataset(args.format, args.root, opts)
    finally:
        note.cancel()
    _print_listing_issues(result.issues, args.strict)
    builder = FileSampleBuilder(root=str(Path(args.root).resolve()), dataset=_dataset_name(args))
    # What the options selected, as the reader resolved them (its defaults filled in): a rerun that
    # selects another split, subset, degradation or domain is another dataset; `--split train` on a
    # root that has only train is the same one.
    def selected(values) -> str | None:
        found = sorted({str(v) for v in values if v is not None})
        return ",".join(found) or None

    items = result.items
    source = {"format": args.format, "root": str(Path(args.root).resolve()),
              "split": selected(i.split for i in items),
              "subset": selected(i.extra.get("subset") for i in items) or args.subset,
              "degradation": selected(i.degradation for i in items), "domain": selected(i.domain for i in items),
              "blur_dir": args.blur_dir}
    return _run_writer(args, result.items, result.issues, builder, source)


def _synth(args) -> int:
    _resolve_out(args)
    from uniremoval.data.synth import SynthSampleBuilder, get_preset, synth_items

    ranges = get_preset(args.params)
    items, issues = synth_items(
        args.clean, args.degradation, args.per_image, args.split or "train", args.params
    )
    _print_listing_issues(issues, args.strict)
    builder = SynthSampleBuilder(
        root=str(Path(args.clean).resolve()),
        dataset=_dataset_name(args),
        preset=args.params,
        seed=args.seed,
        ranges=ranges,
    )
    source = {
        "format": "synth",
        "root": str(Path(args.clean).resolve()),
        "degradation": args.degradation,
        "split": args.split or "train",
        "params": args.params,
        "seed": args.seed,
        "per_image": args.per_image,
    }
    return _run_writer(args, items, issues, builder, source)


def _inspect(args) -> int:
    from uniremoval.data.manifest import format_inspect, inspect_shards

    info = inspect_shards(args.dir)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _verify(args) -> int:
    from uniremoval.data.manifest import load_manifest, shard_target, verify_shards, verify_tar

    target, is_tar = shard_target(args.dir, "verify")
    if is_tar:
        problems, samples, checked = verify_tar(target)
    else:
        problems = verify_shards(target, workers=args.workers, progress=not args.no_progress)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    if is_tar:
        how = "" if checked else " (no manifest beside it lists it: size and sha256 not checked)"
        print(f"{args.dir}: OK, 1 shard, {samples} samples verified{how}")
        return 0
    manifest = load_manifest(target)
    print(
        f"{args.dir}: OK, {len(manifest['shards'])} shard(s), {manifest['counts']['total']} samples verified"
    )
    return 0


def _merge(args) -> int:
    from uniremoval.data.shardwriter import merge_job_manifests

    merged = merge_job_manifests(args.dir, command=_command(args))
    print(
        f"{args.dir}: merged {merged['plan']['num_jobs']} job manifest(s): {len(merged['shards'])} shard(s), "
        f"{merged['counts']['total']} samples -> {Path(args.dir) / 'manifest.json'}"
    )
    return 0
