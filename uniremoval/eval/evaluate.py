"""`uniremoval eval`: restore a test set (or take it as it is), score it, write and log the scores.

Data: a shard dataset (a directory with manifest.json or *.tar, a manifest, a tar, a brace pattern
or URL; read with `uniremoval.data.pipelines.eval_samples`) or a folder of images:

- `DIR/*.png|jpg|bmp` (recursive), with optional targets of the same relative name (any image
  extension) under `DIR/target/`;
- or `DIR/input/...` with targets under `DIR/target/...` (also `gt/`, `groundtruth/`).

Folder images are listed as the shard builders list them (hidden files such as macOS's `._<name>`
skipped) and read as `restore` reads them (`eval.restore.read_image_oriented`: upright, with EXIF
orientation applied; a pair whose orientation tags differ is refused). Shards hold the original
bytes and are decoded as training sees them (`data.pipelines.decode_sample`: upright by the json
`orientation` the builders recorded from the same tag).

Distribution: under `accelerate launch` every rank scores its part (shards: by shard/sample, see
`eval_samples`; folders: the sorted file list strided by rank), the per-image records are gathered
on rank 0, which checks that every image was scored exactly once, writes the JSON/CSV and logs the
MLflow run. Images of the same size are batched (`--batch-size`); scores do not depend on the
batch composition beyond float32 rounding (pyiqa's BRISQUE moves by < 0.01 between a batch of 5
and single images).

Restored images are rounded to 8 bits before scoring, so `--save-images` PNGs reproduce the scores.

`--save-images DIR` is replaced as a whole when the eval completes (`StagedImages`): every rank
writes into a staging folder beside DIR, rank 0 swaps it in after the gather, so an interrupted
rerun leaves DIR as the previous run wrote it.

Undefined and infinite scores: a metric can be undefined for an image (NIQE/BRISQUE of a flat,
constant image: their natural-scene statistics divide by a zero variance). Such an image is named
in a `warning:` line, its score is null in the JSON and empty in the CSV, the dataset mean is
over the images where the metric is defined (null if none), and the count of the others is
written: JSON `undefined`, CSV `(undefined)` row, MLflow `eval_undefined/<dataset>/<metric>`.
PSNR of an image identical to its target is +inf, kept as such: the JSON holds the string "inf"
(`float()` reads it; JSON has no infinity) as does the CSV, and the mean is then inf too (MLflow
stores inf as the largest float, which the report shows as inf). A restored image that holds NaN
or inf is not "undefined" but a broken checkpoint (a diverged run): its scores are null, and every
mean of the dataset is null too, with a warning naming the images.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from uniremoval.data.manifest import MANIFEST_NAME, is_streamed, split_specs
from uniremoval.data.read_ahead import read_ahead
from uniremoval.data.readers import DOMAINS, IMAGE_EXTS, INPUT_NAMES, TARGET_NAMES, child_folder
from uniremoval.errors import DataError, UniremovalError
from uniremoval.eval.metrics import METRICS, Scorer, parse_metrics
from uniremoval.tracking import MLFLOW_NAME_UNSAFE, dataset_name_fix, dataset_name_problem

if TYPE_CHECKING:
    import torch

# The folder names of a paired folder, in any case, as the shard readers take them (and "groundtruth")
TARGET_DIRS = (*TARGET_NAMES, "groundtruth")
DEFAULT_EXPERIMENT = "uniremoval"


@dataclass
class EvalOptions:
    checkpoint: str  # a checkpoint file, or "none" to score the inputs as they are
    data: str | list[str]  # a list: shard specs of one dataset
    metrics: list[str] = field(default_factory=lambda: ["brisque", "piqe"])
    name: str | None = None
    json_out: str | None = None
    csv_out: str | None = None
    save_images: str | None = None
    device: str | None = None  # None: cuda when available
    batch_size: int = 8
    psnr_y: bool = False
    crop_border: int = 0
    tile: int | None = None
    iqa_dir: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None
    label: str | None = None
    degradation: str | None = None
    domain: str | None = None  # an image folder's domain (synthetic, real); shards carry theirs in their json
    # From an eval config (`eval --config`): tracking.tags on each run, tracking.run_name for the runs'
    # names (<run_name>-<dataset>; default eval-<dataset>), and the resolved config as an artifact.
    tags: dict[str, str] = field(default_factory=dict)
    run_name: str | None = None
    config_yaml: str | None = None


@dataclass
class Item:
    name: str
    image: torch.Tensor  # (3, H, W) float in [0, 1]
    target: torch.Tensor | None
    degradation: str | None = None
    domain: str | None = None  # the samples' json `domain` (synthetic, real); None for a folder
    icc_profile: bytes | None = None  # a folder image's RGB colour profile, embedded in its --save-images PNG


@dataclass
class EvalResult:
    dataset: str
    checkpoint: str
    metrics: list[str]
    images: list[dict[str, Any]]
    mean: dict[str, float]  # over the images where the metric is defined; NaN when it is for none
    degradation: str | None = None
    domain: str | None = None  # synthetic or real when every sample says the same (the report's tables)
    run_id: str | None = None
    per_rank: list[int] = field(default_factory=list)  # images scored by each rank
    undefined: dict[str, list[str]] = field(default_factory=dict)  # metric -> images it is undefined for (NaN)
    # what changes the scores besides the model and data: tiled restoration is an approximation (README)
    settings: dict[str, Any] = field(default_factory=dict)
    started_ms: int | None = None  # when the eval began: its MLflow run starts then, not after the scoring

    def to_json(self) -> dict[str, Any]:
        """The --json content, valid JSON: an undefined score is null, an infinite one "inf" (module doc)."""
        return {"dataset": self.dataset, "checkpoint": self.checkpoint,
                "mean": {m: json_score(v) for m, v in self.mean.items()},
                "undefined": {m: len(self.undefined.get(m, [])) for m in self.metrics}, "settings": self.settings,
                "images": [{k: json_score(v) if k in self.mean else v for k, v in r.items()} for r in self.images]}


def json_score(v: float) -> float | str | None:
    """A score as valid JSON: NaN (undefined) -> null, +-inf -> "inf"/"-inf" (float() reads both back)."""
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def json_text(result: EvalResult) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------- data sources


def is_shard_source(data: str | list[str]) -> bool:
    if isinstance(data, (list, tuple)):
        return True
    p = Path(data)
    if is_streamed(data) or "{" in data or len(split_specs(data)) > 1 or p.suffix in (".tar", ".json"):
        return True
    if not p.is_dir() or (p / MANIFEST_NAME).is_file():
        return p.is_dir()
    tars = sorted(p.glob("*.tar"))
    if tars and (images := _images_under(p)):
        # Neither is guessed: read as shards, a folder of photos with a backup tar in it failed on the tar
        # (or, were the tar a shard, scored it alone and left the photos out unseen).
        raise DataError(f"--data {data} holds both tar files ({tars[0].name}{' ...' if len(tars) > 1 else ''}) and "
                        f"images ({images[0].relative_to(p).as_posix()}{' ...' if len(images) > 1 else ''}) and no "
                        "manifest.json, so it is neither a shard dataset nor an image folder alone; give the tars "
                        f"(e.g. --data '{p / '*.tar'}') or move them out of the image folder")
    return bool(tars)


def _images_under(root: Path, exclude: tuple[Path, ...] = (), others: list[Path] | None = None) -> list[Path]:
    """The images under `root` as every command lists them (`readers.walk_images`: hidden files skipped)."""
    from uniremoval.data.readers import walk_images

    return walk_images(root, skip=exclude, others=others)


def folder_pairs(root: str | os.PathLike, others: list[Path] | None = None) -> list[tuple[str, Path, Path | None]]:
    """(name, input, target or None) for a folder dataset, sorted by name (see module doc); input
    files in formats no reader decodes (HEIC, GIF...) go to `others` when given."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory, shard dataset or tar")
    # Every target-named folder is left out of the inputs (the first one found holds the targets): a
    # `GT/` beside `Input/` read as more inputs scored the clean images as test images too.
    tdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in TARGET_DIRS]
    tdirs.sort(key=lambda p: TARGET_DIRS.index(p.name.lower()))
    in_root = child_folder(root, INPUT_NAMES) or root
    inputs = _images_under(in_root, exclude=tuple(tdirs) + saved_folders(in_root), others=others)
    if not inputs:
        raise DataError(f"--data {root}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    targets: dict[str, Path] = {}
    for tdir in tdirs[:1]:
        for t in _images_under(tdir):
            stem = t.relative_to(tdir).with_suffix("").as_posix()
            if stem in targets:  # one would be taken in silence (shards build reports it as `duplicate`)
                raise DataError(f"--data {root}: two targets for the inputs named {stem}.*: {targets[stem]} and {t}; "
                                "keep one")
            targets[stem] = t
    out = []
    for p in inputs:
        rel = p.relative_to(in_root)
        out.append((rel.as_posix(), p, targets.get(rel.with_suffix("").as_posix())))
    return out


FolderListing = tuple[list[tuple[str, Path, "Path | None"]], list[Path]]


def list_folder(root: str | os.PathLike) -> FolderListing:
    """`folder_pairs` of `root`, and the input files no reader decodes beside them."""
    others: list[Path] = []
    return folder_pairs(root, others), others


def saved_folders(root: Path) -> tuple[Path, ...]:
    """Folders under `root` (not root itself) that an eval's --save-images wrote (SAVED_MARKER): the
    restored images of an earlier run, never test images (`--save-images DATA/restored` made a rerun
    score 2N images, its own outputs among them, and nest restored/restored)."""
    return tuple(sorted(m.parent for m in root.rglob(SAVED_MARKER) if m.parent != root and m.is_file()))


def check_headers(pairs: list[tuple[str, Path, Path | None]], need_target: bool,
                  check_size: Callable[[int, int, str], None]) -> None:
    """Refuse, before anything is restored, an image too small for a metric or a file that is no
    image at all (an HTML page saved as .jpg, an empty file): eval stops at either, and found while
    scoring it did so after every image before it (hours into a test set). Headers only (a
    truncated file is still found when it is decoded)."""
    from uniremoval.data.transforms import exif_orientation
    from uniremoval.eval.restore import open_image, read_image_oriented

    for name, inp, tgt in pairs:
        for path in (inp, tgt) if (need_target and tgt is not None) else (inp,):
            try:
                with open_image(None, path, load=False) as img:
                    width, height = img.size
                    if exif_orientation(img) >= 5:  # turned a quarter: named as displayed
                        width, height = height, width
            except Exception:  # noqa: BLE001 - the reader names what is wrong with the file
                read_image_oriented(path)
                continue
            if path == inp:
                check_size(height, width, name)


def iter_folder(root: str, rank: int, world: int, need_target: bool,
                check_size: Callable[[int, int, str], None] | None = None,
                listed: FolderListing | None = None) -> Iterator[Item]:
    """Items of a folder dataset, read upright (`read_image_oriented`). A pair whose EXIF
    orientations differ is scored as displayed when its sizes say it is aligned so
    (`transforms.pair_alignment`), else refused: as stored, or when the sizes cannot tell.
    With `check_size` (the scorer's), this rank's files are checked first (`check_headers`).
    `listed`: the folder as `list_folder` found it (walked once per eval: at 40k images a walk is seconds)."""
    import sys

    from uniremoval.data.transforms import orientation_mismatch, pair_alignment, upright_size
    from uniremoval.eval.restore import read_image_oriented, rgb_icc_profile

    pairs, others = listed if listed is not None else list_folder(root)
    if others and rank == 0:
        from uniremoval.eval.restore import other_formats_note

        print(other_formats_note(others, "eval"), file=sys.stderr)
    in_root = Path(root) / "input" if (Path(root) / "input").is_dir() else Path(root)
    if rank == 0 and (saved := saved_folders(in_root)):
        print(f"note: eval left out {len(saved)} folder(s) under --data {root} that an earlier eval's "
              f"--save-images wrote (e.g. {saved[0]}): restored images, not test images", file=sys.stderr)
    if need_target:
        missing = [n for n, _, t in pairs if t is None]
        if missing:
            raise DataError(
                f"--data {root}: PSNR/SSIM need targets, none found for {len(missing)} image(s), e.g. "
                f"{missing[0]!r}; put targets of the same name under {root}/target/"
            )
    if check_size is not None:
        check_headers(pairs[rank::world], need_target, check_size)
    for name, inp, tgt in pairs[rank::world]:
        image, turn = read_image_oriented(inp)
        target = None
        if tgt is not None and need_target:
            target, target_turn = read_image_oriented(tgt)
            # Both are read as displayed; a pair whose tags differ is scored so only when its sizes say
            # it is aligned that way (an upright target written by a tool that applied the input's tag).
            stored = upright_size(tuple(image.shape[-2:]), turn), upright_size(tuple(target.shape[-2:]), target_turn)
            how = pair_alignment(stored[0], turn, stored[1], target_turn) if target_turn != turn else "displayed"
            if how != "displayed":
                raise DataError(f"{inp}: {orientation_mismatch(turn, target_turn, how)} ({tgt})")
        if target is not None and target.shape != image.shape:
            (_, th, tw), (_, ih, iw) = target.shape, image.shape
            raise DataError(f"{tgt}: the target is {tw}x{th} but its input {inp} is {iw}x{ih} (width x height): "
                            "a pair must be aligned pixel for pixel; crop or resize one to the other, or leave "
                            "the pair out")
        yield Item(name, image, target, icc_profile=rgb_icc_profile(inp))


def _hwc_to_chw01(arr) -> torch.Tensor:
    import numpy as np
    import torch

    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / scale


def iter_shards(data: str, rank: int, world: int, need_target: bool) -> Iterator[Item]:
    from uniremoval.data.pipelines import eval_samples

    for s in eval_samples(data, rank, world, bad_samples="fail", as_tensor=False):
        meta = s.get("meta") or {}
        if need_target and "target" not in s:
            raise DataError(
                f"--data {data}: PSNR/SSIM need targets, but sample {s['key']} of {s['shard']} has none; "
                "an unpaired set (e.g. RTTS, URHI) has no ground truth: score it with no-reference metrics "
                "only (--metrics brisque,piqe)"
            )
        target = _hwc_to_chw01(s["target"]) if (need_target and "target" in s) else None
        yield Item(str(s["key"]), _hwc_to_chw01(s["input"]), target, meta.get("degradation"), meta.get("domain"))


def dataset_name(data: str | list[str]) -> str:
    if isinstance(data, (list, tuple)):
        data = data[0]
    p = Path(split_specs(data)[0].rstrip("/"))  # several joined specs: named after the first, as a list
    if p.name == MANIFEST_NAME or p.suffix == ".tar":
        p = p.parent
    if p.name in ("", "..") and not is_streamed(data):
        p = p.resolve()  # `--data .` (or a shard in it) is named after the folder, not "dataset"
    name = p.name or "dataset"
    # MLflow refuses a metric key (eval/<dataset>/<metric>) holding '(' or '#' (a folder "RTTS (test)"):
    # the run was then spooled as if the server were down, and its replay failed the same way forever.
    return MLFLOW_NAME_UNSAFE.sub("_", name.split("{")[0].rstrip("-_")) or "dataset"


# ---------------------------------------------------------------------------------- the run


def _restorer(opts: EvalOptions, device: torch.device):
    """(restore function on [0,1] batches, checkpoint meta, sha256) for --checkpoint."""
    if opts.checkpoint.lower() == "none":
        return None, {}, None
    from uniremoval.eval.restore import available_memory, images_per_pass, restore_tensor, untiled_shortfall
    from uniremoval.models.checkpoint import checkpoint_sha256, load_checkpoint
    from uniremoval.models.ranges import recorded_range
    from uniremoval.tracking import fetch_run_checkpoint, is_run_artifact

    if is_run_artifact(opts.checkpoint):  # runs:/<id>/weights/last: fetched (or its copy checked) from --tracking-uri
        fetch_run_checkpoint(opts.checkpoint, opts.tracking_uri)
    model, meta = load_checkpoint(opts.checkpoint, map_location=device, restorer=True)
    sha = checkpoint_sha256(opts.checkpoint)
    input_range = recorded_range(meta)
    free = available_memory() if device.type == "cpu" else None

    def restore(x: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
        # On the CPU the kernel kills a process that runs out, losing every score: stop first,
        # saying what it needs (a score over a smaller test set would be wrong, so nothing is skipped).
        h, w = x.shape[-2:]
        per_pass = images_per_pass(x.shape[0], h, w, device)
        short = untiled_shortfall(model, h, w, per_pass, opts.tile, free)
        if short:
            which = f" ({names[0]}{f' and {len(names) - 1} more of its size' if len(names) > 1 else ''})" if names else ""
            smaller = ", or a smaller --batch-size" if per_pass > 1 else ""  # one image a pass: no smaller batch
            raise DataError(f"{opts.data}{which}: {short}; rerun with --tile 512 (or smaller){smaller}")
        return restore_tensor(model, x, input_range, tile=opts.tile, batch_size=opts.batch_size)

    return restore, meta, sha


def score_items(
    items: Iterator[Item],
    scorer: Scorer,
    restore: Callable[[torch.Tensor], torch.Tensor] | None,
    batch_size: int,
    device: torch.device,
    save_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Per-image records `{"name", metric: value, ...}` for `items`, same-size images batched."""
    import torch

    from uniremoval.eval.restore import png_bytes, same_size_batches
    from uniremoval.io import WriteBehind

    records: list[dict[str, Any]] = []

    def sized(items: Iterator[Item]) -> Iterator[Item]:
        for it in items:
            scorer.check_size(*it.image.shape[-2:], it.name)
            yield it

    def score(batch: list[Item]) -> None:
        x = torch.stack([it.image for it in batch]).to(device)
        with torch.no_grad():
            out = restore(x, [it.name for it in batch]) if restore is not None else x
        targets = None
        if scorer.needs_target:
            targets = torch.stack([it.target for it in batch]).to(device)
        # A restored image holding NaN/inf (a diverged checkpoint) has no score: flagged, so it is not
        # averaged away like a flat image's undefined NIQE, and zeroed for the metrics (pyiqa refuses NaN).
        broken = (~torch.isfinite(out)).flatten(1).any(1).tolist() if restore is not None else [False] * len(batch)
        if any(broken):
            out = torch.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
        scores = scorer.score(out, targets)
        for i, it in enumerate(batch):
            rec: dict[str, Any] = {"name": it.name}
            rec.update({m: math.nan if broken[i] else float(v[i]) for m, v in scores.items()})
            if broken[i]:
                rec["_broken_output"] = True
            if it.degradation:
                rec["_degradation"] = it.degradation
            if it.domain:
                rec["_domain"] = it.domain
            records.append(rec)
            if writer is not None:
                writer.submit(Path(save_dir) / saved_name(it.name), png_bytes, out[i].cpu(), icc_profile=it.icc_profile)

    # --save-images: the PNGs are encoded in threads while the next batch is restored and scored
    with WriteBehind(workers=2, pending=2 * batch_size) if save_dir is not None else contextlib.nullcontext() as writer:
        for batch in same_size_batches(sized(items), lambda it: tuple(it.image.shape[-2:]), batch_size):
            score(batch)
    return records


# MLflow's HTTP artifact store cuts a path at '#' or '?' and decodes '%20' (MLflow 3.x: 'photo #2.png'
# was stored as 'photo ', and 'x#1.png', 'x#2.png' as one file): saved images carry '_' for them.
_ARTIFACT_UNSAFE = str.maketrans({"#": "_", "?": "_", "%": "_"})


def saved_name(name: str) -> Path:
    """Where `--save-images` writes the restored image of `name`, relative to its folder (also its
    MLflow artifact path: '#', '?' and '%' become '_'). Always inside it: a shard's sample keys are
    whatever its tar's member names say, and a key such as '../../x' or '/abs/x' (a crafted or
    careless shard from elsewhere) wrote a PNG outside the folder; such parts become '_' / '__'."""
    parts = [p if p not in (".", "..") else "_" * len(p)
             for p in PurePosixPath(name.translate(_ARTIFACT_UNSAFE)).parts if p != "/"]
    return Path(*parts).with_suffix(".png")


def check_saved_names(names: list[str], save_dir: str) -> None:
    """Refuse two inputs whose restored PNGs would be one file (e.g. a.jpg and a.png), before scoring."""
    seen: dict[Path, str] = {}
    for name in names:
        dst = saved_name(name)
        if dst in seen:
            raise DataError(f"{seen[dst]!r} and {name!r} would both be saved as {Path(save_dir) / dst} "
                            "by --save-images; rename one of them")
        seen[dst] = name


SAVED_MARKER = ".uniremoval-eval.json"  # in a --save-images folder: the images one complete eval wrote there


def _staging_paths(save_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(folder, staging, old) for --save-images: the new images are written to the hidden sibling
    `.<name>.eval-staging` and swapped in when the eval completes; `.<name>.eval-old` holds the
    previous set for the instant of the swap."""
    final = Path(save_dir)
    if final.is_symlink():
        final = final.resolve()  # swap the folder the link points to, keep the link
    final = final.absolute()
    return (final, final.with_name(f".{final.name}.eval-staging"), final.with_name(f".{final.name}.eval-old"))


def check_save_dir(save_dir: str | os.PathLike) -> None:
    """Refuse a --save-images folder that a rerun may not replace as a whole: one holding files no
    eval wrote there (a folder eval wrote lists its images in SAVED_MARKER), or one whose parent
    cannot take the staging folder beside it. An empty or missing folder is fine."""
    final, _, old = _staging_paths(save_dir)
    if final == final.parent or final in (Path.cwd(), *Path.cwd().parents):
        raise UniremovalError(f"--save-images {save_dir} is the current folder or one above it; eval replaces "
                              "the folder as a whole when it completes, so give a folder of its own")
    if not final.is_dir() and old.is_dir():
        final = old  # a swap killed half-way: this previous set is put back before the run
    if final.is_dir():
        files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_symlink() or not p.is_dir())
        try:
            own = set(json.loads((final / SAVED_MARKER).read_text())["images"]) | {SAVED_MARKER, ".lock"}
        except (OSError, ValueError, KeyError, TypeError):
            own = set()
        foreign = [f for f in files if f not in own]
        if foreign:
            more = f" and {len(foreign) - 1} other file(s)" if len(foreign) > 1 else ""
            raise UniremovalError(
                f"--save-images {save_dir} holds {foreign[0]!r}{more} that eval did not write there (its "
                f"{SAVED_MARKER} does not list them); a rerun replaces the folder's images as a whole, so move "
                "them out or give an empty or new folder")
    parent = final.parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UniremovalError(f"--save-images {save_dir}: {parent} cannot be written (read-only or no permission); "
                              "eval writes the new images beside the folder and swaps them in at the end")


class StagedImages:
    """--save-images DIR, replaced only when the eval completes: every rank writes its images into
    `staging`; rank 0 swaps it in (`commit`) once all were gathered. The main process holds
    `staging`/.lock (`launch.lock_on_main_process`) so a second eval into DIR stops, and clears first
    what a killed eval left: a stale staging folder, or a swap stopped half-way (the previous set
    goes back). Until the swap DIR is the previous complete set; an eval that does not complete
    removes its staging folder (a kill -9 leaves it to the next run)."""

    def __init__(self, save_dir: str, state) -> None:
        from uniremoval.launch import lock_on_main_process

        self.option = save_dir
        self.final, self.staging, self.old = _staging_paths(save_dir)
        self.main = state.is_main_process
        self.committed = False
        self._lock = lock_on_main_process(state, self.staging, f"eval --save-images {save_dir}", self._prepare)

    def _prepare(self) -> None:
        """Main process, holding the lock: clear what a killed eval left."""
        try:
            if self.old.is_dir():
                if self.final.exists():
                    shutil.rmtree(self.old, ignore_errors=True)  # the swap was done, its old set not yet removed
                else:
                    os.replace(self.old, self.final)  # the swap stopped between its two renames
            check_save_dir(self.option)
            for p in self.staging.iterdir():
                if p.name != ".lock":
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        except BaseException as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UniremovalError(f"--save-images {self.option}: cannot prepare {self.staging} "
                                      f"({exc.strerror or exc})") from exc
            raise

    def commit(self, names: list[str], dataset: str) -> None:
        """Main process, every rank's images written: mark the set complete and swap it in (two
        renames). The previous set stays in `old` until `close`: removing many images takes a while,
        and the score files are written first, so a kill leaves new images beside old scores only
        for the moment of that write (the next eval into DIR removes a left-over `old`)."""
        from uniremoval.io import atomic_write_json, fsync_dir

        # eval_id tells this set from a later eval's of the same names (`eval replay` uploads only its own)
        atomic_write_json(self.staging / SAVED_MARKER, {"dataset": dataset, "images": sorted(names),
                                                       "eval_id": uuid.uuid4().hex})
        fsync_dir(self.staging)
        if self.final.exists():
            os.replace(self.final, self.old)
        os.replace(self.staging, self.final)
        self.committed = True
        (self.final / ".lock").unlink(missing_ok=True)  # the lock guarded the staging folder, now gone

    def close(self) -> None:
        from uniremoval.io import fsync_dir

        if self.main and not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.main and self.old.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            fsync_dir(self.final.parent)
        self._lock.close()


def summarize(records: list[dict[str, Any]], metrics: list[str]
              ) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, list[str]]]:
    """Sorted per-image records, the per-metric means over the images where the metric is defined
    (not NaN; an inf counts and makes the mean inf), and the images where it is not; refuses an
    image scored twice."""
    counts = Counter(r["name"] for r in records)
    dup = [n for n, c in counts.items() if c > 1]
    if dup:
        raise DataError(f"{len(dup)} image name(s) were scored more than once, e.g. {dup[0]!r}; "
                        "names (folder paths or shard keys) must be unique within a dataset")
    images = sorted(({k: v for k, v in r.items() if not k.startswith("_")} for r in records),
                    key=lambda r: r["name"])
    mean, undefined = {}, {}
    for m in metrics:
        values = [r[m] for r in images if not math.isnan(r[m])]
        undefined[m] = [r["name"] for r in images if math.isnan(r[m])]
        if any(math.isinf(v) for v in values):
            mean[m] = math.fsum(values)  # inf (fsum raises on inf - inf; only PSNR is infinite, always +inf)
        else:
            mean[m] = math.fsum(values) / len(values) if values else math.nan
    return images, mean, undefined


