"""`manifest.json`: what a shard folder holds, and the tools that read, check and summarise it.

Format (version 1), beside the tars:

    {"format_version": 1, "dataset": "its",
     "created_by": {"command": ["uniremoval", "shards", "build", ...], "version": "0.1.0"},
     "source": {"format": "reside-its", "root": "/data/ITS"},
     "shards": [{"name": "its-000000.tar", "samples": 812, "bytes": 268391424, "sha256": "...",
                 "plan_sha256": "...", "counts": {"degradation": {...}, "domain": {...}, "split": {...}}}],
     "counts": {"total": 13990, "degradation": {"haze": 13990}, "domain": {"synthetic": 13990},
                "split": {"train": 13990}},
     "issues": {"total": 3, "missing_partner": 3}, "report": "report.jsonl",
     "plan": {"num_shards": 18, "num_jobs": 1, "job_indices": [0]}, "complete": true}

`load_manifest` and `shard_paths` are what training pipelines use; `verify_shards` and
`inspect_shards` back `uniremoval shards verify|inspect`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from uniremoval.errors import DataError
from uniremoval.io import sha256_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")
REQUIRED_KEYS = ("format_version", "dataset", "shards", "counts")


# ---------------------------------------------------------------------------------------------
# reading


def load_manifest(path: str | os.PathLike, fix: str = "rebuild the shards") -> dict:
    """Read `<dir>/manifest.json` (or the manifest file itself); DataError naming the file if bad.
    `fix` is what the message tells the user to do about a damaged file."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        hint = ""
        if path.is_dir() and list(path.glob("manifest-job*.json")):
            hint = f"; it holds per-job manifests: run `uniremoval shards merge {path}` first"
        raise DataError(f"no shard manifest at {file}{hint} (build one with `uniremoval shards build`)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"shard manifest {file} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise DataError(f"shard manifest {file} lacks {', '.join(missing)}; {fix}")
    if data["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"shard manifest {file} has format_version {data['format_version']!r}; this version reads "
            f"{FORMAT_VERSION}. Rebuild the shards with this version."
        )
    if not isinstance(data["shards"], list) or not isinstance(data["counts"], dict):
        raise DataError(f"shard manifest {file}: 'shards' must be a list and 'counts' a mapping; {fix}")
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict) or not {"name", "samples", "bytes", "sha256"} <= shard.keys():
            raise DataError(f"shard manifest {file}: entry {i} of 'shards' lacks name/samples/bytes/sha256; {fix}")
        if not isinstance(shard["name"], str) or "/" in shard["name"] or shard["name"].startswith(".."):
            raise DataError(f"shard manifest {file}: shard name {shard['name']!r} must be a plain file name")
    return data


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` and `{a,b}.tar` expansion (zero padding kept), like webdataset's."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def shard_paths(spec: str | os.PathLike) -> list[str]:
    """Shard URLs/paths from a shard folder (manifest order), a glob, a brace pattern or URLs.

    A folder must hold a manifest whose shards all exist. URLs (http(s)://, pipe:, s3://, gs://)
    are passed through with only brace expansion. Several specs may be joined with `::`.
    """
    text = os.fspath(spec)
    if "::" in text:
        return [p for part in text.split("::") for p in shard_paths(part)]
    if text.startswith(URL_PREFIXES):
        return expand_braces(text)
    path = Path(text)
    if path.is_dir():
        manifest = load_manifest(path)
        paths = [str(path / s["name"]) for s in manifest["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{len(missing)} shard(s) listed in {path / MANIFEST_NAME} are missing, e.g. {missing[0]}; "
                f"rerun the build to complete it"
            )
        return paths
    paths = []
    for part in expand_braces(text):
        if glob.has_magic(part):
            paths += sorted(glob.glob(part))
        elif os.path.isfile(part):
            paths.append(part)
        else:
            raise DataError(f"shard {part} does not exist (from {text!r})")
    if not paths:
        raise DataError(f"no shards match {text!r}")
    return paths


# ---------------------------------------------------------------------------------------------
# samples inside a tar


def split_member(name: str) -> tuple[str, str]:
    """`dir/key.input.png` -> (`dir/key`, `input.png`): webdataset splits at the first dot."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), (ext if dot else "")


def iter_tar_samples(
    path: str | os.PathLike, only_json: bool = False
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive members with the same key, as webdataset groups them."""
    with tarfile.open(path, "r:") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_member(member.name)
            if k != key:
                if key is not None:
                    yield key, fields
                key, fields = k, {}
            if only_json and ext != "json":
                fields[ext] = b""
                continue
            fh = tar.extractfile(member)
            fields[ext] = fh.read() if fh else b""
        if key is not None:
            yield key, fields


def image_size(data: bytes) -> tuple[int, int]:
    """Fully decode `data`; return (height, width). Raises ValueError('truncated: ...'/'unreadable: ...')."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.height, im.width
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        kind = "truncated" if "truncat" in str(exc).lower() else "unreadable"
        raise ValueError(f"{kind}: {type(exc).__name__}: {exc}") from exc


def sample_fields(fields: dict[str, bytes]) -> tuple[str | None, str | None]:
    """The `input.<ext>` and `target.<ext>` member names of one sample (None when absent)."""
    inp = next((e for e in fields if e.startswith("input.")), None)
    tgt = next((e for e in fields if e.startswith("target.")), None)
    return inp, tgt


# ---------------------------------------------------------------------------------------------
# verify


def _verify_one(directory: str, entry: dict) -> tuple[list[str], list[str]]:
    """Check one shard against its manifest entry; returns (problems, keys)."""
    path = Path(directory) / entry["name"]
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"], []
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (corrupt or replaced)")
    keys: list[str] = []
    try:
        for key, fields in iter_tar_samples(path):
            keys.append(key)
            problems += _verify_sample(name, key, fields)
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{name}: unreadable tar after {len(keys)} samples ({exc})")
    if len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['samples']}")
    return problems, keys


def _verify_sample(shard: str, key: str, fields: dict[str, bytes]) -> list[str]:
    where = f"{shard}:{key}"
    inp, tgt = sample_fields(fields)
    problems = []
    if "json" not in fields:
        problems.append(f"{where}: no json")
        meta = {}
    else:
        try:
            meta = json.loads(fields["json"])
        except ValueError as exc:
            return [f"{where}: json does not parse ({exc})"]
        for k in ("degradation", "domain", "source", "split", "height", "width"):
            if k not in meta:
                problems.append(f"{where}: json lacks {k!r}")
    if inp is None:
        return problems + [f"{where}: no input.<ext>"]
    try:
        hw = image_size(fields[inp])
    except ValueError as exc:
        return problems + [f"{where}: {inp} {exc}"]
    if meta and (meta.get("height"), meta.get("width")) != hw:
        problems.append(
            f"{where}: {inp} is {hw[0]}x{hw[1]}, json says {meta.get('height')}x{meta.get('width')}"
        )
    if tgt is not None:
        try:
            thw = image_size(fields[tgt])
        except ValueError as exc:
            return problems + [f"{where}: {tgt} {exc}"]
        if thw != hw:
            problems.append(f"{where}: {tgt} is {thw[0]}x{thw[1]} but {inp} is {hw[0]}x{hw[1]}")
    return problems


def verify_shards(directory: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[str]:
    """Every listed shard exists with its size and sha256, every sample decodes, pairs match in size,
    keys are unique, and no unlisted shard lies beside them. Returns the problems (empty = good)."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    if manifest.get("complete") is False:
        problems.append(f"{directory / MANIFEST_NAME}: build not complete; rerun shards build")
    entries = manifest["shards"]
    results: list[tuple[list[str], list[str]]] = []
    if workers > 1 and len(entries) > 1:
        from concurrent.futures import ProcessPoolExecutor

        from uniremoval.data.shardwriter import pool_context

        with ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
            results = list(pool.map(_verify_one, [str(directory)] * len(entries), entries))
    else:
        from tqdm import tqdm

        for entry in tqdm(entries, desc="verify", unit="shard", disable=not progress):
            results.append(_verify_one(str(directory), entry))
    seen: dict[str, str] = {}
    total = 0
    for entry, (probs, keys) in zip(entries, results):
        problems += probs
        total += len(keys)
        for key in keys:
            if key in seen:
                problems.append(f"{entry['name']}:{key}: duplicate key (also in {seen[key]})")
            seen[key] = entry["name"]
    if total != manifest["counts"].get("total", total):
        problems.append(f"manifest counts.total is {manifest['counts'].get('total')}, shards hold {total}")
    listed = {e["name"] for e in entries}
    for path in sorted(directory.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: a tar in the folder that the manifest does not list")
    return problems


# ---------------------------------------------------------------------------------------------
# inspect


def _median(values: list[int]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def inspect_shards(directory: str | os.PathLike) -> dict:
    """Counts, sizes, resolutions and degradations, read from the manifest and the samples' json."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    heights, widths = [], []
    resolutions: Counter = Counter()
    paired = 0
    combos: Counter = Counter()
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; run `uniremoval shards verify`")
        for _key, fields in iter_tar_samples(path, only_json=True):
            meta = json.loads(fields.get("json") or b"{}")
            h, w = int(meta.get("height", 0)), int(meta.get("width", 0))
            heights.append(h)
            widths.append(w)
            resolutions[f"{w}x{h}"] += 1
            paired += sample_fields(fields)[1] is not None
            combos[f"{meta.get('degradation')}/{meta.get('domain')}/{meta.get('split')}"] += 1
    sizes = [e["bytes"] for e in manifest["shards"]]
    n = len(heights)
    return {
        "dataset": manifest["dataset"],
        "directory": str(directory),
        "shards": len(sizes),
        "samples": n,
        "paired": paired,
        "bytes": sum(sizes),
        "shard_bytes": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
        "bytes_per_sample": (sum(sizes) / n) if n else 0.0,
        "counts": manifest["counts"],
        "degradation_domain_split": dict(sorted(combos.items())),
        "resolution": {
            "height": {
                "min": min(heights, default=0),
                "median": _median(heights),
                "max": max(heights, default=0),
            },
            "width": {
                "min": min(widths, default=0),
                "median": _median(widths),
                "max": max(widths, default=0),
            },
            "most_common": dict(resolutions.most_common(5)),
        },
        "issues": manifest.get("issues", {}),
        "created_by": manifest.get("created_by", {}),
    }


def format_inspect(info: dict) -> str:
    mb = info["bytes"] / 1e6
    res = info["resolution"]
    lines = [
        f"dataset {info['dataset']}  ({info['directory']})",
        (
            f"  shards {info['shards']}, samples {info['samples']} ({info['paired']} paired), {mb:.1f} MB, "
            f"{info['bytes_per_sample'] / 1e3:.1f} kB/sample, shard size "
            f"{info['shard_bytes']['min'] / 1e6:.1f}-{info['shard_bytes']['max'] / 1e6:.1f} MB"
        ),
    ]
    for group in ("degradation", "domain", "split"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(info["counts"].get(group, {}).items()))
        lines.append(f"  {group}: {counts}")
    lines.append(
        f"  height {res['height']['min']}-{res['height']['max']} (median {res['height']['median']:g}), "
        f"width {res['width']['min']}-{res['width']['max']} (median {res['width']['median']:g})"
    )
    lines.append("  most common WxH: " + ", ".join(f"{k} ({v})" for k, v in res["most_common"].items()))
    if info["issues"].get("total"):
        details = ", ".join(f"{k} {v}" for k, v in sorted(info["issues"].items()) if k != "total")
        lines.append(f"  inputs skipped at build: {info['issues']['total']} ({details})")
    return "\n".join(lines)
