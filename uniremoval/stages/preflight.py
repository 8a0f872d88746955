"""Checks of a stage's inputs before anything starts: every shard folder, pattern and checkpoint a
config names is there, holds shards, and holds what its entry says (the source's degradation, DA's
clear images, validation pairs). Run by the trainer after the ranks agree (`Trainer._fit`) and by
`uniremoval cache`; a missing validation set was otherwise found at the first validation, hours in."""

from __future__ import annotations

import json
from pathlib import Path

from uniremoval.config import CLEAR, CacheStage, DAStage, DataSource, KTStage, StageBase, TeacherStage
from uniremoval.errors import ConfigError


def _other_degradation(cfg: StageBase, src: DataSource, folder: Path) -> str | None:
    """What is wrong when a shard folder's manifest counts no sample of the source's degradation:
    the cache ran that type's teacher over another type's images (and labelled them so), and
    validation scored them under the wrong name, both silently; training skipped every sample."""
    from uniremoval.data.manifest import manifest_degradations

    want = src.degradation or (cfg.degradation if isinstance(cfg, TeacherStage) else None)
    held = manifest_degradations(folder) if want and folder.is_dir() else None
    if held is None or want in held:
        return None
    holds = f"holds {', '.join(f'{n} {d}' for d, n in sorted(held.items()))} sample(s) (its manifest.json), no '{want}' one"
    if set(held) == {CLEAR}:
        # 'degradation: clear' is no type to train: clear photos belong in DA's X_C, not among degraded inputs
        where = "list them in data.clear (DA's X_C)" if isinstance(cfg, DAStage) else "they are no degraded input"
        return f"{holds}: these are clear photos ({where}); give the '{want}' shards"
    # ('clear' is no type to suggest: a folder of clear photos and another type's images names that type)
    return f"{holds}; give the '{want}' shards, or degradation: {min(set(held) - {CLEAR})} if these are the ones meant"


def _local_shards(spec: str) -> list[str]:
    from uniremoval.data.manifest import is_streamed
    from uniremoval.data.shard_stream import resolve_shards
    from uniremoval.errors import DataError

    try:
        return [s for s in resolve_shards(spec) if not is_streamed(s) and Path(s).is_file()]
    except DataError:  # an unfinished build, no tars: the stream names it
        return []


def _no_pair(spec: str) -> str | None:
    """What is wrong when a local teacher/KT validation set (data.val) holds no paired sample: their
    validation is PSNR/SSIM against targets, and an unpaired set (RTTS, real photos) scored nothing,
    found only at the first validation, val_every steps in. Stops at the first sample with a target
    (read from tar headers)."""
    import tarfile

    from uniremoval.data.manifest import iter_tar_samples, sample_fields

    shards, seen = _local_shards(spec), 0
    for shard in shards:
        try:
            for _key, fields in iter_tar_samples(shard, only_json=True):
                if sample_fields(fields)[1] is not None:
                    return None
                seen += 1
        except (OSError, tarfile.TarError, EOFError):  # a damaged shard: the stream names it
            return None
    if not seen:
        return None
    return (f"holds {seen} image(s) and no target: teacher and KT validation score PSNR/SSIM against targets; "
            f"give a paired test set here (e.g. shards/sots_outdoor), and score unpaired real photos with "
            f"`uniremoval eval` or as DA's data.val")


def _no_clear_image(spec: str) -> str | None:
    """What is wrong when a local DA clear source (data.clear) holds no sample the clear stream can
    use: it takes a paired sample's target, or an unpaired image whose json says 'clear' (or nothing);
    an unpaired set of degraded photos (RTTS, URHI) gave none, found only at step 1 after the models
    were built (and compiled). Stops at the first usable sample (read from tar headers and json)."""
    import tarfile
    from collections import Counter

    from uniremoval.data.manifest import iter_tar_samples, sample_fields

    shards = _local_shards(spec)
    held: Counter = Counter()
    for shard in shards:
        try:
            for _key, fields in iter_tar_samples(shard, only_json=True):
                try:
                    meta = json.loads(fields.get("json") or b"{}")
                except ValueError:
                    meta = {}
                kind = meta.get("degradation") if isinstance(meta, dict) else None
                if sample_fields(fields)[1] is not None or kind in (None, CLEAR):
                    return None
                held[str(kind)] += 1
        except (OSError, tarfile.TarError, EOFError):  # a damaged shard: the stream names it
            return None
    if not held:
        return None
    types = ", ".join(f"{n} {d}" for d, n in sorted(held.items()))
    return (f"holds {types} image(s) without a target, and no clear one: DA takes X_C from clear photos or a "
            f"paired set's targets; give shards built with `uniremoval shards build --format folder --degradation "
            f"clear` (README: Data preparation) or a paired set (e.g. shards/spa), and put real degraded photos "
            f"in data.train")


