"""Domain adaptation (stage 2): the KT student adapts to real degraded photos, without pairs.

Algorithm box, per step:

    x_r        <- a batch of real degraded crops (every type in every batch)
    x_c        <- a batch of real clear crops (X_C: `data.clear`), independent of x_r
    G_S(x_r), G_S(x_c), features   <- ONE student pass on [x_r; x_c] (one DDP forward per backward)
    l1         <- l1_0 * l1_decay ** epoch
    G step:  L_da = L_gan(D(G_S(x_r))) + l2 |G_S(x_c) - x_c|_1 + l3 (L_eig + l1 L_efg)
             (D frozen during this update; uniremoval.losses.mgcl.DALoss.generator_terms)
    D step:  D on [x_c; G_S(x_r).detach()] (one pass), real clear vs restored, LSGAN by default
    log train/gan, idt, eig, efg, total (generator) and d_real, d_fake, d_total (discriminator)

Validation (every `train.val_every` steps, all ranks): no-reference IQA (`val_iqa.metrics`, PIQE
by default; lower is better) of the restored held-out real images of each `data.val` set, logged
as `val/<dataset>/<metric>`, with the unrestored inputs' score once as `val/<dataset>/<metric>_input`
for reference (once per MLflow run: each checkpoint keeps which sets' it holds, so a `--resume auto`
does not log it again), and `val/mean/<first metric>` (the best checkpoint's criterion).

The models are named "generator" (the student; exported as `<run_dir>/last` and `best`, what
evaluation and restoration load) and "discriminator" (`discriminator-last`); each has its own
optimiser (`optim`, `optim_d`) and LR schedule. With `loss.use_gan: false` no discriminator is built.

DeepSpeed: this stage trains two networks, and accelerate's DeepSpeed integration makes one engine
per `prepare` call with one config; training two engines at once is, per accelerate's docs, an
experimental API with no support for two trained models sharing one plugin. The stage therefore
refuses DeepSpeed up front and names the launch config to use (DDP: launch/multi_gpu.yaml). The
student is ~20M parameters at the deblur width: DDP fits on any training GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from uniremoval.config import KT_SWITCHES, DAStage, ablation_flags
from uniremoval.errors import ConfigError
from uniremoval.stages.kt import build_phi, build_student, weights_run_id, weights_sha256
from uniremoval.stages.teachers import pool_feature, restore_with_feature
from uniremoval.stages.trainer import Stage, TrainContext, deepspeed_requested, skip_batches
from uniremoval.stages.validation import warn_left_out
from uniremoval.tracking import VAL_MEAN, val_metric

DEEPSPEED_REFUSAL = (
    "the DA stage trains two models (student and discriminator), which accelerate's DeepSpeed integration "
    "does not support in one run; launch it with DDP instead: accelerate launch --config_file "
    "launch/multi_gpu.yaml -m uniremoval train da --config ... (or launch/single_gpu.yaml / launch/multi_node.yaml)"
)


def refuse_deepspeed() -> None:
    if deepspeed_requested():
        raise ConfigError(DEEPSPEED_REFUSAL)


def make_da_loss(cfg: DAStage, phi: nn.Module | None) -> nn.Module:
    from uniremoval.losses.mgcl import DALoss

    lc = cfg.loss
    return DALoss(phi, cfg.features.layer_weights, l2=lc.l2, l3=lc.l3, tau=lc.tau, gan=lc.gan, use_gan=lc.use_gan,
                  use_idt=lc.use_idt, use_eicl=lc.use_eicl, use_efcl=lc.use_efcl, negatives_grad=lc.negatives_grad,
                  positives_grad=lc.positives_grad)


def build_discriminator(cfg: DAStage) -> nn.Module:
    from uniremoval.models import build_model

    d = cfg.discriminator
    return build_model("patch_discriminator", base_channels=d.base_channels, n_layers=d.n_layers, norm=d.norm,
                       spectral_norm=d.spectral_norm)


class DomainAdaptation(Stage):
    """The DA stage on the shared trainer (see the module docstring)."""

    stage = "da"
    compiled_frozen = ("phi",)  # VGG-19 on the crops of every step
    also_reads = "as many real clear images (data.clear) beside them"

    def __init__(self, cfg: DAStage) -> None:
        refuse_deepspeed()  # before the trainer builds a DeepSpeed accelerator for it
        super().__init__(cfg)
        self.cfg: DAStage = cfg
        self.degradations = list(cfg.data.degradations)
        self.cell = cfg.data.feature_cell
        from uniremoval.data.pipelines import CropPadding

        self.crop_padding = CropPadding()  # images smaller than the crop: counted, warned once a run
        # Without the GAN term D gets no signal worth training: it is then not built at all.
        self.trainable = ("generator", "discriminator") if cfg.loss.use_gan else ("generator",)
        metric = cfg.val_iqa.metrics[0] if cfg.val_iqa.metrics else None
        self.best_metric = (val_metric(VAL_MEAN, metric), "min") if metric else None
        self.loss_fn: nn.Module | None = None
        self._iqa: Any = None
        # val set name -> fingerprint of what its inputs' scores were scored for (see _input_fingerprint),
        # in this process; and of those that reached the MLflow run (tracking on), which each checkpoint
        # keeps (state_dict) for a resume that logs on into the same MLflow run
        self._inputs_scored: dict[str, str] = {}
        self._inputs_logged: dict[str, str] = {}
        self._init_ablation: dict[str, bool] | None = None
        if not cfg.model.init:
            raise ConfigError("the DA stage starts from the KT student: set model.init to its weights "
                              "(e.g. model.init=outputs/kt/last.safetensors)")
        if not cfg.data.train:
            raise ConfigError("data.train is empty: list the real degraded shards of every degradation type")
        if not cfg.data.clear:
            raise ConfigError("data.clear is empty: list shards of real clear photos (X_C), e.g. the ground "
                              "truths of real paired sets")
        for src in cfg.data.train:
            if src.degradation is None:
                raise ConfigError(f"data.train source {src.name!r} needs a degradation (one of {self.degradations})")
        # The scorer is built at the first validation, val_every steps in: a missing parameter file
        # (BRISQUE, NIQE), or a truncated/foreign one, is named now, before anything starts (read as
        # the scorer reads it, into a scratch folder), not thousands of steps in.
        import tempfile

        from uniremoval.eval.iqa_params import find_param_file, needs_params, pyiqa_model_path

        with tempfile.TemporaryDirectory() as tmp:
            for metric in cfg.val_iqa.metrics:
                if needs_params(metric):
                    pyiqa_model_path(metric, find_param_file(metric), tmp)

    def build_models(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        models: dict[str, nn.Module] = {"generator": build_student(cfg, self._check_init)}
        if cfg.loss.use_gan:
            models["discriminator"] = build_discriminator(cfg)
        phi = build_phi(cfg) if cfg.loss.use_eicl else None
        if phi is not None:
            models["phi"] = phi
        self.loss_fn = make_da_loss(cfg, phi)
        return models

    def _check_init(self, meta: dict[str, Any]) -> None:
        """model.init must restore every type DA adapts: a teacher (one type) or a student of other types
        would start the all-in-one adaptation from a model that never learnt the others, silently."""
        stage = meta.get("stage")
        trained = meta.get("degradations") or ([meta["degradation"]] if meta.get("degradation") else None)
        if stage is None or trained is None:  # an official .pth, or weights without a record: trusted
            return
        lacking = [d for d in self.degradations if d not in trained]
        if lacking:
            what = f"the {trained[0]!r} teacher" if stage == "teacher" else f"a {stage} student of {trained}"
            raise ConfigError(f"model.init {self.cfg.model.init} is {what}; DA adapts a student of every type in "
                              f"data.degradations {self.degradations} (it lacks {lacking}): give the KT student "
                              f"(e.g. model.init=outputs/kt/last.safetensors)")

    def train_batches(self, epoch: int, start: int, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        from uniremoval.data.pipelines import da_loader
        from uniremoval.data.transforms import Aug

        cfg, d = self.cfg, self.cfg.data
        aug = Aug(**d.augment.model_dump())
        loader = da_loader(
            [(s.name, s.shards, s.degradation, s.weight) for s in d.train],
            [(s.name, s.shards, "clear", s.weight) for s in d.clear],
            self.degradations, d.batch_size, d.crop_size, cfg.train.steps_per_epoch * cfg.train.grad_accum,
            d.num_workers, cfg.train.seed, rank, world_size, bad_samples=d.bad_samples, augment=aug,
            shuffle_buffer=d.shuffle_buffer, shuffle_buffer_mb=d.shuffle_buffer_mb, pin_memory=d.pin_memory, padding=self.crop_padding,
        )
        loader.set_epoch(epoch)
        return skip_batches(loader, start)

    def l1(self, epoch: int) -> float:
        from uniremoval.losses import decayed_weight

        return decayed_weight(self.cfg.loss.l1, self.cfg.loss.l1_decay, epoch)

    def training_step(self, batch: dict[str, Any], ctx: TrainContext) -> dict[str, Tensor | float]:
        assert self.loss_fn is not None
        lc = self.cfg.loss
        xr, xc = batch["degraded"]["input"], batch["clear"]["input"]
        n = xr.shape[0]
        # One generator pass over both batches: DDP allows one forward per backward.
        restored, feat = restore_with_feature(ctx.models["generator"], torch.cat([xr, xc]),
                                              self.cfg.model.input_range)
        restored_real, restored_clear = restored[:n], restored[n:]
        feat_real = feat_clear = None
        if lc.use_efcl:
            pooled = pool_feature(feat, self.cell)
            feat_real, feat_clear = pooled[:n], pooled[n:]
        l1 = self.l1(ctx.epoch)

        d_fake_for_g = None
        # D's update below scores [clear; restored] in one pass. With batch norm the batch's statistics
        # are part of D's function, so G is scored in that same company: the restored half of a pass
        # over [clear; restored] (per-sample norms give the same logits either way, without the clear half).
        mixed = self.cfg.discriminator.norm == "batch"
        if lc.use_gan:
            # D is fixed during G's update: no grads into it, and no DDP wrapper (its own update
            # below is the one that goes through DDP).
            ctx.requires_grad("discriminator", False)
            d = ctx.unwrap("discriminator")
            d_fake_for_g = d(torch.cat([xc, restored_real]))[xc.shape[0]:] if mixed else d(restored_real)
        try:
            g_terms = self.loss_fn.generator_terms(
                restored_real, xr, restored_clear, xc, feat_real, feat_real, feat_clear, d_fake_for_g, l1=l1)
            ctx.optimize("generator", g_terms["total"], g_terms)
        finally:
            if lc.use_gan:
                ctx.requires_grad("discriminator", True)
        logged: dict[str, Tensor | float] = {k: v.detach() for k, v in g_terms.items()}

        if lc.use_gan:
            # One D pass over [real clear; restored (detached)]: real vs fake.
            logits = ctx.models["discriminator"](torch.cat([xc, restored_real.detach()]))
            d_terms = self.loss_fn.discriminator_terms(logits[: xc.shape[0]], logits[xc.shape[0]:])
            ctx.optimize("discriminator", d_terms["total"], d_terms)
            logged.update({"d_real": d_terms["d_real"].detach(), "d_fake": d_terms["d_fake"].detach(),
                           "d_total": d_terms["total"].detach()})
        if lc.use_efcl:
            logged["weight_l1"] = l1
        if ctx.want_images:
            ctx.log_images("train", [xr[:4], restored_real[:4].detach(), xc[:4]])
        return logged

    # ------------------------------------------------------------------ validation
    def _input_fingerprint(self, src: Any) -> str:
        """What a set's input scores depend on: its images (shards, how many) and the metrics."""
        import hashlib
        import json

        blob = json.dumps([list(src.shards), self._val_cap(src), list(self.cfg.val_iqa.metrics)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _val_cap(self, src: Any) -> int:
        return min(src.max_samples or self.cfg.val_iqa.max_images, self.cfg.val_iqa.max_images)

    def _scorer(self, device: torch.device) -> Any:
        if self._iqa is None:
            from uniremoval.eval.metrics import Scorer

            self._iqa = Scorer(list(self.cfg.val_iqa.metrics), device=str(device))
        return self._iqa

    def validate(self, ctx: TrainContext) -> dict[str, float]:
        from uniremoval.data.pipelines import eval_samples
        from uniremoval.data.read_ahead import read_ahead
        from uniremoval.eval.metrics import METRICS
        from uniremoval.eval.restore import restore_tensor
        from uniremoval.stages.validation import val_progress

        names = list(self.cfg.val_iqa.metrics)
        if not self.cfg.data.val or not names:
            return {}
        # The smallest side every metric accepts (PIQE works on 16-px blocks, NIQE on 96): a smaller
        # real photo (a crop, a thumbnail) is left out, said below, not a crash at the first validation.
        needs = max(names, key=lambda m: METRICS[m].min_size)
        least = METRICS[needs].min_size
        scorer = self._scorer(ctx.device)
        model = ctx.unwrap("generator")
        out: dict[str, float] = {}
        firsts: list[float] = []
        for src in self.cfg.data.val:
            cap = self._val_cap(src)  # the set's first `cap` images, the same on any number of processes
            fingerprint = self._input_fingerprint(src)
            # the inputs' scores never change: logged once per MLflow run (a resume of it included)
            with_input = self._inputs_scored.get(src.name) != fingerprint
            keys = names + ([f"{m}_input" for m in names] if with_input else [])
            # Per score: its sum and how many images it is defined for (NIQE/BRISQUE of a flat image
            # is NaN, as in `uniremoval eval`: left out of the mean, not poisoning it).
            sums = {k: 0.0 for k in keys} | {f"{k}#n": 0.0 for k in keys} | {"n": 0.0, "bad": 0.0, "small": 0.0}
            bad_example, small_key = None, None
            stream = eval_samples(src.shards, ctx.rank, ctx.world_size, first=cap)
            # rank 0's share (the largest), as the paired validations show theirs
            bar = val_progress(ctx, src.name, stream, cap)
            # (read ahead: the next image decodes while this one is restored and scored)
            for item in read_ahead(stream):
                bar.update(1)
                if "error" in item:  # left out, counted and said below
                    sums["bad"] += 1
                    bad_example = bad_example or item
                    continue
                if min(item["input"].shape[-2:]) < least:
                    sums["small"] += 1
                    small_key = small_key or item.get("key")
                    continue
                x01 = ((item["input"] + 1) * 0.5).unsqueeze(0).to(ctx.device)
                y01 = restore_tensor(model, x01, self.cfg.model.input_range)
                scores = {m: v[0] for m, v in scorer.score(y01).items()}
                if with_input:
                    scores |= {f"{m}_input": v[0] for m, v in scorer.score(x01).items()}
                for k, v in scores.items():
                    if not math.isnan(v):
                        sums[k] += v
                        sums[f"{k}#n"] += 1
                sums["n"] += 1
            bar.close()
            total = ctx.all_sum(sums)
            if ctx.rank == 0:
                warn_left_out(src, total, bad_example)
                if total["small"]:
                    eg = f", e.g. {small_key}" if small_key else ""
                    warnings.warn(f"validation set {src.name} ({src.shards}): {int(total['small'])} image(s) smaller "
                                  f"than {least}x{least} pixels ({needs}'s least) left out of its scores{eg}; rebuild "
                                  "the set without them, or drop the metric", RuntimeWarning, stacklevel=2)
            if total["n"] == 0:
                warnings.warn(f"validation set {src.name} gave no usable images", RuntimeWarning, stacklevel=2)
                continue
            for k in keys:
                if total[f"{k}#n"] < total["n"] and ctx.rank == 0:
                    warnings.warn(f"validation set {src.name}: {k} is undefined for {int(total['n'] - total[f'{k}#n'])} "
                                  f"of {int(total['n'])} image(s) (flat images); averaged over the others",
                                  RuntimeWarning, stacklevel=2)
                out[val_metric(src.name, k)] = total[k] / total[f"{k}#n"] if total[f"{k}#n"] else math.nan
            if with_input:
                self._inputs_scored[src.name] = fingerprint
                if self.cfg.tracking.enabled:  # a tracking-off resume logs nothing into the run it continues
                    self._inputs_logged[src.name] = fingerprint
            firsts.append(out[val_metric(src.name, names[0])])
        if firsts:
            out[val_metric(VAL_MEAN, names[0])] = sum(firsts) / len(firsts)
        return out

    def extra_tags(self) -> dict[str, str]:
        tags = {"gan": self.cfg.loss.gan, "init": str(self.cfg.model.init)}
        init = weights_sha256(self.cfg.model.init)  # the path's file may be replaced later (a resumed KT run)
        if init:
            tags["init_sha256"] = init
        if run_id := weights_run_id(self.cfg.model.init):  # the KT run it adapts
            tags["init_run_id"] = run_id
        if self.cfg.loss.use_eicl:
            tags["vgg_weights"] = self.cfg.features.weights
        from uniremoval.tracking import ablation_tags

        tags.update(ablation_tags(self.init_ablation()))
        return tags

    def init_ablation(self) -> dict[str, bool]:
        """The KT switches (use_icl, use_fcl) of the weights this run adapts, from their JSON: part of
        the adapted model's ablation row (Table V's rows are DA on top of a KT row), so the report does
        not show them blank. Empty for an init without them (a teacher, official weights)."""
        if self._init_ablation is None:
            from uniremoval.models.checkpoint import recorded_meta

            saved = recorded_meta(self.cfg.model.init).get("ablation") if self.cfg.model.init else None
            saved = saved if isinstance(saved, dict) else {}
            self._init_ablation = {k: saved[k] for k in KT_SWITCHES if isinstance(saved.get(k), bool)}
        return self._init_ablation

    def export_meta(self, name: str) -> dict[str, Any]:
        if name == "generator":
            meta: dict[str, Any] = {"input_range": self.cfg.model.input_range, "degradations": self.degradations}
            if kt_flags := self.init_ablation():
                meta["ablation"] = {**kt_flags, **ablation_flags(self.cfg)}
            return meta
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"val_inputs_logged": dict(self._inputs_logged)}

    def load_state_dict(self, state: dict[str, Any], same_mlflow_run: bool) -> None:
        # A new MLflow run (another run's checkpoint continued, or tracking was off) holds no input score.
        logged = state.get("val_inputs_logged")
        if same_mlflow_run and isinstance(logged, dict):
            self._inputs_logged = {str(k): str(v) for k, v in logged.items()}
            self._inputs_scored = dict(self._inputs_logged)
