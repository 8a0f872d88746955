"""Pixel losses: L1 (the KT stage's L_pixel and the DA stage's L_idt), and MPRNet's teacher losses.

MPRNet trains each stage output against the target with Charbonnier + 0.05 * edge loss, where the
edge loss is Charbonnier between the Laplacians (one Gaussian-pyramid level) of output and target.
MPRNet works on [0, 1] images; here images are in [-1, 1], so its eps = 1e-3 is, relative to the
range, half as large. That difference is far below anything training can notice and is kept for
simplicity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_same_shape(x: Tensor, y: Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(
            f"{what}: prediction shape {tuple(x.shape)} differs from target shape {tuple(y.shape)}"
        )


def l1_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute difference, |x - y|_1 averaged over all elements."""
    _check_same_shape(x, y, "l1_loss")
    return (x - y).abs().mean()


def charbonnier_loss(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """Mean of sqrt((x - y)^2 + eps^2): L1 with a smooth minimum (differentiable at x == y)."""
    _check_same_shape(x, y, "charbonnier_loss")
    diff = x - y
    return torch.sqrt(diff * diff + eps * eps).mean()


def _gaussian_kernel_5x5(dtype: torch.dtype = torch.float32) -> Tensor:
    # The binomial-like 1D filter of Burt & Adelson's pyramid (a = 0.4), as MPRNet uses; sums to 1.
    k1 = torch.tensor([0.05, 0.25, 0.4, 0.25, 0.05], dtype=dtype)
    return torch.outer(k1, k1)


class EdgeLoss(nn.Module):
    """MPRNet's edge loss: Charbonnier between Laplacians of prediction and target.

    The Laplacian is one level of a Laplacian pyramid: blur with the 5x5 Gaussian (replicate
    padding), keep every second pixel, put those back on a zero grid times 4 (the zeros dilute the
    mean by 4), blur again, and subtract from the input. Works for any number of channels (the
    blur is depthwise) and any size (odd sizes included).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        # A buffer so that .to(device) / dtype moves it; not a parameter (never trained).
        self.register_buffer("kernel", _gaussian_kernel_5x5()[None, None], persistent=False)

    def _blur(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight = self.kernel.to(dtype=x.dtype).expand(c, 1, 5, 5)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), weight, groups=c)

    def laplacian(self, x: Tensor) -> Tensor:
        """x minus its blurred, downsampled and re-upsampled self: the band-pass (edge) part."""
        blurred = self._blur(x)
        upsampled = torch.zeros_like(blurred)
        upsampled[:, :, ::2, ::2] = blurred[:, :, ::2, ::2] * 4
        return x - self._blur(upsampled)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_same_shape(x, y, "EdgeLoss")
        if x.dim() != 4:
            raise ValueError(f"EdgeLoss needs NCHW images, got shape {tuple(x.shape)}")
        return charbonnier_loss(self.laplacian(x), self.laplacian(y), self.eps)


def mprnet_stage_loss(
    outputs: Sequence[Tensor],
    target: Tensor,
    edge_weight: float = 0.05,
    eps: float = 1e-3,
    edge_loss: EdgeLoss | None = None,
) -> dict[str, Tensor]:
    """The teacher stage's loss: sum over MPRNet's stage outputs of Charbonnier + edge_weight * edge.

    Args:
        outputs: the restored images of every stage (MPRNet returns three; one is fine too).
        target: the clean image.
        edge_loss: an EdgeLoss to reuse (its kernel buffer already on the right device); made if None.

    Returns:
        {"char": sum of Charbonnier terms, "edge": sum of edge terms,
         "total": char + edge_weight * edge}.
    """
    if len(outputs) == 0:
        raise ValueError("mprnet_stage_loss needs at least one stage output")
    edge = edge_loss if edge_loss is not None else EdgeLoss(eps).to(target.device)
    char_sum = sum(charbonnier_loss(o, target, eps) for o in outputs)
    edge_sum = sum(edge(o, target) for o in outputs)
    return {"char": char_sum, "edge": edge_sum, "total": char_sum + edge_weight * edge_sum}
