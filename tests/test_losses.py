"""Tests for uniremoval.losses: the contrastive formula, MGCL / EX-MGCL, GAN and pixel losses."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from uniremoval.errors import ConfigError
from uniremoval.losses import decayed_weight
from uniremoval.losses.contrastive import contrastive_loss, flatten_features, safe_normalize
from uniremoval.losses.gan import discriminator_parts, generator_loss
from uniremoval.losses.mgcl import DALoss, KTLoss
from uniremoval.losses.pixel import EdgeLoss, charbonnier_loss, l1_loss, mprnet_stage_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: on a shared 2-core machine, torch's thread pool makes these tests ~15x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


E1 = [1.0, 0.0, 0.0]
E2 = [0.0, 1.0, 0.0]


def t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# contrastive_loss: hand-computed values


def test_parallel_positive_orthogonal_negative_p1() -> None:
    # cos(a, pos) = 1, cos(a, neg) = 0: -log(e / (e + 1)) = log(1 + e^-1)
    loss = contrastive_loss(t([E1]), t([[E1]]), t([[E2]]), tau=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


def test_orthogonal_positive_parallel_negative_tau_half() -> None:
    # cos(a, pos) = 0, cos(a, neg) = 1 at tau 0.5: -log(1 / (1 + e^2))
    loss = contrastive_loss(t([E1]), t([[E2]]), t([[E1]]), tau=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-12)


def test_scale_does_not_matter() -> None:
    # Cosines only: multiplying vectors by positive constants leaves the loss unchanged.
    a = t([[1.0, 2.0, 3.0]])
    pos = t([[[3.0, -1.0, 0.5]]])
    neg = t([[[-2.0, 1.0, 1.0], [0.0, 1.0, 0.0]]])
    ref = contrastive_loss(a, pos, neg, 0.3)
    assert contrastive_loss(7 * a, 0.01 * pos, 300 * neg, 0.3).item() == pytest.approx(ref.item(), rel=1e-12)


def test_several_positives_p3() -> None:
    # positives cos 1, 0, -1 (e1, e2, -e1); negatives cos -1, 0 (-e1, e3); tau 1
    a = t([E1])
    pos = t([[E1, E2, [-1.0, 0.0, 0.0]]])
    neg = t([[[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    s_pos = math.e + 1 + math.exp(-1)
    s_neg = math.exp(-1) + 1
    expected = -math.log(s_pos / (s_pos + s_neg))
    assert contrastive_loss(a, pos, neg, 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_shared_sets_equal_expanded_sets() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    pos = torch.randn(3, 6, generator=g, dtype=torch.float64)
    neg = torch.randn(5, 6, generator=g, dtype=torch.float64)
    shared = contrastive_loss(a, pos, neg, 0.2)
    expanded = contrastive_loss(a, pos.expand(4, 3, 6), neg.expand(4, 5, 6), 0.2)
    assert shared.item() == pytest.approx(expanded.item(), rel=1e-12)


def test_mask_drops_negatives_and_empty_rows_give_zero() -> None:
    # Row 0: negatives e2 (cos 0) and e1 (cos 1); masking e1 leaves the orthogonal negative only.
    a = t([E1, E1])
    pos = t([[E1], [E1]])
    neg = t([[E2, E1], [E2, E1]])
    row_both = -math.log(math.e / (math.e + 1 + math.e))
    row_orth = math.log(1 + math.exp(-1))
    mask = torch.tensor([[True, False], [True, True]])
    assert contrastive_loss(a, pos, neg, 1.0, mask).item() == pytest.approx(
        (row_orth + row_both) / 2, rel=1e-12
    )
    # A row with no negatives left contributes exactly 0 and still counts in the mean over N.
    mask = torch.tensor([[False, False], [True, True]])
    assert contrastive_loss(a, pos, neg, 1.0, mask).item() == pytest.approx(row_both / 2, rel=1e-12)
    all_off = torch.zeros(2, 2, dtype=torch.bool)
    assert contrastive_loss(a, pos, neg, 1e-6, all_off).item() == 0.0


def test_paper_tau_hard_max_values() -> None:
    # tau = 1e-6: positive closer -> ~exp(-1e6) ~ 0; negative closer -> ~ (1 - 0) / tau = 1e6.
    good = contrastive_loss(t([E1], torch.float32), t([[E1]], torch.float32), t([[E2]], torch.float32), 1e-6)
    bad = contrastive_loss(t([E1], torch.float32), t([[E2]], torch.float32), t([[E1]], torch.float32), 1e-6)
    assert good.item() == 0.0
    assert bad.item() == pytest.approx(1e6, rel=1e-6)
    # Tied cosines: -log(P / (P + Q)) whatever tau is (logits of 1e6 leave ~1e-10 of rounding in float64).
    tie = contrastive_loss(t([E1]), t([[E1, E1]]), t([[E1, E1, E1]]), 1e-6)
    assert tie.item() == pytest.approx(math.log(5 / 2), rel=1e-9)


def test_bad_arguments_are_refused() -> None:
    a, p, n = t([E1]), t([[E1]]), t([[E2]])
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(a, p, n, 0.0)
    with pytest.raises(ValueError, match="neg_mask"):
        contrastive_loss(a, p, n, 1.0, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="negatives"):
        contrastive_loss(a, p, t([[[1.0, 0.0]]]), 1.0)
    with pytest.raises(ValueError, match="anchor"):
        contrastive_loss(t([[[1.0, 0.0, 0.0]]]), p, n, 1.0)


def test_flatten_and_normalize_helpers() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert flatten_features(x).shape == (2, 60)
    u = safe_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(u, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------
# contrastive_loss: gradients and stability


@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("p", [1, 3])
def test_gradcheck_float64(tau: float, p: int) -> None:
    g = torch.Generator().manual_seed(p)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(3, p, 5, generator=g, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, False]])
    assert torch.autograd.gradcheck(lambda x, y, z: contrastive_loss(x, y, z, tau), (a, pos, neg))
    assert torch.autograd.gradcheck(lambda x, y, z: contrastive_loss(x, y, z, tau, mask), (a, pos, neg))
    # shared (P, D) / (Q, D) forms too
    assert torch.autograd.gradcheck(lambda x, y, z: contrastive_loss(x, y[0], z[1], tau), (a, pos, neg))


def _finite_value_and_grads(
    a: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float, mask=None
) -> float:
    leaves = [x.detach().clone().requires_grad_(True) for x in (a, pos, neg)]
    loss = contrastive_loss(*leaves, tau, mask)
    loss.backward()
    assert torch.isfinite(loss), loss
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), leaf.grad
    return loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-6, 1.0])
def test_finite_at_paper_tau_and_tau_one(dtype: torch.dtype, tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 16, generator=g).to(dtype)
    pos = torch.randn(4, 2, 16, generator=g).to(dtype)
    neg = torch.randn(4, 5, 16, generator=g).to(dtype)
    value = _finite_value_and_grads(a, pos, neg, tau)
    assert value >= 0
    # Ties: every vector the same (all cosines 1), and the anchor equal to every negative. In float32
    # at tau = 1e-6 a cosine's rounding (~6e-8) moves a logit by ~0.06, so ties are only approximate.
    same = torch.ones(2, 8, dtype=dtype)
    tol = 0.2 if (dtype == torch.float32 and tau < 1e-3) else 1e-6
    assert _finite_value_and_grads(same, same[:, None], same[:, None].expand(2, 3, 8), tau) == pytest.approx(
        math.log(4), abs=tol
    )
    # Zero-norm vectors (cosine 0 with everything), and a fully masked row.
    zeros = torch.zeros(2, 8, dtype=dtype)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    _finite_value_and_grads(zeros, same[:, None], torch.zeros(2, 3, 8, dtype=dtype), tau, mask)
    _finite_value_and_grads(same, zeros[:, None], same[:, None].expand(2, 3, 8), tau)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    a = torch.randn(3, 8).half()
    loss = contrastive_loss(a, a[:, None], torch.randn(3, 4, 8).half(), 1e-6)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Under autocast the matmul would otherwise run in bfloat16; the value must match float32's.
    g = torch.Generator().manual_seed(9)
    a, pos, neg = (torch.randn(3, k, 64, generator=g) for k in (1, 2, 5))
    a = a[:, 0]
    ref = contrastive_loss(a, pos, neg, 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(a, pos, neg, 1e-3)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# contrastive_loss against an independent float64 reference (explicit loops, math.exp / math.log)


def _reference(a: list, pos: list, neg: list, tau: float, mask: list | None) -> float:
    def cos(u: list, v: list) -> float:
        dot = sum(x * y for x, y in zip(u, v))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    total = 0.0
    for n in range(len(a)):
        num = 0.0
        for p in pos[n]:
            num += math.exp(cos(a[n], p) / tau)
        den = num
        kept = 0
        for q, v in enumerate(neg[n]):
            if mask is None or mask[n][q]:
                den += math.exp(cos(a[n], v) / tau)
                kept += 1
        total += 0.0 if kept == 0 else -math.log(num / den)
    return total / len(a)


@pytest.mark.parametrize("tau", [0.07, 0.2, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("n,p,q", [(1, 1, 1), (3, 1, 5), (4, 3, 2), (6, 5, 7)])
def test_matches_loop_reference(tau: float, n: int, p: int, q: int) -> None:
    rng = random.Random(hash((tau, n, p, q)) & 0xFFFF)
    d = 7
    a = [[rng.gauss(0, 1) for _ in range(d)] for _ in range(n)]
    pos = [[[rng.gauss(0, 1) for _ in range(d)] for _ in range(p)] for _ in range(n)]
    neg = [[[rng.gauss(0, 1) for _ in range(d)] for _ in range(q)] for _ in range(n)]
    mask = [[rng.random() < 0.6 for _ in range(q)] for _ in range(n)]
    mask[0] = [False] * q  # at least one fully masked row
    for m in (None, mask):
        got = contrastive_loss(
            t(a), t(pos), t(neg), tau, None if m is None else torch.tensor(m, dtype=torch.bool)
        ).item()
        assert got == pytest.approx(_reference(a, pos, neg, tau, m), rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# pixel losses


def test_pixel_values() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    y = torch.zeros(2, 2)
    assert l1_loss(x, y).item() == pytest.approx(1.0)
    expected = sum(math.sqrt(v * v + 1e-6) for v in (0.0, 1.0, 2.0, -1.0)) / 4
    assert charbonnier_loss(x, y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        l1_loss(x, torch.zeros(3))


def test_edge_loss_properties() -> None:
    edge = EdgeLoss()
    const = torch.full((1, 3, 16, 16), 0.3)
    lap = edge.laplacian(const)
    # A flat image has no edges (away from the border, where zero-insertion meets replicate padding).
    assert lap[..., 4:-4, 4:-4].abs().max().item() < 1e-6
    x = torch.rand(2, 3, 15, 17)  # odd sizes work
    assert edge(x, x).item() == pytest.approx(1e-3, rel=1e-4)  # Charbonnier of 0 is eps
    # A brightness shift leaves the Laplacian unchanged away from the border; noise does not.
    shift = edge.laplacian(x + 0.5) - edge.laplacian(x)
    assert shift[..., 4:-4, 4:-4].abs().max().item() < 1e-5
    assert edge(x, x + 0.2 * torch.randn_like(x)).item() > 0.05


def test_mprnet_stage_loss_sums_stages() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    outs = [torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    terms = mprnet_stage_loss(outs, target)
    edge = EdgeLoss()
    char = sum(charbonnier_loss(o, target).item() for o in outs)
    edges = sum(edge(o, target).item() for o in outs)
    assert terms["char"].item() == pytest.approx(char, rel=1e-6)
    assert terms["edge"].item() == pytest.approx(edges, rel=1e-6)
    assert terms["total"].item() == pytest.approx(char + 0.05 * edges, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# GAN losses


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, kind: str = "lsgan") -> torch.Tensor:
    """D_S's total loss as DA trains it: 0.5 * (real term + fake term)."""
    return DALoss(None, use_eicl=False, gan=kind).discriminator_terms(d_real, d_fake)["total"]  # type: ignore[arg-type]


