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

`load_manifest` reads and checks a folder's manifest (the format above, strictly); every command
turns a `shards:` spec into shard files and URLs with `shard_stream.resolve_shards`, which also
takes folders of bare tars and manifests of other tools; `verify_shards` and `inspect_shards` back
`uniremoval shards verify|inspect`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand

from uniremoval.errors import DataError
from uniremoval.io import sha256_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("format_version", "dataset", "shards", "counts")


# ---------------------------------------------------------------------------------------------
# reading


def is_streamed(spec: str) -> bool:
    """Whether a shard spec is read through a URL (any `scheme://`) or a shell command (`pipe:`)
    rather than opened as a local path: no file to stat, hash or seek."""
    return "://" in spec or spec.startswith("pipe:")


def is_plain_path(spec: str) -> bool:
    """A spec that names one local file or folder as written: not streamed, no `file:` URL, no glob or
    brace pattern (those are expanded, and checked, by `shard_stream.resolve_shards`)."""
    return not is_streamed(spec) and not spec.startswith("file:") and not any(c in spec for c in "*?[{")


def manifest_degradations(folder: str | os.PathLike) -> dict[str, int] | None:
    """{degradation: samples} a shard folder's manifest counts, or None (no manifest, or no counts)."""
    held = ((existing_manifest(folder) or {}).get("counts") or {}).get("degradation")
    return held if isinstance(held, dict) and held else None


def source_degradations(spec: str | os.PathLike | list | tuple) -> dict[str, int] | None:
    """{degradation: samples} of a shard source, from its manifest(s) alone, before any sample is read:
    a folder or manifest.json (local or http(s), fetched) by its counts, single shards (tars, brace
    patterns, globs, http(s) URLs, `pipe:curl ... URL` commands) by their entries in the manifest.json
    beside them; several specs (a list, or joined with `::`) together. None when that is not known (no
    manifest or no counts, a shard its manifest does not list, a fetch that fails, s3://, a pipe: command
    without one http(s) URL): eval then checks the samples' json as it scores them."""
    parts = list(spec) if isinstance(spec, (list, tuple)) else split_specs(os.fspath(spec))
    if len(parts) > 1:
        total: Counter = Counter()
        for part in parts:
            if (held := source_degradations(part)) is None:
                return None
            total.update(held)
        return dict(total) or None
    if not parts:
        return None
    text = os.fspath(parts[0])
    if text.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        text = url2pathname(urlparse(text).path)
    if text.startswith(("http://", "https://")):
        if text.endswith(("/", ".json")):  # a dataset URL: its manifest, as training lists it
            url = text + MANIFEST_NAME if text.endswith("/") else text
            return _degradation_counts(((_fetch_json(url) or {}).get("counts") or {}).get("degradation"))
        return _shard_degradations(list(braceexpand(text)))
    if text.startswith("pipe:"):  # `pipe:curl -s http://host/ds/ds-{000000..000009}.tar`: one URL per command
        urls = [re.findall(r"https?://[^\s'\"|;&<>()]+", cmd) for cmd in braceexpand(text)]
        return _shard_degradations([u[0] for u in urls]) if all(len(u) == 1 for u in urls) else None
    if is_streamed(text):
        return None
    path = Path(text)
    if path.is_dir() or (path.suffix == ".json" and path.is_file()):
        return manifest_degradations(path)
    from uniremoval.data.shard_stream import resolve_shards  # (it reads this module's split_specs)

    try:
        return _shard_degradations(resolve_shards(text))
    except DataError:  # a missing shard: the reader names it
        return None


def _degradation_counts(held: object) -> dict[str, int] | None:
    ok = isinstance(held, dict) and held and all(isinstance(n, int) for n in held.values())
    return held if ok else None