def undefined_warnings(result: EvalResult, shown: int = 10) -> list[str]:
    """One `warning:` line per metric that is undefined for some images, naming them."""
    lines = []
    for m, names in result.undefined.items():
        if not names:
            continue
        listed = ", ".join(repr(n) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown
                                                            else "")
        rest = len(result.images) - len(names)
        mean = f"its mean is over the other {rest} image(s)" if rest else "it has no mean"
        lines.append(f"warning: {result.dataset}: {m} is undefined for {len(names)} of {len(result.images)} "
                     f"image(s): {listed}; {mean}, and the count is written (JSON 'undefined', CSV "
                     f"'(undefined)' row, MLflow eval_undefined/{result.dataset}/{m})")
    return lines


def domain_problem(domain: str | None, data: str | list[str], where: str, given: str = "--domain") -> str | None:
    """Why `given` (--domain, or a config's eval.data.N.domain) cannot tag `data` (named `where` in the
    message): shards carry their own domain."""
    if not domain or not is_shard_source(data):
        return None
    return (f"{given} {domain}: {where} is shards, whose samples carry their domain in their json (set when "
            f"built: `shards build --domain`); {given} tags image folders: drop it")


def degradation_conflict(opts: EvalOptions, held: set[str] | list[str]) -> str | None:
    """The error when --degradation names no type the samples' json holds: the run would be tagged,
    and the report would file its scores (rain shards in the snow table), under the wrong type."""
    if not opts.degradation or not held or opts.degradation in held:
        return None
    return (f"--degradation {opts.degradation}: the samples of --data {opts.data} are {sorted(held)} (their json), "
            f"no '{opts.degradation}' one; drop --degradation (the json's type is used) or give the "
            f"'{opts.degradation}' data")