def test_gan_values() -> None:
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert generator_loss(ones, "lsgan").item() == 0.0
    assert generator_loss(zeros, "lsgan").item() == 1.0
    assert discriminator_loss(ones, zeros, "lsgan").item() == 0.0
    assert discriminator_loss(zeros, ones, "lsgan").item() == 1.0  # 0.5 * (1 + 1)
    assert generator_loss(zeros, "vanilla").item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros, "vanilla").item() == pytest.approx(math.log(2))
    # Logits away from 0, so that the labels show: softplus(-z) = -log(sigmoid(z)) for "real" (label 1),
    # softplus(z) = -log(1 - sigmoid(z)) for "fake" (label 0). Swapped labels give other numbers.
    def softplus(z: float) -> float:
        return math.log1p(math.exp(z))

    assert generator_loss(torch.tensor([3.0, -1.0]), "vanilla").item() == pytest.approx(
        (softplus(-3.0) + softplus(1.0)) / 2, rel=1e-6)
    real, fake = discriminator_parts(torch.tensor([2.0, -0.5]), torch.tensor([-3.0, 1.5]), "vanilla")
    assert real.item() == pytest.approx((softplus(-2.0) + softplus(0.5)) / 2, rel=1e-6)
    assert fake.item() == pytest.approx((softplus(-3.0) + softplus(1.5)) / 2, rel=1e-6)
    # LSGAN parts: (D(real) - 1)^2 and D(fake)^2, means; the total halves their sum (CycleGAN).
    real, fake = discriminator_parts(torch.tensor([0.5, 3.0]), torch.tensor([0.5, -2.0]), "lsgan")
    assert (real.item(), fake.item()) == pytest.approx(((0.25 + 4.0) / 2, (0.25 + 4.0) / 2))
    real, fake = discriminator_parts(torch.tensor([2.0]), torch.tensor([2.0]), "lsgan")
    assert (real.item(), fake.item()) == pytest.approx((1.0, 4.0))
    assert discriminator_loss(torch.tensor([2.0]), torch.tensor([2.0]), "lsgan").item() == pytest.approx(2.5)
    assert generator_loss(torch.tensor([3.0, 0.5]), "lsgan").item() == pytest.approx((4.0 + 0.25) / 2)
    assert generator_loss(torch.tensor([2.0, -1.0]), "hinge").item() == pytest.approx(-0.5)
    real, fake = discriminator_parts(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5]), "hinge")
    assert (real.item(), fake.item()) == pytest.approx((0.5, 0.75))
    with pytest.raises(ValueError, match="lsgan"):
        generator_loss(ones, "wgan")  # type: ignore[arg-type]


