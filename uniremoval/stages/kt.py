"""Knowledge transfer (stage 1): one student learns every degradation type from frozen teachers.

Algorithm box, per step (every batch holds every degradation type):

    x, type          <- a mixed batch of synthetic degraded crops
    G_T(x), f_T(x)   <- the cache (teacher image + pooled feature), or the teachers run online
    G_S(x), f_S(x)   <- the student; f_S pooled on the cache's grid (`teachers.pool_feature`)
    a1               <- a1_0 * a1_decay ** epoch
    L_kt             =  |G_S(x) - G_T(x)|_1 + a2 (L_ig + a1 L_fg)       (uniremoval.losses.mgcl.KTLoss)
    step the student; log train/pixel, train/ig, train/fg, train/total

Validation (every `train.val_every` steps, on all ranks): PSNR/SSIM of the student on each
`data.val` set (full images, paired), logged as `val/<dataset>/psnr|ssim`, plus the degraded
input's own PSNR (`val/<dataset>/psnr_input`) as the baseline, and `val/mean/psnr` (the best
checkpoint's criterion).

Teachers: with `teachers.mode: cached` (default) the stage never runs a teacher; the cache is
checked against `teachers.checkpoints` first and a stale one is refused. With `online` the
teachers are frozen modules on the device (eval, no grad), never given to accelerate or
DeepSpeed. Online teachers see the *crop* while the cache ran them on the whole image, so the two
targets differ: near the crop's borders (a convolution's context), along the crop's midlines (MPRNet
splits its input into quarters and halves: the whole image's split lines are elsewhere; a tiny MPRNet
with random weights measured 2-54% per 16-px cell of the pooled feature there, ~3e-4 elsewhere), and a
little everywhere (channel attention averages over the whole input). Both are valid targets: the
cached one is the teacher's restoration of the whole photo, cropped, as the teacher works at test time.
With flips and rotations on (`data.augment`), a cached sample's teacher image and feature grid
are flipped or rotated with its input, as a ground-truth pair would be; an online teacher instead
sees the flipped crop. The images agree as far as the teacher restores a flipped scene as well as
the original; the pooled features agree only for a flip-equivariant teacher (random weights: 25-32%
apart; teachers trained with flips, as the MPRNet recipe does: much closer). `data.augment.*: false`
makes cached and online targets the same crop for crop.

DeepSpeed (launch/deepspeed_zero2.yaml, deepspeed_zero3.yaml): only the student is prepared, so
only it becomes a DeepSpeed engine; teachers and VGG-19 stay plain modules (the trainer builds the
DeepSpeed accelerator, gloo on a machine without CUDA; see `build_accelerator`). Under ZeRO-3 the
student's parameters are sharded, so validation forwards through the engine on every rank in
lockstep.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from uniremoval.config import KTStage
from uniremoval.errors import CheckpointError, ConfigError, DataError
from uniremoval.models.ranges import MINUS_ONE_ONE, recorded_range
from uniremoval.stages.teachers import (
    Teacher,
    check_teacher_architecture,
    freeze,
    load_teachers,
    pool_feature,
    restore_with_feature,
    teacher_targets,
)
from uniremoval.stages.trainer import Stage, TrainContext, skip_batches, zero_stage
from uniremoval.stages.validation import validate_paired
from uniremoval.tracking import VAL_MEAN, val_metric

TEACHER_PREFIX = "teacher_"


# --------------------------------------------------------------------------------------------- models


def build_student(cfg: Any, check_init: Callable[[dict[str, Any]], None] | None = None) -> nn.Module:
    """The student: MPRNet of `model.preset`, from `model.init` when set (ours or an official .pth);
    `check_init` is given the init checkpoint's metadata (a stage's own check of where it comes from)."""
    from uniremoval.models import build_configured
    from uniremoval.models.checkpoint import load_checkpoint

    if not cfg.model.init:
        return build_configured(cfg.model)
    model, meta = load_checkpoint(cfg.model.init, arch=cfg.model.arch, preset=cfg.model.preset, preset_key="model.preset",
                                  overrides=cfg.model.overrides)
    saved_range = recorded_range(meta)
    if saved_range != cfg.model.input_range:
        raise ConfigError(
            f"model.init {cfg.model.init} was trained on {saved_range!r} images but model.input_range is "
            f"{cfg.model.input_range!r}; set model.input_range={saved_range}"
        )
    if check_init is not None:
        check_init(meta)
    return model


def weights_sha256(spec: str | None) -> str | None:
    """sha256 of the weights a checkpoint setting names (as eval's checkpoint_sha256 tag), for a run's
    lineage tags; None when unset or unreadable (the stage itself reports a missing file)."""
    if not spec:
        return None
    from uniremoval.models.checkpoint import checkpoint_sha256

    try:
        return checkpoint_sha256(spec)
    except (CheckpointError, OSError):
        return None


def weights_run_id(spec: str | None) -> str | None:
    """The MLflow run that trained the weights a checkpoint setting names, for a run's lineage tags;
    None when unset, official weights or an untracked run."""
    if not spec:
        return None
    from uniremoval.models.checkpoint import checkpoint_run_id

    return checkpoint_run_id(spec)


def build_phi(cfg: Any) -> nn.Module:
    from uniremoval.models.vgg_arch import LAYER_NAMES, VGGFeatures

    unknown = [name for name in cfg.features.layers if name not in LAYER_NAMES]
    if unknown:
        raise ConfigError(f"features.layers: {unknown} are not VGG-19 layers; valid names: {', '.join(LAYER_NAMES)}")
    return freeze(VGGFeatures(cfg.features.layers, weights=cfg.features.weights, path=cfg.features.path))


def make_kt_loss(cfg: KTStage, phi: nn.Module | None) -> nn.Module:
    from uniremoval.losses.mgcl import KTLoss

    lc = cfg.loss
    return KTLoss(phi, cfg.features.layer_weights, a2=lc.a2, tau=lc.tau, pixel=lc.pixel, use_icl=lc.use_icl,
                  use_fcl=lc.use_fcl, negatives_grad=lc.negatives_grad, feature_negatives=lc.feature_negatives)


def kt_terms(
    student: nn.Module,
    loss_fn: nn.Module,
    batch: dict[str, Any],
    a1: float,
    cell: int,
    input_range: str = MINUS_ONE_ONE,
    teachers: dict[str, Teacher] | None = None,
    degradations: list[str] | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The terms of L_kt on one batch: (terms, student image, teacher image).

    Targets come from the batch (`teacher`, `feature`: the cached path) unless `teachers` is
    given (the online path). Shared by the training step and the online-vs-cached test.
    """
    x, labels = batch["input"], batch["degradation"]
    if teachers is not None:
        if degradations is None:
            raise ValueError("kt_terms with online teachers needs the degradation names (labels index them)")
        t_img, t_feat = teacher_targets(teachers, degradations, x, labels, cell)
    else:
        t_img, t_feat = batch["teacher"], batch.get("feature")
    s_img, s_feat = restore_with_feature(student, x, input_range)
    s_pooled = pool_feature(s_feat, cell) if loss_fn.use_fcl else None
    if s_pooled is not None and t_feat is not None and s_pooled.shape[1:] != t_feat.shape[1:]:
        raise ConfigError(
            f"student feature grid {tuple(s_pooled.shape[1:])} != teacher feature grid {tuple(t_feat.shape[1:])}: "
            "the student and the teachers must share the architecture preset (model.preset / teachers.preset) "
            "and data.feature_cell must be the cache's cell"
        )
    terms = loss_fn(s_img, t_img, x, s_pooled, t_feat, labels, a1)
    return terms, s_img, t_img


# --------------------------------------------------------------------------------------------- the stage


class KnowledgeTransfer(Stage):
    """The KT stage on the shared trainer (see the module docstring)."""

    stage = "kt"
    trainable = ("student",)
    compiled_frozen = ("phi",)  # VGG-19 on three crop batches a step; the teachers (online) see varying batches
    best_metric = (val_metric(VAL_MEAN, "psnr"), "max")

    def __init__(self, cfg: KTStage) -> None:
        super().__init__(cfg)
        self.cfg: KTStage = cfg
        self.online = cfg.teachers.mode == "online"
        self.degradations = list(cfg.data.degradations)
        self.cell = cfg.data.feature_cell
        from uniremoval.data.pipelines import CropPadding

        self.crop_padding = CropPadding()  # images smaller than the crop: counted, warned once a run
        self.loss_fn: nn.Module | None = None
        self.teachers: dict[str, Teacher] = {}
        self._identity: dict[str, str] | None = None  # weights_identity, computed once
        for src in cfg.data.train:
            if src.degradation is None:
                raise ConfigError(f"data.train source {src.name!r} needs a degradation (one of {self.degradations})")
        if not cfg.data.train:
            raise ConfigError("data.train is empty: list the cache shards (teachers.mode=cached) or the synthetic "
                              "shards (teachers.mode=online) of every degradation type")

    def preflight(self) -> None:
        if not self.online:
            # The cache holds these teachers' outputs (checked by sha256 below): a teacher of another
            # architecture or preset than the student would be distilled, its features compared with the
            # student's by L_fg, unsaid (or refused at the first step as a grid of other channels).
            preset = self.cfg.teachers.preset or self.cfg.model.preset
            for name in self.degradations:
                if path := self.cfg.teachers.checkpoints.get(name):
                    check_teacher_architecture(name, path, self.cfg.model.arch, preset, self.cfg.model.overrides)
            check_teacher_cache(self.cfg)

    def build_models(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        models: dict[str, nn.Module] = {"student": build_student(cfg)}
        phi = build_phi(cfg) if cfg.loss.use_icl else None
        if phi is not None:
            models["phi"] = phi
        self.loss_fn = make_kt_loss(cfg, phi)
        if self.online:
            preset = cfg.teachers.preset or cfg.model.preset
            self.teachers = load_teachers(cfg.teachers.checkpoints, self.degradations, preset, arch=cfg.model.arch,
                                          overrides=cfg.model.overrides)
            for name, t in self.teachers.items():
                models[TEACHER_PREFIX + name] = t.model  # frozen, moved to the device, never prepared
        return models

    def train_batches(self, epoch: int, start: int, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        from uniremoval.data.pipelines import kt_loader
        from uniremoval.data.transforms import Aug

        cfg, d = self.cfg, self.cfg.data
        aug = Aug(**d.augment.model_dump())
        loader = kt_loader(
            [(s.name, s.shards, s.degradation, s.weight) for s in d.train],
            self.degradations, d.batch_size, d.crop_size, cfg.train.steps_per_epoch * cfg.train.grad_accum,
            d.num_workers, cfg.train.seed, rank, world_size, cell=self.cell, bad_samples=d.bad_samples,
            require=() if self.online else ("teacher", "feature"), augment=aug, pin_memory=d.pin_memory,
            shuffle_buffer=d.shuffle_buffer, shuffle_buffer_mb=d.shuffle_buffer_mb, padding=self.crop_padding,
            teachers=None if self.online else {k.removeprefix("teachers.checkpoints."): v
                                               for k, v in self.weights_identity().items()},
        )
        loader.set_epoch(epoch)
        return skip_batches(loader, start)

    def a1(self, epoch: int) -> float:
        from uniremoval.losses import decayed_weight

        return decayed_weight(self.cfg.loss.a1, self.cfg.loss.a1_decay, epoch)

    def training_step(self, batch: dict[str, Any], ctx: TrainContext) -> dict[str, Tensor | float]:
        assert self.loss_fn is not None
        a1 = self.a1(ctx.epoch)
        terms, s_img, t_img = kt_terms(
            ctx.models["student"], self.loss_fn, batch, a1, self.cell, self.cfg.model.input_range,
            self.teachers if self.online else None, self.degradations,
        )
        ctx.optimize("student", terms["total"], terms)
        if ctx.want_images:
            ctx.log_images("train", [batch["input"][:4], s_img[:4].detach(), t_img[:4]])
        logged: dict[str, Tensor | float] = {k: v.detach() for k, v in terms.items()}
        if self.cfg.loss.use_fcl:
            logged["weight_a1"] = a1
        return logged

    def validate(self, ctx: TrainContext) -> dict[str, float]:
        if not self.cfg.data.val:
            return {}
        lockstep = zero_stage(ctx.accelerator) == 3
        model = ctx.models["student"] if lockstep else ctx.unwrap("student")
        return validate_paired(ctx, model, self.cfg.model.input_range, self.cfg.data.val, lockstep)

    def extra_tags(self) -> dict[str, str]:
        tags = {"teachers_mode": self.cfg.teachers.mode, "feature_cell": str(self.cell)}
        if self.cfg.loss.use_icl:
            tags["vgg_weights"] = self.cfg.features.weights
        # The params hold only the teachers' and init's paths, whose files a retrained or resumed run
        # replaces (best.safetensors): the sha256 says which weights this run learnt from. A cached run's
        # cache was checked to come from these very files (check_teacher_cache).
        for key, sha in self.weights_identity().items():
            tags[f"teacher_sha256.{key.removeprefix('teachers.checkpoints.')}"] = sha
        init = weights_sha256(self.cfg.model.init)
        if init:
            tags["init_sha256"] = init
        # ...and the runs that trained them, when their JSON names one (a search by run id, not by hash)
        for name in self.degradations:
            if run_id := weights_run_id(self.cfg.teachers.checkpoints.get(name)):
                tags[f"teacher_run_id.{name}"] = run_id
        if run_id := weights_run_id(self.cfg.model.init):
            tags["init_run_id"] = run_id
        if not self.online:  # ...and the cache folders it reads, tagged as the cache run tags them
            tags.update(cache_tags(self.cfg))
        return tags

    def weights_identity(self) -> dict[str, str]:
        if self._identity is None:  # hashed once a run (online teachers: when they were loaded)
            ids = {}
            for name in self.degradations:
                t = self.teachers.get(name)
                sha = t.sha256 if t is not None else weights_sha256(self.cfg.teachers.checkpoints.get(name))
                if sha:
                    ids[f"teachers.checkpoints.{name}"] = sha
            self._identity = ids
        return self._identity

    def export_meta(self, name: str) -> dict[str, Any]:
        return {"input_range": self.cfg.model.input_range, "degradations": self.degradations}


def cache_tags(cfg: KTStage) -> dict[str, str]:
    """`cache_sha256.<dataset>` of each local cache folder data.train reads (the folder, its manifest.json,
    or tars in it): the tag the cache run that wrote it carries (stages.cache.cache_identity)."""
    from pathlib import Path

    from uniremoval.data.manifest import MANIFEST_NAME, is_streamed, split_specs
    from uniremoval.stages.cache import CACHE_TAG_PREFIX, cache_identity

    tags: dict[str, str] = {}
    for src in cfg.data.train:
        for spec in src.shards:
            if is_streamed(spec):
                continue
            first = Path(split_specs(spec)[0])
            folder = first if first.is_dir() else first.parent
            named = first.name == MANIFEST_NAME or first.suffix == ".tar" or first.is_dir()
            if named and (ident := cache_identity(folder)):
                tags[f"{CACHE_TAG_PREFIX}{ident[0]}"] = ident[1]
    return tags


def check_teacher_cache(cfg: KTStage) -> None:
    """Refuse a cache built by other teacher weights, on another feature grid, or of another type.

    Each data.train source must come from cache folders written by `uniremoval cache` (manifest.json
    with a 'cache' section): the folder itself, its manifest.json, or local shard files / brace
    patterns inside it (checked through the folder that holds them). Remote URLs and `pipe:`
    commands cannot be checked here and are only warned about.
    """
    from pathlib import Path

    from uniremoval.data.manifest import MANIFEST_NAME, is_streamed
    from uniremoval.data.shard_stream import resolve_shards
    from uniremoval.stages.cache import check_cache

    for src in cfg.data.train:
        folders: list[Path] = []
        tars: dict[Path, list[Path]] = {}  # folder -> the tar files named inside it
        for spec in src.shards:
            folder = Path(spec)
            if folder.is_file() and folder.name == MANIFEST_NAME:
                folder = folder.parent
            if folder.is_dir():
                folders.append(folder)
            elif is_streamed(spec):
                warnings.warn(f"data.train {src.name}: {spec} is not a local cache folder; its teacher identity "
                              "cannot be checked (teachers.mode=cached expects folders written by `uniremoval "
                              "cache`)", RuntimeWarning, stacklevel=2)
            else:  # local tar files or a brace pattern: their folder's manifest names the teacher
                for url in resolve_shards(spec):
                    folders.append(Path(url).parent)
                    tars.setdefault(Path(url).parent, []).append(Path(url))
        for folder in dict.fromkeys(folders):
            manifest = check_cache(folder, cfg.teachers.checkpoints, None, cfg.data.feature_cell)
            listed = {e["name"] for e in manifest["shards"]}
            stray = [t for t in tars.get(folder, []) if t.name not in listed]
            if stray:  # a tar the manifest does not vouch for: an older cache's (other source or teacher)
                more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
                raise DataError(f"data.train {src.name}: {stray[0]}{more} is not one of the cache shards "
                                f"{folder / 'manifest.json'} lists (left by an earlier cache of other source shards, "
                                f"or copied in): its teacher is unknown. Give the folder {folder} as the shards, or "
                                f"delete the tars it does not list")
            have = manifest["cache"]["degradation"]
            if have != src.degradation:
                raise ConfigError(f"data.train {src.name}: cache {folder} holds '{have}' teacher outputs, but the "
                                  f"source says degradation '{src.degradation}'")
