"""The one trainer every stage runs on (teacher, kt, da), built on accelerate.

The stage contract
------------------
A stage is an object (subclass `Stage`) that knows *what* to train; the trainer knows *how*
(devices, DDP, mixed precision, accumulation, clipping, schedules, checkpoints, resume, signals,
non-finite losses, logging). A stage provides:

- ``stage`` / ``degradation``: how the MLflow run is tagged (``teacher`` + ``haze``, ``kt``, ``da``).
  The run is named after the config's ``name``, its folder under ``output_dir`` (``teacher-haze``,
  ``kt``, ``ablation-kt-bkt``): runs of one stage told apart in MLflow as on disk.
- ``build_models() -> dict[str, nn.Module]``: every network it needs, built after seeding.
- ``trainable``: the names among them that are trained (``("teacher",)``, ``("student",)``,
  ``("generator", "discriminator")``). Only these are handed to ``accelerator.prepare`` (wrapped
  in DDP); every other module is frozen (``eval()``, no grads) and only moved to the device.
- ``optim_config(name)``: the optimiser settings per trained model; default ``cfg.optim``, and
  ``cfg.optim_d`` for a model named ``discriminator``. Each trained model gets its own optimiser
  and its own LR schedule from ``cfg.schedule``.
- ``train_batches(epoch, start, rank, world_size) -> Iterable[dict]``: the micro-batches of one
  epoch on this rank, starting at micro-batch ``start`` (resume). An epoch is
  ``steps_per_epoch * grad_accum`` micro-batches; the same count on every rank (no DDP hang).
  Tensors in the batch are moved to the device by the trainer. An iterator with a ``lookahead``
  (a StepLoader epoch: how many batches its workers hold ready) is made for the next epoch once no
  more than that many micro-batches of the current one are left, so its workers start up behind the
  current epoch's last steps (``_NextEpoch``); an epoch's batches must not depend on when.
- ``training_step(batch, ctx) -> dict[str, Tensor | float]``: compute losses and call
  ``ctx.optimize(name, loss, terms)`` once per optimiser to update (DA alternates
  ``generator`` then ``discriminator``); return the named terms to log as ``train/<term>``.
  ``ctx.epoch`` drives per-epoch weight decays (a1 * 0.99 ** epoch). ``ctx.want_images`` is true
  every ``train.image_every`` steps: call ``ctx.log_images(tag, [input, output, target])`` then.
- ``validate(ctx) -> dict[str, float]``: runs on ALL ranks under ``torch.no_grad()``; each rank
  handles its share (``ctx.rank`` / ``ctx.world_size``) and combines with ``ctx.all_sum``. Return
  metric names as logged, e.g. ``val/<dataset>/psnr``.
- ``best_metric``: ``("val/<dataset>/psnr", "max")`` to keep a best checkpoint, or None.
- ``preflight()``: checks of its own inputs (KT: the teacher cache), run by the trainer on every rank
  after the ranks agree on the config and shard listing and `check_inputs` passed, before models.

One optimiser step ("step") = one optimiser update = ``grad_accum`` micro-batches. Inside
``training_step``, ``ctx.optimize`` does ``accelerator.backward`` (scaled by accumulation),
clipping, ``optimizer.step``, the LR schedule and ``zero_grad`` at accumulation boundaries.

DDP notes for stages with two networks (DA): freeze D's parameters with
``ctx.requires_grad("discriminator", False)`` around the generator's update, and use
``ctx.unwrap(name)`` for forward passes that must not go through the DDP wrapper (validation,
D's forward inside the G step).

Layout of a run (``cfg.run_dir`` = output_dir/name)
---------------------------------------------------
(On-disk helpers: run_folder.py.) ``checkpoints/step-00000100/``: ``<model>.safetensors`` +
``<model>.json`` (weights, step, config hash, MLflow run id), ``state.pt`` (step, optimiser and
schedule states, counters, run id, the config as JSON: tensors and plain types only, loads with
``weights_only=True``), ``config.yaml`` (the same config, to read or resume with),
``rng-rank<r>.pt`` (each rank's RNG).
Written into a hidden temporary directory and renamed, so a crash mid-write leaves the previous
checkpoint complete; ``keep_last`` are kept, and the temporaries of a killed job are removed
when the run starts again. ``last`` and ``best`` (safetensors + json) of the
first trainable model (``<model>-last`` / ``<model>-best`` for any other) are written in the run
directory: what later stages load (e.g. ``outputs/teacher-haze/best.safetensors``).

Resume (``--resume auto|PATH``) restores weights, optimisers, schedules, counters, RNG, and the data
position: the epoch and micro-batch index follow from the step (``epoch = step // steps_per_epoch``),
loaders are re-seeded per epoch, and ``train_batches(epoch, start=...)`` skips the micro-batches
already seen that epoch, so a resumed run sees exactly the batches an uninterrupted one would.
A resume may change settings (each named in a warning and an MLflow tag), not the architecture,
degradation types, stage or discriminator the saved weights belong to, nor the loss switches that make
the run's ablation row (config.RESUME_FIXED).

Non-finite losses: an update whose loss terms are inf/NaN on any rank is skipped on every rank
(``train.nonfinite``). With torch's fused Adam (the default on CUDA) the skip happens on the device:
the step's terms become a flag the fused kernel reads (``found_inf``), and the host reads that flag
one step later, when the GPU is past it, so no step waits for the GPU to drain before its backward
(the skipped count, warning or ``nonfinite=stop`` follow one step late; logs and checkpoints read
every flag first). Other optimisers, fp16's GradScaler and DeepSpeed check on the host before the
backward, one device read per update.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next step boundary all ranks agree on it (one
all-reduce; on the device with the non-finite flag, so read one step later), write a checkpoint
and return with ``status == "preempted"`` (the CLI exits 75).
Ctrl-C (SIGINT) does the same (exit 130), so an interactive stop keeps the steps since the last
periodic checkpoint; a second Ctrl-C stops at once. Loader workers ignore SIGINT (pipelines.py), so
the terminal's Ctrl-C, sent to every process of the group, does not break the loader mid-step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from uniremoval.config import (
    ABLATION_SWITCHES,
    OptimConfig,
    ScheduleConfig,
    StageBase,
    ablation_flags,
    config_changes,
    config_hash,
    config_to_dict,
    config_to_yaml,
    fixed_on_resume,
    run_name,
)
from uniremoval.data.shard_stream import listed_shards
from uniremoval.errors import CheckpointError, ConfigError, DataError, UniremovalError
from uniremoval.io import atomic_writer, fsync_dir
from uniremoval.launch import (
    SAME_FILES_FIX,
    agreed_listing,
    leave_process_group_at_exit,
    lock_on_main_process,
    same_config_on_every_rank,
    same_on_every_rank,
)
from uniremoval.stages import fast
from uniremoval.stages.preflight import check_inputs
from uniremoval.stages.run_folder import (
    CHECKPOINT_DIR,
    STEP_DIR_RE,
    disk_full_is_an_error,
    export_name,
    keep_file,
    list_checkpoints,
    load_weights_into,
    read_resume_file,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from uniremoval.tracking import finishing, refuse_non_mlflow_server, resolve_uri

# Per-batch counts the loaders report, summed over ranks and logged as train/<name>: samples
# skipped as unreadable (data.bad_samples=skip), samples smaller than the crop (mirror-padded).
DATA_COUNTS = ("bad_samples", "padded_samples")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" (rerun with --resume auto)



class NonFiniteLossError(UniremovalError):
    """A loss became NaN/inf and the config says stop (or too many were skipped)."""


@dataclass
class PendingUpdate:
    """An update whose non-finite check is still on the device (see the module docstring).
    `values` holds [agreed skip, agreed stop, then each micro-batch's terms in `parts` order]."""

    step: int  # the update's number, as messages give it (1 = the first update)
    name: str  # the model it updated
    parts: list[tuple[list[str], dict[str, float]]]  # per micro-batch: tensor term names, non-finite host terms
    values: fast.HostCopy


# --------------------------------------------------------------------------------------------- stage


class Stage:
    """Base class of a training stage; see the module docstring for the contract."""

    stage: str = "stage"
    degradation: str | None = None
    trainable: tuple[str, ...] = ()
    # Frozen models compiled with the trainable ones under model.compile: those called on the
    # training crops' fixed shape every step (VGG-19), not those whose batch varies (online teachers).
    compiled_frozen: tuple[str, ...] = ()
    best_metric: tuple[str, Literal["max", "min"]] | None = None
    # What a step reads besides its data.batch_size samples per micro-batch, for the run's epoch line.
    also_reads: str = ""

    def __init__(self, cfg: StageBase) -> None:
        self.cfg = cfg

    def build_models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optim_config(self, name: str) -> OptimConfig:
        if name == "discriminator" and hasattr(self.cfg, "optim_d"):
            return self.cfg.optim_d  # type: ignore[attr-defined]
        return self.cfg.optim

    def train_batches(self, epoch: int, start: int, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], ctx: TrainContext) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def validate(self, ctx: TrainContext) -> dict[str, float]:
        return {}

    def preflight(self) -> None:
        """Checks of the stage's own inputs beyond `check_inputs` (KT: the teacher cache), run on every
        rank once the ranks agree on the config and the shard listing, before any model is built."""

    def extra_tags(self) -> dict[str, str]:
        return {}

    def weights_identity(self) -> dict[str, str]:
        """sha256 of the weights the stage reads besides its own (KT's teachers), keyed by the setting
        that names them. Each checkpoint keeps it, so a resume notices a file replaced under the same
        path (a retrained teacher), which the config cannot show. Called on the main process."""
        return {}

    def export_meta(self, name: str) -> dict[str, Any]:
        """Extra metadata stored with exported weights (e.g. preset, input_range, degradation)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the stage itself must carry across a resume (plain types: `state.pt` loads with
        weights_only), saved in each checkpoint from the main process."""
        return {}

    def load_state_dict(self, state: dict[str, Any], same_mlflow_run: bool) -> None:
        """Take back `state_dict()` on resume, on every rank. `same_mlflow_run`: the run logs on into
        the MLflow run that checkpoint's run logged to (not another run's checkpoint, not tracking off)."""


