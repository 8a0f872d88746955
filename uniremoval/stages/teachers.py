"""Frozen teachers for knowledge transfer, and the feature-grid pooling shared by KT and the cache.

Why one module for both: the cache stage stores each teacher's restored image and its
intermediate feature pooled on a fixed pixel grid; the KT stage must pool the *student's* feature
in exactly the same way (and, with ``teachers.mode: online``, compute the teacher targets exactly
as the cache would) or L_fg compares two different things. Both import the functions below.

The grid: average pooling with kernel = stride = ``cell`` pixels, anchored at the top-left, partial
cells at the bottom/right dropped (``F.avg_pool2d``'s floor mode). A crop whose offset and size are
multiples of ``cell`` maps exactly onto a sub-grid, so random crops work on cached features.

Teachers are plain frozen modules: ``eval()``, ``requires_grad_(False)``, run under
``torch.no_grad()``, and never handed to ``accelerator.prepare`` (nor to DeepSpeed), so they are
neither wrapped in DDP nor sharded, and add no optimiser state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniremoval.errors import CheckpointError, ConfigError
from uniremoval.models import checked_outputs
from uniremoval.models.ranges import MINUS_ONE_ONE, from_model_range, recorded_range, to_model_range


def pool_feature(feature: Tensor, cell: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H // cell, W // cell): mean over each cell x cell block, partial cells dropped.

    Computed in float32 whatever the input dtype (bf16 averages lose precision; the cache stores
    the result as float16, the student side keeps float32).
    """
    if cell < 1:
        raise ConfigError(f"feature cell must be >= 1 pixel, got {cell}")
    if feature.ndim != 4:
        raise ValueError(f"pool_feature expects (N, C, H, W), got shape {tuple(feature.shape)}")
    h, w = feature.shape[-2:]
    if h < cell or w < cell:
        raise ValueError(f"a {w}x{h} feature map holds no full {cell}x{cell} cell; use larger crops or a smaller cell")
    return F.avg_pool2d(feature.float(), kernel_size=cell, stride=cell)


def restore_with_feature(model: nn.Module, x: Tensor, input_range: str = MINUS_ONE_ONE) -> tuple[Tensor, Tensor]:
    """Run an MPRNet-like model on [-1, 1] images: (final image in [-1, 1], full-resolution feature).

    The image is the last stage's output (``images[0]``); the feature is whatever the model returns
    with ``return_feature=True`` (MPRNet: the stage-3 ORSNet output). Works on a DDP/DeepSpeed-wrapped
    student too (the wrapper forwards keyword arguments).
    """
    images, feature = checked_outputs(model(to_model_range(x, input_range), return_feature=True), x, with_feature=True)
    return from_model_range(images[0], input_range), feature


@dataclass
class Teacher:
    """One frozen teacher: the network, the range its weights expect, and its checkpoint's identity."""

    degradation: str
    model: nn.Module
    input_range: str
    checkpoint: str
    sha256: str | None = None

    @torch.no_grad()
    def __call__(self, x: Tensor, cell: int) -> tuple[Tensor, Tensor]:
        """Teacher image (clamped to [-1, 1], as the cache's lossless PNG holds it) and pooled feature."""
        image, feature = restore_with_feature(self.model, x, self.input_range)
        # Pooled in fp32: under bf16 autocast, averaging a cell in bf16 would round the mean to 8 bits.
        return image.clamp(-1.0, 1.0), pool_feature(feature.float(), cell)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_teachers(
    checkpoints: Mapping[str, str],
    degradations: Sequence[str],
    preset: str,
    device: torch.device | str = "cpu",
    input_range: str | None = None,
    arch: str = "mprnet",
    overrides: Mapping[str, object] | None = None,
) -> dict[str, Teacher]:
    """Load one frozen teacher per degradation type, in the order of ``degradations``.

    ``checkpoints`` maps degradation name -> checkpoint (ours .safetensors, or an official MPRNet
    .pth). Every type must have one, and no checkpoint may name an unknown type. ``input_range``
    None takes the checkpoint's metadata (official .pth files: [0, 1]). ``arch``: the teachers'
    architecture, the student's (``model.arch``), as they share its preset; ``overrides`` (its
    ``model.overrides``), None: not checked.
    """
    from uniremoval.models.checkpoint import checkpoint_sha256, load_checkpoint  # heavy: kept lazy

    missing = [d for d in degradations if d not in checkpoints]
    if missing:
        raise ConfigError(
            f"teachers.checkpoints has no entry for degradation(s) {missing}; give one checkpoint per type "
            f"in {list(degradations)} (e.g. teachers.checkpoints.{missing[0]}=outputs/teacher-{missing[0]}/best.safetensors)"
        )
    extra = sorted(set(checkpoints) - set(degradations))
    if extra:
        raise ConfigError(
            f"teachers.checkpoints names {extra}, which are not in data.degradations {list(degradations)}"
        )
    teachers: dict[str, Teacher] = {}
    for name in degradations:
        path = checkpoints[name]
        check_teacher_architecture(name, path, arch, preset, overrides)
        try:
            model, meta = load_checkpoint(
                path, arch=arch, preset=preset, map_location=device,
                preset_key="teachers.preset",
            )
        except CheckpointError as exc:  # k teachers: say which entry
            raise CheckpointError(f"teachers.checkpoints.{name}: {exc}") from exc
        _check_teacher_role(name, path, meta)
        rng = input_range or recorded_range(meta)
        teachers[name] = Teacher(name, freeze(model), rng, str(meta.get("checkpoint", path)), checkpoint_sha256(path))
    return teachers