def refuse_wrong_degradation(opts: EvalOptions) -> None:
    """`degradation_conflict` from the shards' manifest(s) (a URL's fetched), before any image is
    restored or scored; sources whose manifest does not say are checked from the json as they are."""
    if not opts.degradation or not is_shard_source(opts.data):
        return
    from uniremoval.data.manifest import source_degradations

    held = source_degradations(opts.data)
    if held and (problem := degradation_conflict(opts, list(held))):
        raise DataError(problem)


def untrained_type_warning(result: EvalResult, meta: dict[str, Any]) -> str | None:
    """A warning when the scored weights were trained on other types than the data's (their JSON's
    `degradations`, or a teacher's `degradation`): legitimate (a generalisation test), but never silent."""
    trained = meta.get("degradations") or ([meta["degradation"]] if meta.get("degradation") else None)
    if not result.degradation or not trained or result.degradation in trained:
        return None
    return (f"warning: {result.dataset} is '{result.degradation}' data, but {result.checkpoint} was trained on "
            f"{list(trained)} only (its JSON): these are scores on a type the model never saw")


def run_eval(opts: EvalOptions) -> EvalResult | None:
    """Evaluate on every rank; returns the result on the main process, None elsewhere."""
    import torch
    from accelerate import PartialState

    started_ms = int(time.time() * 1000)
    metrics = parse_metrics(opts.metrics)
    # With MLflow the name is in metric names (eval/<name>/<metric>) and in the scores' artifact files
    # (eval-<name>.json): none of what MLflow refuses, and no '/' (a config's eval.data names are checked
    # alike at load: they name files and folders with MLflow off too).
    if opts.mlflow and opts.name and (problem := dataset_name_problem(opts.name, slash=False)):
        raise UniremovalError(f"--name {opts.name!r}: eval's metric (eval/<name>/<metric>) and file names {problem}; "
                              f"{dataset_name_fix(opts.name, slash=False)}")
    check_distinct_outputs(opts.json_out, opts.csv_out, opts.save_images)
    if opts.batch_size < 1:
        raise UniremovalError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.crop_border < 0:
        raise UniremovalError(f"--crop-border must be >= 0, got {opts.crop_border}")
    if opts.domain is not None and opts.domain not in DOMAINS:
        raise UniremovalError(f"--domain {opts.domain!r} must be one of {', '.join(DOMAINS)}")
    if problem := domain_problem(opts.domain, opts.data, f"--data {opts.data}"):
        raise UniremovalError(problem)
    from uniremoval.eval.restore import TILE_OVERLAP, tiling_problem

    if problem := tiling_problem(opts.tile, TILE_OVERLAP):
        raise UniremovalError(f"--tile {opts.tile}: {problem}; eval overlaps tiles by {TILE_OVERLAP} px, so give "
                              f"--tile {TILE_OVERLAP + 1} or more (e.g. 512)")
    if opts.mlflow:  # a server without MLflow's API at this address: refused before hours of scoring
        from uniremoval.tracking import refuse_non_mlflow_server, resolve_uri

        refuse_non_mlflow_server(resolve_uri(opts.tracking_uri))
    want = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise UniremovalError("--device cuda, but no CUDA device is visible; use --device cpu")
    state = PartialState(cpu=(want == "cpu"))
    device = state.device if want != "cpu" else torch.device("cpu")

    listed: FolderListing | None = None  # a folder source, walked once (as listed on this rank)
    if state.num_processes > 1:
        # Each rank scores every n-th shard (or image) of its own listing: listings that differ (a node
        # whose mount lags, a copy missing a file) would score some images twice and others never. The
        # manifest check stands in the listing: a rank that refused alone would leave the others waiting.
        from uniremoval.data.shard_stream import resolve_shards
        from uniremoval.launch import SAME_FILES_FIX, agreed_listing

        def listing() -> list[str]:
            nonlocal listed
            refuse_wrong_degradation(opts)
            if is_shard_source(opts.data):
                return resolve_shards(opts.data)
            listed = list_folder(opts.data)
            return [name for name, _, _ in listed[0]]

        agreed_listing(state.num_processes, listing, list, f"files in --data {opts.data}",
                       SAME_FILES_FIX + "; nothing was scored")
    else:
        refuse_wrong_degradation(opts)
        if not is_shard_source(opts.data):
            listed = list_folder(opts.data)
    need_target = any(METRICS[m].kind == "fr" for m in metrics)
    if opts.save_images and not is_shard_source(opts.data):
        check_saved_names([name for name, _, _ in listed[0]], opts.save_images)
    scorer = Scorer(metrics, device=str(device), iqa_dir=opts.iqa_dir, y_channel=opts.psnr_y,
                    crop_border=opts.crop_border)
    restore, meta, sha = _restorer(opts, device)
    reader = iter_shards if listed is None else functools.partial(iter_folder, check_size=scorer.check_size,
                                                                  listed=listed)
    # Read in a thread a batch ahead: decoding the next images overlaps the restore and scoring.
    items = read_ahead(reader(opts.data, state.process_index, state.num_processes, need_target),
                       depth=max(2, opts.batch_size))
    if state.is_main_process:
        items = _with_progress(items, opts, state.num_processes, listed)
    staged = StagedImages(opts.save_images, state) if opts.save_images else None
    try:
        return _score_and_write(opts, state, metrics, items, scorer, restore, device, meta, sha, staged, started_ms)
    finally:
        if staged is not None:
            staged.close()


