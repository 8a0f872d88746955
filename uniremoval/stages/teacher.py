"""Teacher stage: supervised MPRNet on one degradation's synthetic pairs.

Algorithm box (per optimiser step):
    x, y   <- a batch of random crops (degraded, clean) of this degradation's shards
    outs   <- G_T(x)                                # MPRNet's three stage outputs
    L      <- sum_s Charbonnier(outs_s, y) + 0.05 * sum_s Edge(outs_s, y)
    update G_T with Adam; LR: MPRNet's warmup + cosine preset (configs/teacher/mprnet_recipe.yaml)
    every val_every steps: PSNR / SSIM on the val split (stages/validation.py), every rank its share;
    the best PSNR (first val set) is kept as best.safetensors, the end as last.safetensors.

Images are [-1, 1] in the batches; the network sees `model.input_range` ([-1, 1] by default, or
[0, 1] when fine-tuning an official checkpoint), and that range is written with the weights so
the cache and KT stages feed the teacher what it was trained on. An official MPRNet `.pth` can
replace a trained teacher in any later config (teachers.checkpoints: {blur: model_deblurring.pth};
MPRNet ships no dehazing model, so the haze teacher is trained).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from uniremoval.config import TeacherStage
from uniremoval.errors import ConfigError
from uniremoval.models import checked_outputs
from uniremoval.models.ranges import from_model_range, recorded_range, to_model_range
from uniremoval.stages.trainer import (
    Stage,
    TrainContext,
    skip_batches,
    zero_stage,
)
from uniremoval.stages.validation import validate_paired
from uniremoval.tracking import val_metric


class TeacherTraining(Stage):
    stage = "teacher"
    trainable = ("teacher",)

    def __init__(self, cfg: TeacherStage) -> None:
        super().__init__(cfg)
        deg = cfg.degradation
        self.degradation = deg
        self.sources = [s for s in cfg.data.train if s.degradation in (None, deg)]
        if not self.sources:
            names = [f"{s.name} ({s.degradation})" for s in cfg.data.train] or ["none"]
            raise ConfigError(f"teacher for '{deg}': data.train has no source of that degradation (found: "
                              f"{', '.join(names)}); add one with degradation: {deg}")
        self.val_sources = [s for s in cfg.data.val if s.degradation in (None, deg)]
        self.best_metric = (val_metric(self.val_sources[0].name, "psnr"), "max") if self.val_sources else None
        self.input_range = cfg.model.input_range
        from uniremoval.data.pipelines import CropPadding

        self.crop_padding = CropPadding()  # images smaller than the crop: counted, warned once a run
        self._edge: nn.Module | None = None

    # ------------------------------------------------------------------ models and data
    def build_models(self) -> dict[str, nn.Module]:
        from uniremoval.models import build_configured

        m = self.cfg.model
        if m.init:
            from uniremoval.models.checkpoint import load_checkpoint

            # model.preset is checked against the file, as KT's student does: a preset taken silently
            # from the file left the run training (and exporting) another architecture than its config
            # logs, which the cache and KT then refuse under teachers.preset, a whole run later.
            model, meta = load_checkpoint(m.init, arch=m.arch, preset=m.preset, preset_key="model.preset",
                                          overrides=m.overrides)
            saved = recorded_range(meta)
            if saved != self.input_range:  # fine-tuning must feed the range the weights were trained on
                raise ConfigError(f"model.init {m.init} was trained on {saved!r} images but model.input_range is "
                                  f"{self.input_range!r}; set model.input_range={saved}")
        else:
            model = build_configured(m)
        return {"teacher": model}  # the trainer applies model.channels_last (not under DeepSpeed)

    def train_batches(self, epoch: int, start: int, rank: int, world_size: int):
        from uniremoval.data.pipelines import kt_loader
        from uniremoval.data.transforms import Aug

        c = self.cfg
        loader = kt_loader(
            [(s.name, s.shards, self.degradation, s.weight) for s in self.sources], [self.degradation],
            batch_size=c.data.batch_size, crop_size=c.data.crop_size,
            steps_per_epoch=c.train.steps_per_epoch * c.train.grad_accum, num_workers=c.data.num_workers,
            seed=c.train.seed, rank=rank, world_size=world_size, cell=c.data.feature_cell,
            bad_samples=c.data.bad_samples, require=("target",), augment=Aug(**c.data.augment.model_dump()),
            shuffle_buffer=c.data.shuffle_buffer, shuffle_buffer_mb=c.data.shuffle_buffer_mb,
            pin_memory=c.data.pin_memory and torch.cuda.is_available(), padding=self.crop_padding)
        loader.set_epoch(epoch)  # the epoch seeds shard order, shuffling and crops: resumable
        return skip_batches(loader, start)

    def export_meta(self, name: str) -> dict[str, Any]:
        return {"input_range": self.input_range, "degradation": self.degradation}

    # ------------------------------------------------------------------ one step
    def training_step(self, batch: dict[str, Any], ctx: TrainContext) -> dict[str, Tensor]:
        from uniremoval.losses.pixel import EdgeLoss, mprnet_stage_loss

        if self._edge is None:
            self._edge = EdgeLoss(self.cfg.loss.charbonnier_eps).to(ctx.device)
        x = to_model_range(batch["input"], self.input_range)
        y = to_model_range(batch["target"], self.input_range)
        outs, _ = checked_outputs(ctx.models["teacher"](x), x)
        terms = mprnet_stage_loss(outs, y, edge_weight=self.cfg.loss.edge_weight,
                                  eps=self.cfg.loss.charbonnier_eps, edge_loss=self._edge)
        ctx.optimize("teacher", terms["total"], terms)
        if ctx.want_images:
            ctx.log_images("train", [batch["input"], from_model_range(outs[0].detach(), self.input_range),
                                     batch["target"]])
        return terms

    # ------------------------------------------------------------------ validation
    def validate(self, ctx: TrainContext) -> dict[str, float]:
        # scored as the KT student is (and as `uniremoval eval` scores), so their val/* compare; under
        # ZeRO-3 the parameters are sharded: forward through the engine, every rank in lockstep
        lockstep = zero_stage(ctx.accelerator) == 3
        model = ctx.models["teacher"] if lockstep else ctx.unwrap("teacher")
        return validate_paired(ctx, model, self.input_range, self.val_sources, lockstep)