def _fetch_json(url: str) -> dict | None:
    """A small JSON document (a manifest) at an http(s) URL, or None when it cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return None
    return data if isinstance(data, dict) else None


def _shard_degradations(shards: list[str]) -> dict[str, int] | None:
    """Summed per-shard degradation counts of `shards` (paths or URLs) from the manifest.json beside
    each, or None when one is not listed with its counts."""
    total: Counter = Counter()
    listed: dict[str, dict[str, dict]] = {}  # folder -> {shard name: manifest entry}, read once
    for shard in shards:
        folder, _, name = shard.rpartition("/")
        if folder not in listed:
            m = (_fetch_json(f"{folder}/{MANIFEST_NAME}") if "://" in shard
                 else existing_manifest(Path(folder or ".") / MANIFEST_NAME)) or {}
            entries = m.get("shards") if isinstance(m.get("shards"), list) else []
            listed[folder] = {e["name"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}
        entry = listed[folder].get(name)
        held = _degradation_counts(((entry or {}).get("counts") or {}).get("degradation"))
        if held is None:
            return None
        total.update(held)
    return dict(total) or None


def existing_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest an output folder already holds, before a build or cache writes there: None when
    there is none, or when it is damaged (the build rewrites it, as after a kill). A cache's has a
    "cache" section, a dataset's has none. A manifest file itself (an array job's) is read as is."""
    file = Path(folder) if Path(folder).is_file() else Path(folder) / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


# `::` joins several shard specs, except inside the brackets of an IPv6 host (http://[::1]:8000/...)
_SPEC_SEP = re.compile(r"::(?![^\[\]]*\])")


def split_specs(text: str) -> list[str]:
    """The shard specs joined with `::` in `text` (one when none is)."""
    return _SPEC_SEP.split(text)



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
    """Fully decode `data`; return its stored (height, width). Raises ValueError('truncated: ...'/'unreadable: ...')."""
    return image_probe(data)[0]


# The most pixels an image in a shard may have: what the loaders decode (OpenCV refuses more than
# 2^30, its CV_IO_MAX_IMAGE_PIXELS). Pillow's own guard (a warning over ~89 MP, an error over ~179 MP,
# against decompression bombs from the web) would refuse a user's panorama or stitched scan.
LOADER_MAX_PIXELS = 2**30


class _TooLarge(ValueError):
    pass


