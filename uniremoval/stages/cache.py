"""Cache stage: run each frozen teacher once over its degradation's synthetic shards.

Algorithm box:
    for each source s in data.train (its `degradation` picks teacher T):
        for each shard of s assigned to this rank (shard i -> rank i mod world):
            skip it if its done-record matches (teacher sha256, source sha256, cell)
            for each run of up to cache.batch_size consecutive samples of one image size:
                y_T, f_T <- T(x) on the full images (the model pads to 8), under train.mixed_precision
                write the sample's own fields + teacher.png + feature.npy + json.teacher_sha256
            rename the hidden temporary .<shard>.tar.*.tmp -> <shard>.tar; write its done-record
    main process: manifest.json per source (shard format + a `cache` section)

Layout: ``<cache.out>/<source name>/<shard name>.tar`` (the source's shard names) with
``manifest.json`` beside them; KT's ``data.train`` points at ``<cache.out>/<source name>``.

- ``teacher.png``: the teacher's restored image, clamped to [-1, 1], rounded to 8-bit RGB (lossless
  PNG: what the cache holds is exactly what KT reads).
- ``feature.npy``: float16 (C, H//cell, W//cell): the teacher's full-resolution feature
  average-pooled on a ``data.feature_cell`` grid anchored top-left, partial border cells dropped
  (`uniremoval.stages.teachers.pool_feature`, which KT applies to the student's feature too).
- ``manifest.json`` ``cache`` section: the teacher checkpoint's path and sha256, its input range,
  the feature cell, and every source shard with its sha256. `check_cache` refuses a cache whose
  teacher or sources differ from the config.

Speed: ``train.mixed_precision`` (bf16 autocast), ``model.channels_last`` and
``cache.batch_size`` (consecutive samples of one size share a forward) apply here as in training;
``cache.cudnn_benchmark`` autotunes convolutions per image size and ``model.compile`` compiles each
teacher per batch shape: both pay off on large fixed-size sources (SPA's patches, GoPro), and cost
a search or a compile per new size on sources of many sizes (RESIDE, Rain1400). The precision is
part of each shard's done-record, so a cache is never a mix of two. The CPU work runs beside the
teacher: a thread decodes the next inputs and ``cache.workers`` threads PNG-encode the last outputs
(at zlib ``cache.png_level``, lossless at any level), the tar written in source order, byte for
byte what a serial run writes.

Resumable per shard: an interrupted run leaves at most a hidden temporary tar per rank, removed
on the next run; complete shards (done-record present and matching) are not recomputed. Every
sample of the sources is written exactly once (whole shards per rank, no sharing).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniremoval.config import CacheStage
from uniremoval.data.manifest import MANIFEST_NAME, existing_manifest, is_streamed
from uniremoval.errors import CheckpointError, ConfigError, DataError
from uniremoval.io import atomic_write_json, atomic_writer, sha256_file
from uniremoval.launch import SAME_FILES_FIX, agreed_listing, lock_on_main_process, same_config_on_every_rank

CACHE_FORMAT = 1
DONE_SUFFIX = ".done.json"


# ------------------------------------------------------------------------------------- identities


def source_sha256(url: str, manifests: dict[Path, dict[str, str]] | None = None) -> str | None:
    """sha256 of a source shard: from its dataset manifest when it lists it, else hashed (local
    files); None for remote URLs (not verifiable without downloading). `manifests`: each folder's
    {shard name: sha256}, filled as read, so that a source of thousands of shards parses its
    manifest once (per shard, the whole manifest was read again: quadratic in the shard count)."""
    if is_streamed(url):
        return None
    path = Path(url)
    listed = manifests.get(path.parent) if manifests is not None else None
    if listed is None:
        listed = _listed_shas(path.parent / MANIFEST_NAME)
        if manifests is not None:
            manifests[path.parent] = listed
    if path.name in listed:
        return listed[path.name]
    return sha256_file(path) if path.is_file() else None


def _listed_shas(manifest: Path) -> dict[str, str]:
    """{shard name: sha256} of a dataset manifest ({} when there is none or it cannot be read)."""
    entries = (existing_manifest(manifest) or {}).get("shards")
    return {str(e["name"]): str(e["sha256"]) for e in entries if isinstance(e, dict) and e.get("name") and
            e.get("sha256")} if isinstance(entries, list) else {}


def _local_file(url: str) -> bool:
    return not is_streamed(url) and Path(url).is_file()


def _source_repaired(rec: dict[str, Any], url: str) -> bool:
    """Whether a shard cached with bad source samples left out has a source file whose bytes changed
    since: repaired in place. The source's identity is its dataset manifest's sha256, which a repair
    back to the built bytes does not change, so the shard was reused with the samples still missing."""
    had = rec.get("source_file_sha256")
    return bool(rec.get("skipped") and had and _local_file(url) and sha256_file(Path(url)) != had)


def _done_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / f".{shard_name}{DONE_SUFFIX}"


def _is_done(out_dir: Path, shard_name: str, want: dict[str, Any]) -> dict | None:
    done = _done_path(out_dir, shard_name)
    tar = out_dir / shard_name
    if not done.is_file() or not tar.is_file():
        return None
    try:
        rec = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    # A source is its bytes: a shard cached from the same bytes at another path (a workspace moved or
    # copied, a dataset remounted) is reused, not recomputed for hours.
    moved = want.get("source_sha256") is not None and rec.get("source_sha256") == want["source_sha256"]
    if any(rec.get(k) != v for k, v in want.items() if not (moved and k == "source_url")) \
            or rec.get("bytes") != tar.stat().st_size:
        return None
    return rec


# ------------------------------------------------------------------------------------- writing


def _uint8_hwc(image_chw: Any) -> np.ndarray:
    """[-1, 1] (3, H, W) tensor -> (H, W, 3) uint8 array; on the tensor's device, so a GPU image
    crosses to the host as 1 byte per value."""
    return ((image_chw.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _encode(image_hwc: np.ndarray, feature: np.ndarray, png_level: int) -> tuple[bytes, bytes]:
    """The stored bytes of one teacher output (an encoder thread's job: PNG and zlib release the GIL)."""
    from uniremoval.data.transforms import encode_png

    return encode_png(image_hwc, png_level), _npy(feature.astype(np.float16))


def run_teacher(teacher: Any, x: Any, cell: int, speed: Any) -> tuple[Any, Any]:
    """The teacher on a batch as the cache runs it (`speed`'s autocast and layout); fp32 results."""
    import torch

    from uniremoval.stages.fast import channels_last_input

    with torch.no_grad(), speed.autocast():
        image, feature = teacher(channels_last_input(x) if speed.channels_last else x, cell)
    return image.float(), feature.float()


def cache_shard(url: str, out_dir: Path, shard_name: str, teacher: Any, cell: int, speed: Any,
                want: dict[str, Any], progress: Any = None, batch_size: int = 1, workers: int = 0,
                png_level: int | None = None, bad_samples: str = "skip") -> dict[str, Any]:
    """Write one cache shard for source shard `url`; return its done-record.

    Up to `batch_size` consecutive samples of one image size go through the teacher together;
    samples are written in the source's order either way. With `workers` > 0 the CPU work runs
    beside the teacher instead of between its batches: a thread decodes the next inputs, and
    `workers` threads PNG-encode the last outputs while the next batch runs. The shard's bytes are
    the same either way (tests/test_teacher_cache.py). `png_level`: the teacher PNG's zlib level
    (lossless at any; None: the bulk default, `transforms.BULK_PNG_LEVEL`). A source sample that does
    not decode (or that the teacher fails on) is left out with a warning naming it and recorded in the
    done-record's `skipped` (`bad_samples="skip"`, data.bad_samples' default), or stops the shard with
    a DataError naming it (`"fail"`).
    """
    import collections
    import warnings
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from uniremoval.data.pipelines import decode_sample
    from uniremoval.data.read_ahead import read_ahead
    from uniremoval.data.shard_stream import ShardReadError, iter_shard
    from uniremoval.data.shardwriter import sample_members, tar_member
    from uniremoval.data.transforms import BULK_PNG_LEVEL, to_tensor

    level = BULK_PNG_LEVEL if png_level is None else png_level
    path = out_dir / shard_name
    n, skipped, counts = 0, [], Counter()
    pending: list[tuple[str, dict[str, bytes], dict[str, Any], Any]] = []  # (key, files, meta, CHW input)
    encoding: collections.deque = collections.deque()  # (key, files, meta, Future of (png, npy)), source order
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cache-encode") if workers > 0 else None

    def skip(key: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        where = f"source shard {url}, key {key}"
        if bad_samples == "fail":
            raise DataError(f"bad sample in {where}: {reason}. Fix or drop it (`uniremoval shards verify` lists every "
                            f"bad sample), or set data.bad_samples=skip to cache the rest without it") from exc
        skipped.append({"key": key, "reason": reason})
        warnings.warn(f"cache: skipped the sample in {where}: {reason}; it is left out of the cache (listed in the "
                      f"cache's manifest.json 'issues'; data.bad_samples=fail stops instead)", RuntimeWarning,
                      stacklevel=2)
        if progress is not None:
            progress.update(1)  # handled: the bar counts the source's samples

    def decoded() -> Any:
        """(key, files, meta, CHW input, None) per source sample, or (key, ..., the exception)."""
        for key, files in iter_shard(url):
            try:
                # the loaders' decoding: the input upright by json `orientation`, so the teacher
                # image and grid are stored upright
                sample = decode_sample(files, ())
                h, w = sample["input"].shape[:2]
                if min(h, w) < cell:  # (pool_feature would say "use larger crops": no crop here)
                    raise ValueError(f"the input is {w}x{h}, smaller than one {cell}x{cell}-pixel feature cell "
                                     f"(data.feature_cell): no feature to cache; leave it out of the source, or "
                                     f"lower data.feature_cell for every stage")
                yield key, files, sample["meta"], to_tensor(sample["input"]), None
            except Exception as exc:  # noqa: BLE001 (one unusable sample must not stop the cache)
                yield key, files, None, None, exc

    def teacher_each(batch: list) -> list:
        """Outputs per sample: one forward for the batch; alone again if it fails (isolates a bad one)."""
        try:
            image, feature = run_teacher(teacher, torch.stack([b[3] for b in batch]).to(speed.device), cell, speed)
            return [(image[i], feature[i]) for i in range(len(batch))]
        except Exception as exc:  # noqa: BLE001 (one unusable sample must not stop the cache)
            if len(batch) == 1:
                skip(batch[0][0], exc)
                return [None]
            return [out for b in batch for out in teacher_each([b])]

    def write_encoded(tar: tarfile.TarFile, wait: bool) -> None:
        """Append the encoded samples to the tar in source order: those ready (all with `wait`)."""
        nonlocal n
        while encoding and (wait or encoding[0][3].done()):
            key, files, meta, job = encoding.popleft()
            png, npy = job.result()
            meta["teacher_sha256"] = want["teacher_sha256"]
            sample: dict[str, Any] = {"__key__": key, "json": meta}
            for ext, data in files.items():
                if ext != "json" and ext.split(".")[0] not in ("teacher", "feature"):
                    sample[ext] = data  # the synthetic sample's own bytes, never re-encoded
            sample["teacher.png"] = png
            sample["feature.npy"] = npy
            for name, data in sample_members(sample):
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
            n += 1
            counts[str(meta.get("split", "unknown"))] += 1
            if progress is not None:
                progress.update(1)

    def flush(tar: tarfile.TarFile) -> None:
        for (key, files, meta, _), out in zip(pending, teacher_each(pending) if pending else []):
            if out is None:
                continue
            image, feature = out
            args = (_uint8_hwc(image), feature.cpu().numpy(), level)  # host copies: the teacher's batch is done
            if pool is not None:
                job = pool.submit(_encode, *args)
            else:
                job = Future()
                job.set_result(_encode(*args))
            encoding.append((key, files, meta, job))
        pending.clear()
        write_encoded(tar, wait=False)

    # the next inputs decode while the teacher runs
    source = read_ahead(decoded(), depth=2 * batch_size, name="cache-decode") if workers > 0 else None
    try:
        with atomic_writer(path, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
                try:
                    for key, files, meta, x, exc in (source if source is not None else decoded()):
                        if exc is not None:
                            skip(key, exc)
                            continue
                        if pending and (len(pending) >= batch_size or pending[0][3].shape != x.shape):
                            flush(tar)
                        pending.append((key, files, meta, x))
                    flush(tar)
                    write_encoded(tar, wait=True)
                except ShardReadError as exc:
                    raise DataError(f"source shard {url} is unreadable ({exc}); rebuild it or drop it from "
                                    f"data.train") from exc
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the old one is retired (a full disk fails here, nothing lost)
            # The new tar is about to replace the old one: the old done-record and the folder's manifest
            # go first. Left in place, a kill before the new record (hashing a large tar takes a while)
            # would leave the new tar under the old record, and the manifest would vouch (teacher sha256,
            # cell) for shards a killed rebuild by other weights replaced: a silent mix. A tar's size
            # rarely tells two teachers' shards apart. The manifest is rewritten once every shard is done.
            _done_path(out_dir, shard_name).unlink(missing_ok=True)
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    finally:
        if source is not None:
            source.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    os.chmod(path, 0o644)
    rec = {**want, "name": shard_name, "samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path),
           "skipped": skipped, "counts": {"split": dict(sorted(counts.items()))}}
    if skipped and _local_file(url):  # the bytes read, so that a repair in place is seen (_source_repaired)
        rec["source_file_sha256"] = sha256_file(Path(url))
    atomic_write_json(_done_path(out_dir, shard_name), rec)
    return rec


# ------------------------------------------------------------------------------------- the stage


def _plan(cfg: CacheStage) -> list[dict[str, Any]]:
    """Every (source, shard) of data.train, in a fixed order shared by all ranks."""
    from uniremoval.data.shard_stream import resolve_shards

    if not cfg.data.train:
        raise ConfigError("cache: data.train lists no synthetic source to cache")
    names = [s.name for s in cfg.data.train]
    if len(set(names)) != len(names):
        raise ConfigError(f"cache: data.train source names must be unique (they name the cache folders): {names}")
    items = []
    for src in cfg.data.train:
        if src.degradation is None:
            raise ConfigError(f"cache: source {src.name!r} (data.train) has no degradation, so no teacher runs on it; "
                              f"give it degradation: <type>, one of teachers.checkpoints {sorted(cfg.teachers.checkpoints)}")
        if src.degradation not in cfg.teachers.checkpoints:
            raise ConfigError(
                f"cache: source {src.name!r} has degradation {src.degradation!r}, which has no teacher; "
                f"teachers.checkpoints has {sorted(cfg.teachers.checkpoints)}")
        urls = resolve_shards(src.shards)
        shard_names = [Path(u.split("?")[0]).name for u in urls]
        if len(set(shard_names)) != len(shard_names):
            raise ConfigError(f"cache: source {src.name!r} has shards with the same file name: {shard_names}")
        counts: dict[Path, dict[str, int]] = {}  # samples per shard, from each local folder's manifest
        for url, name in zip(urls, shard_names):
            folder = Path(url).parent
            if folder not in counts:
                held = existing_manifest(folder) if Path(url).is_file() else None
                counts[folder] = {s.get("name"): s.get("samples") for s in (held or {}).get("shards", [])
                                  if isinstance(s, dict)}
            items.append({"source": src.name, "degradation": src.degradation, "url": url, "name": name,
                          "samples": counts[folder].get(name)})
    return items


def check_out_folders(out_root: Path, items: list[dict[str, Any]]) -> None:
    """Refuse, before anything is written, a cache folder that is (or holds, or lies inside) a source
    shard folder, or that already holds a dataset rather than a cache: the cache would overwrite it."""
    sources = {Path(it["url"]).resolve().parent for it in items if Path(it["url"]).is_file()}
    for name in sorted({it["source"] for it in items}):
        out_dir = (out_root / name).resolve()
        for src in sources:
            if out_dir == src or src in out_dir.parents or out_dir in src.parents:
                raise ConfigError(f"cache.out={out_root}: the cache of {name!r} would be written to {out_dir}, "
                                  f"{'the folder of' if out_dir == src else 'overlapping'} the source shards "
                                  f"{src}; set cache.out to a folder of its own (e.g. cache/)")
        held = existing_manifest(out_dir)
        if held is not None and "cache" not in held:
            raise ConfigError(f"cache.out={out_root}: {out_dir} holds a dataset ({out_dir / MANIFEST_NAME} has no "
                              f"cache section), which the cache would overwrite; set cache.out to a folder of its own")


def run(cfg: CacheStage, args: Any = None) -> int:
    """`uniremoval cache`: build (or complete) the teacher-output cache on every rank."""
    from uniremoval.stages.trainer import build_accelerator

    acc = build_accelerator(cfg)
    out_root = Path(cfg.cache.out)
    same_config_on_every_rank(acc.num_processes, cfg)
    # Shard i is rank i mod world's in each rank's own plan: plans that differ (a shard one node does
    # not see) would leave shards uncached on every rerun, or cache one under another's source hash.
    items = agreed_listing(acc.num_processes, lambda: _plan(cfg),
                           lambda plan: [f"{it['source']}: {it['url']}" for it in plan], "source shards",
                           SAME_FILES_FIX + "; nothing was cached")
    check_out_folders(out_root, items)
    from uniremoval.io import check_output

    made = out_root if not out_root.exists() else None  # and the folders above it that do not exist yet
    while made is not None and not made.parent.exists():
        made = made.parent
    check_output(out_root, "cache.out", folder=True, create=True)
    # One cache job per cache.out: the same command started twice stops here, not interleaving shards.
    with lock_on_main_process(acc, out_root, "a teacher cache"):
        try:
            return _build(cfg, acc, items, out_root)
        except BaseException:
            if made is not None and acc.is_main_process:  # e.g. a teacher refused: no empty folders left
                _remove_if_unused(out_root, made)
            raise


def _remove_if_unused(out_root: Path, made: Path) -> None:
    """Remove the folders this run made (`made`: the topmost, `out_root` or above it) if nothing was
    written in them but the lock file and empty source folders. Called holding the lock: a job
    started meanwhile was refused, one started after finds no folder."""
    entries = list(made.rglob("*"))
    lock = out_root / ".lock"
    if any(e.is_symlink() or (e.is_file() and e != lock) for e in entries):
        return
    with contextlib.suppress(OSError):
        lock.unlink(missing_ok=True)
        for d in sorted((e for e in entries if e.is_dir()), key=lambda e: len(e.parts), reverse=True):
            d.rmdir()
        made.rmdir()


def _build(cfg: CacheStage, acc: Any, items: list[dict[str, Any]], out_root: Path) -> int:
    from uniremoval.progress import progress_bar
    from uniremoval.stages import fast
    from uniremoval.stages.teachers import load_teachers

    rank, world = acc.process_index, acc.num_processes
    cell = cfg.data.feature_cell
    degs = sorted({it["degradation"] for it in items})
    preset = cfg.teachers.preset or cfg.model.preset
    teachers = load_teachers({d: cfg.teachers.checkpoints[d] for d in degs}, degs, preset, device=acc.device,
                             arch=cfg.model.arch, overrides=cfg.model.overrides)
    speed = fast.Speed.from_config(cfg, acc.device)
    for t in teachers.values():
        if speed.channels_last:
            fast.to_channels_last(t.model)
        if speed.compile:  # one graph per batch shape: for fixed-size sources (see the module's docstring)
            speed.compile_model(t.model)
    if speed.compile and acc.is_main_process:
        print(f"model.compile: the teachers compile at their first batch of each shape (mode {speed.compile_mode}; "
              f"a minute or more on a GPU, kernels cached in {speed.compile_cache or 'the inductor default'})",
              file=sys.stderr)
    if acc.is_main_process:  # the sources' hashes once, shared with every rank through the plan
        manifests: dict[Path, dict[str, str]] = {}
        for it in items:
            it["source_sha256"] = source_sha256(it["url"], manifests)
    shas = [it.get("source_sha256") for it in items]
    if world > 1:
        import torch.distributed as dist

        box = [shas]
        dist.broadcast_object_list(box, src=0)
        shas = box[0]
    for it, sha in zip(items, shas):
        it["source_sha256"] = sha

    mine = [it for i, it in enumerate(items) if i % world == rank]
    todo, reused = [], 0
    for it in mine:
        out_dir = out_root / it["source"]
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{it['name']}.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        want = _want(it, teachers[it["degradation"]], cell, cfg.train.mixed_precision)
        rec = _is_done(out_dir, it["name"], want)
        if rec and not _source_repaired(rec, it["url"]):
            reused += 1
        else:
            todo.append((it, want))
    # `with`: an interrupt closes the bar before cli.main prints its one line, not after it at exit
    sizes = [it.get("samples") for it, _ in todo]
    total = sum(sizes) if all(isinstance(n, int) for n in sizes) else None  # known for local shard folders
    with progress_bar(total, f"cache (rank {rank})", "img", disable=not acc.is_main_process,
                      dynamic_ncols=True) as bar, \
            fast.math_flags(cudnn_tf32=True, cudnn_benchmark=cfg.cache.cudnn_benchmark):
        for it, want in todo:
            t = teachers[it["degradation"]]
            bar.set_postfix_str(f"{it['source']}/{it['name']}", refresh=False)
            cache_shard(it["url"], out_root / it["source"], it["name"], t, cell, speed, want, bar,
                        batch_size=cfg.cache.batch_size, workers=cfg.cache.workers, png_level=cfg.cache.png_level,
                        bad_samples=cfg.data.bad_samples)
    counts = [len(todo), reused]
    if world > 1:  # the summary line counts every rank's shards, not rank 0's
        import torch
        import torch.distributed as dist

        total_counts = torch.tensor(counts, device=acc.device)
        dist.all_reduce(total_counts)  # also the barrier before rank 0 writes the manifests
        counts = total_counts.tolist()
    acc.wait_for_everyone()
    if acc.is_main_process:
        n = write_manifests(cfg, items, teachers, out_root)
        bad = sum(json.loads((out_root / s.name / MANIFEST_NAME).read_text())["issues"]["total"] for s in cfg.data.train)
        left_out = f"; {bad} bad source sample(s) left out (each cache's manifest.json 'issues')" if bad else ""
        print(f"cache: {len(items)} shards in {out_root} ({n} samples); recomputed {counts[0]}, "
              f"reused {counts[1]}{left_out}", file=sys.stderr)
    acc.wait_for_everyone()
    _log_run(cfg, acc, out_root)
    return 0


def _want(it: dict[str, Any], teacher: Any, cell: int, precision: str) -> dict[str, Any]:
    return {"cache_format": CACHE_FORMAT, "source_url": it["url"], "source_sha256": it["source_sha256"],
            "teacher_sha256": teacher.sha256, "cell": cell, "input_range": teacher.input_range,
            "precision": precision}


def write_manifests(cfg: CacheStage, items: list[dict[str, Any]], teachers: Mapping[str, Any], out_root: Path) -> int:
    """manifest.json per source folder (readable by the shard tools and pipelines) + a `cache` section."""
    from uniremoval import __version__

    total = 0
    for src in cfg.data.train:
        out_dir = out_root / src.name
        recs, sources = [], []
        for it in (i for i in items if i["source"] == src.name):
            rec = _is_done(out_dir, it["name"], _want(it, teachers[it["degradation"]], cfg.data.feature_cell,
                                                     cfg.train.mixed_precision))
            if rec is None:
                raise DataError(f"cache shard {out_dir / it['name']} is missing or incomplete after the run; "
                                f"rerun `uniremoval cache`")
            recs.append(rec)
            sources.append({"url": it["url"], "sha256": it["source_sha256"]})
        t = teachers[src.degradation]
        n = sum(r["samples"] for r in recs)
        total += n
        split = Counter()
        for r in recs:
            split.update(r["counts"]["split"])
        manifest = {
            "format_version": 1, "dataset": src.name, "complete": True,
            "created_by": {"command": ["uniremoval", "cache"], "version": __version__},
            "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"],
                        "counts": {"degradation": {src.degradation: r["samples"]}, "domain": {"synthetic": r["samples"]},
                                   "split": r["counts"]["split"]}} for r in recs],
            "counts": {"total": n, "degradation": {src.degradation: n}, "domain": {"synthetic": n},
                       "split": dict(sorted(split.items()))},
            "issues": {"total": sum(len(r["skipped"]) for r in recs),
                       "samples": [s | {"shard": r["name"]} for r in recs for s in r["skipped"]][:1000]},
            "cache": {"format": CACHE_FORMAT, "degradation": src.degradation, "feature_cell": cfg.data.feature_cell,
                      "teacher": {"checkpoint": str(t.checkpoint), "sha256": t.sha256, "input_range": t.input_range},
                      "precision": cfg.train.mixed_precision,
                      "sources": sources},
        }
        atomic_write_json(out_dir / MANIFEST_NAME, manifest)
        listed = {r["name"] for r in recs}
        if stray := sorted(t.name for t in out_dir.glob("*.tar") if t.name not in listed):
            # Not deleted: they may be the cache of source shards left out of this run on purpose, which
            # would cost a teacher pass each to rebuild. KT reading the folder goes by the manifest.
            more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
            print(f"cache: {out_dir} also holds {stray[0]}{more}, not part of this cache (an earlier build's, "
                  f"from source shards this run did not list); the manifest leaves them out, so training skips "
                  f"them; delete them to free the space", file=sys.stderr)
    return total