def _with_progress(items: Iterator[Item], opts: EvalOptions, world: int,
                   listed: FolderListing | None = None) -> Iterator[Item]:
    """Rank 0's items behind a progress bar on stderr (a test set of thousands of photos restores for
    hours, silently otherwise): a bar on a terminal, a line a minute and a last one in a log (a batch
    job's). Its total is rank 0's share of a folder, or a single process's manifest count of shards."""
    from uniremoval.progress import progress_bar

    total = None
    if listed is not None:
        total = len(listed[0][::world])
    elif world == 1 and isinstance(opts.data, str) and Path(opts.data).is_dir():
        from uniremoval.data.manifest import manifest_degradations

        total = sum((manifest_degradations(opts.data) or {}).values()) or None
    name = opts.name or dataset_name(opts.data)
    bar = progress_bar(total, f"eval {name}", "img", leave=False)
    for item in items:
        yield item
        bar.update(1)
    bar.close()  # the last line when every image is done (stopped early: the stop's own message is last)


def _score_and_write(opts: EvalOptions, state, metrics: list[str], items: Iterator[Item], scorer: Scorer, restore,
                     device, meta: dict[str, Any], sha: str | None,
                     staged: StagedImages | None, started_ms: int | None = None) -> EvalResult | None:
    """Score (and gather) every rank's part; on rank 0 swap the saved images in, write and log."""
    from accelerate.utils import gather_object

    save_dir = str(staged.staging) if staged is not None else None
    if state.num_processes == 1:
        records = score_items(items, scorer, restore, opts.batch_size, device, save_dir)
        for r in records:
            r["_rank"] = 0
    else:
        records = _score_and_gather(state, gather_object, lambda: score_items(
            items, scorer, restore, opts.batch_size, device, save_dir))
        if not state.is_main_process:
            return None  # rank 0 writes and logs; the gather above was the last collective
    degradations = {r["_degradation"] for r in records if r.get("_degradation")}
    domains = {r.get("_domain") for r in records}  # a None among them (no json domain): no domain tag
    if problem := degradation_conflict(opts, degradations):  # shards whose manifest does not count them
        raise DataError(problem)
    ranks = Counter(r["_rank"] for r in records)
    images, mean, undefined = summarize(records, metrics)
    if not images:
        raise DataError(f"--data {opts.data}: no images were scored")
    broken = sorted(r["name"] for r in records if r.get("_broken_output"))
    if broken:  # not a property of some images but of the model: no mean describes it
        mean = dict.fromkeys(mean, math.nan)
        import sys

        print(f"warning: {opts.data}: the restored output holds NaN or inf for {len(broken)} of {len(images)} "
              f"image(s) ({', '.join(map(repr, broken[:5]))}{' ...' if len(broken) > 5 else ''}): the checkpoint "
              f"is broken (a diverged training run?); every mean is left undefined (null)", file=sys.stderr)
    result = EvalResult(
        dataset=opts.name or dataset_name(opts.data),
        checkpoint=opts.checkpoint if opts.checkpoint.lower() != "none" else "none",
        metrics=metrics, images=images, mean=mean,
        degradation=opts.degradation or (degradations.pop() if len(degradations) == 1 else None),
        domain=opts.domain or (domains.pop() if len(domains) == 1 else None),
        per_rank=[ranks.get(i, 0) for i in range(state.num_processes)], undefined=undefined,
        settings={"tile": opts.tile, "psnr_y": opts.psnr_y, "crop_border": opts.crop_border},
        started_ms=started_ms,
    )
    import sys

    for line in undefined_warnings(result) if not broken else []:  # broken: said above, no mean at all
        print(line, file=sys.stderr)
    if warning := untrained_type_warning(result, meta):
        print(warning, file=sys.stderr)
    if staged is not None:  # every rank's images are written (gathered above): the new set replaces the old
        staged.commit([saved_name(r["name"]).as_posix() for r in images], result.dataset)
    write_outputs(result, opts.json_out, opts.csv_out)
    if opts.mlflow:
        result.run_id = log_eval_mlflow(result, opts, meta, sha)
    return result