def image_probe(data: bytes) -> tuple[tuple[int, int], int]:
    """Fully decode `data`; return its stored (height, width) and its EXIF orientation (1-8, 1 when
    untagged). Raises ValueError('truncated: ...'/'unreadable: ...')."""
    from PIL import Image

    from uniremoval.data.transforms import (
        exif_orientation,
        pil_limit_lifted,
        unsupported_png,
        unsupported_tiff,
    )

    problem = unsupported_png(data) or unsupported_tiff(data)
    if problem:  # PIL would read it (at 8 bits, or not at all): refused here rather than by the loaders mid-training
        raise ValueError(f"unreadable: {problem}")
    try:
        with pil_limit_lifted(), Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > LOADER_MAX_PIXELS:
                raise _TooLarge(f"{im.width}x{im.height} is {im.width * im.height:,} pixels, more than the "
                                f"{LOADER_MAX_PIXELS:,} the shard loaders decode (OpenCV's limit); downscale or crop it")
            im.load()
            return (im.height, im.width), exif_orientation(im)
    except _TooLarge as exc:
        raise ValueError(f"unreadable: {exc}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        from uniremoval.data.transforms import decode_problem

        kind, reason = decode_problem(exc, data)
        raise ValueError(f"{kind}: {reason}") from exc


def sample_fields(fields: dict[str, bytes]) -> tuple[str | None, str | None]:
    """The `input.<ext>` and `target.<ext>` member names of one sample (None when absent)."""
    inp = next((e for e in fields if e.startswith("input.")), None)
    tgt = next((e for e in fields if e.startswith("target.")), None)
    return inp, tgt


# ---------------------------------------------------------------------------------------------
# verify


def _verify_one(directory: str, entry: dict, cell: int | None = None) -> tuple[list[str], list[str] | None]:
    """Check one shard against its manifest entry (a lone tar's entry has only its name: no size,
    checksum or count to compare); returns (problems, keys), keys None for a shard that cannot be
    opened. `cell`: a teacher cache's feature cell (its manifest's), which each cached feature grid
    must match."""
    path = Path(directory) / entry["name"]
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"], []
    try:
        with open(path, "rb"):
            pass
    except PermissionError as exc:
        # keys None: not read at all (its manifest count is not then a second problem)
        return [f"{name}: cannot be read ({exc.strerror}); give the user running this read access to it"], None
    problems = []
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (corrupt or replaced)")
    keys: list[str] = []
    groups: dict[str, Counter] = {g: Counter() for g in COUNT_GROUPS}
    if size == 0:
        problems.append(f"{name}: empty file (0 bytes), not a tar")
    else:
        cut = tar_end_problem(path, size)
        if cut:
            problems.append(f"{name}: {cut}")
        try:
            for key, fields in iter_tar_samples(path):
                keys.append(key)
                problems += _verify_sample(name, key, fields, cell, groups)
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"{name}: unreadable tar after {len(keys)} samples ({exc})")
    if "samples" in entry and len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['samples']}")
    listed = entry.get("counts") if isinstance(entry.get("counts"), dict) else {}
    for group in COUNT_GROUPS:
        # Training reads a sample's degradation from its json and refuses a mismatch with its source
        # (eval scores it under the manifest's): a count that disagrees is found here, not hours in.
        if isinstance(listed.get(group), dict) and dict(groups[group]) != listed[group]:
            problems.append(f"{name}: {group} counts: {_counts_text(groups[group])} in its samples' json, "
                            f"{_counts_text(listed[group])} in the manifest")
    return problems, keys


COUNT_GROUPS = ("degradation", "domain", "split")  # what a manifest counts per shard and in all


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def tar_end_problem(path: Path, size: int) -> str | None:
    """Why a tar looks cut short, or None. A tar is whole 512-byte blocks ending with two zero blocks;
    tarfile stops silently at a cut between members, so a cut tar would otherwise read as a smaller one."""
    if size % 512:
        return f"cut short: {size} bytes is not a whole number of 512-byte tar blocks"
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 1024))
        tail = fh.read(1024)
    if size < 1024 or tail.strip(b"\0"):
        return "cut short: no end-of-archive blocks at its end"
    return None


def _verify_sample(shard: str, key: str, fields: dict[str, bytes], cell: int | None = None,
                   groups: dict[str, Counter] | None = None) -> list[str]:
    """The sample's problems; its json's degradation, domain and split are counted into `groups`."""
    from uniremoval.data.transforms import meta_orientation, upright_size

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
        if not isinstance(meta, dict):
            return [f"{where}: json is a {type(meta).__name__}, not an object"]
        for k in ("degradation", "domain", "source", "split", "height", "width"):
            if k not in meta:
                problems.append(f"{where}: json lacks {k!r}")
            elif groups is not None and k in groups:
                groups[k][str(meta[k])] += 1
    if inp is None:
        return problems + [f"{where}: no input.<ext>"]
    try:
        hw = image_size(fields[inp])
    except ValueError as exc:
        return problems + [f"{where}: {inp} {exc}"]
    try:
        turn = meta_orientation(meta)
    except ValueError as exc:
        return problems + [f"{where}: {exc}"]
    shown = upright_size(hw, turn)  # json height/width are the size as the loaders turn it
    if meta and (meta.get("height"), meta.get("width")) != shown:
        turned = f" ({shown[0]}x{shown[1]} turned by its orientation {turn})" if turn >= 5 else ""
        problems.append(
            f"{where}: {inp} is {hw[0]}x{hw[1]}{turned}, json says {meta.get('height')}x{meta.get('width')}"
        )
    if tgt is not None:
        try:
            thw = image_size(fields[tgt])
        except ValueError as exc:
            return problems + [f"{where}: {tgt} {exc}"]
        if thw != hw:
            problems.append(f"{where}: {tgt} is {thw[0]}x{thw[1]} but {inp} is {hw[0]}x{hw[1]}")
    return problems + _verify_cached(where, inp, shown, fields, cell)