def check_inputs(cfg: StageBase) -> None:
    """Refuse, before anything starts, a local input of a training or cache stage that is not there:
    shard folders (data.train/val/clear), model.init and teachers.checkpoints (a missing validation set
    was found only at the first validation, thousands of steps in), and a shard folder whose manifest
    holds no sample of its source's degradation, or (DA's data.clear) no clear image nor target. URLs
    and pipes pass; a local folder, file: URL or pattern must list shards (`resolve_shards`).
    Checkpoints a run logged to MLflow (runs:/<id>/weights/last) are fetched."""
    from uniremoval.data.manifest import is_plain_path, split_specs
    from uniremoval.data.shard_stream import resolve_shards
    from uniremoval.errors import CheckpointError, DataError
    from uniremoval.models.checkpoint import resolve_weights
    from uniremoval.tracking import fetch_run_checkpoint, is_run_artifact

    cwd = Path.cwd()
    missing: list[str] = []
    for section in ("train", "val", "clear"):
        for i, src in enumerate(getattr(cfg.data, section)):
            for spec in (part for entry in src.shards for part in split_specs(entry)):
                if spec.startswith(("pipe:", "http://", "https://")):
                    continue  # read when the stream opens it (other URL schemes: resolve_shards refuses)
                where = f"data.{section}.{i} ({src.name})"
                plain = is_plain_path(spec)
                if plain and not Path(spec).exists():
                    made_by = ("`uniremoval cache --config configs/cache.yaml`" if isinstance(cfg, KTStage)
                               and section == "train" and cfg.teachers.mode == "cached"
                               else f"`uniremoval shards build|synth ... --out {spec}` (README: Data preparation)")
                    missing.append(f"{where}: {spec} does not exist; {made_by} writes it")
                    continue
                try:  # a folder of no shards, an unmerged or unfinished build, a pattern matching nothing
                    resolve_shards(spec)
                except DataError as exc:
                    missing.append(f"{where}: {exc}")
                    continue
                if plain and (wrong := (_other_degradation(cfg, src, Path(spec)) or
                               (_no_clear_image(spec) if section == "clear" and isinstance(cfg, DAStage) else None) or
                               (_no_pair(spec) if section == "val" and isinstance(cfg, (TeacherStage, KTStage))
                                else None))):
                    missing.append(f"{where}: {spec} {wrong}")
    checkpoints: dict[str, tuple[str, str]] = {}
    if cfg.model.init:
        made_by = "`uniremoval train kt`" if isinstance(cfg, DAStage) else "a training stage"
        checkpoints["model.init"] = (cfg.model.init, made_by)
    if isinstance(cfg, (CacheStage, KTStage)):
        used = {src.degradation for src in cfg.data.train} if isinstance(cfg, CacheStage) else set(cfg.teachers.checkpoints)
        for deg, path in cfg.teachers.checkpoints.items():
            if deg not in used:
                continue
            # configs/ ships teachers for haze, rain and blur only: another type needs a config of its own.
            # Looked up where the command below reads it: relative to the working directory.
            shipped = (Path("configs") / "teacher" / f"{deg}.yaml").is_file()
            made_by = (f"`uniremoval train teacher --config configs/teacher/{deg}.yaml`" if shipped else
                       f"`uniremoval train teacher` with a config of `degradation: {deg}` and its shards (e.g. a "
                       f"copy of configs/teacher/haze.yaml)")
            checkpoints[f"teachers.checkpoints.{deg}"] = (path, made_by)
    for key, (path, made_by) in checkpoints.items():
        try:
            if is_run_artifact(path):  # runs:/<id>/weights/last: fetched here, once, from tracking.uri's store
                fetch_run_checkpoint(path, cfg.tracking.uri)
            else:
                resolve_weights(Path(path))
        except CheckpointError as exc:
            # a path that is there (a folder) is not "missing": say what resolve_weights found
            missing.append(f"{key}: {exc}" if is_run_artifact(path) or Path(path).exists() else
                           f"{key}: {path} does not exist; {made_by} writes it, or set {key}=PATH")
    if missing:
        raise ConfigError(f"missing or mismatched input(s), relative paths read from {cwd}:\n  " + "\n  ".join(missing))