CACHE_TAG_PREFIX = "cache_sha256."  # + a cache folder's dataset name: the sha256 of its manifest.json


def cache_identity(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(dataset, sha256 of manifest.json) of a cache folder `uniremoval cache` wrote, or None: the cache
    run tags `cache_sha256.<dataset>` with it, and so does each KT run that reads the folder, so the
    cache a student learnt from is one search away (its manifest lists the teacher and source shards)."""
    manifest = Path(folder) / MANIFEST_NAME
    try:
        data = manifest.read_bytes()
        parsed = json.loads(data)
    except (OSError, ValueError):
        return None
    if not isinstance(parsed, dict) or "cache" not in parsed or not parsed.get("dataset"):
        return None
    return str(parsed["dataset"]), hashlib.sha256(data).hexdigest()


def _log_run(cfg: CacheStage, acc: Any, out_root: Path) -> None:
    if not acc.is_main_process:
        return
    from uniremoval.models.checkpoint import checkpoint_run_id, checkpoint_sha256
    from uniremoval.tracking import finishing, start_run

    # Which weights made the cache, as KT's tags name its teachers: by hash, and by the run that trained them.
    lineage: dict[str, str] = {}
    for name, spec in cfg.teachers.checkpoints.items():
        if not spec:
            continue
        with contextlib.suppress(CheckpointError, OSError):
            lineage[f"teacher_sha256.{name}"] = checkpoint_sha256(spec)
        if run_id := checkpoint_run_id(spec):
            lineage[f"teacher_run_id.{name}"] = run_id
    for src in cfg.data.train:  # and what it made: the KT runs that read a folder tag the same hash
        if ident := cache_identity(out_root / src.name):
            lineage[f"{CACHE_TAG_PREFIX}{ident[0]}"] = ident[1]
    tracker = start_run(cfg, run_name="cache", stage="cache", run_dir=out_root, extra_tags=lineage)
    if tracker is None:
        return
    with finishing(tracker):
        metrics = {}
        for src in cfg.data.train:
            m = json.loads((out_root / src.name / MANIFEST_NAME).read_text())
            metrics[f"cache/{src.name}/samples"] = m["counts"]["total"]
            metrics[f"cache/{src.name}/skipped"] = m["issues"]["total"]
            tracker.log_artifact(out_root / src.name / MANIFEST_NAME, f"manifests/{src.name}")
        tracker.log_metrics(metrics, step=0)


# ------------------------------------------------------------------------------------- checking


def check_cache(cache_dir: str | os.PathLike, teachers: Mapping[str, str],
                sources: Sequence[str] | str | None = None, cell: int | None = None) -> dict[str, Any]:
    """Refuse (DataError) a cache folder that another teacher or other source shards produced.

    `cache_dir`: one source's cache folder (with manifest.json). `teachers`: degradation ->
    checkpoint path, as in `teachers.checkpoints`. `sources`: the synthetic shards it must come
    from (a spec as in data.train); None checks the recorded sources that exist on this machine
    (a cache moved without its sources is accepted). `cell`: the expected feature cell.
    Returns the manifest.
    """
    from uniremoval.data.shard_stream import resolve_shards

    cache_dir = Path(cache_dir)
    file = cache_dir / MANIFEST_NAME
    if not file.is_file():
        if any(cache_dir.glob("*.tar")):
            # Shards but no manifest: a build (or rebuild) that did not finish, when `uniremoval cache` wrote
            # there (its done-records, or its lock in the cache root); else tars from elsewhere.
            if any(cache_dir.glob(f".*{DONE_SUFFIX}")) or (cache_dir.parent / ".lock").exists():
                raise DataError(f"cache {cache_dir}: no manifest.json, an unfinished cache build; rerun "
                                f"`uniremoval cache --config ...` to complete it (finished shards are reused)")
            raise DataError(f"cache {cache_dir}: holds tars but no manifest.json, and `uniremoval cache` did not "
                            f"write them: it is not a teacher cache (KT reads the teachers' outputs from one); "
                            f"build it from these source shards with `uniremoval cache --config ...`")
        raise DataError(f"cache {cache_dir}: no manifest.json; build it with `uniremoval cache --config ...`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cache {file} is not valid JSON ({exc}); rebuild it with `uniremoval cache`") from exc
    info = manifest.get("cache")
    if not isinstance(info, dict) or not manifest.get("complete"):
        raise DataError(f"{cache_dir} is not a complete teacher cache (no 'cache' section); "
                        f"rebuild it with `uniremoval cache`")
    deg = info["degradation"]
    if deg not in teachers:
        raise DataError(f"cache {cache_dir} holds '{deg}' teacher outputs, but teachers.checkpoints has no '{deg}' "
                        f"entry (it has {sorted(teachers)})")
    from uniremoval.models.checkpoint import checkpoint_sha256

    want = checkpoint_sha256(teachers[deg])
    have = info["teacher"]["sha256"]
    if want != have:
        raise DataError(
            f"stale cache {cache_dir}: it was built by teacher {info['teacher']['checkpoint']} (sha256 {have[:12]}), "
            f"but teachers.checkpoints.{deg} = {teachers[deg]} has sha256 {want[:12]}. Rebuild it with "
            f"`uniremoval cache --config ...` (or point teachers.checkpoints.{deg} at the teacher that built it)")
    if cell is not None and info["feature_cell"] != cell:
        raise DataError(f"cache {cache_dir} pools features on {info['feature_cell']} px cells, the config asks "
                        f"data.feature_cell={cell}; rebuild the cache or set data.feature_cell={info['feature_cell']}")
    recorded = {s["url"]: s["sha256"] for s in info["sources"]}
    manifests: dict[Path, dict[str, str]] = {}  # each source folder's, read once
    if sources is not None:
        urls = resolve_shards(sources)
        shas = [source_sha256(u, manifests) for u in urls] if sorted(urls) != sorted(recorded) else []
        if shas and None not in shas and None not in recorded.values() and sorted(shas) == sorted(recorded.values()):
            recorded = dict(zip(urls, shas))  # the same source bytes at another path (moved or copied)
        elif sorted(urls) != sorted(recorded):
            missing = sorted(set(urls) - set(recorded))
            extra = sorted(set(recorded) - set(urls))
            raise DataError(f"stale cache {cache_dir}: built from other source shards than the config's "
                            f"(not cached: {missing[:3]}{'...' if len(missing) > 3 else ''}; cached but no longer "
                            f"listed: {extra[:3]}{'...' if len(extra) > 3 else ''}); rebuild with `uniremoval cache`")
    for url, sha in recorded.items():
        if sha is None or ("://" not in url and not Path(url).exists()):
            continue
        now = source_sha256(url, manifests)
        if now != sha:
            raise DataError(f"stale cache {cache_dir}: source shard {url} changed since it was cached "
                            f"(sha256 {sha[:12]} -> {str(now)[:12]}); rebuild with `uniremoval cache`")
    for entry in manifest["shards"]:
        p = cache_dir / entry["name"]
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise DataError(f"cache shard {p} is missing or has another size than manifest.json records; "
                            f"rerun `uniremoval cache` to complete it")
    _check_done_records(cache_dir, manifest, have)
    return manifest


def _check_done_records(cache_dir: Path, manifest: dict[str, Any], teacher_sha: str) -> None:
    """A shard whose done-record names another tar or teacher than manifest.json was rewritten after the
    manifest: a rebuild (other teacher weights) killed midway by a uniremoval older than the one that
    removes the manifest first, which left the old manifest vouching for a mix of two teachers' shards
    (tars are padded, so their sizes rarely differ). Shards without a done-record are not judged."""
    mixed = []
    for entry in manifest["shards"]:
        try:
            rec = json.loads(_done_path(cache_dir, entry["name"]).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        other_tar = entry.get("sha256") and rec.get("sha256") and rec["sha256"] != entry["sha256"]
        other_teacher = rec.get("teacher_sha256") and rec["teacher_sha256"] != teacher_sha
        if other_tar or other_teacher:
            by = str(rec.get("teacher_sha256") or "?")[:12]
            mixed.append(f"{entry['name']} (teacher {by})")
    if mixed:
        raise DataError(
            f"cache {cache_dir} mixes two builds: manifest.json names teacher {teacher_sha[:12]}, but "
            f"{len(mixed)} of its {len(manifest['shards'])} shard(s) were rewritten after it was written "
            f"({', '.join(mixed[:3])}{'...' if len(mixed) > 3 else ''}): a rebuild killed midway by an older "
            f"uniremoval, which left the old manifest in place. Rerun `uniremoval cache --config ...` with the "
            f"teacher you mean: shards of other weights are recomputed and the manifest is rewritten")