def _score_and_gather(state, gather_object, score: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Score this rank's part and gather every rank's records. A failure on one rank is gathered
    too and raised on all of them, so no rank waits forever in the collective."""
    try:
        records, error = score(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        records, error = [], exc
    for r in records:
        r["_rank"] = state.process_index
    msg = None if error is None else f"{type(error).__name__}: {error}"
    parts = gather_object([{"rank": state.process_index, "error": msg, "records": records}])
    if error is not None:
        error.on_every_rank = True  # type: ignore[attr-defined]  # every rank raises here: see cli.main
        raise error
    failed = [p for p in parts if p["error"]]
    if failed:
        exc = UniremovalError(f"rank {failed[0]['rank']} failed: {failed[0]['error']}")
        exc.on_every_rank = True  # type: ignore[attr-defined]
        raise exc
    return [r for p in parts for r in p["records"]]


def csv_text(result: EvalResult) -> str:
    """Per-image scores (full precision; an undefined one empty, an infinite one "inf"), then the
    `(mean)` row and the `(undefined)` row (images where the metric is undefined, left out of the mean)."""
    def cell(v: float) -> str:
        return "" if math.isnan(v) else repr(v)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", *result.metrics])
    for r in result.images:
        w.writerow([r["name"], *(cell(r[m]) for m in result.metrics)])
    w.writerow(["(mean)", *(cell(result.mean[m]) for m in result.metrics)])
    w.writerow(["(undefined)", *(len(result.undefined.get(m, [])) for m in result.metrics)])
    return buf.getvalue()


def write_outputs(result: EvalResult, json_out: str | None, csv_out: str | None) -> None:
    from uniremoval.io import atomic_write_text

    if json_out:
        atomic_write_text(json_out, json_text(result))
    if csv_out:
        atomic_write_text(csv_out, csv_text(result))


def check_distinct_outputs(json_out: str | None, csv_out: str | None, save_images: str | None = None) -> None:
    """Refuse --json and --csv naming one file (the CSV would overwrite the JSON), or both stdout
    (`-`, /dev/stdout: the two would run together), or either inside --save-images (the folder is
    replaced as a whole: the next run refused it as holding files eval did not write there), before
    any work. /dev/null twice is fine."""
    from uniremoval.io import is_stdout, is_stream

    folder = _staging_paths(save_images)[0].resolve() if save_images else None
    for option, path in (("--json", json_out), ("--csv", csv_out)):
        if folder is not None and path and not is_stream(path) and folder in Path(path).resolve().parents:
            raise UniremovalError(f"{option} {path} is inside --save-images {save_images}, a folder eval replaces "
                                  f"as a whole at each run; write the scores beside it (e.g. {option} "
                                  f"{Path(save_images).parent / Path(path).name})")

    if json_out and csv_out and is_stdout(json_out) and is_stdout(csv_out):
        raise UniremovalError(f"--json {json_out} and --csv {csv_out} both go to stdout, where the two would run "
                              "together; send one of them to a file")
    if json_out and csv_out and is_stream(json_out) and is_stream(csv_out):
        return  # /dev/null, or two descriptors: nothing is replaced
    if json_out and csv_out and Path(json_out).resolve() == Path(csv_out).resolve():
        raise UniremovalError(f"--json {json_out} and --csv {csv_out} are the same file (the CSV would replace the "
                              "JSON); give two paths, e.g. scores.json and scores.csv")


# ---------------------------------------------------------------------------------- MLflow


def log_eval_mlflow(result: EvalResult, opts: EvalOptions, meta: dict[str, Any], sha: str | None) -> str | None:
    """One finished MLflow run `eval-<dataset>` holding `eval/<dataset>/<metric>`.

    Tags: stage=eval, dataset, checkpoint, checkpoint_sha256, config_hash (the checkpoint's training
    config), git_commit (and git_dirty), degradation, domain (synthetic|real, from the samples' json),
    label, `uniremoval.model` (the report's row: the weights'
    sha256, or "input" for --checkpoint none; `best` and `last` of one training run are two models),
    and the training run when the checkpoint's JSON names it (`mlflow_run_id`):
    `uniremoval.train_run_id`, plus `mlflow.parentRunId` when it is in the same experiment, and its
    `ablation.*` tags copied so the report can lay out ablation tables (from the checkpoint's JSON
    when the run is in another store). Experiment: --experiment,
    else the training run's, else "uniremoval".

    When MLflow cannot be reached the run is spooled to a folder `mlflow-spool-eval-<dataset>-*`
    beside --json (else --csv, else in ~/.cache/uniremoval/eval-spool), kept until sent; the
    warning gives the command that sends it (`uniremoval eval replay FOLDER`).
    """
    from uniremoval.tracking import Tracker, finishing, git_tags, mlflow_client, resolve_uri

    uri = resolve_uri(opts.tracking_uri)
    client = mlflow_client(uri)  # gives up on a dead server in seconds, before the Tracker spools
    train_run = None
    train_id = meta.get("mlflow_run_id")
    if train_id:
        try:
            train_run = client.get_run(train_id)
        except Exception:  # noqa: BLE001 - another store, or deleted: keep the id as a tag only
            train_run = None
    experiment = opts.experiment
    if experiment is None and train_run is not None:
        experiment = client.get_experiment(train_run.info.experiment_id).name
    experiment = experiment or DEFAULT_EXPERIMENT

    label = opts.label
    if label is None:
        if result.checkpoint == "none":
            label = "input"
        elif train_run is not None and train_run.info.run_name:
            label = train_run.info.run_name
        elif meta.get("run_name"):
            # The training run is in another store (trained against a local mlflow.db, evaluated on the
            # team's server): its name as the checkpoint recorded it, not "last" for every model.
            label = str(meta["run_name"])
        else:
            label = Path(result.checkpoint).stem
    from uniremoval import __version__
    from uniremoval.tracking import (
        ABLATION_TAG_PREFIX,
        LABEL_TAG,
        MODEL_TAG,
        TRAIN_RUN_TAG,
        ablation_tags,
        is_run_artifact,
    )

    where = result.checkpoint
    if where != "none" and not is_run_artifact(where):  # as typed it was relative to a folder the run does not know
        where = str(Path(where).resolve())
    tags = {"stage": "eval", "dataset": result.dataset, "checkpoint": where, LABEL_TAG: label,
            MODEL_TAG: sha or "input", "uniremoval_version": __version__,
            "world_size": str(max(1, len(result.per_rank)))}
    if sha:
        tags["checkpoint_sha256"] = sha
    if meta.get("step") is not None:  # best and last of one run: the same params, told apart by step too
        tags["checkpoint_step"] = str(meta["step"])
    if meta.get("config_hash"):
        tags["config_hash"] = str(meta["config_hash"])  # the scored model's training config
    tags.update(git_tags())
    if result.degradation:
        tags["degradation"] = result.degradation
    if result.domain:
        tags["domain"] = result.domain
    if train_id:
        tags[TRAIN_RUN_TAG] = train_id
    if isinstance(meta.get("ablation"), dict):  # the row the checkpoint records; the run's tags win below
        tags.update(ablation_tags(meta["ablation"]))
    if train_run is not None:
        tags.update({k: v for k, v in train_run.data.tags.items() if k.startswith(ABLATION_TAG_PREFIX)})
        exp = client.get_experiment_by_name(experiment)
        if exp is not None and exp.experiment_id == train_run.info.experiment_id:
            tags["mlflow.parentRunId"] = train_id
    tags.update(opts.tags)  # the config's tracking.tags, as on a training run's

    spool = spool_folder(opts, result.dataset)  # made by the Tracker only if it spools
    tracker = Tracker(uri, experiment, f"{opts.run_name or 'eval'}-{result.dataset}", tags, spool_dir=spool,
                      start_ms=result.started_ms,
                      replay_hint=f"uniremoval eval replay {shlex.quote(str(spool))}")
    # finishing: an interrupted upload leaves a KILLED run, not a RUNNING one
    with finishing(tracker), tempfile.TemporaryDirectory(prefix="uniremoval-eval-") as tmp:
        tracker.log_params({
            "metrics": ",".join(result.metrics), "n_images": len(result.images), "psnr_y": opts.psnr_y,
            "crop_border": opts.crop_border, "batch_size": opts.batch_size, "tile": opts.tile,
            "data": opts.data if isinstance(opts.data, str) else ",".join(opts.data),
            "pyiqa_variants": ",".join(f"{m}={METRICS[m].pyiqa_name}" for m in result.metrics
                                       if METRICS[m].pyiqa_name),
        })
        # An inf mean (PSNR of identical images) is logged: MLflow stores it as the largest float.
        values = {f"eval/{result.dataset}/{m}": v for m, v in result.mean.items() if not math.isnan(v)}
        values.update({f"eval_undefined/{result.dataset}/{m}": float(len(result.undefined.get(m, [])))
                       for m in result.metrics})
        tracker.log_metrics(values, step=0)
        if opts.config_yaml is not None:
            tracker.log_text(opts.config_yaml, "config.yaml")
        # Temporary score files: when MLflow is unreachable the Tracker spools a copy of each.
        from uniremoval.io import atomic_write_json

        for name, text in ((f"eval-{result.dataset}.json", json_text(result)),
                           (f"eval-{result.dataset}.csv", csv_text(result))):
            (Path(tmp) / name).write_text(text)
            tracker.log_artifact(Path(tmp) / name, "scores")
        if opts.save_images and tracker.run_id is not None and not tracker.offline:
            # Tracker spools single files only; a folder goes up in one call when the store is reachable.
            log_saved_images(client, tracker.run_id, opts.save_images, f"images/{result.dataset}")
        elif opts.save_images:  # `eval replay` uploads the folder after the spooled calls
            atomic_write_json(Path(spool) / SPOOL_IMAGES, {"folder": str(Path(opts.save_images).absolute()),
                                                          "artifact_path": f"images/{result.dataset}",
                                                          "eval_id": saved_eval_id(opts.save_images)})
    if tracker.offline and train_id and train_run is None:
        # The training run could not be looked up, so neither could its experiment: `eval replay`
        # looks again, rather than leave the run in the default experiment away from its training run,
        # and nests it under that run as a live eval is (with --experiment: when it is the same one).
        from uniremoval.io import atomic_write_json

        atomic_write_json(Path(spool) / SPOOL_ADOPT, {"train_run_id": train_id, "experiment": opts.experiment})
    if (Path(spool) / SPOOL_IMAGES).is_file() and not tracker.offline and tracker.run_id is not None:
        # The server came back while finish() sent the spool: the images go up now, not never.
        log_saved_images(tracker.client, tracker.run_id, opts.save_images, f"images/{result.dataset}")
        shutil.rmtree(spool, ignore_errors=True)
    return tracker.run_id


def log_saved_images(client: Any, run_id: str, folder: str | os.PathLike, artifact_path: str) -> None:
    """Upload a --save-images folder into the run, its subfolders kept, without the SAVED_MARKER
    bookkeeping file (not an image of the run)."""
    root = Path(folder)
    for file in sorted(root.rglob("*")):
        if file.is_file() and file.name != SAVED_MARKER:
            parent = file.parent.relative_to(root).as_posix()
            client.log_artifact(run_id, str(file), artifact_path if parent == "." else f"{artifact_path}/{parent}")


def saved_eval_id(folder: str | os.PathLike) -> str | None:
    """The id of the eval whose complete image set `folder` holds (its SAVED_MARKER), or None."""
    try:
        return json.loads((Path(folder) / SAVED_MARKER).read_text()).get("eval_id")
    except (OSError, ValueError, AttributeError):
        return None


SPOOL_PREFIX = "mlflow-spool-eval-"
SPOOL_IMAGES = "save-images.json"  # in an eval spool: the --save-images folder to upload on replay
SPOOL_ADOPT = "train-run.json"  # in an eval spool: the training run whose experiment replay looks up
SPOOL_ROOT = "~/.cache/uniremoval/eval-spool"  # an eval's spool when it writes neither --json nor --csv


def spool_folder(opts: EvalOptions, dataset: str) -> Path:
    """Where this eval's MLflow spool goes if MLflow is unreachable (not created here), kept until
    sent: beside --json (else --csv), where the user looks for the eval's results, else in
    SPOOL_ROOT. A new name per eval: a Tracker replays what it finds in its spool folder into its
    own run."""
    from uniremoval.io import is_stream

    out = next((o for o in (opts.json_out, opts.csv_out) if o and not is_stream(o)), None)  # not beside /dev/stdout
    root = Path(out).absolute().parent if out else Path(SPOOL_ROOT).expanduser()
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in dataset)
    return root / f"{SPOOL_PREFIX}{safe}-{uuid.uuid4().hex[:8]}"


def replay(spool: str | os.PathLike, tracking_uri: str | None = None) -> str | None:
    """`uniremoval eval replay FOLDER`: send what an eval spooled while MLflow was unreachable (to
    the server recorded in the spool, or `tracking_uri`), upload its --save-images folder if it was
    given, and remove the spool folder. Returns the run id; raises when MLflow is still unreachable."""
    import warnings

    from uniremoval.tracking import SPOOL_NAME, send_spool

    folder = Path(spool)
    if folder.name == SPOOL_NAME:
        folder = folder.parent
    if not (folder / SPOOL_NAME).is_file():
        raise UniremovalError(f"{spool}: no {SPOOL_NAME} there; give the folder the eval's warning named "
                              f"({SPOOL_PREFIX}<dataset>-*), or it was sent already")
    with warnings.catch_warnings():  # the error below says it once, without the tracker's own warning
        warnings.simplefilter("ignore", RuntimeWarning)
        adopt, fixed = None, False
        with contextlib.suppress(OSError, ValueError, AttributeError):
            record = json.loads((folder / SPOOL_ADOPT).read_text())
            adopt, fixed = record.get("train_run_id"), record.get("experiment") is not None
        sent, tracker = send_spool(folder / SPOOL_NAME, tracking_uri, adopt=adopt, keep_experiment=fixed)
    if not sent or tracker.run_id is None:
        raise UniremovalError(f"MLflow at {tracker.uri} is still unreachable; {folder} is kept: run "
                              f"`uniremoval eval replay {shlex.quote(str(folder))}` again later (or add "
                              "--tracking-uri URI to send it to another server)")
    images = folder / SPOOL_IMAGES
    if images.is_file():
        import sys

        spec = json.loads(images.read_text())
        if not Path(spec["folder"]).is_dir():
            print(f"warning: {spec['folder']} (--save-images) is gone; run {tracker.run_id} has no images",
                  file=sys.stderr)
        elif spec.get("eval_id") and saved_eval_id(spec["folder"]) != spec["eval_id"]:
            # a later eval replaced the folder: its images would go up under this eval's scores
            print(f"warning: {spec['folder']} (--save-images) now holds another eval's images (its "
                  f"{SAVED_MARKER} differs); run {tracker.run_id} has no images", file=sys.stderr)
        else:
            log_saved_images(tracker.client, tracker.run_id, spec["folder"], spec["artifact_path"])
    if folder.name.startswith(SPOOL_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
    return tracker.run_id