def check_teacher_architecture(name: str, path: str, arch: str, preset: str,
                               overrides: Mapping[str, object] | None = None) -> None:
    """A teacher of another architecture or preset than the student's: refused naming the entry and what
    to retrain, before any weights are read (the cache stage and online KT load the teachers; cached KT
    checks the same files, whose outputs it distils). Teachers share the student's `model.arch` and one
    preset (`teachers.preset`, else `model.preset`): L_fg compares their features with the student's.
    load_checkpoint alone advised `teachers.preset=<its preset>`, which every other teacher (and the
    student) then refused in turn."""
    import json
    from pathlib import Path

    from uniremoval.models.checkpoint import META_SUFFIX, WEIGHTS_SUFFIX, resolve_weights

    try:
        weights = resolve_weights(Path(path))
        meta = json.loads(weights.with_suffix(META_SUFFIX).read_text()) if weights.suffix == WEIGHTS_SUFFIX else None
    except (CheckpointError, OSError, ValueError):
        return  # unreadable: load_checkpoint (or the cache check) says what is wrong
    if meta is None:  # an official .pth: an MPRNet of the preset its shapes say (load_checkpoint checks those)
        saved_arch, saved = "mprnet", None
    elif isinstance(meta, dict):
        saved_arch, saved = meta.get("arch"), meta.get("preset")
    else:
        return
    entry = f"teachers.checkpoints.{name}={path}"
    if saved_arch is not None and saved_arch != arch:
        like = f", model.preset={saved}" if saved else ""
        raise CheckpointError(
            f"{entry}: holds a {saved_arch!r} model, but the teachers share the student's architecture, "
            f"model.arch={arch!r}; retrain this teacher with model.arch={arch}, or make the student and every "
            f"teacher {saved_arch!r} (model.arch={saved_arch}{like})")
    if saved is not None and saved != preset:
        raise CheckpointError(
            f"{entry}: is a {saved!r} {arch}, but every teacher shares one architecture "
            f"with the others and the student: preset {preset!r} (teachers.preset, else model.preset); retrain this "
            f"teacher with model.preset={preset}, or use {saved!r} throughout (model.preset={saved}, teachers.preset "
            f"null or {saved}, and a {saved!r} teacher for every type)")
    options = dict(meta.get("model_kwargs") or {}) if isinstance(meta, dict) else None
    if overrides is not None and options is not None and options != dict(overrides):
        raise CheckpointError(
            f"{entry}: was trained with the architecture options {options}, but the teachers share the student's, "
            f"model.overrides {dict(overrides)}; retrain this teacher with the student's model.overrides, or train "
            f"the student (and every teacher) with model.overrides={options or '{}'}")


def _check_teacher_role(name: str, path: str, meta: Mapping[str, object]) -> None:
    """Our checkpoints record the stage and type that trained them: a student, or another type's
    teacher, given as the `name` teacher would be distilled (or cached) without a word."""
    stage, trained_on = meta.get("stage"), meta.get("degradation")
    fix = f"give outputs/teacher-{name}/best.safetensors (or an official MPRNet .pth)"
    if stage in ("kt", "da"):
        raise CheckpointError(f"teachers.checkpoints.{name}={path}: holds a {stage} student, not a teacher; {fix}")
    if stage == "teacher" and trained_on and trained_on != name:
        raise CheckpointError(f"teachers.checkpoints.{name}={path}: is the {trained_on!r} teacher, not the "
                              f"{name!r} one; {fix}")


@torch.no_grad()
def teacher_targets(
    teachers: Mapping[str, Teacher],
    degradations: Sequence[str],
    x: Tensor,
    labels: Tensor,
    cell: int,
) -> tuple[Tensor, Tensor]:
    """Teacher images and pooled features for a mixed batch: sample i goes to the teacher of its type.

    ``labels[i]`` indexes ``degradations``. Each teacher runs once on its sub-batch (a type absent
    from the batch costs nothing). Returns (N, 3, H, W) images in [-1, 1] and (N, C, H//cell, W//cell)
    float32 features, in batch order.
    """
    images: Tensor | None = None
    feats: Tensor | None = None
    labels = labels.to(x.device)
    for idx, name in enumerate(degradations):
        rows = (labels == idx).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        img, feat = teachers[name](x.index_select(0, rows), cell)
        if images is None:
            images = x.new_empty((x.shape[0], *img.shape[1:]), dtype=img.dtype)
            feats = x.new_empty((x.shape[0], *feat.shape[1:]), dtype=feat.dtype)
        images.index_copy_(0, rows, img)
        feats.index_copy_(0, rows, feat)  # type: ignore[union-attr]
    if images is None or feats is None:
        raise ValueError("teacher_targets got an empty batch")
    known = (labels >= 0) & (labels < len(degradations))
    if not bool(known.all()):
        bad = labels[~known].tolist()
        raise ValueError(f"labels {bad} do not index degradations {list(degradations)}")
    return images, feats
