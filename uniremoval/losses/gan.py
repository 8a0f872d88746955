"""GAN losses for domain adaptation: D_S is trained on real clear images against restored images.

How the paper's Eq. 7 is read. As printed it is
``L_gan = E[D(x_c)] + E[1 - D(G(x_r))]``, linear in D: D could raise it without bound, so it has
no optimum and cannot be what was trained. The paper cites CycleGAN, whose adversarial loss is the
least-squares GAN (LSGAN, Mao et al. 2017):

* discriminator: ``E[(D(x_c) - 1)^2] + E[D(G(x_r))^2]`` (CycleGAN halves it to slow D down),
* generator:     ``E[(D(G(x_r)) - 1)^2]``,

i.e. Eq. 7 with every term squared. That is the default ("lsgan"). Two common alternatives are
options: "vanilla" (the non-saturating BCE-with-logits GAN of Goodfellow et al.) and "hinge"
(Lim & Ye; Miyato et al.). D's outputs are raw logits/scores (no sigmoid) for every kind.

The discriminator total is ``0.5 * (real term + fake term)`` for every kind, the CycleGAN
convention (``DALoss.discriminator_terms`` sums ``discriminator_parts``). The caller must pass
logits of *detached* restored images when training D.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

GanKind = Literal["lsgan", "vanilla", "hinge"]
GAN_KINDS: tuple[str, ...] = ("lsgan", "vanilla", "hinge")


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; choose one of {', '.join(GAN_KINDS)}")


def generator_loss(d_fake: Tensor, kind: GanKind = "lsgan") -> Tensor:
    """The generator's adversarial loss from D's logits on restored images (gradient flows into them)."""
    _check_kind(kind)
    if kind == "lsgan":
        return (d_fake - 1).pow(2).mean()
    if kind == "vanilla":
        # Non-saturating form: maximise log D(G(x)) rather than minimise log(1 - D(G(x))).
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    return -d_fake.mean()


def discriminator_parts(d_real: Tensor, d_fake: Tensor, kind: GanKind = "lsgan") -> tuple[Tensor, Tensor]:
    """D's loss on real clear images and on (detached) restored images, separately (for logging)."""
    _check_kind(kind)
    if kind == "lsgan":
        return (d_real - 1).pow(2).mean(), d_fake.pow(2).mean()
    if kind == "vanilla":
        return (
            F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)),
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)),
        )
    return F.relu(1 - d_real).mean(), F.relu(1 + d_fake).mean()