def _verify_cached(where: str, inp: str, shown: tuple[int, int], fields: dict[str, bytes],
                   cell: int | None) -> list[str]:
    """A cache sample's teacher image (stored upright: the input's size as the loaders turn it) and
    feature grid, decoded as KT decodes them (nothing to check in a dataset's sample)."""
    import numpy as np

    from uniremoval.data.transforms import decode_feature

    problems = []
    teacher = next((e for e in fields if e.startswith("teacher.")), None)
    if teacher is not None:
        try:
            thw = image_size(fields[teacher])
        except ValueError as exc:
            problems.append(f"{where}: {teacher} {exc}")
        else:
            if thw != shown:
                problems.append(f"{where}: {teacher} is {thw[0]}x{thw[1]} but {inp} is {shown[0]}x{shown[1]}")
    if "feature.npy" in fields:
        try:
            feat = decode_feature(fields["feature.npy"])
        except Exception as exc:  # noqa: BLE001 - np.load raises ValueError, OSError, EOFError...
            return problems + [f"{where}: feature.npy does not decode ({type(exc).__name__}: {exc})"]
        if cell and feat.shape[1:] != (shown[0] // cell, shown[1] // cell):
            problems.append(f"{where}: feature.npy grid {feat.shape[1:]} does not match a {shown[1]}x{shown[0]} "
                            f"image at the cache's cell {cell}")
        if not np.isfinite(feat).all():
            problems.append(f"{where}: feature.npy holds non-finite values")
    return problems


def verify_tar(path: str | os.PathLike) -> tuple[list[str], int, bool]:
    """One tar shard: every sample decodes, pairs match in size, keys are unique; its size, sha256 and
    count too when a manifest beside it lists it. Returns (problems, samples, checked_against_manifest)."""
    path = Path(path)
    entry = _entry_beside(path)
    problems, keys = _verify_one(str(path.parent), entry or {"name": path.name}, _cache_cell(path.parent))
    if keys is None:
        return problems, 0, entry is not None
    if not keys and not problems:
        problems.append(f"{path.name}: holds no samples")
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            problems.append(f"{path.name}:{key}: duplicate key")
        seen.add(key)
    return problems, len(keys), entry is not None


def _cache_cell(directory: Path) -> int | None:
    """The feature cell of the teacher cache whose manifest.json is in `directory` (else None)."""
    try:
        info = json.loads((directory / MANIFEST_NAME).read_text()).get("cache")
    except (OSError, ValueError, AttributeError):
        return None
    cell = info.get("feature_cell") if isinstance(info, dict) else None
    return cell if isinstance(cell, int) and cell > 0 else None


def _entry_beside(tar: Path) -> dict | None:
    """The manifest entry of `tar` in the manifest.json beside it, if one lists it (else None)."""
    if not (tar.parent / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(tar.parent)
    except DataError:
        return None
    return next((e for e in manifest["shards"] if e["name"] == tar.name), None)


def shard_target(path: str | os.PathLike, action: str) -> tuple[Path, bool]:
    """What `shards inspect|verify PATH` reads: (folder, False) for a shard folder (or its manifest.json),
    (file, True) for one tar shard; a DataError saying what PATH must be otherwise."""
    p = Path(path)
    usage = f"`shards {action}` takes a shard folder (the one holding {MANIFEST_NAME}) or one .tar shard"
    if not p.exists():
        raise DataError(f"{p} does not exist; {usage}")
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        if not (p / MANIFEST_NAME).exists() and tars and not list(p.glob("manifest-job*.json")):
            raise DataError(
                f"no shard manifest at {p / MANIFEST_NAME}, but {len(tars)} .tar file(s) beside it: "
                f"{action} one with `uniremoval shards {action} {tars[0]}`, or rebuild the folder with "
                f"`uniremoval shards build`"
            )
        return p, False
    if p.name == MANIFEST_NAME:
        return p.parent, False
    if p.suffix == ".tar" or tarfile.is_tarfile(p):
        return p, True
    raise DataError(f"{p} is neither a shard folder nor a tar shard; {usage}")


def verify_shards(directory: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[str]:
    """Every listed shard exists with its size and sha256, every sample decodes, pairs match in size,
    keys are unique, and no unlisted shard lies beside them. Returns the problems (empty = good).
    `directory` may also be one tar shard (see verify_tar)."""
    directory = Path(directory)
    if directory.is_file() and directory.name != MANIFEST_NAME:
        return verify_tar(directory)[0]
    if directory.name == MANIFEST_NAME and directory.is_file():
        directory = directory.parent
    manifest = load_manifest(directory)
    problems: list[str] = []
    if manifest.get("complete") is False:
        problems.append(f"{directory / MANIFEST_NAME}: build not complete; rerun shards build")
    entries = manifest["shards"]
    cell = _cache_cell(directory)
    results: list[tuple[list[str], list[str]]] = []
    from uniremoval.progress import progress_bar

    # a bar on a terminal, a line a minute in a log (tqdm's redraws were one endless line there)
    with progress_bar(len(entries), "verify", "shard", disable=not progress) as bar:
        if workers > 1 and len(entries) > 1:
            from concurrent.futures.process import BrokenProcessPool

            from uniremoval.data.shardwriter import worker_died, worker_pool

            with worker_pool(workers) as pool:
                done = pool.map(_verify_one, [str(directory)] * len(entries), entries, [cell] * len(entries))
                try:
                    for result in done:
                        results.append(result)
                        bar.update(1)
                except BrokenProcessPool as exc:
                    raise worker_died("shards verify", "nothing was checked to the end: rerun it") from exc
        else:
            for entry in entries:
                results.append(_verify_one(str(directory), entry, cell))
                bar.update(1)
    seen: dict[str, str] = {}
    total = 0
    for entry, (probs, keys) in zip(entries, results):
        problems += probs
        if keys is None:  # not read: its listed count stands in for the total check
            total += entry.get("samples", 0)
            continue
        total += len(keys)
        for key in keys:
            if key in seen:
                problems.append(f"{entry['name']}:{key}: duplicate key (also in {seen[key]})")
            seen[key] = entry["name"]
    if total != manifest["counts"].get("total", total):
        problems.append(f"manifest counts.total is {manifest['counts'].get('total')}, shards hold {total}")
    if total == 0:
        problems.append(f"{directory / MANIFEST_NAME}: no samples at all; its report ({manifest.get('report')}) "
                        f"says why each input was rejected")
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


def _damaged(path: Path, why: str, directory: Path | None) -> DataError:
    rerun = "rerun the `uniremoval shards build` (or `synth`) command that wrote it (damaged shards are rebuilt)"
    fix = (f"`uniremoval shards verify {directory}` lists every problem; {rerun}" if directory is not None
           else f"{rerun}, or delete it")
    return DataError(f"shard {path} {why}; {fix}")


def _unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(f"shard {path} cannot be read ({exc.strerror}); give the user running this read access to it")


def _sample_metas(path: Path, directory: Path | None) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(json metadata, fields) of each sample of one tar; DataError naming the tar when it is unreadable."""
    n = 0
    try:
        for key, fields in iter_tar_samples(path, only_json=True):
            try:
                meta = json.loads(fields.get("json") or b"{}")
                if not isinstance(meta, dict):
                    raise TypeError("not a JSON object")
                meta["height"], meta["width"] = int(meta.get("height", 0)), int(meta.get("width", 0))
            except (ValueError, TypeError) as exc:
                raise _damaged(path, f"has unreadable json in sample {key!r} ({exc})", directory) from exc
            n += 1
            yield meta, fields
    except PermissionError as exc:  # not damaged: rebuilding it is not the fix
        raise _unreadable(path, exc) from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _damaged(path, f"is not a readable tar after {n} sample(s) ({exc})", directory) from exc


def inspect_shards(directory: str | os.PathLike) -> dict:
    """Counts, sizes, resolutions and degradations, read from the manifest and the samples' json.
    `directory` may also be one tar shard: its counts then come from its samples alone."""
    path, is_tar = shard_target(directory, "inspect")
    if is_tar:
        size = path.stat().st_size
        if size == 0:
            raise _damaged(path, "is an empty file (0 bytes), not a tar: it was cut short", None)
        try:
            cut = tar_end_problem(path, size)
        except PermissionError as exc:
            raise _unreadable(path, exc) from exc
        if cut:
            raise _damaged(path, f"is {cut}", None)
        entry = _entry_beside(path)
        manifest = load_manifest(path.parent) if entry is not None else {}
        files = [(path, size)]
        where = None
    else:
        manifest = load_manifest(path)
        files = []
        for entry in manifest["shards"]:
            file = path / entry["name"]
            if not file.is_file():
                raise DataError(f"shard {file} listed in the manifest is missing; run `uniremoval shards verify {path}`")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise _damaged(file, f"is {size} bytes, its manifest says {entry['bytes']}", path)
            files.append((file, size))
        where = path
    heights, widths = [], []
    resolutions: Counter = Counter()
    paired = turned = foreign = 0
    combos: Counter = Counter()
    groups: dict[str, Counter] = {g: Counter() for g in ("degradation", "domain", "split")}
    for file, _size in files:
        for meta, fields in _sample_metas(file, where):
            h, w = meta["height"], meta["width"]
            heights.append(h)
            widths.append(w)
            resolutions[f"{w}x{h}"] += 1
            paired += sample_fields(fields)[1] is not None
            turned += meta.get("orientation", 1) != 1
            # every sample the writers make has a json; one without is not ours (or damaged)
            foreign += "json" not in fields or sample_fields(fields)[0] is None
            combos[f"{meta.get('degradation')}/{meta.get('domain')}/{meta.get('split')}"] += 1
            for g, c in groups.items():
                c[str(meta.get(g))] += 1
    sizes = [size for _file, size in files]
    n = len(heights)
    counts = manifest["counts"] if not is_tar else {"total": n, **{g: dict(sorted(c.items())) for g, c in groups.items()}}
    return {
        "dataset": manifest.get("dataset") or path.stem,
        "directory": str(path),
        "shards": len(sizes),
        "samples": n,
        "paired": paired,
        "turned": turned,  # samples the loaders turn upright by their EXIF orientation
        "foreign": foreign,  # samples without a json or an input image: not uniremoval samples
        "bytes": sum(sizes),
        "shard_bytes": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
        "bytes_per_sample": (sum(sizes) / n) if n else 0.0,
        "counts": counts,
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
        "issues": manifest.get("issues", {}) if not is_tar else {},
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
    if info["turned"]:
        lines.append(f"  EXIF orientation: {info['turned']} sample(s) stored turned, read upright (sizes as displayed)")
    if info["foreign"]:
        lines.append(f"  WARNING: {info['foreign']} sample(s) lack a json or an input image, so they are not "
                     f"uniremoval samples (the loaders skip or refuse them): run `uniremoval shards verify "
                     f"{info['directory']}` to list them")
    if info["issues"].get("total"):
        details = ", ".join(f"{k} {v}" for k, v in sorted(info["issues"].items()) if k != "total")
        lines.append(f"  inputs skipped at build: {info['issues']['total']} ({details})")
    return "\n".join(lines)