def test_schedule() -> None:
    assert decayed_weight(0.5, 0.99, 0) == 0.5
    assert decayed_weight(0.5, 0.99, 10) == pytest.approx(0.5 * 0.99**10)
    with pytest.raises(ValueError):
        decayed_weight(0.5, 0.99, -1)


# ----------------------------------------------------------------------------------------------
# MGCL / EX-MGCL


class TinyPhi(nn.Module):
    """A random two-layer conv stack standing in for VGG-19 (no weights can be downloaded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = torch.relu(self.c1(x))
        return [f1, torch.relu(self.c2(f1))]


class TinyNet(nn.Module):
    """Restorer with an intermediate feature: x -> (image, feature on a 2x-pooled grid)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.enc(x))
        return x + self.dec(f), nn.functional.avg_pool2d(f, 2)


LW = (0.5, 1.0)


def _batch(seed: int, n: int = 4, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _kt_inputs(n: int = 4):
    """Degraded inputs, a "restored" target unlike them, and a fixed teacher feature."""
    degraded = _batch(1, n)
    teacher_out = _batch(2, n)
    with torch.no_grad():
        teacher_feat = TinyNet(seed=7)(degraded)[1]
    return degraded, teacher_out, teacher_feat


def test_kt_total_and_ablation_keys() -> None:
    degraded, teacher_out, teacher_feat = _kt_inputs()
    student = TinyNet()
    out, feat = student(degraded)
    labels = torch.tensor([0, 0, 1, 2])
    full = KTLoss(TinyPhi(), LW, a2=0.1, tau=0.5)(
        out, teacher_out, degraded, feat, teacher_feat, labels, a1=0.3
    )
    assert set(full) == {"pixel", "ig", "fg", "total"}
    # L_pixel = |G_S(x) - G_T(x)|_1 against the teacher's image (not the degraded input)
    assert full["pixel"].item() == pytest.approx((out - teacher_out).abs().mean().item(), rel=1e-6)
    expected = full["pixel"] + 0.1 * (full["ig"] + 0.3 * full["fg"])
    assert full["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    icl = KTLoss(TinyPhi(), LW, tau=0.5, use_fcl=False)(out, teacher_out, degraded, None, None, None, 0.3)
    assert set(icl) == {"pixel", "ig", "total"}
    assert icl["ig"].item() == pytest.approx(full["ig"].item(), rel=1e-6)
    bkt = KTLoss(None, use_icl=False, use_fcl=False)(out, teacher_out, degraded, None, None, None, 0.3)
    assert set(bkt) == {"pixel", "total"} and bkt["total"].item() == pytest.approx(bkt["pixel"].item())
    fcl_only = KTLoss(None, use_icl=False, tau=0.5)(
        out, teacher_out, degraded, feat, teacher_feat, labels, 0.3
    )
    assert set(fcl_only) == {"pixel", "fg", "total"}
    cb = KTLoss(None, use_icl=False, use_fcl=False, pixel="charbonnier")(out, teacher_out, degraded)
    assert cb["pixel"].item() == pytest.approx(charbonnier_loss(out, teacher_out).item())


def test_kt_ig_matches_explicit_layer_sum() -> None:
    degraded, teacher_out, _ = _kt_inputs()
    out, _ = TinyNet()(degraded)
    phi = TinyPhi()
    ig = KTLoss(phi, LW, tau=0.3, use_fcl=False)(out, teacher_out, degraded)["ig"]
    expected = 0.0
    for w, a, p, q in zip(LW, phi(out), phi(teacher_out), phi(degraded)):
        a, p, q = flatten_features(a), flatten_features(p), flatten_features(q)
        # every anchor sees the whole batch of degraded inputs as negatives, its own included
        expected += w * contrastive_loss(a, p[:, None], q[None].expand(len(a), -1, -1), 0.3).item()
    assert ig.item() == pytest.approx(expected, rel=1e-5)


def test_kt_feature_negatives_exclude_anchor_and_same_type() -> None:
    g = torch.Generator().manual_seed(5)
    sf = torch.randn(4, 2, 3, 3, generator=g)
    tf = torch.randn(4, 2, 3, 3, generator=g)
    labels = torch.tensor([0, 0, 1, 1])
    a, p = flatten_features(sf), flatten_features(tf)[:, None]
    loss_all = KTLoss(None, use_icl=False, tau=0.4).feature_loss(sf, tf, labels)
    assert loss_all.item() == pytest.approx(
        contrastive_loss(a, p, a, 0.4, ~torch.eye(4, dtype=torch.bool)).item()
    )
    other = KTLoss(None, use_icl=False, tau=0.4, feature_negatives="other_types").feature_loss(sf, tf, labels)
    mask = labels[:, None] != labels[None, :]
    assert other.item() == pytest.approx(contrastive_loss(a, p, a, 0.4, mask).item())
    assert other.item() != pytest.approx(loss_all.item())
    # one type in the whole batch: nothing to contrast against, the term is 0
    same = KTLoss(None, use_icl=False, feature_negatives="other_types").feature_loss(
        sf, tf, torch.zeros(4).long()
    )
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        KTLoss(None, use_icl=False, feature_negatives="other_types").feature_loss(sf, tf, None)


def test_kt_config_errors() -> None:
    with pytest.raises(ConfigError, match="phi"):
        KTLoss(None)
    with pytest.raises(ConfigError, match="layer_weights"):
        degraded, teacher_out, _ = _kt_inputs()
        KTLoss(TinyPhi(), (1.0, 1.0, 1.0), use_fcl=False)(degraded, teacher_out, degraded)
    with pytest.raises(ConfigError, match="tau"):
        KTLoss(None, use_icl=False, tau=0.0)
    with pytest.raises(ConfigError, match="gan"):
        DALoss(None, use_eicl=False, gan="wgan")  # type: ignore[arg-type]


@pytest.mark.parametrize("negatives_grad", [False, True])
def test_kt_negatives_grad_flag(negatives_grad: bool) -> None:
    degraded, teacher_out, _ = _kt_inputs()
    degraded = degraded.clone().requires_grad_(True)
    teacher_out = teacher_out.clone().requires_grad_(True)
    loss = KTLoss(TinyPhi(), LW, tau=0.5, use_fcl=False, negatives_grad=negatives_grad)
    out, _ = TinyNet()(degraded.detach())
    loss(out, teacher_out, degraded)["total"].backward()
    assert teacher_out.grad is None  # the teacher is always a fixed target
    if negatives_grad:
        assert degraded.grad is not None and degraded.grad.abs().sum() > 0
    else:
        assert degraded.grad is None
    # Feature level: the negatives are the student's own features; compare with an explicit detach.
    sf = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    tf = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    KTLoss(None, use_icl=False, tau=0.5, negatives_grad=negatives_grad).feature_loss(sf, tf, None).backward()
    a = sf.detach().clone().requires_grad_(True)
    af = flatten_features(a)
    contrastive_loss(
        af, flatten_features(tf)[:, None], af.detach(), 0.5, ~torch.eye(4, dtype=torch.bool)
    ).backward()
    assert torch.allclose(sf.grad, a.grad) == (not negatives_grad)


def _da_inputs():
    real = _batch(11, 4)
    clear = _batch(12, 3)
    return real, clear


def test_da_total_keys_and_discriminator() -> None:
    real, clear = _da_inputs()
    student = TinyNet()
    restored_real, feat_real = student(real)
    restored_clear, feat_clear = student(clear)
    d_fake = torch.randn(4, 1, 3, 3)
    loss = DALoss(TinyPhi(), LW, l2=0.2, l3=0.3, tau=0.5)
    terms = loss.generator_terms(
        restored_real, real, restored_clear, clear, feat_real, feat_real, feat_clear, d_fake, 0.4
    )
    assert set(terms) == {"gan", "idt", "eig", "efg", "total"}
    expected = terms["gan"] + 0.2 * terms["idt"] + 0.3 * (terms["eig"] + 0.4 * terms["efg"])
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["idt"].item() == pytest.approx(l1_loss(restored_clear, clear).item())
    assert terms["gan"].item() == pytest.approx(generator_loss(d_fake, "lsgan").item())
    # efg: positives = the whole batch of clear features, negatives = other real samples' features
    a, pc = flatten_features(feat_real), flatten_features(feat_clear)
    efg = contrastive_loss(
        a, pc[None].expand(4, -1, -1), a[None].expand(4, -1, -1), 0.5, ~torch.eye(4, dtype=torch.bool)
    )
    assert terms["efg"].item() == pytest.approx(efg.item(), rel=1e-6)
    # eig: per phi layer, anchors = phi(G_S(x_r)), positives = the whole batch phi(G_S(x_c)) shared by
    # every anchor, negatives = the whole batch phi(x_r) (the real degraded inputs), weighted by LW.
    phi = TinyPhi()
    eig = 0.0
    for w, a_l, p_l, q_l in zip(LW, phi(restored_real), phi(restored_clear), phi(real)):
        a_l, p_l, q_l = flatten_features(a_l), flatten_features(p_l), flatten_features(q_l)
        eig += w * _reference(a_l.double().tolist(), [p_l.double().tolist()] * 4, [q_l.double().tolist()] * 4,
                              0.5, None)
    assert terms["eig"].item() == pytest.approx(eig, rel=1e-5)
    bda = DALoss(None, use_eicl=False, use_efcl=False).generator_terms(
        restored_real, real, restored_clear, clear, d_fake_logits=d_fake
    )
    assert set(bda) == {"gan", "idt", "total"}
    eicl = DALoss(TinyPhi(), LW, tau=0.5, use_efcl=False, use_gan=False, use_idt=False).generator_terms(
        restored_real, real, restored_clear, clear
    )
    assert set(eicl) == {"eig", "total"}
    assert eicl["eig"].item() == pytest.approx(terms["eig"].item(), rel=1e-6)
    d = DALoss(None, use_eicl=False, gan="hinge").discriminator_terms(
        torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    )
    assert (d["d_real"].item(), d["d_fake"].item(), d["total"].item()) == pytest.approx((0.5, 0.75, 0.625))


@pytest.mark.parametrize("positives_grad", [False, True])
@pytest.mark.parametrize("negatives_grad", [False, True])
def test_da_negative_and_positive_grad_flags(positives_grad: bool, negatives_grad: bool) -> None:
    real, clear = _da_inputs()
    real = real.clone().requires_grad_(True)
    restored_real = (real.detach() * 0.9).requires_grad_(True)
    restored_clear = (clear * 0.9).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    feat_real = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    feat_deg = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    feat_clear = torch.randn(3, 2, 3, 3, generator=g, requires_grad=True)
    loss = DALoss(
        TinyPhi(),
        LW,
        tau=0.5,
        use_gan=False,
        use_idt=False,
        negatives_grad=negatives_grad,
        positives_grad=positives_grad,
    )
    loss.generator_terms(
        restored_real, real, restored_clear, clear, feat_real, feat_deg, feat_clear, None, 0.5
    )["total"].backward()
    assert restored_real.grad is not None and feat_real.grad is not None  # anchors always train
    # each flag governs its own set: negatives = the real degraded images and their features,
    # positives = the restored clear images and their features (image and feature level alike)
    for leaf, flag in ((real, negatives_grad), (feat_deg, negatives_grad),
                       (restored_clear, positives_grad), (feat_clear, positives_grad)):
        assert (leaf.grad is not None and leaf.grad.abs().sum() > 0) == flag


# ----------------------------------------------------------------------------------------------
# every loss goes down when a tiny model is optimised on it alone


def _optimise(model: nn.Module, loss_fn, steps: int = 30, lr: float = 1e-2) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = last = float("nan")
    for i in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        if i == 0:
            first = loss.item()
        last = loss.item()
    with torch.no_grad():
        last = loss_fn().item()
    assert math.isfinite(first) and math.isfinite(last)
    return first, last


@pytest.mark.parametrize("fn", [l1_loss, charbonnier_loss, EdgeLoss()], ids=["l1", "charbonnier", "edge"])
def test_pixel_and_edge_losses_decrease(fn) -> None:
    x, y = _batch(1), _batch(2)
    model = TinyNet()
    first, last = _optimise(model, lambda: fn(model(x)[0], y))
    assert last < 0.8 * first, (first, last)
    model = TinyNet()
    first, last = _optimise(model, lambda: mprnet_stage_loss([model(x)[0], model(x)[0] * 0.5], y)["total"])
    assert last < 0.8 * first


@pytest.mark.parametrize("tau", [0.1, 1e-6])
def test_ig_and_fg_decrease(tau: float) -> None:
    degraded, teacher_out, teacher_feat = _kt_inputs()
    # ig: the student's output must move towards the teacher's and away from the degraded inputs.
    loss = KTLoss(TinyPhi(), LW, tau=tau, use_fcl=False)
    model = TinyNet()
    first, last = _optimise(model, lambda: loss(model(degraded)[0], teacher_out, degraded)["ig"])
    assert last < 0.5 * first, (first, last)
    # fg: the student's feature towards the teacher's feature and away from other samples' features.
    loss = KTLoss(None, use_icl=False, tau=tau)
    model = TinyNet()
    first, last = _optimise(model, lambda: loss.feature_loss(model(degraded)[1], teacher_feat, None))
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("tau", [0.1, 1e-6])
def test_eig_and_efg_decrease(tau: float) -> None:
    real, clear = _da_inputs()
    loss = DALoss(TinyPhi(), LW, tau=tau, use_gan=False, use_idt=False, use_efcl=False)
    model = TinyNet()

    def eig() -> torch.Tensor:
        return loss.generator_terms(model(real)[0], real, model(clear)[0], clear)["eig"]

    first, last = _optimise(model, eig)
    assert last < 0.5 * first, (first, last)
    loss = DALoss(None, use_eicl=False, tau=tau)
    model = TinyNet()

    def efg() -> torch.Tensor:
        feat_real, feat_clear = model(real)[1], model(clear)[1]
        return loss.feature_loss(feat_real, feat_real, feat_clear)

    first, last = _optimise(model, efg)
    assert last < 0.5 * first, (first, last)


class TinyD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("kind", ["lsgan", "vanilla", "hinge"])
def test_gan_losses_decrease(kind: str) -> None:
    real, clear = _da_inputs()
    disc = TinyD()
    disc.requires_grad_(False)
    model = TinyNet()
    first, last = _optimise(model, lambda: generator_loss(disc(model(real)[0]), kind))  # type: ignore[arg-type]
    assert last < first - 0.1 * abs(first) - 1e-3, (first, last)
    disc = TinyD()
    with torch.no_grad():
        fake = TinyNet()(real)[0]
    first, last = _optimise(disc, lambda: discriminator_loss(disc(clear), disc(fake), kind))  # type: ignore[arg-type]
    assert last < 0.8 * first, (first, last)


def test_edge_laplacian_matches_a_loop_reference() -> None:
    """MPRNet's Laplacian, written out with numpy loops: blur (5x5 [.05 .25 .4 .25 .05] outer product,
    replicate padding), keep even pixels x4 on a zero grid, blur again, subtract from the input."""
    import numpy as np

    k1 = [0.05, 0.25, 0.4, 0.25, 0.05]

    def blur(a: np.ndarray) -> np.ndarray:
        h, w = a.shape
        p = np.pad(a, 2, mode="edge")
        return np.array([[sum(k1[i] * k1[j] * p[y + i, x + j] for i in range(5) for j in range(5))
                          for x in range(w)] for y in range(h)])

    img = np.random.default_rng(0).random((7, 6))
    b = blur(img)
    up = np.zeros_like(b)
    up[::2, ::2] = 4 * b[::2, ::2]
    ref = img - blur(up)
    got = EdgeLoss().laplacian(torch.from_numpy(img)[None, None].double())[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # the kernel buffer is float32
    # the loss: Charbonnier (eps 1e-3) between the two Laplacians
    other = np.random.default_rng(1).random((7, 6))
    b = blur(other)
    up = np.zeros_like(b)
    up[::2, ::2] = 4 * b[::2, ::2]
    d = ref - (other - blur(up))
    want = np.sqrt(d * d + 1e-6).mean()
    x, y = (torch.from_numpy(a)[None, None].double() for a in (img, other))
    assert EdgeLoss()(x, y).item() == pytest.approx(want, rel=1e-6)
