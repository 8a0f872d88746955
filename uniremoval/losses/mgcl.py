"""MGCL (knowledge transfer) and EX-MGCL (domain adaptation): the paper's multi-granularity losses.

Both combine an image-level term (the contrastive loss on phi = VGG-19 feature maps, summed over
layers with per-layer weights) and a feature-level term (the contrastive loss on the student's
intermediate feature, flattened per sample; for feature maps phi is the identity).

Choices where the paper is silent (each is a constructor argument):

* ``negatives_grad=False`` (default): negatives are fixed references, detached from the graph.
  The image-level negatives are data (degraded inputs) anyway; the feature-level ones are the
  student's own features of *other* samples, and letting the loss also move them would make every
  sample's feature receive up to N-1 extra repulsive gradients, each scaled by 1/tau = 1e6 at the
  paper's tau. The paper describes negatives as references to push away from, so they are detached.
  ``True`` lets gradients flow into them (through phi at image level).
* Positives: in KT they are the frozen teacher's output/feature and are always detached. In DA
  they are the student's own outputs/features on clear images; ``positives_grad=False`` (default)
  detaches them, treating them as targets (the identity loss already trains G_S on clear images;
  a gradient through them would pull restored clear images towards restored degraded ones).
* ``feature_negatives`` (KT): "all" = features of every other sample in the batch; "other_types"
  = only samples of a different degradation type (the paper's "features with different
  degradation types"). The anchor itself is never a negative. A row left with no negatives
  contributes 0 (see ``contrastive_loss``).
* Image-level negatives are the whole batch of degraded inputs, the anchor's own input included
  (it is the clearest example of what the output must not look like).
* In DA, ``feat_degraded`` is the student's intermediate feature of each real degraded input,
  row i belonging to the same sample as anchor ``feat_restored_real[i]``. A stage normally gets
  both from one student pass and passes the same tensor twice; the anchor's own row is therefore
  always excluded from its negatives, exactly as in KT.

"The batch" is the batch these modules are given: under data-parallel training that is each
process's local batch (negatives are not gathered across processes), so the per-process batch
size sets how many negatives each anchor sees.

With the paper's tau = 1e-6 the contrastive terms are hard-max losses of size up to ~1/tau; the
returned dict keeps every term separately so a stage can log their scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from uniremoval.errors import ConfigError
from uniremoval.losses.contrastive import contrastive_loss, flatten_features
from uniremoval.losses.gan import GAN_KINDS, GanKind, discriminator_parts, generator_loss
from uniremoval.losses.pixel import charbonnier_loss, l1_loss

DEFAULT_LAYER_WEIGHTS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
PIXEL_LOSSES = ("l1", "charbonnier")
FEATURE_NEGATIVES = ("all", "other_types")


def _grad_context(enabled: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if enabled else torch.no_grad()


def _maybe_detach(x: Tensor, keep_grad: bool) -> Tensor:
    return x if keep_grad else x.detach()


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ConfigError(f"contrastive temperature tau must be > 0, got {tau}")


def _phi_maps(phi: nn.Module, images: Tensor, n_layers: int) -> list[Tensor]:
    maps = list(phi(images))
    if len(maps) != n_layers:
        raise ConfigError(
            f"layer_weights has {n_layers} values but the feature extractor phi returned {len(maps)} "
            f"feature maps; give one weight per phi layer"
        )
    return maps


def _check_feature_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{what}: feature shapes {tuple(a.shape)} and {tuple(b.shape)} differ; pool both on the same grid"
        )


def image_level_loss(
    phi: nn.Module,
    layer_weights: Sequence[float],
    anchor_images: Tensor,
    positive_images: Tensor,
    negative_images: Tensor,
    tau: float,
    per_anchor_positive: bool,
    positives_grad: bool,
    negatives_grad: bool,
) -> Tensor:
    """sum_l w_l * contrastive_loss(phi_l(anchor), phi_l(positives), phi_l(negatives)).

    per_anchor_positive=True: positive i belongs to anchor i (P = 1, Eq. 2); False: the whole
    batch of positive images is shared by every anchor (P = batch, Eq. 9). Negatives are always
    the whole batch of negative images, shared.
    """
    n_layers = len(layer_weights)
    anchor_maps = _phi_maps(phi, anchor_images, n_layers)
    if not positives_grad and not negatives_grad and positive_images.shape[1:] == negative_images.shape[1:]:
        # Both are fixed references: one forward of phi on the two batches stacked (per-sample
        # maths, half the kernel launches) instead of one each.
        n = positive_images.shape[0]
        with torch.no_grad():
            both = _phi_maps(phi, torch.cat((positive_images, negative_images)), n_layers)
        pos_maps, neg_maps = [m[:n] for m in both], [m[n:] for m in both]
    else:
        with _grad_context(positives_grad):
            pos_maps = _phi_maps(phi, positive_images, n_layers)
        with _grad_context(negatives_grad):
            neg_maps = _phi_maps(phi, negative_images, n_layers)
    total = anchor_images.new_zeros((), dtype=torch.float32)
    for w, a, p, q in zip(layer_weights, anchor_maps, pos_maps, neg_maps):
        a_flat = flatten_features(a)
        p_flat = flatten_features(_maybe_detach(p, positives_grad))
        q_flat = flatten_features(_maybe_detach(q, negatives_grad))
        positives = p_flat.unsqueeze(1) if per_anchor_positive else p_flat
        total = total + w * contrastive_loss(a_flat, positives, q_flat, tau)
    return total


class KTLoss(nn.Module):
    """L_kt = L_pixel + a2 * (L_ig + a1 * L_fg) for the knowledge-transfer stage.

    Ablation rows: BKT = use_icl=False, use_fcl=False; +ICL = use_fcl=False; +ICL+FCL = both on.
    ``phi`` may be None when use_icl is False. ``phi`` is registered as a submodule (so ``.to``
    moves it); freezing it is the caller's job (VGGFeatures is frozen).
    """

    def __init__(
        self,
        phi: nn.Module | None,
        layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS,
        a2: float = 0.1,
        tau: float = 1e-6,
        pixel: Literal["l1", "charbonnier"] = "l1",
        use_icl: bool = True,
        use_fcl: bool = True,
        negatives_grad: bool = False,
        feature_negatives: Literal["all", "other_types"] = "all",
    ) -> None:
        super().__init__()
        _check_tau(tau)
        if pixel not in PIXEL_LOSSES:
            raise ConfigError(f"unknown pixel loss {pixel!r}; choose one of {', '.join(PIXEL_LOSSES)}")
        if feature_negatives not in FEATURE_NEGATIVES:
            raise ConfigError(
                f"unknown feature_negatives {feature_negatives!r}; choose one of {', '.join(FEATURE_NEGATIVES)}"
            )
        if use_icl and phi is None:
            raise ConfigError("the image-level contrastive term (use_icl) needs a feature extractor phi")
        self.phi = phi
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.a2 = a2
        self.tau = tau
        self.pixel = pixel
        self.use_icl = use_icl
        self.use_fcl = use_fcl
        self.negatives_grad = negatives_grad
        self.feature_negatives = feature_negatives

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor,
        degraded: Tensor,
        student_feat: Tensor | None = None,
        teacher_feat: Tensor | None = None,
        labels: Tensor | None = None,
        a1: float = 0.5,
    ) -> dict[str, Tensor]:
        """Terms of L_kt for one batch.

        Args:
            student_out, teacher_out, degraded: (N, 3, H, W) images in [-1, 1].
            student_feat, teacher_feat: (N, C, h, w) intermediate features pooled on the same grid
                (needed when use_fcl).
            labels: (N,) degradation type ids (needed when feature_negatives="other_types").
            a1: the current (decayed) weight of L_fg.

        Returns:
            {"pixel", "ig" (if use_icl), "fg" (if use_fcl), "total"}.
        """
        teacher_out = teacher_out.detach()  # the teacher is a fixed target
        if self.pixel == "l1":
            pixel = l1_loss(student_out, teacher_out)
        else:
            pixel = charbonnier_loss(student_out, teacher_out)
        terms: dict[str, Tensor] = {"pixel": pixel}
        contrast = pixel.new_zeros(())
        if self.use_icl:
            assert self.phi is not None  # checked in __init__
            ig = image_level_loss(
                self.phi,
                self.layer_weights,
                student_out,
                teacher_out,
                degraded,
                self.tau,
                per_anchor_positive=True,
                positives_grad=False,
                negatives_grad=self.negatives_grad,
            )
            terms["ig"] = ig
            contrast = contrast + ig
        if self.use_fcl:
            fg = self.feature_loss(student_feat, teacher_feat, labels)
            terms["fg"] = fg
            contrast = contrast + a1 * fg
        terms["total"] = pixel + self.a2 * contrast
        return terms

    def feature_loss(
        self, student_feat: Tensor | None, teacher_feat: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """L_fg: anchor = student feature, positive = teacher feature, negatives = other samples' student features."""
        if student_feat is None or teacher_feat is None:
            raise ValueError("the feature-level term (use_fcl) needs student_feat and teacher_feat")
        _check_feature_pair(student_feat, teacher_feat, "L_fg student/teacher")
        anchor = flatten_features(student_feat)
        positive = flatten_features(teacher_feat.detach()).unsqueeze(1)
        negatives = _maybe_detach(anchor, self.negatives_grad)
        n = anchor.shape[0]
        mask = ~torch.eye(n, dtype=torch.bool, device=anchor.device)
        if self.feature_negatives == "other_types":
            if labels is None or labels.shape != (n,):
                raise ValueError(
                    f"feature_negatives='other_types' needs labels of shape ({n},), got "
                    f"{None if labels is None else tuple(labels.shape)}"
                )
            labels = labels.to(anchor.device)
            mask &= labels[:, None] != labels[None, :]
        return contrastive_loss(anchor, positive, negatives, self.tau, mask)