class _NextEpoch:
    """The next epoch's batch iterator, created before the current epoch ends.

    A loader whose iterator has a `lookahead` (StepLoader: its workers' prefetch depth) starts its
    workers when it is created; once no more than `lookahead` micro-batches of the current epoch are
    left to fetch, that epoch's workers have nothing left to make, so the next epoch's start-up (new
    workers, shard opening, shuffle buffers) overlaps the last steps, validation and checkpoint
    instead of stalling the first step of the epoch. The batches are the same either way: an epoch's
    data depends on its number, not on when its loader starts.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.batches: Iterator[dict[str, Any]] | None = None

    def due(self, current: Iterator[Any], left: int) -> bool:
        lookahead = getattr(current, "lookahead", 0)
        return self.batches is None and lookahead > 0 and left <= lookahead

    def start(self, epoch: int, batches: Iterator[dict[str, Any]]) -> None:
        self.epoch, self.batches = epoch, batches

    def take(self, epoch: int) -> Iterator[dict[str, Any]] | None:
        batches = self.batches if self.epoch == epoch else None
        if batches is None:
            self.close()
        self.epoch, self.batches = None, None
        return batches

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        self.epoch, self.batches = None, None
        if close is not None:
            close()


def changes_batches(key: str, old: Any, new: Any) -> bool:
    """Whether a setting changed on resume makes the batches from there on other than an uninterrupted
    run's: the training data and its reading (every data.* but the validation sets, pinned memory and
    the bad-sample policy; 0 and 1 loader workers read alike), the micro-batches per step, the epoch
    length, the seed."""
    if key.startswith(("data.val", "data.pin_memory", "data.bad_samples")):
        return False
    if key == "data.num_workers" and isinstance(old, int) and isinstance(new, int):
        return max(1, old) != max(1, new)
    return key.startswith("data.") or key in ("train.grad_accum", "train.steps_per_epoch", "train.seed")


def skip_batches(batches: Iterable[Any], start: int) -> Iterator[Any]:
    """Drop the first `start` items (resume inside an epoch: they are decoded, then discarded)."""
    it = iter(batches)
    for _ in range(start):
        try:
            next(it)
        except StopIteration:
            return iter(())
    return it


# --------------------------------------------------------------------------------------------- schedules


def lr_factor(schedule: ScheduleConfig, step: int, total_steps: int, base_lr: float) -> float:
    """LR multiplier after `step` optimiser updates.

    constant: 1. cosine: from 1 to min_lr/base_lr over total_steps. warmup_cosine: linear warmup over
    warmup_steps (from 1/warmup to 1, as MPRNet's GradualWarmupScheduler), then cosine to min_lr.
    """
    floor = min(schedule.min_lr / base_lr, 1.0)
    if schedule.name == "constant":
        return 1.0
    warm = schedule.warmup_steps if schedule.name == "warmup_cosine" else 0
    if step < warm:
        return (step + 1) / warm
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[nn.Parameter], oc: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """Adam/AdamW from the config with the fast implementation (`fast.adam_impl`): fused on CUDA,
    multi-tensor foreach elsewhere, unless `optim.fused` says otherwise."""
    return fast.make_adam(params, oc.lr, "cuda" if on_cuda else "cpu", betas=tuple(oc.betas), eps=oc.eps,
                          weight_decay=oc.weight_decay, decoupled=oc.name == "adamw", fused=oc.fused)


class StepSchedule:
    """Sets an optimiser's LR to base_lr * lr_factor(step); its only state is the step."""

    def __init__(self, optimizer: Any, base_lr: float, schedule: ScheduleConfig, horizon: int) -> None:
        self.optimizer, self.base_lr, self.schedule, self.horizon = optimizer, base_lr, schedule, horizon
        self.last_lr = base_lr
        self.step = 0

    def apply(self, step: int) -> float:
        self.step = step
        self.last_lr = self.base_lr * lr_factor(self.schedule, step, self.horizon, self.base_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "base_lr": self.base_lr, "last_lr": self.last_lr}


# --------------------------------------------------------------------------------------------- context


@dataclass
class FitResult:
    status: Literal["finished", "preempted"]
    step: int
    run_id: str | None
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    stop_signal: int | None = None  # what stopped a preempted run (SIGTERM, SIGUSR1, SIGINT)

    @property
    def exit_code(self) -> int:
        """0 finished; a stop by Ctrl-C: 130, as the shell reports an interrupt; a scheduler's stop:
        PREEMPTED_EXIT_CODE (requeue scripts rerun it; an interactive stop must not be rerun)."""
        if self.status == "finished":
            return 0
        return 128 + signal.SIGINT if self.stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE


def print_weights(cfg: StageBase, stage: Stage, result: FitResult) -> None:
    """One line on stderr (main process), led by the run's name as MLflow shows it: the steps run,
    where the exported weights are, the MLflow run."""
    import sys

    from accelerate.state import PartialState

    label, run_dir = run_name(cfg), Path(cfg.run_dir)

    if stage.best_metric is not None and (run_dir / "best.safetensors").exists():
        where = f"{run_dir / 'best.safetensors'} (best {stage.best_metric[0]}) and {run_dir / 'last.safetensors'}"
    else:
        where = str(run_dir / "last.safetensors")
    if PartialState().is_main_process:
        print(f"{label}: {result.step} steps; weights: {where}"
              + (f"; MLflow run {result.run_id}" if result.run_id else ""), file=sys.stderr)


def run_stage(stage: Stage, resume: str | None = None) -> int:
    """`uniremoval train <stage>`: fit on the shared trainer, then say where the weights are.
    Returns the exit code (PREEMPTED_EXIT_CODE after a SIGTERM/SIGUSR1 checkpoint)."""
    result = Trainer(stage.cfg, stage).fit(resume=resume)
    if result.status == "preempted":
        return result.exit_code
    print_weights(stage.cfg, stage, result)
    return 0


class TrainContext:
    """What a stage sees during `training_step` and `validate`: models, counters, and callbacks."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer

    # counters -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimiser updates completed before this micro-batch."""
        return self._t.step

    @property
    def epoch(self) -> int:
        return self._t.step // self._t.cfg.train.steps_per_epoch

    @property
    def cfg(self) -> StageBase:
        return self._t.cfg

    @property
    def accelerator(self):
        return self._t.accelerator

    @property
    def device(self) -> torch.device:
        return self._t.accelerator.device

    @property
    def rank(self) -> int:
        return self._t.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self._t.accelerator.num_processes

    @property
    def models(self) -> dict[str, nn.Module]:
        """Trained models as prepared (DDP-wrapped when distributed); frozen ones as they are."""
        return self._t.models

    def unwrap(self, name: str) -> nn.Module:
        return self._t.accelerator.unwrap_model(self._t.models[name])

    def requires_grad(self, name: str, flag: bool) -> None:
        for p in self._t.models[name].parameters():
            p.requires_grad_(flag)

    # optimisation ---------------------------------------------------------------------------
    def optimize(self, name: str, loss: Tensor, terms: dict[str, Any] | None = None) -> None:
        """Backward `loss` into model `name` and update it at the accumulation boundary. An update
        whose loss or `terms` are not finite on some rank is left out on every rank (counted and
        warned about by the trainer, a step later where the check runs on the device)."""
        self._t.optimize(name, loss, terms)

    # logging --------------------------------------------------------------------------------
    @property
    def want_images(self) -> bool:
        t = self._t
        return t.accelerator.is_main_process and t.tracker is not None and t.step % t.cfg.train.image_every == 0 \
            and t._images_logged_at != t.step

    def log_images(self, tag: str, images: Sequence[Tensor]) -> None:
        """Log an (input | output | target) grid of [-1, 1] NCHW tensors (main process only)."""
        t = self._t
        if t.tracker is not None and t.accelerator.is_main_process:
            t.tracker.log_image_grid(tag, images, step=t.step)
            t._images_logged_at = t.step

    def all_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum each value over all ranks (validation: sum of scores and counts, then divide)."""
        if not values:
            return {}
        keys = sorted(values)
        vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        vec = self._t.reduce(vec, "sum")
        return {k: float(v) for k, v in zip(keys, vec.tolist())}


# --------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs a Stage: `Trainer(cfg, stage).fit(resume=None|"auto"|path) -> FitResult`."""

    def __init__(self, cfg: StageBase, stage: Stage, accelerator: Any | None = None,
                 tracker: Any | None = None, handle_signals: bool = True) -> None:
        self.cfg = cfg
        self.stage = stage
        self.accelerator = accelerator if accelerator is not None else build_accelerator(cfg)
        self.tracker = tracker
        self.handle_signals = handle_signals
        self.speed = fast.Speed(self.accelerator.device)  # the config's speed settings, read in setup()
        self._old_handlers: dict[int, Any] = {}  # signal handlers fit() replaced, put back at its end
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, StepSchedule] = {}
        self.step = 0
        self.nonfinite_skipped = 0
        # What the loaders report per batch (DATA_COUNTS), this process, this run; and all ranks'
        # counts up to the checkpoint this run resumed from.
        self.data_counts = dict.fromkeys(DATA_COUNTS, 0)
        self.data_counts_resumed = dict.fromkeys(DATA_COUNTS, 0.0)
        self.resumed_changes: list[str] = []  # settings changed since the checkpoint resumed ("key: old -> new")
        self.best_value: float | None = None
        self.val_pending = False  # a validation due at the checkpoint's step, put off by a stop
        self.resumed_from: Path | None = None  # the checkpoint this job resumed
        self.batches_changed = False  # a resume changed what makes the batches (changes_batches, processes)
        self.run_id: str | None = None
        self._stop_requested = False
        self._stop_signal: int | None = None
        self.resumed_from_other_run: tuple[Path, str | None] | None = None  # --resume PATH of another run
        self._stop_seen = False  # agreed by every rank (several processes: see _agree_update)
        self._agreed_at = -1  # the step whose optimize() last agreed (self.step before it moved on)
        self._dropped_window: set[str] = set()  # models whose accumulation window had a non-finite loss
        self._defer_check = False  # set in setup(): the non-finite check runs on the device, read a step late
        self._window: dict[str, list[tuple[list[str], Tensor, dict[str, float]]]] = {}  # terms per micro-batch
        self._pending: list[PendingUpdate] = []  # updates whose device flags the host has not read yet
        self._images_logged_at = -1
        self._kept_exports: list[Path] = []  # a finished run's exports kept before it trains on
        # Running sums of the loss terms since the last log, kept on the device (reading them every
        # step would make the host wait for the GPU to drain, step after step): read at log time.
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, Tensor | float] = {}  # finite values in each sum (skipped steps' are not)
        self.ctx = TrainContext(self)
        self.run_dir = Path(cfg.run_dir)
        self._run_lock: contextlib.ExitStack | None = None  # held by the main process during fit()
        self.ckpt_root = self.run_dir / CHECKPOINT_DIR

    # ---------------------------------------------------------------- the algorithm box
    def fit(self, resume: str | None = None) -> FitResult:
        try:
            return self._fit(resume)
        finally:
            self._unlock_run_dir()  # taken in load(): the run folder is this job's until here

    def _fit(self, resume: str | None) -> FitResult:
        tc, acc = self.cfg.train, self.accelerator  # tc: the train section of the config
        total = self.total_steps()
        if self.cfg.tracking.enabled and self.tracker is None:  # every rank, before anything is loaded
            refuse_non_mlflow_server(resolve_uri(self.cfg.tracking.uri))
        # DDP averages the gradients of replicas that each read their own config: one that differs (a
        # file edited while the nodes started) would train with its own lr, crop or losses unnoticed.
        # Compared before check_inputs, which would raise on one rank alone (the others would wait).
        same_config_on_every_rank(acc.num_processes, self.cfg)
        # Each rank streams its share of its own listing: a shard one node lacks skews the mix, and
        # validation scores some images twice and others never.
        if acc.num_processes > 1:  # (listing a URL source fetches its manifest: not for nothing)
            agreed_listing(acc.num_processes, lambda: listed_shards(self.cfg.data), list, "shard files",
                           SAME_FILES_FIX + "; nothing was trained")
        check_inputs(self.cfg)                         # every shard folder and checkpoint named is there
        self.stage.preflight()                         # the stage's own (KT: the teacher cache)
        self.setup()                                   # seed, models, optimisers, schedules
        self.load(resume)                              # weights, optimisers, RNG, step, run id
        self._check_run_length(total)
        self._print_epoch_size()
        if acc.is_main_process:                        # what a killed job left half-written
            self._remove_stale_temporaries()
            self._keep_finished_exports(total)         # a finished run trained on: its weights kept
        self.start_tracking()                          # the same MLflow run on resume
        self._install_signal_handlers()
        bar = self._progress(total)
        status: Literal["finished", "preempted"] = "finished"
        metrics: dict[str, float] = {}
        upcoming = _NextEpoch()  # the next epoch's batches, started while this one drains
        try:
            with finishing(self.tracker, done=None):  # stopped: KILLED (Ctrl-C) or FAILED, never RUNNING
                if self.val_pending:  # the validation a stop put off at the checkpoint's step
                    metrics.update(self.validate())
                    self.val_pending = False
                    self._settle_pending_validation()
                while self.step < total:
                    epoch, start = divmod(self.step, tc.steps_per_epoch)
                    batches = upcoming.take(epoch) if start == 0 else None
                    if batches is None:
                        batches = self._epoch_batches(epoch, start)
                    end = min(tc.steps_per_epoch, start + total - self.step)
                    more_epochs = end == tc.steps_per_epoch and (epoch + 1) * tc.steps_per_epoch < total
                    for s in range(start, end):
                        for micro in range(tc.grad_accum):    # one optimiser step = grad_accum micro-batches
                            batch = self._next_batch(batches, epoch)
                            left = (end - s) * tc.grad_accum - micro - 1  # micro-batches still to fetch
                            if more_epochs and upcoming.due(batches, left):
                                upcoming.start(epoch + 1, self._epoch_batches(epoch + 1, 0))
                            self._count_data(batch)
                            if self.speed.cuda_graphs:  # a new graph iteration: the last one's outputs are used up
                                torch.compiler.cudagraph_mark_step_begin()
                            # accelerate counts the same micro-batches (gradient_accumulation_steps = grad_accum)
                            # and syncs gradients on each window's last; ctx.optimize steps there
                            with acc.accumulate(*[self.models[n] for n in self.stage.trainable]), self._autocast(), \
                                    unused_parameters_named(tc.find_unused_parameters):
                                terms = self.stage.training_step(batch, self.ctx)
                            self._accumulate_terms(terms)
                        self.step += 1
                        self._read_update_flags(before=self.step)  # the last step's: the GPU is past them
                        bar.update(1)
                        if self.step % tc.log_every == 0 or self.step == total:
                            metrics.update(self.log_train(bar))
                        # A stop asked for (a scheduler's signal: a deadline) is answered before this step's
                        # validation: the checkpoint first, the validation by the resumed run (val_pending).
                        preempt = self._stop_agreed()
                        due = self.step % tc.val_every == 0 or self.step == total
                        if due and not preempt:
                            metrics.update(self.validate())
                        self.val_pending = due and preempt
                        if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == total or preempt:
                            self.save_checkpoint()
                        if preempt:
                            status = "preempted"
                            break
                    close = getattr(batches, "close", None)
                    if close is not None:  # its workers are done: free them now, not at the next epoch's start
                        close()
                    if status == "preempted":
                        break
                self._read_update_flags()  # (a log or checkpoint at the last step read them already)
                if status == "finished":
                    self.export("last")
                    self._tag_weights()
                    self._log_weights()
        finally:
            upcoming.close()  # a run stopped in its epoch's last steps: the next epoch's workers go too
            bar.close()
            self._restore_signal_handlers()
        if status == "preempted":
            how = "interrupted" if self._stop_signal == signal.SIGINT else "preempted"
            self._print(f"{how}: checkpoint saved at step {self.step} in {self.latest_checkpoint()}; "
                        f"continue with --resume auto")
        if self.tracker is not None:
            self.tracker.finish("KILLED" if status == "preempted" else "FINISHED")
        acc.wait_for_everyone()
        leave_process_group_at_exit()  # every rank got here: the group can be left cleanly at exit
        # The run this job logged to: none with tracking off (the checkpoint's id is kept for a resume
        # that turns tracking back on, not reported as if this job had logged there).
        run_id = self.mlflow_run_id if self.cfg.tracking.enabled else None
        return FitResult(status, self.step, run_id, self.latest_checkpoint(), metrics,
                         self.nonfinite_skipped, self._stop_signal if status == "preempted" else None)

    # ---------------------------------------------------------------- setup
    def total_steps(self) -> int:
        t = self.cfg.train
        full = t.epochs * t.steps_per_epoch
        return min(full, t.max_steps) if t.max_steps is not None else full

    def _check_run_length(self, total: int) -> None:
        """Say so when the config asks for steps it will not train: max_steps only stops a run early."""
        t = self.cfg.train
        full = self.schedule_horizon()
        if t.max_steps is not None and t.max_steps > full:
            self._warn_once(f"train.max_steps={t.max_steps} is beyond the run's end, train.epochs x "
                            f"train.steps_per_epoch = {full}: it stops at step {full} (max_steps only stops early); "
                            f"raise train.epochs to train longer", RuntimeWarning, stacklevel=3)
        if self.step >= total:
            # the limit reached is named: raising the other one does nothing
            if t.max_steps is not None and t.max_steps < full:
                reached, fix = f"train.max_steps={t.max_steps}", "raise train.max_steps"
            else:
                reached, fix = f"train.epochs x train.steps_per_epoch = {full}", "raise train.epochs"
            self._print(f"step {self.step} is already the run's end ({reached}): nothing to train; {fix} and "
                        f"--resume auto to train on")

    def _print_epoch_size(self) -> None:
        """An epoch is a count of optimiser steps, the same on any number of processes: the samples it
        reads grow with them (8 GPUs at 16 each read 8x one GPU's), and so does what the epoch-clocked
        settings (the a1/l1 decay, train.epochs) mean in samples. Said at the start of every run."""
        t, processes, batch = self.cfg.train, self.accelerator.num_processes, self.cfg.data.batch_size
        per_step = batch * t.grad_accum * processes
        also = f"; {self.stage.also_reads}" if self.stage.also_reads else ""
        self._print(f"an epoch: train.steps_per_epoch {t.steps_per_epoch} x {per_step} samples a step (data.batch_size "
                    f"{batch} x train.grad_accum {t.grad_accum} x {processes} process(es)) = "
                    f"{t.steps_per_epoch * per_step:,} samples{also}")

    def schedule_horizon(self) -> int:
        # The schedule spans the full run even when max_steps stops early (max_steps is not
        # part of the config hash: a smoke test follows the real run's LR curve).
        return self.cfg.train.epochs * self.cfg.train.steps_per_epoch

    def setup(self) -> None:
        from accelerate.utils import set_seed

        acc = self.accelerator
        self._check_deepspeed()
        self.speed = fast.Speed.from_config(self.cfg, acc.device)
        if self.deepspeed and self.speed.channels_last:
            # DeepSpeed broadcasts parameters as raw bytes, which needs contiguous (NCHW) storage.
            self._warn_once("model.channels_last is ignored under DeepSpeed (its parameter broadcast needs "
                            "contiguous weights); use a DDP launch config for channels_last", stacklevel=2)
            self.speed = dataclasses.replace(self.speed, channels_last=False)
        if self.deepspeed and self.speed.compile:
            # ZeRO fetches and releases parameters with hooks around each module, which torch.compile
            # would trace into; not measured or tested here, so DeepSpeed runs eagerly.
            self._warn_once("model.compile is ignored under DeepSpeed (untested with ZeRO's parameter hooks); use a "
                            "DDP launch config to compile", stacklevel=2)
            self.speed = dataclasses.replace(self.speed, compile=False)
        set_seed(self.cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
        models = self.stage.build_models()
        missing = [n for n in self.stage.trainable if n not in models]
        if missing:
            raise ConfigError(f"stage {self.stage.stage}: trainable model(s) {missing} not built")
        on_cuda = acc.device.type == "cuda"
        if on_cuda:  # fixed crop shapes: let cuDNN pick the fastest kernels (matmul TF32 stays off, see fast.py)
            torch.backends.cudnn.benchmark = True
        for name, model in models.items():
            if name not in self.stage.trainable:
                model.to(acc.device).eval().requires_grad_(False)  # frozen: never wrapped
                if self.speed.channels_last:
                    fast.to_channels_last(model)
                if self.speed.compile and name in self.stage.compiled_frozen:
                    self.speed.compile_model(model)
                self.models[name] = model
        for name in self.stage.trainable:
            model = models[name].train()
            if self.speed.channels_last:
                fast.to_channels_last(model)
            if self.speed.compile:  # in place: state_dict keys and DDP wrapping stay as they are
                self.speed.compile_model(model)
            opt = make_optimizer(model.parameters(), self.stage.optim_config(name), on_cuda)
            model, opt = acc.prepare(model, opt)
            self.models[name], self.optimizers[name] = model, opt
            # Not accelerate's scheduler wrapper (it steps num_processes times per update): the LR
            # is a pure function of the update count, set before each update (DeepSpeed steps
            # inside backward), so resuming the step count resumes the schedule.
            self.schedulers[name] = StepSchedule(opt, self.stage.optim_config(name).lr, self.cfg.schedule,
                                                 self.schedule_horizon())
            self.schedulers[name].apply(self.step)
        # fp16's GradScaler sets the fused optimiser's skip flag itself; DeepSpeed steps inside its engine.
        self._defer_check = (not self.deepspeed and getattr(acc, "scaler", None) is None
                             and all(fast.skips_on_device(o) for o in self.optimizers.values()))
        if self.speed.compile:
            names = [*self.stage.trainable, *(n for n in self.stage.compiled_frozen if n in models)]
            self._print(f"model.compile: {', '.join(names)} compile at the first step(s) (mode "
                        f"{self.speed.compile_mode}; minutes on a GPU, kernels cached in "
                        f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'the inductor cache')} for later runs)")
        # Different RNG streams per rank for anything random inside a step (noise, dropout).
        seed = self.cfg.train.seed + 1000 * acc.process_index
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _autocast(self) -> Any:
        # Under DeepSpeed accelerate's autocast is a no-op (DeepSpeed's own bf16 mode would hold the
        # weights in bf16 and fail on fp32 inputs): the engine stays fp32 and the step autocasts
        # itself, as under DDP (see build_accelerator).
        return self.speed.autocast() if self.deepspeed else self.accelerator.autocast()

    @property
    def deepspeed(self) -> bool:
        return str(getattr(self.accelerator, "distributed_type", "")).endswith("DEEPSPEED")

    @property
    def zero_stage(self) -> int:
        """0 without DeepSpeed. Under ZeRO-3 parameters are sharded: a stage's validation must
        forward through ctx.models[name] on every rank in lockstep, not ctx.unwrap(name)."""
        return zero_stage(self.accelerator)

    def _check_deepspeed(self) -> None:
        if not self.deepspeed:
            return
        if len(self.stage.trainable) > 1:
            raise ConfigError(f"stage {self.stage.stage} trains {len(self.stage.trainable)} models "
                              f"({', '.join(self.stage.trainable)}); DeepSpeed through accelerate wraps one. Launch "
                              f"it with DDP instead (launch/multi_gpu.yaml)")
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:  # our loaders are not prepared: DeepSpeed learns the batch size from the config
            ds = plugin.deepspeed_config
            # The stage config decides the batch and the clipping, as under DDP: "auto" is filled in, a
            # DeepSpeed value that differs is refused (the loaders never read DeepSpeed's batch, and its
            # gradient_clipping replaced train.clip_grad_norm silently).
            batch, clip, want = self.cfg.data.batch_size, self.cfg.train.clip_grad_norm, self.cfg.train.grad_accum

            def follow(key: str, stage_key: str, value: Any, fill: float, note: str = "") -> None:
                """DeepSpeed's `key` follows the stage config's `stage_key`: unset or auto gets `fill`."""
                got = ds.get(key)
                if got in (None, "auto"):
                    ds[key] = fill
                elif float(got) != fill:
                    raise ConfigError(f"the DeepSpeed config has {key}={got}, the stage config {stage_key}={value}"
                                      f"{note}: set them equal (or set the DeepSpeed value to auto, and the trainer "
                                      f"fills in {stage_key})")

            follow("train_micro_batch_size_per_gpu", "data.batch_size", batch, batch, " (per process)")
            # "auto" would make accelerate fill in 1.0 and clip silently; follow train.clip_grad_norm.
            follow("gradient_clipping", "train.clip_grad_norm", clip, clip or 0.0, " (None or 0: no clipping)")
            for half in ("bf16", "fp16"):
                if str((ds.get(half) or {}).get("enabled", False)).lower() == "true":
                    raise ConfigError(f"the DeepSpeed config enables {half}: its engine would hold the student in "
                                      f"{half} and fail on fp32 inputs; remove it and set train.mixed_precision=bf16 "
                                      f"(autocast, weights stay fp32)")
            # Accumulation: the trainer's loop runs train.grad_accum micro-batches per update; DeepSpeed
            # must count the same, or it steps more often than the schedule and the logs say.
            follow("gradient_accumulation_steps", "train.grad_accum", want, want)
            total, n = ds.get("train_batch_size"), self.accelerator.num_processes
            if total not in (None, "auto") and int(total) != batch * want * n:
                raise ConfigError(f"the DeepSpeed config has train_batch_size={total}, the stage config gives "
                                  f"data.batch_size x train.grad_accum x processes = {batch} x {want} x {n} = "
                                  f"{batch * want * n}: set it to auto (or remove it), or change those")

    def start_tracking(self) -> None:
        if self.tracker is None and self.cfg.tracking.enabled and self.accelerator.is_main_process:
            from uniremoval.tracking import start_run

            # The batches follow the process count (each rank reads its own share of the shards; the
            # global batch is processes x data.batch_size), which the config does not hold.
            tags = {"world_size": str(self.accelerator.num_processes), **self.stage.extra_tags()}
            if self.resumed_from_other_run is not None:  # a new run that continues another one's state
                path, other = self.resumed_from_other_run
                tags = {**tags, "resumed_from": str(path), **({"resumed_from_run": other} if other else {})}
            self.tracker = start_run(self.cfg, run_name=self.cfg.name, stage=self.stage.stage,
                                     degradation=self.stage.degradation, run_id=self.run_id,
                                     extra_tags=tags, run_dir=self.run_dir,
                                     background=True)  # a slow or hung server never holds the GPUs
            if self.tracker is not None and self.resumed_changes:
                # The run's params are the config it started with (MLflow does not change them), also
                # when it is created only now from a spool kept while the server was down: the
                # settings this resume changed go beside them, as a tag and the config used now.
                self.tracker.set_tags({"resumed_changes": "; ".join(self.resumed_changes)[:5000]})
                self.tracker.log_text(config_to_yaml(self.cfg), f"config-resumed-step{self.step:08d}.yaml")
        if self.tracker is not None:
            self.run_id = self.tracker.run_id

    # ---------------------------------------------------------------- one update
    def optimize(self, name: str, loss: Tensor, terms: dict[str, Any] | None) -> None:
        if self._defer_check:
            self._optimize_on_device_check(name, loss, terms)
            return
        acc, opt = self.accelerator, self.optimizers[name]
        if name in self._dropped_window:
            # An earlier micro-batch of this accumulation window was not finite: the whole update
            # is dropped, not stepped with the rest of the window's gradient. Every rank agreed on
            # the drop, so every rank skips these backwards alike (no DDP hang).
            if acc.sync_gradients:
                self._dropped_window.discard(name)
                opt.zero_grad(set_to_none=True)
            return
        bad = self._nonfinite_terms(loss, terms)
        if self._agree_update(bool(bad)):               # every rank skips together: no DDP hang
            self._handle_nonfinite(name, bad, self.step + 1)
            opt.zero_grad(set_to_none=True)
            if not acc.sync_gradients and not self.deepspeed:
                self._dropped_window.add(name)
            return
        self._apply_update(name, loss)

    def _apply_update(self, name: str, loss: Tensor, skip: Tensor | None = None) -> None:
        """Backward, and at the accumulation boundary clip, step and zero the gradients. `skip`: the
        fused optimiser's device flag (1.0 leaves the update out)."""
        acc, opt, sched = self.accelerator, self.optimizers[name], self.schedulers[name]
        if acc.sync_gradients:
            sched.apply(self.step)  # the LR of update number self.step (DeepSpeed steps inside backward)
        acc.backward(loss)
        if acc.sync_gradients:
            clip = self.cfg.train.clip_grad_norm
            if clip is not None and not self.deepspeed:  # DeepSpeed clips by its own config
                acc.clip_grad_norm_(self.models[name].parameters(), clip)
            inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper steps the torch optimiser
            inner.found_inf = skip
            try:
                opt.step()
            finally:
                inner.found_inf = None
            opt.zero_grad(set_to_none=True)

    def _optimize_on_device_check(self, name: str, loss: Tensor, terms: dict[str, Any] | None) -> None:
        """`optimize` with the non-finite check on the device: every micro-batch is backpropagated
        (a NaN gradient is harmless when its update is left out), the window's flag is agreed by all
        ranks with an all-reduce the host does not wait for, and the fused optimiser leaves the
        update out on it. The host reads the flags a step later (`_read_update_flags`)."""
        acc = self.accelerator
        items = dict(terms or {})
        items.setdefault("loss", loss)
        keys = [k for k, v in items.items() if isinstance(v, Tensor)]
        values = torch.stack([items[k].detach().float().sum() for k in keys])
        host_bad = {k: float(v) for k, v in items.items()
                    if not isinstance(v, Tensor) and not math.isfinite(float(v))}
        self._window.setdefault(name, []).append((keys, values, host_bad))
        if not acc.sync_gradients:
            self._apply_update(name, loss)
            return
        window = self._window.pop(name)
        bad = torch.stack([(~torch.isfinite(v)).any() for _, v, _ in window]).any().float()
        if any(h for _, _, h in window):
            bad = torch.ones_like(bad)
        flags = torch.stack([bad, torch.full_like(bad, float(self._stop_requested))])
        if acc.num_processes > 1:  # every rank skips the same update and stops after the same step
            flags = self.reduce(flags, "max")
            self._agreed_at = self.step
        self._apply_update(name, loss, skip=flags[0])
        self._pending.append(PendingUpdate(self.step + 1, name, [(k, h) for k, _, h in window],
                                           fast.HostCopy(torch.cat([flags, *(v for _, v, _ in window)]))))

    def _read_update_flags(self, before: int | None = None) -> None:
        """Read the device flags of the updates numbered below `before` (all with None): count and
        report the skipped ones (`_handle_nonfinite`), note an agreed stop. Updates of the step just
        queued stay pending, so the host does not wait for the GPU to finish them."""
        keep: list[PendingUpdate] = []
        for update in self._pending:
            if before is not None and update.step >= before:
                keep.append(update)
                continue
            values = update.values.get().tolist()
            skipped, stop = values[0] > 0, values[1] > 0
            self._stop_seen = self._stop_seen or stop
            if skipped:
                bad: dict[str, float] = {}
                at = 2
                for keys, host_bad in update.parts:  # the first micro-batch that had one names it
                    bad = {k: v for k, v in zip(keys, values[at:at + len(keys)]) if not math.isfinite(v)}
                    bad.update(host_bad)
                    at += len(keys)
                    if bad:
                        break
                self._handle_nonfinite(update.name, bad, update.step)
        self._pending = keep

    def _nonfinite_terms(self, loss: Tensor, terms: dict[str, Any] | None) -> dict[str, float]:
        """The terms that are not finite, by name. All tensor terms are read in one device-to-host
        copy: the one wait for the GPU of a training step (the forward must finish before its loss
        can be checked, and the check must come before the update)."""
        items = dict(terms or {})
        items.setdefault("loss", loss)
        tensors = {k: v for k, v in items.items() if isinstance(v, Tensor)}
        values = {k: float(v) for k, v in items.items() if not isinstance(v, Tensor)}
        if tensors:
            read = torch.stack([v.detach().float().sum() for v in tensors.values()]).tolist()
            values.update(zip(tensors, read))
        return {k: v for k, v in values.items() if not math.isfinite(v)}

    def _handle_nonfinite(self, name: str, bad: dict[str, float], step: int) -> None:
        where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
        msg = (f"non-finite loss at step {step} (model {name!r}, rank {self.accelerator.process_index}): "
               f"{where}")
        self.nonfinite_skipped += 1
        limit = self.cfg.train.max_nonfinite
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(msg + "; stopping (train.nonfinite=stop). Lower optim.lr, enable "
                                     "train.clip_grad_norm, or use mixed_precision=no.")
        if self.nonfinite_skipped > limit:
            raise NonFiniteLossError(f"{msg}; {self.nonfinite_skipped} non-finite updates skipped, more than "
                                     f"train.max_nonfinite={limit}: stopping")
        if bad or self.accelerator.is_main_process:
            warnings.warn(f"{msg}; update skipped ({self.nonfinite_skipped} so far)", RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------- logging and validation
    def _accumulate_terms(self, terms: dict[str, Any]) -> None:
        """Add each finite term to its running sum and count it, on the device (no host read: see
        `_sums`). A non-finite value (a skipped step's) is left out of both, so the logged mean is
        over the steps that had one, not pulled towards 0."""
        for k, v in terms.items():
            if isinstance(v, Tensor):
                v = v.detach().double().sum()
                finite = torch.isfinite(v)
                add: Tensor | float = torch.where(finite, v, torch.zeros_like(v))
                one: Tensor | float = finite.double()
            else:
                one = 1.0 if math.isfinite(float(v)) else 0.0
                add = float(v) if one else 0.0
            self._sums[k] = self._sums.get(k, 0.0) + add
            self._counts[k] = self._counts.get(k, 0.0) + one

    def _log_window(self) -> dict[str, tuple[float, float]]:
        """Each term's sum and count of finite values since the last log, over all ranks. Collective."""
        keys = sorted(self._sums)
        dev = self.accelerator.device
        # Every rank reduces the same shape: a stage's training_step returns the same terms on every
        # rank (its loss terms), so the keys, and with none every rank sends the one zero below.
        local = torch.zeros(1, dtype=torch.float64, device=dev)
        if keys:  # one read of every running sum and count (device tensors, or floats for host terms)
            local = torch.stack([torch.as_tensor(d[k], dtype=torch.float64, device=dev).reshape(())
                                 for d in (self._sums, self._counts) for k in keys])
        total = self.reduce(local, "sum").tolist()
        return {k: (s, n) for k, s, n in zip(keys, total[:len(keys)], total[len(keys):])}

    def log_train(self, bar: Any) -> dict[str, float]:
        """Mean of each term since the last log over all ranks' finite values; LRs; skipped count.
        A term with no finite value in the window is not logged (MLflow takes no NaN)."""
        window = self._log_window()
        self._read_update_flags()  # the skipped count is logged: every update's flag, now
        keys = list(window)
        out = {f"train/{k}": s / n for k, (s, n) in window.items() if n > 0}
        for name, sched in self.schedulers.items():
            out[f"train/lr_{name}" if len(self.schedulers) > 1 else "train/lr"] = sched.last_lr
        out["train/nonfinite_skipped"] = float(self.nonfinite_skipped)
        out.update({f"train/{k}": v for k, v in self.data_counts_total().items()})
        # epochs completed, fractional (the epoch index of the window's last step said 1 at the end of
        # epoch 0, beside that epoch's losses)
        out["train/epoch"] = self.step / self.cfg.train.steps_per_epoch
        self._sums, self._counts = {}, {}
        if self.accelerator.is_main_process:
            shown = {k: f"{out[f'train/{k}']:.4g}" for k in progress_terms(keys) if f"train/{k}" in out}
            bar.set_postfix(shown, refresh=False)
            if self.tracker is not None:
                self.tracker.log_metrics(out, step=self.step)
        return out

    def validate(self) -> dict[str, float]:
        for name in self.stage.trainable:
            self.models[name].eval()
        try:
            # Validation images vary in size: run compiled models eagerly rather than recompile per size.
            with torch.no_grad(), fast.eager() if self.speed.compile else contextlib.nullcontext():
                metrics = self.stage.validate(self.ctx)
        finally:
            for name in self.stage.trainable:
                self.models[name].train()
        if metrics and self.accelerator.is_main_process:
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, step=self.step)
            self._print(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if self.stage.best_metric is not None and self.stage.best_metric[0] in metrics:
            key, mode = self.stage.best_metric
            value = metrics[key]
            # Never the best: NaN (an output gone NaN scores NaN), nor inf (nothing after it could beat
            # it; a mean PSNR is inf as soon as one image is restored exactly, whatever the others score).
            better = math.isfinite(value) and (self.best_value is None or (
                value > self.best_value if mode == "max" else value < self.best_value))
            if not math.isfinite(value) and self.accelerator.is_main_process:
                why = ("the model's output is not finite?" if math.isnan(value) else
                       "one image restored exactly makes a mean PSNR inf, whatever the others score"
                       if key.endswith("psnr") else "one image scored inf makes the mean inf, whatever the others score")
                warnings.warn(f"step {self.step}: {key}={value} is not finite ({why}); "
                              f"best.safetensors is left as it was", RuntimeWarning, stacklevel=2)
            if better:
                self.best_value = value
                self.export("best", extra={"best_metric": key, "best_value": value})
        return metrics

    # ---------------------------------------------------------------- checkpoints
    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run's id; when the server was down at the start, the run exists only once the
        spool is replayed mid-run, so ask the tracker rather than keep the id seen at the start."""
        if self.tracker is not None and self.tracker.run_id is not None:
            return self.tracker.run_id
        return self.run_id

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = {"step": self.step, "epoch": self.ctx.epoch, "config_hash": config_hash(self.cfg),
                "mlflow_run_id": self.mlflow_run_id, "stage": self.stage.stage,
                "run_name": run_name(self.cfg), "degradation": self.stage.degradation}
        # The ablation row travels with the weights: eval against another MLflow store (or with the
        # training run deleted) cannot read the run's ablation.* tags.
        if flags := ablation_flags(self.cfg):
            meta["ablation"] = flags
        return meta

    def _save_weights(self, path: Path, name: str, extra: dict[str, Any] | None = None) -> None:
        """Write one model's weights (main process). Call on EVERY rank: ZeRO-3 gathers here."""
        from uniremoval.models.checkpoint import save_checkpoint

        acc = self.accelerator
        net = acc.unwrap_model(self.models[name])
        meta = {**self.checkpoint_meta(), **self.stage.export_meta(name), **(extra or {})}
        if self.zero_stage != 3:
            if acc.is_main_process:
                save_checkpoint(path, net, meta)
            return
        # ZeRO-3 shards the parameters above stage3_param_persistence_threshold: gather the full
        # ones on all ranks (a collective) for the length of the save. The module keeps its
        # structure, so shared parameters (MPRNet's one PReLU) are still recognised as aliases, and
        # the weights keep their training dtype (fp32 master weights are in the optimiser; this
        # does not need stage3_gather_16bit_weights_on_model_save).
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
            if acc.is_main_process:
                save_checkpoint(path, net, meta)

    def export(self, which: str, extra: dict[str, Any] | None = None) -> None:
        """`last`/`best` weights beside the checkpoints (what later stages load)."""
        for name in self.stage.trainable:
            path = self.run_dir / export_name(self.stage.trainable, name, which)
            with disk_full_is_an_error(f"exporting {path}.safetensors", self.run_dir,
                                       f"The previous {path.name} weights, if any, are intact"):
                self._save_weights(path, name, extra)
        self.accelerator.wait_for_everyone()

    def _tag_weights(self) -> None:
        """Tag the run with the sha256 of each exported weights file (`weights_sha256.last`, `.best`,
        `.discriminator-last`...): the runs that read them tag the same hash (`init_sha256`,
        `teacher_sha256.<type>`, eval's `checkpoint_sha256`), so a search by hash finds the run that
        trained them too."""
        if self.tracker is None:
            return
        from uniremoval.models.checkpoint import META_SUFFIX

        tags = {}
        for name in self.stage.trainable:
            for which in ("last", "best"):
                base = self.run_dir / export_name(self.stage.trainable, name, which)
                # ...and those a finished run trained on kept (last-step<N>): the runs that read them
                # still find this run by their hash
                for meta in (base.with_name(base.name + META_SUFFIX),
                             *sorted(self.run_dir.glob(f"{glob.escape(base.name)}-step*{META_SUFFIX}"))):
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        sha = json.loads(meta.read_text()).get("weights_sha256")
                        if sha:
                            tags[f"weights_sha256.{meta.name.removesuffix(META_SUFFIX)}"] = str(sha)
        if tags:
            self.tracker.set_tags(tags)

    def _log_weights(self) -> None:
        """The exported weights (last, best: .safetensors and .json) into the run's `weights/`, so the
        MLflow run holds what it trained (download from the UI, or `mlflow artifacts download`);
        `tracking.log_weights: false` keeps them on disk only."""
        if self.tracker is None or not self.cfg.tracking.log_weights:
            return
        for name in self.stage.trainable:
            for which in ("last", "best"):
                base = self.run_dir / export_name(self.stage.trainable, name, which)
                for file in (base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")):
                    if file.is_file():
                        self.tracker.log_artifact(file, "weights")
        for file in self._kept_exports:  # kept by this job: the run's weights/ held them until now
            if file.is_file():
                self.tracker.log_artifact(file, "weights")

    def save_checkpoint(self) -> Path:
        final = self.ckpt_root / f"step-{self.step:08d}"
        tmp = self.ckpt_root / f".step-{self.step:08d}.tmp"
        if final.is_dir():  # this step is saved already (preempted right after a periodic save)
            return final
        previous = self.latest_checkpoint()
        intact = f"Nothing was replaced: the last complete checkpoint is {previous or 'none (this run had none yet)'}"
        self._read_update_flags()  # the state saved counts every skipped update
        with disk_full_is_an_error(f"checkpoint {final}", self.ckpt_root, intact, cleanup=tmp):
            return self._write_checkpoint(final, tmp)

    def _write_checkpoint(self, final: Path, tmp: Path) -> Path:
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
        if self.deepspeed:  # ZeRO shards the optimiser state: every rank writes its part
            acc.save_state(str(tmp / "deepspeed"))
        for name in self.stage.trainable:
            self._save_weights(tmp / name, name)
        data_counts = self.data_counts_total()  # a collective: every rank
        # The terms summed since the last log (collective): a resume continues the window, so the mean
        # logged at the next log step is over the same steps as in an uninterrupted run, not only
        # those after the resume.
        window = self._log_window()
        if acc.is_main_process:
            state = {
                "step": self.step, "nonfinite_skipped": self.nonfinite_skipped, "best_value": self.best_value,
                "val_pending": self.val_pending,  # optional: older checkpoints lack it
                **data_counts, "log_window": {k: [s, n] for k, (s, n) in window.items()},
                "mlflow_run_id": self.mlflow_run_id, "world_size": acc.num_processes, "config_hash": config_hash(self.cfg),
                "torch_threads": torch.get_num_threads(),  # optional: a CPU run's sums follow it
                "weights_sha256": self.stage.weights_identity(),  # optional: older checkpoints lack it
                "stage_state": self.stage.state_dict(),  # optional too
                "zero_stage": self.zero_stage,  # a resume must load deepspeed/ under the same stage
                "config": json.dumps(config_to_dict(self.cfg)),
                "optimizers": {} if self.deepspeed else {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            }
            torch.save(state, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_to_yaml(self.cfg))  # to read, or to resume with
            fsync_dir(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.replace(tmp, final)  # the checkpoint appears complete or not at all
            fsync_dir(self.ckpt_root)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _count_data(self, batch: Any) -> None:
        if isinstance(batch, dict):
            for key in DATA_COUNTS:
                self.data_counts[key] += int(batch.get(key, 0))

    def data_counts_total(self) -> dict[str, float]:
        """DATA_COUNTS summed over all ranks and the whole run (resumes included). Collective."""
        summed = [float(self.data_counts[k]) for k in DATA_COUNTS]
        if self.accelerator.num_processes > 1:  # one process: host counts, no device round trip
            local = torch.tensor(summed, dtype=torch.float64, device=self.accelerator.device)
            summed = self.reduce(local, "sum").tolist()
        return {k: v + self.data_counts_resumed[k] for k, v in zip(DATA_COUNTS, summed, strict=True)}

    def _prune(self) -> None:
        steps = sorted(list_checkpoints(self.ckpt_root))
        for old in steps[: max(0, len(steps) - self.cfg.checkpoint.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporaries a killed job of this run left behind (main process, before training).

        A kill -9 while a checkpoint or the last/best weights are written leaves a hidden
        `.step-N.tmp` folder or a `.last.safetensors.<random>.tmp` file. The periodic checkpoint of
        the same step is rewritten over its folder on resume, but a preemption checkpoint (SIGTERM
        at any step, then SIGKILL before it was complete) and every export temporary have names no
        later write reuses: each one would stay, a model's size (with its optimiser state for a
        checkpoint), for every such kill over a job's many requeues.
        """
        removed = remove_stale_temporaries(self.run_dir, [
            export_name(self.stage.trainable, name, which)
            for name in self.stage.trainable for which in ("last", "best")])
        if removed:
            self._print(f"removed {len(removed)} temporary file(s)/folder(s) left by an interrupted job: "
                        + ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))

    def _keep_finished_exports(self, total: int) -> None:
        """A finished run trained on (more train.epochs, then --resume auto) exports new last/best weights
        over those it finished with, which later runs may have read: a DA run's model.init, evals (their
        sha256 tags name them, and the lineage search by hash found nothing once they were replaced).
        Those files are kept in the run folder as `<export>-step<N>` (.safetensors and .json) first."""
        from uniremoval.models.checkpoint import META_SUFFIX, WEIGHTS_SUFFIX, recorded_meta

        if self.resumed_from is None or self.step >= total:
            return

        def exported_at(name: str, which: str) -> tuple[Path, Any]:
            base = self.run_dir / export_name(self.stage.trainable, name, which)
            return base, recorded_meta(base.with_name(base.name + WEIGHTS_SUFFIX)).get("step")

        kept = []
        for name in self.stage.trainable:
            if exported_at(name, "last")[1] != self.step:  # `last` is exported when a run finishes: not here
                continue
            for which in ("last", "best"):
                base, step = exported_at(name, which)
                if step is None:
                    continue
                for suffix in (WEIGHTS_SUFFIX, META_SUFFIX):
                    src = base.with_name(base.name + suffix)
                    dst = base.with_name(f"{base.name}-step{int(step):08d}{suffix}")
                    if src.is_file() and not dst.exists():
                        with disk_full_is_an_error(f"keeping {src} as {dst.name}", self.run_dir,
                                                   f"{src} is intact"):
                            keep_file(src, dst)
                        self._kept_exports.append(dst)
                        if suffix == WEIGHTS_SUFFIX:
                            kept.append(dst.name)
        if kept:
            self._print(f"this run finished at step {self.step} and now trains on to step {total}: the weights it "
                        f"exported, which later runs may have read (their sha256 tags name them), are kept as "
                        f"{', '.join(kept)} in {self.run_dir} (and in the MLflow run, tagged weights_sha256."
                        f"<name>); last/best will be the new ones")

    def _check_run_dir(self, fresh: bool) -> None:
        """Before anything is trained: the run folder can be written (else the first checkpoint,
        possibly hours in, would fail), and a fresh run does not overwrite another run's weights."""
        from uniremoval.io import check_output

        check_output(self.run_dir, "run folder", folder=True, create=True,
                     fix="set output_dir (or name) to a writable place")
        self._lock_run_dir()
        try:
            if fresh:
                self._refuse_another_run()
        except BaseException:
            self._unlock_run_dir()
            raise

    def _lock_run_dir(self) -> None:
        """One job per run folder: a second one (the same command started twice, or another config
        with the same output_dir/name) stops here rather than interleave checkpoints with the first.
        The main process holds the lock until fit() ends."""
        self._run_lock = lock_on_main_process(self.accelerator, self.run_dir, f"the run {self.cfg.name!r}")

    def _unlock_run_dir(self) -> None:
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None

    def _refuse_another_run(self) -> None:
        found = list_checkpoints(self.ckpt_root)
        exports = sorted(self.run_dir.glob("*.safetensors"))
        if found:
            raise CheckpointError(f"run folder {self.run_dir} already holds a run (checkpoints up to "
                                  f"{found[-1].name}); continue it with --resume auto, or give this run another "
                                  f"output_dir or name (delete the folder to start over)")
        if exports:  # weights of a run stopped before its first checkpoint: nothing to continue
            raise CheckpointError(f"run folder {self.run_dir} holds the weights of an earlier run "
                                  f"({', '.join(p.name for p in exports[:3])}) but no checkpoint to continue it "
                                  f"from; give this run another output_dir or name, or move those files away "
                                  f"(or delete the folder) to start over")

    def _resume_hint(self, path: Path, resume: str) -> str:
        """What to do about a checkpoint folder with a file missing (the trainer writes each one whole,
        so a folder copied in part, or edited)."""
        if resume != "auto":
            return "give a checkpoints/step-* folder of a run, or --resume auto"
        earlier = [p for p in list_checkpoints(self.ckpt_root) if p != path]
        if earlier:
            return (f"it is the newest checkpoint of {self.ckpt_root}, copied in part or edited (the trainer writes "
                    f"each one whole): resume the one before it with --resume {earlier[-1]}, or restore the file")
        return (f"it is the only checkpoint of {self.ckpt_root}, copied in part or edited (the trainer writes each "
                "one whole): restore the file, or start a new run (another name) from its weights with "
                f"model.init={path}/{self.stage.trainable[0]}.safetensors if they are there")

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.ckpt_root)
        return found[-1] if found else None

    def _resume_path(self, resume: str | None) -> Path | None:
        """The checkpoint to resume (None: start at step 0), agreed on by every rank; the run folder checked."""

        def agree(path: Path | None) -> None:
            # Every rank must load the same checkpoint (DeepSpeed's load_state is a collective): a run
            # folder one node sees differently (a lagging mount) is refused on every rank, before any of
            # it is read (one rank alone stopping would leave the others waiting in a collective).
            same_on_every_rank(self.accelerator.num_processes, None if path is None else str(path),
                               "resume checkpoints", "every process must see the same run folder (a shared file system)",
                               lambda a, b: f"{a or 'none'} on rank 0, {b or 'none'} on the other")

        if resume and resume != "auto":
            # A checkpoint named that is not there stops the run before its folder is made (a typo left
            # an empty run folder holding a lock).
            seen = Path(resume) if Path(resume).exists() else None
            agree(seen)
            if seen is None:
                raise CheckpointError(f"resume checkpoint {resume} does not exist; give a checkpoints/step-* folder "
                                      f"of a run, or --resume auto")
        self._check_run_dir(fresh=not resume)
        if not resume:
            return None
        path = self.latest_checkpoint() if resume == "auto" else Path(resume)
        if resume == "auto":  # a path given was agreed on above
            agree(path)
        if path is None:
            self._refuse_another_run()  # exported weights without a checkpoint are not overwritten
            self._print(f"--resume auto: no checkpoint in {self.ckpt_root}; starting from step 0")
        return path

    def load(self, resume: str | None) -> None:
        """Resume a checkpoint (`resume`, or checkpoint.resume: a path or "auto"), on every rank: its
        weights and optimiser states, step and counters, MLflow run, stage state and RNG streams."""
        resume = resume if resume is not None else self.cfg.checkpoint.resume
        path = self._resume_path(resume)
        if path is None:
            return
        state = self._load_weights_and_optimisers(path, resume)
        self.resumed_from = path
        self.step = int(state["step"])
        for sched in self.schedulers.values():
            sched.apply(self.step)  # a function of the step: nothing else to restore
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.data_counts_resumed = {k: float(state.get(k, 0.0)) for k in DATA_COUNTS}
        # The log window's all-rank sums go to the main process; the other ranks hold zeros for the
        # same terms, so every rank reduces the same shape at the next log.
        window = state.get("log_window") or {}
        main = self.accelerator.is_main_process
        self._sums = {k: float(v[0]) if main else 0.0 for k, v in window.items()}
        self._counts = {k: float(v[1]) if main else 0.0 for k, v in window.items()}
        self.best_value = state.get("best_value")
        self.val_pending = bool(state.get("val_pending", False))
        self.run_id = state.get("mlflow_run_id")
        here = path.resolve().parent == self.ckpt_root.resolve()
        saved_name = json.loads(state["config"]).get("name") if "config" in state else None
        if not here or (saved_name is not None and saved_name != self.cfg.name):
            # Another run's checkpoint continued in this folder (given by path, or in a run folder
            # copied under another name): a run of its own in MLflow (tagged resumed_from), or the
            # other run's metrics and logged weights would be overwritten.
            self.resumed_from_other_run = (path, self.run_id)
            self.run_id = None
            self.best_value = None  # this run's best is its own: the first validation writes best.*
            whose = "another run's checkpoint" if not here else f"run {saved_name!r}'s checkpoint"
            self._print(f"continuing {path} ({whose}) as the new run {self.cfg.name!r}")
        if here:
            self._supersede_later_checkpoints(path)
        self.stage.load_state_dict(state.get("stage_state") or {}, same_mlflow_run=self.run_id is not None)
        self._restore_rng(path, state)
        epoch, start = divmod(self.step, self.cfg.train.steps_per_epoch)
        # The skipped batches are decoded (their random crops set the stream's state): on a long epoch
        # that is a wait, said so rather than a progress bar that seems stuck.
        # The claim that the batches go on as before holds only when nothing that makes them changed.
        same = ("the run goes on with the batches an uninterrupted one would see" if not self.batches_changed
                else "the changes warned about mean the batches from here on are not an uninterrupted run's")
        inside = (f"; reading past epoch {epoch}'s first {start * self.cfg.train.grad_accum} micro-batches first "
                  f"(decoded and skipped: {same})" if start else "")
        self._print(f"resumed from {path} at step {self.step}{inside}")

    def _settle_pending_validation(self) -> None:
        """The resumed checkpoint had a validation due at its step, and it ran: its state.pt says so now
        (with the best value it may have set), else a later resume from it (more train.epochs after a
        stop at the last step, where no checkpoint follows) validated that step again. Another run's
        checkpoint is never rewritten; the file keeps its time (settings files are compared with it)."""
        path = self.resumed_from
        if not self.accelerator.is_main_process or path is None or path.resolve().parent != self.ckpt_root.resolve():
            return
        file = path / "state.pt"
        state = torch.load(file, map_location="cpu", weights_only=True)
        state.update(val_pending=False, best_value=self.best_value)
        times = file.stat()
        with atomic_writer(file) as fh:
            torch.save(state, fh)
        os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns))

    def _load_weights_and_optimisers(self, path: Path, resume: str) -> dict[str, Any]:
        """The checkpoint's state.pt, once its launch (DeepSpeed or not), config and weights are checked;
        the trainable models' weights and optimiser states loaded."""
        if not (path / "state.pt").is_file():
            raise CheckpointError(f"resume checkpoint {path} has no state.pt; {self._resume_hint(path, resume)}")
        from safetensors.torch import load_file

        state = read_resume_file(path / "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
        saved_ds = (path / "deepspeed").is_dir()  # DeepSpeed keeps the optimiser state there, DDP in state.pt
        if saved_ds != self.deepspeed:
            raise CheckpointError(
                f"resume checkpoint {path} was written {'under' if saved_ds else 'without'} DeepSpeed, and this "
                f"run is launched {'without' if saved_ds else 'with'} it: the optimiser state is stored differently. "
                f"Resume with the launch config that wrote it ("
                f"{'launch/deepspeed_zero2.yaml or deepspeed_zero3.yaml' if saved_ds else 'DDP: launch/multi_gpu.yaml'}"
                f"), or start a new run from its weights (model.init={path}/{self.stage.trainable[0]}.safetensors)")
        if self.deepspeed:
            self._check_deepspeed_resume(path, state)
        self._check_resumed_config(path, state)
        if self.accelerator.is_main_process:
            self._check_resumed_weights(path, state)
        for name in self.stage.trainable:
            weights = path / f"{name}.safetensors"
            if not weights.is_file():
                raise CheckpointError(f"resume checkpoint {path} lacks {weights.name}; {self._resume_hint(path, resume)}")
            if self.deepspeed:
                continue  # weights and sharded optimiser state come back through load_state below
            load_weights_into(self.accelerator.unwrap_model(self.models[name]),
                              read_resume_file(weights, lambda f: load_file(str(f))), weights)
            self.optimizers[name].load_state_dict(state["optimizers"][name])
        if self.deepspeed:
            self.accelerator.load_state(str(path / "deepspeed"))
        return state

    def _restore_rng(self, path: Path, state: dict[str, Any]) -> None:
        """Each rank's RNG streams, when saved on as many processes; said when they start fresh, and when
        the process or thread count changed what an uninterrupted run would compute."""
        rng = path / f"rng-rank{self.accelerator.process_index}.pt"
        saved_world, world = state.get("world_size"), self.accelerator.num_processes
        if rng.is_file() and saved_world == world:
            set_rng_state(read_resume_file(rng, lambda f: torch.load(f, map_location="cpu", weights_only=True)))
        elif saved_world is not None and saved_world != world:
            # Not only the RNG: each rank streams its own share of the shards, so the batches (and the
            # global batch, processes x data.batch_size) follow the process count. The run's MLflow tag
            # world_size keeps the count it started with; resumed_changes says this one.
            self.resumed_changes.append(f"processes: {saved_world} -> {world}")
            self.batches_changed = True
            self._warn_once(f"resuming {path} on {world} processes (saved on {saved_world}): RNG streams start fresh, "
                            f"and from here on the batches are not those of an uninterrupted run on {saved_world} "
                            f"(each process reads its own share of the shards; the global batch is now {world} x "
                            f"data.batch_size)", RuntimeWarning, stacklevel=3)
        else:
            why = (f"it has no RNG state for rank {self.accelerator.process_index} ({rng.name})" if not rng.is_file()
                   else "it does not record the process count it was saved on, so its RNG files may be another's")
            warnings.warn(f"resuming {path}: {why}: RNG streams start fresh", RuntimeWarning, stacklevel=3)
        saved_threads, threads = state.get("torch_threads"), torch.get_num_threads()
        if self.accelerator.device.type == "cpu" and saved_threads is not None and saved_threads != threads:
            # On CPU the kernels split their sums over the threads: another count changes the last bits
            # of every step (a requeue onto a node with another core count, or another OMP_NUM_THREADS).
            self.resumed_changes.append(f"torch threads: {saved_threads} -> {threads}")
            warnings.warn(f"resuming {path} with {threads} torch threads (saved with {saved_threads}): on CPU the "
                          "weights from here on differ in their last bits from an uninterrupted run's (set "
                          f"OMP_NUM_THREADS={saved_threads} to continue it exactly)", RuntimeWarning, stacklevel=3)

    def _check_deepspeed_resume(self, path: Path, state: dict[str, Any]) -> None:
        """DeepSpeed loads its optimiser state only under the ZeRO stage and process count that wrote it
        (else a bare AssertionError or ZeRORuntimeException from inside load_state): refuse by name."""
        saved = state.get("zero_stage")
        if saved is None:  # written before checkpoints kept it: ZeRO-3 names its files per rank
            saved = 3 if any((path / "deepspeed").rglob("zero_pp_rank_*_model_states.pt")) else 2
            same = (saved == 3) == (self.zero_stage == 3)
        else:
            same = int(saved) == self.zero_stage
        world = state.get("world_size")
        changes = ([] if same else [f"ZeRO stage {saved}, this run {self.zero_stage}"]) + (
            [f"{world} processes, this run {self.accelerator.num_processes}"]
            if world is not None and int(world) != self.accelerator.num_processes else [])
        if changes:
            raise CheckpointError(
                f"resume checkpoint {path} was written under DeepSpeed with {'; '.join(changes)}: DeepSpeed "
                f"partitions the optimiser state by both and cannot load it otherwise. Resume with the launch "
                f"config and --num_processes {world} that wrote it, or start a new run (another name) from its "
                f"weights with model.init={path}/{self.stage.trainable[0]}.safetensors")

    def _check_resumed_config(self, path: Path, state: dict[str, Any]) -> None:
        """A resumed run may change its schedule, logging or data paths (named in a warning), not what
        the weights and optimiser state it continues are: architecture, degradation types, stage."""
        if state.get("config_hash") == config_hash(self.cfg):
            return
        if "config" not in state:  # written before checkpoints kept their config
            self._warn_once(f"resuming {path}: its config hash {state.get('config_hash')} differs from this "
                            f"config's {config_hash(self.cfg)}", RuntimeWarning, stacklevel=4)
            return
        changes = config_changes(json.loads(state["config"]), self.cfg)
        shown = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes]
        fixed = [line for line, (k, _, _) in zip(shown, changes, strict=True) if fixed_on_resume(k)]
        if fixed:
            why = ("its weights and optimiser state belong to that setting"
                   if any(k not in ABLATION_SWITCHES for k, _, _ in changes if fixed_on_resume(k)) else
                   "the loss switches are the run's ablation row (its ablation.* tags, Tables IV and V), and "
                   "weights trained partly under each belong to neither row")
            raise CheckpointError(
                f"resume checkpoint {path} was trained with another {', '.join(fixed)}: {why}. Resume with the "
                f"config it was written with ({path / 'config.yaml'}), or start a new run (another name) from its "
                f"weights with model.init={path}/{self.stage.trainable[0]}.safetensors")
        if shown:
            self.resumed_changes = shown
            self.batches_changed = any(changes_batches(k, old, new) for k, old, new in changes)
            note = ""
            workers = [(old, new) for k, old, new in changes if k == "data.num_workers"]
            if workers and all(isinstance(v, int) for v in workers[0]) and changes_batches("data.num_workers", *workers[0]):
                # Each loader worker streams its own share of the shards with its own shuffle: the batch
                # sequence follows the worker count (0 and 1 read alike), as it follows the seed.
                note = (". data.num_workers decides which samples each batch holds (every loader worker reads its "
                        "own share of the shards), so from here on the batches are not those of an uninterrupted "
                        "run with either count; resume with the old count to continue the same sequence")
            accum = [(old, new) for k, old, new in changes if k == "train.grad_accum"]
            if accum and "step" in state:
                # The position inside an epoch is counted in steps: step x grad_accum micro-batches of
                # the new count are skipped, not the micro-batches the saved run read.
                (old, new), step = accum[0], int(state["step"])
                note += (f". train.grad_accum sets the micro-batches a step reads: the resumed epoch skips its "
                         f"first {new} x (steps into the epoch) of them, where the saved run had read {old} x, so "
                         f"samples are {'skipped' if new > old else 'read again'} relative to it")
            spe = [(old, new) for k, old, new in changes if k == "train.steps_per_epoch"]
            if spe and all(isinstance(v, int) and v > 0 for v in spe[0]) and "step" in state:
                # The epoch is step // steps_per_epoch: it clocks the contrastive weight's decay (a1, l1 x
                # 0.99 per epoch), so a new count moves it at once, past steps and all.
                (old, new), step = spe[0], int(state["step"])
                note += (f". train.steps_per_epoch counts the epochs that clock the a1/l1 decay and the run's "
                         f"length (train.epochs x steps_per_epoch): at step {step} the run is now in epoch "
                         f"{step // new}, not {step // old}")
            self._warn_once(f"resuming {path} with {len(shown)} changed setting(s): " + "; ".join(shown) + note,
                            RuntimeWarning, stacklevel=4)

    def _check_resumed_weights(self, path: Path, state: dict[str, Any]) -> None:
        """Name the weights read besides the run's own (KT's teachers) whose file changed since the
        checkpoint, under the same setting or not: the run goes on learning from the new ones."""
        if "weights_sha256" not in state:
            self._warn_unrecorded_weights(path)
            return
        saved = state.get("weights_sha256") or {}
        now = self.stage.weights_identity() if saved else {}
        changed = [f"{k}: weights sha256 {saved[k][:12]} -> {now[k][:12]}" for k in sorted(saved)
                   if k in now and now[k] != saved[k]]
        if changed:
            self.resumed_changes.extend(changed)
            warnings.warn(f"resuming {path}: {'; '.join(changed)}. These are not the weights the checkpoint "
                          f"was trained with (a file replaced under the same path, e.g. a retrained teacher): the run "
                          f"goes on learning from the new ones; to continue it as it was, put the old file back",
                          RuntimeWarning, stacklevel=4)

    def _warn_unrecorded_weights(self, path: Path) -> None:
        """A checkpoint of a uniremoval older than the weights record: nothing to compare the stage's
        other weights (KT's teachers) with. Say so, naming the files modified after the checkpoint
        was written (a retrained teacher put in place since), rather than resuming silently."""
        now = self.stage.weights_identity()
        if not now:
            return
        written = (path / "state.pt").stat().st_mtime
        newer, unknown = [], 0
        for key in sorted(now):
            value: Any = self.cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
            file = Path(str(value)) if value is not None and "://" not in str(value) else None
            if file is None or not file.is_file():
                unknown += 1  # a runs:/ URI, or a setting this walk does not find: no file time to read
            elif file.stat().st_mtime > written:
                newer.append(f"{key} ({file})")
        if newer:
            self.resumed_changes.append("modified since the checkpoint: " + ", ".join(newer))
        warnings.warn(
            f"resuming {path}: it was written by an older uniremoval that did not record the sha256 of "
            f"{', '.join(sorted(now))}, so whether they are still the weights it was trained with cannot be "
            f"checked" + (f"; modified after it was written: {', '.join(newer)}. If that is another teacher, "
                          f"the run goes on learning from it: put the old file back, or start a new run (another "
                          f"name) from its weights with model.init={path}/{self.stage.trainable[0]}.safetensors"
                          if newer else " (none was modified after it was written)" if not unknown else "") +
            ". Checkpoints written from now on record them", RuntimeWarning, stacklevel=4)

    # ---------------------------------------------------------------- signals, agreement, misc
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        if not self.handle_signals or threading_is_not_main():
            return

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True
            self._stop_signal = self._stop_signal or signum

        def interrupt(signum: int, frame: Any) -> None:
            request_stop(signum, frame)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            if self.accelerator.is_main_process:
                # os.write, not print: the handler may interrupt a write to stderr (the progress bar's),
                # and a buffered write from inside it would raise "reentrant call".
                with contextlib.suppress(OSError, ValueError):
                    os.write(sys.stderr.fileno(), b"\nCtrl-C: a checkpoint is written when the current step ends, "
                             b"then the run stops; Ctrl-C again to stop at once (losing the steps since the last "
                             b"checkpoint)\n")

        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, request_stop)
        self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def reduce(self, tensor: Tensor, op: Literal["sum", "max"]) -> Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return out

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (one process: the flag, no device round trip)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.reduce(t, "max").item() > 0)

    def _agree_update(self, nonfinite: bool) -> bool:
        """Whether any rank saw a non-finite loss (every rank then skips the update). The same
        collective carries the stop request (SIGTERM/SIGUSR1): with several processes a step costs
        one agreement, not a second all-reduce and host wait at its end (`_stop_agreed`)."""
        if self.accelerator.num_processes == 1:
            return nonfinite
        t = torch.tensor([float(nonfinite), float(self._stop_requested)], device=self.accelerator.device)
        bad, stop = self.reduce(t, "max").tolist()
        self._stop_seen = self._stop_seen or stop > 0
        self._agreed_at = self.step
        return bad > 0

    def _stop_agreed(self) -> bool:
        """Whether every rank stops after this step: one process reads its flag; several use what the
        step's update agreed (`_agree_update`; with the device check, what the last step's update
        agreed, read once this step's is queued), or agree now if no update of this step did."""
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        if self._agreed_at != self.step - 1:  # no optimize() in this step (the counter moved after it)
            self._stop_seen = self._stop_seen or self._agree(self._stop_requested)
        return self._stop_seen

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The micro-batches of `epoch` from micro-batch `start` on (this rank's share)."""
        acc = self.accelerator
        return iter(self.stage.train_batches(epoch, start * self.cfg.train.grad_accum, acc.process_index,
                                             acc.num_processes))

    def _next_batch(self, batches: Iterator[dict[str, Any]], epoch: int) -> dict[str, Any]:
        try:
            batch = next(batches)
        except StopIteration:
            need = self.cfg.train.steps_per_epoch * self.cfg.train.grad_accum
            raise DataError(f"the training data of epoch {epoch} ended early (rank {self.accelerator.process_index},"
                            f" step {self.step}); an epoch needs {need} micro-batches (train.steps_per_epoch x "
                            f"train.grad_accum)") from None
        return fast.to_device(batch, self.accelerator.device, self.speed.channels_last)

    def _progress(self, total: int) -> Any:
        """A bar on a terminal; in a log, a line at each train.log_every step with the window's losses."""
        from uniremoval.progress import progress_bar

        return progress_bar(total, self.cfg.name, "step", initial=self.step,
                            disable=not self.accelerator.is_main_process, every_s=None, on_postfix=True,
                            dynamic_ncols=True)

    def _supersede_later_checkpoints(self, path: Path) -> None:
        """Resuming an earlier checkpoint of this run starts another branch from it. The checkpoints after
        it belong to the one left: in place, they were never replaced (a step saved already is kept) and
        the next `--resume auto` continued the left branch. They are moved to checkpoints/superseded-*."""
        later = [p for p in list_checkpoints(self.ckpt_root) if int(STEP_DIR_RE.match(p.name).group(1)) > self.step]
        if later and self.accelerator.is_main_process:
            import time

            aside = self.ckpt_root / f"superseded-at-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for p in later:
                os.replace(p, aside / p.name)
            fsync_dir(self.ckpt_root)
            best_step = -1
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                best_step = int(json.loads((self.run_dir / "best.json").read_text())["step"])
            best = (f"; best.* (step {best_step}) is from those steps too, until a validation of this branch does "
                    f"better" if best_step > self.step else "")
            self._print(f"resuming {path}, an earlier checkpoint of this run: its {len(later)} later checkpoint(s) "
                        f"({', '.join(p.name for p in later)}) belong to the steps trained after it, so they are "
                        f"moved to {aside} (--resume auto continues this branch; delete that folder when it is "
                        f"not needed){best}")
        self.accelerator.wait_for_everyone()

    def _warn_once(self, message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
        """A warning every rank would give alike (the config and the checkpoint are the same on every
        rank): given by the main process only (8 GPUs printed it 8 times)."""
        if self.accelerator.is_main_process:
            warnings.warn(message, category, stacklevel=stacklevel + 1)

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- helpers


def deepspeed_requested() -> bool:
    """True under `accelerate launch --config_file launch/deepspeed_*.yaml` (the env it sets). Only
    "true", as accelerate reads it: a "1" would run as DDP, so DA must not refuse it as DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cfg: StageBase) -> Any:
    """Accelerator for this config: CPU (gloo) when there is no CUDA or train.cpu is set.

    Under `accelerate launch` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED=true) the plugin
    comes from the launcher; on CPU that needs the gloo backend and no `cpu=True` (which would
    silently drop DeepSpeed).
    """
    from accelerate.utils import InitProcessGroupKwargs

    cpu = cfg.train.cpu or not torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if cpu and mp == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    if deepspeed_requested():
        if mp == "fp16":
            raise ConfigError("train.mixed_precision=fp16 is not supported under DeepSpeed (its fp16 engine casts "
                              "the student to half, the frozen teachers and VGG-19 stay fp32); use bf16 or no, "
                              "or a DDP launch config (launch/multi_gpu.yaml)")
        # A launch config's deepspeed_config.gradient_accumulation_steps reaches accelerate as this
        # variable, which overrides the argument below: refuse a mismatch rather than step more often.
        env_gas = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if env_gas not in (None, "", "auto") and int(env_gas) != cfg.train.grad_accum:
            raise ConfigError(f"the accelerate launch config sets gradient_accumulation_steps={env_gas} "
                              f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS), the stage config train.grad_accum="
                              f"{cfg.train.grad_accum}: set them equal, or drop it from the launch config's "
                              f"deepspeed_config (the trainer then follows train.grad_accum)")
        handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu else []
        # bf16 is the trainer's autocast (Trainer._autocast), not DeepSpeed's bf16 engine, which would
        # convert the student's weights to bf16 and fail on its fp32 inputs.
        return _accelerator(cfg, mixed_precision="no", gradient_accumulation_steps=cfg.train.grad_accum,
                            kwargs_handlers=handlers)
    handlers = []
    if cfg.train.find_unused_parameters:
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return _accelerator(cfg, cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=cfg.train.grad_accum,
                        kwargs_handlers=handlers)


def _accelerator(cfg: StageBase, **kwargs: Any) -> Any:
    from accelerate import Accelerator

    try:
        return Accelerator(**kwargs)
    except ValueError as exc:  # accelerate keeps one state per process (a notebook's second run)
        if "already been initialized" not in str(exc):
            raise
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision} / train.cpu={cfg.train.cpu}: an "
                          f"earlier run in this Python process set accelerate up otherwise, and accelerate keeps one "
                          f"setting per process; run each stage in a process of its own (as the CLI does), or call "
                          f"accelerate.state.AcceleratorState._reset_state(True) between runs") from exc


@contextlib.contextmanager
def unused_parameters_named(searched: bool) -> Iterator[None]:
    """DDP's error for a model that left parameters out of the last step's loss (raised at the next
    step, on every rank, as a RuntimeError with torch's advice to pass an argument no config reaches)
    becomes one that names the setting (`searched`: it is on already)."""
    try:
        yield
    except RuntimeError as exc:
        if "Expected to have finished reduction in the prior iteration" not in str(exc):
            raise
        if searched:  # DDP finds the parameters no output reaches, not those of an output the loss leaves out
            raise ConfigError("the model left some of its parameters out of a step's loss although "
                              "train.find_unused_parameters is true: an output of the forward that the loss "
                              "does not use holds them; leave it out of the forward's outputs, or use it") from exc
        raise ConfigError("the model left some of its parameters out of a step's loss, which DDP does not allow "
                          "by default (an architecture's branch used only with return_feature=True, say): use "
                          "every parameter in each forward, or set train.find_unused_parameters=true (DDP then "
                          "looks for them every step, which costs time)") from exc


def progress_terms(keys: Sequence[str], limit: int = 4) -> list[str]:
    """The loss terms the progress bar shows: the totals first (KT's `total`, DA's `total` and
    `d_total`), then the others in name order, at most `limit`."""
    totals = [k for k in keys if k == "total" or k.endswith("_total")]
    return (sorted(totals, key=lambda k: (k != "total", k)) + [k for k in keys if k not in totals])[:limit]


def zero_stage(accelerator: Any) -> int:
    """The DeepSpeed ZeRO stage of an Accelerator; 0 without DeepSpeed."""
    if not str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        return 0
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def threading_is_not_main() -> bool:
    import threading

    return threading.current_thread() is not threading.main_thread()

