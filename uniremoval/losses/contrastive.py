"""The one contrastive loss behind the paper's Eq. 2 (L_C, one positive) and Eq. 9 (L_EC, many).

For anchor ``a``, positives ``pos_1..pos_P`` and negatives ``neg_1..neg_Q``::

    L(a) = -log( sum_p s(a, pos_p) / (sum_p s(a, pos_p) + sum_q s(a, neg_q)) ),
    s(u, v) = exp(cos(u, v) / tau)

and the loss is the mean of ``L`` over the N anchors. With the paper's tau = 1e-6 the logits
``cos / tau`` reach 1e6, so ``exp`` would overflow; the loss is computed as
``logsumexp(all logits) - logsumexp(positive logits)``, which is exact and finite for any tau > 0.
Near tau -> 0 it tends to ``(max_q cos(a, neg_q) - max_p cos(a, pos_p)) / tau`` when a negative is
closer than every positive, and to 0 otherwise: a hard-max loss whose gradients scale with 1/tau.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Norms are clamped at this value before dividing: a zero vector then gets cosine 0 with everything
# and a finite gradient (the plain ``x / ||x||`` has a 0/0 value and an infinite gradient there).
# 1e-12 squared (1e-24) is still a normal float32 number.
NORM_EPS = 1e-12


def flatten_features(x: Tensor) -> Tensor:
    """Flatten everything but the batch dimension: (N, ...) -> (N, D).

    Callers flatten feature maps (N, C, H, W) this way so that the cosine is taken over the whole
    map of one sample, as the paper's phi(.) vectors are.
    """
    if x.dim() < 1:
        raise ValueError(f"flatten_features needs a batched tensor, got a scalar of shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def safe_normalize(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Unit vectors along the last dimension, with a zero vector mapped to zero (finite gradient)."""
    # clamp before sqrt: the sqrt's derivative at 0 is infinite; the clamp's derivative below eps is 0.
    norm = x.pow(2).sum(dim=-1, keepdim=True).clamp_min(eps * eps).sqrt()
    return x / norm


def _cosines(anchor_unit: Tensor, others: Tensor, name: str) -> Tensor:
    """Cosines (N, K) between N unit anchors and either K shared vectors (K, D) or per-anchor (N, K, D)."""
    n, d = anchor_unit.shape
    if others.dim() == 2:
        if others.shape[1] != d:
            raise ValueError(f"{name} has feature size {others.shape[1]}, the anchor {d}: shapes must agree")
        # Shared set: one matmul, never materialising an (N, K, D) copy (matters for VGG feature maps).
        return anchor_unit @ safe_normalize(others).transpose(0, 1)
    if others.dim() == 3:
        if others.shape[0] != n or others.shape[2] != d:
            raise ValueError(
                f"{name} has shape {tuple(others.shape)}, expected ({n}, K, {d}) for an anchor of shape ({n}, {d})"
            )
        return torch.einsum("nd,nkd->nk", anchor_unit, safe_normalize(others))
    raise ValueError(
        f"{name} must be (K, D) shared by all anchors or (N, K, D); got shape {tuple(others.shape)}"
    )


def contrastive_loss(
    anchor: Tensor,
    positives: Tensor,
    negatives: Tensor,
    tau: float,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """Mean over anchors of ``-log(sum_pos s / (sum_pos s + sum_neg s))``, ``s = exp(cos / tau)``.

    Args:
        anchor: (N, D).
        positives: (N, P, D), or (P, D) for one set shared by every anchor (Eq. 9's batch of weak
            positives; avoids an N-fold copy). P = 1 is the paper's Eq. 2.
        negatives: (N, Q, D), or (Q, D) shared by every anchor.
        tau: temperature, > 0. Any value works, 1e-6 included.
        neg_mask: optional bool (N, Q); True keeps negative q for anchor n, False drops it (e.g. the
            anchor itself, or samples of the same degradation type).

    Returns:
        A scalar: the mean over all N rows. A row whose mask drops every negative has nothing to
        contrast against and contributes exactly 0 (it still counts in the mean over N, so the
        scale of the loss does not jump with the number of such rows).

    Half-precision inputs are computed in float32, with autocast turned off inside: at tau = 1e-6 a
    bfloat16 cosine (~4e-3 of rounding) would move the logits by thousands.
    """
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        return _contrastive_loss_fp32(anchor, positives, negatives, tau, neg_mask)


def _contrastive_loss_fp32(
    anchor: Tensor, positives: Tensor, negatives: Tensor, tau: float, neg_mask: Tensor | None
) -> Tensor:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if anchor.dim() != 2:
        raise ValueError(
            f"anchor must be (N, D), got shape {tuple(anchor.shape)}; flatten it with flatten_features"
        )
    if anchor.dtype not in (torch.float32, torch.float64):
        anchor = anchor.float()
    positives = positives.to(anchor.dtype)
    negatives = negatives.to(anchor.dtype)

    a = safe_normalize(anchor)
    pos_logits = _cosines(a, positives, "positives") / tau  # (N, P)
    neg_logits = _cosines(a, negatives, "negatives") / tau  # (N, Q)
    if pos_logits.shape[1] == 0:
        raise ValueError("contrastive_loss needs at least one positive (P >= 1)")

    has_neg = None
    if neg_mask is not None:
        if neg_mask.shape != neg_logits.shape or neg_mask.dtype != torch.bool:
            raise ValueError(
                f"neg_mask must be a bool tensor of shape {tuple(neg_logits.shape)}, "
                f"got {neg_mask.dtype} {tuple(neg_mask.shape)}"
            )
        # -inf logits contribute exp(-inf) = 0 to the sum and receive zero gradient.
        neg_logits = neg_logits.masked_fill(~neg_mask, float("-inf"))
        has_neg = neg_mask.any(dim=1)

    lse_pos = torch.logsumexp(pos_logits, dim=1)
    lse_all = torch.logsumexp(torch.cat([pos_logits, neg_logits], dim=1), dim=1)
    per_row = lse_all - lse_pos  # >= 0 mathematically; the two sums differ by the negatives only
    if has_neg is not None:
        # Exactly 0 (not a rounding residue) for rows with no negatives left.
        per_row = torch.where(has_neg, per_row, torch.zeros_like(per_row))
    return per_row.mean()