class DALoss(nn.Module):
    """L_da = L_gan + l2 * L_idt + l3 * (L_eig + l1 * L_efg) for the domain-adaptation stage.

    Ablation rows: BDA = use_eicl=False, use_efcl=False; +EICL = use_efcl=False; +EFCL = both on.
    """

    def __init__(
        self,
        phi: nn.Module | None,
        layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS,
        l2: float = 0.1,
        l3: float = 0.1,
        tau: float = 1e-6,
        gan: GanKind = "lsgan",
        use_gan: bool = True,
        use_idt: bool = True,
        use_eicl: bool = True,
        use_efcl: bool = True,
        negatives_grad: bool = False,
        positives_grad: bool = False,
    ) -> None:
        super().__init__()
        _check_tau(tau)
        if gan not in GAN_KINDS:
            raise ConfigError(f"unknown GAN loss {gan!r}; choose one of {', '.join(GAN_KINDS)}")
        if use_eicl and phi is None:
            raise ConfigError(
                "the extended image-level contrastive term (use_eicl) needs a feature extractor phi"
            )
        self.phi = phi
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.l2 = l2
        self.l3 = l3
        self.tau = tau
        self.gan = gan
        self.use_gan = use_gan
        self.use_idt = use_idt
        self.use_eicl = use_eicl
        self.use_efcl = use_efcl
        self.negatives_grad = negatives_grad
        self.positives_grad = positives_grad

    def generator_terms(
        self,
        restored_real: Tensor,
        real_degraded: Tensor,
        restored_clear: Tensor,
        clear: Tensor,
        feat_restored_real: Tensor | None = None,
        feat_degraded: Tensor | None = None,
        feat_restored_clear: Tensor | None = None,
        d_fake_logits: Tensor | None = None,
        l1: float = 0.5,
    ) -> dict[str, Tensor]:
        """Terms of the student's loss for one batch.

        Args:
            restored_real: G_S(x_r), (N, 3, H, W); real_degraded: x_r, (N, 3, H, W).
            restored_clear: G_S(x_c), (M, 3, H', W'); clear: x_c (M may differ from N).
            feat_restored_real: the student's intermediate feature on x_r, (N, C, h, w): the anchors.
            feat_degraded: the student's feature of the real degraded inputs, (N, C, h, w), row i
                of sample i (usually the same tensor as feat_restored_real); negatives are rows j != i.
            feat_restored_clear: the student's feature on x_c, (M, C, h, w): the shared positives.
            d_fake_logits: D_S(G_S(x_r)) (not detached), needed when use_gan.
            l1: the current (decayed) weight of L_efg.

        Returns:
            {"gan", "idt", "eig", "efg" (each only if enabled), "total"}.
        """
        terms: dict[str, Tensor] = {}
        total = restored_real.new_zeros((), dtype=torch.float32)
        if self.use_gan:
            if d_fake_logits is None:
                raise ValueError("the GAN term (use_gan) needs d_fake_logits = D(restored_real)")
            terms["gan"] = generator_loss(d_fake_logits, self.gan)
            total = total + terms["gan"]
        if self.use_idt:
            terms["idt"] = l1_loss(restored_clear, clear)
            total = total + self.l2 * terms["idt"]
        contrast = total.new_zeros(())
        if self.use_eicl:
            assert self.phi is not None  # checked in __init__
            terms["eig"] = image_level_loss(
                self.phi,
                self.layer_weights,
                restored_real,
                restored_clear,
                real_degraded,
                self.tau,
                per_anchor_positive=False,
                positives_grad=self.positives_grad,
                negatives_grad=self.negatives_grad,
            )
            contrast = contrast + terms["eig"]
        if self.use_efcl:
            terms["efg"] = self.feature_loss(feat_restored_real, feat_degraded, feat_restored_clear)
            contrast = contrast + l1 * terms["efg"]
        terms["total"] = total + self.l3 * contrast
        return terms

    def feature_loss(
        self,
        feat_restored_real: Tensor | None,
        feat_degraded: Tensor | None,
        feat_restored_clear: Tensor | None,
    ) -> Tensor:
        """L_efg: anchors = features on x_r, positives = all features on x_c, negatives = other samples' x_r features."""
        if feat_restored_real is None or feat_degraded is None or feat_restored_clear is None:
            raise ValueError(
                "the extended feature-level term (use_efcl) needs feat_restored_real, feat_degraded and "
                "feat_restored_clear"
            )
        _check_feature_pair(feat_restored_real, feat_restored_clear, "L_efg real/clear")
        _check_feature_pair(feat_restored_real, feat_degraded, "L_efg anchor/negatives")
        if feat_degraded.shape[0] != feat_restored_real.shape[0]:
            raise ValueError(
                f"feat_degraded has {feat_degraded.shape[0]} rows, feat_restored_real {feat_restored_real.shape[0]}; "
                "row i of both must be the same real sample"
            )
        anchor = flatten_features(feat_restored_real)
        positives = flatten_features(_maybe_detach(feat_restored_clear, self.positives_grad))
        negatives = flatten_features(_maybe_detach(feat_degraded, self.negatives_grad))
        n = anchor.shape[0]
        mask = ~torch.eye(n, dtype=torch.bool, device=anchor.device)
        return contrastive_loss(anchor, positives, negatives, self.tau, mask)

    def discriminator_terms(self, d_real_logits: Tensor, d_fake_logits: Tensor) -> dict[str, Tensor]:
        """D_S's loss: real clear images against *detached* restored images; total = 0.5 * (real + fake)."""
        d_real, d_fake = discriminator_parts(d_real_logits, d_fake_logits, self.gan)
        return {"d_real": d_real, "d_fake": d_fake, "total": 0.5 * (d_real + d_fake)}
