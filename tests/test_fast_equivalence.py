"""Every speed setting of uniremoval.stages.fast keeps the KT numbers (CPU, tiny MPRNet, 32 px crops).

The reference is the naive path: fp32, contiguous (NCHW) tensors, teachers run online, Adam's
per-parameter loop. Tolerances, all at the paper's tau = 1e-6 (the hardest case: the contrastive
terms are hard-max losses of size ~1/tau, so any rounding is magnified by 1e6):

* cached teacher tensors vs online teachers: identical (same computation, rtol 0); the cache's
  stored form (8-bit PNG teacher image, float16 feature) moves L_pixel by at most 1/255 (half an
  8-bit step on [-1, 1]) and the contrastive terms by < 1% (measured ~5e-4);
* channels_last: loss terms rtol 1e-4 (measured ~2e-5), gradients within 1e-4 of each tensor's
  largest gradient, updated weights within 1% of the learning rate (measured 0.4%);
* fused / foreach Adam vs the loop: weights within 1e-6 relative after 3 steps;
* bf16 autocast (only the networks; the contrastive loss stays fp32): loss terms rtol 3e-2
  (measured 2e-4 .. 8e-3): bf16 keeps 8 mantissa bits.

VGG-19 (random weights) is cut at relu3_1 here to keep the test fast; the layout code is the same
for every layer.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from uniremoval.losses.mgcl import KTLoss
from uniremoval.models.mprnet_arch import MPRNet
from uniremoval.models.vgg_arch import VGGFeatures
from uniremoval.stages import fast
from uniremoval.stages.kt import kt_terms
from uniremoval.stages.teachers import Teacher, freeze

DEGS = ["haze", "rain", "blur"]
CELL = 16
TAU = 1e-6
LR = 2e-5
LAYERS = ("relu1_1", "relu2_1", "relu3_1")
WEIGHTS = (1 / 32, 1 / 16, 1 / 8)
A1 = 0.5


def _terms(student, phi, batch, teachers=None):
    loss = KTLoss(phi, WEIGHTS, tau=TAU)
    terms, _, _ = kt_terms(student, loss, batch, A1, CELL, teachers=teachers, degradations=DEGS)
    return terms


def _values(terms) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


def _step(student, phi, batch, optimizer):
    terms = _terms(student, phi, batch)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    grads = [p.grad.detach().clone() for p in student.parameters()]
    optimizer.step()
    return _values(terms), grads, [p.detach().clone() for p in student.parameters()]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    student = MPRNet("tiny")
    teachers = {d: Teacher(d, freeze(MPRNet("tiny")), "minus_one_one", f"random-{d}") for d in DEGS}
    phi = VGGFeatures(LAYERS, weights="random")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])
    # The cached targets, built apart from `teacher_targets` (which the online path uses): each
    # sample through its own type's teacher, one at a time.
    per_sample = [teachers[DEGS[int(lab)]](x[i:i + 1], CELL) for i, lab in enumerate(labels)]
    t_img, t_feat = (torch.cat([out[j] for out in per_sample]) for j in (0, 1))
    cached = {"input": x, "degradation": labels, "teacher": t_img, "feature": t_feat}
    # The naive reference: fp32, NCHW, the loop Adam, one step.
    ref_student = copy.deepcopy(student)
    opt = torch.optim.Adam(ref_student.parameters(), lr=LR, foreach=False)
    ref = _step(ref_student, phi, cached, opt)
    return {"student": student, "teachers": teachers, "phi": phi, "cached": cached, "ref": ref}


def _close_terms(got: dict[str, float], want: dict[str, float], rtol: float) -> None:
    assert set(got) == set(want) == {"pixel", "ig", "fg", "total"}
    for k, value in want.items():
        assert got[k] == pytest.approx(value, rel=rtol, abs=0), (k, got[k], value)


def test_cached_targets_equal_online_teachers(setup):
    online = _values(_terms(setup["student"], setup["phi"], {k: setup["cached"][k] for k in ("input", "degradation")},
                            teachers=setup["teachers"]))
    # Not bit-equal: a conv over 1 sample and over a sub-batch sum in another order (measured 2e-7).
    _close_terms(online, setup["ref"][0], rtol=1e-5)

    # What the cache stores: the teacher image as 8-bit PNG levels, the pooled feature as float16.
    c = setup["cached"]
    stored = dict(c, teacher=((c["teacher"] + 1) * 127.5).round() / 127.5 - 1, feature=c["feature"].half().float())
    got = _values(_terms(setup["student"], setup["phi"], stored))
    assert abs(got["pixel"] - online["pixel"]) <= 1 / 255
    for k in ("ig", "fg", "total"):
        assert got[k] == pytest.approx(online[k], rel=1e-2), k


def test_channels_last_same_loss_grads_and_step(setup):
    student = fast.to_channels_last(copy.deepcopy(setup["student"]))
    phi = fast.to_channels_last(copy.deepcopy(setup["phi"]))
    assert student.tail.weight.is_contiguous(memory_format=torch.channels_last)
    batch = fast.to_device(setup["cached"], "cpu", channels_last=True)
    assert batch["input"].is_contiguous(memory_format=torch.channels_last)
    assert not batch["input"].is_contiguous()
    opt = fast.make_adam(student.parameters(), LR, "cpu")
    values, grads, weights = _step(student, phi, batch, opt)
    ref_values, ref_grads, ref_weights = setup["ref"]
    _close_terms(values, ref_values, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        assert float((g - rg).abs().max()) <= 1e-4 * float(rg.abs().max()) + 1e-30
    w0 = [p.detach() for p in setup["student"].parameters()]
    # One Adam step moves each weight by about lr: the two layouts must agree to 1% of that.
    moved = max(float((rw - w).abs().max()) for rw, w in zip(ref_weights, w0))
    assert moved == pytest.approx(LR, rel=0.05)
    diff = max(float((w - rw).abs().max()) for w, rw in zip(weights, ref_weights))
    assert diff <= 1e-2 * LR


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}])
def test_fast_adam_equals_loop(impl):
    torch.manual_seed(1)
    shapes = [(12, 3, 3, 3), (12,), (40, 12, 1, 1), (1,)]
    params = [torch.randn(s) for s in shapes]
    runs = {}
    for name, kwargs in (("loop", {"foreach": False}), ("fast", impl)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kwargs)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * 1e3  # KT gradients are large (1/tau)
            opt.step()
        runs[name] = ps
    for a, b in zip(runs["fast"], runs["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert fast.adam_impl("cpu") == {"foreach": True}
    assert fast.adam_impl("cuda") == {"fused": True}
    assert fast.adam_impl("cuda", fused=False) == {"foreach": True}


def test_trainer_builds_the_fast_adam():
    from uniremoval.config import OptimConfig
    from uniremoval.stages.trainer import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(p, OptimConfig(lr=1e-3), on_cuda=False)
    assert type(opt) is torch.optim.Adam and opt.defaults["foreach"] and not opt.defaults["fused"]
    opt = make_optimizer(p, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, fused=True), on_cuda=False)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] and opt.defaults["weight_decay"] == 0.1


def test_bf16_autocast_loss_close(setup):
    student = fast.to_channels_last(copy.deepcopy(setup["student"]))
    phi = fast.to_channels_last(copy.deepcopy(setup["phi"]))
    batch = fast.to_device(setup["cached"], "cpu", channels_last=True)
    dtype = fast.autocast_dtype("bf16", "cpu")
    assert dtype is torch.bfloat16
    with torch.no_grad(), fast.autocast("cpu", dtype):
        _, feature = student(batch["input"], return_feature=True)
        assert feature.dtype == torch.bfloat16  # autocast really ran the network in bf16
        values = _values(_terms(student, phi, batch))
    _close_terms(values, setup["ref"][0], rtol=3e-2)
    assert values["pixel"] != setup["ref"][0]["pixel"]  # and the numbers did change (not fp32 in disguise)


def test_math_flags_restore_and_keep_fp32_matmul():
    flags = torch.backends.cudnn, torch.backends.cuda.matmul

    def state() -> tuple[bool, bool, bool]:
        return flags[0].allow_tf32, flags[0].benchmark, flags[1].allow_tf32

    original = state()
    try:
        for outside in ((True, False, True), (False, True, True), (True, True, False)):
            flags[0].allow_tf32, flags[0].benchmark, flags[1].allow_tf32 = outside  # every flag other than asked
            for asked in ((False, True), (True, False)):
                with fast.math_flags(cudnn_tf32=asked[0], cudnn_benchmark=asked[1]):
                    assert state() == (*asked, False)  # the loss's cosines stay fp32 even if TF32 matmuls were on
                assert state() == outside  # restored
    finally:
        flags[0].allow_tf32, flags[0].benchmark, flags[1].allow_tf32 = original


def test_config_compile_modes_are_the_ones_fast_knows():
    import typing

    from uniremoval.config import ModelConfig

    modes = typing.get_args(ModelConfig.model_fields["compile_mode"].annotation)
    assert modes == fast.COMPILE_MODES and set(fast.CUDA_GRAPH_MODES) <= set(modes)


def test_autocast_dtype_choices():
    from uniremoval.errors import ConfigError

    assert fast.autocast_dtype("no", "cpu") is None
    assert fast.autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        fast.autocast_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown mixed_precision"):
        fast.autocast_dtype("int8", "cpu")
    with fast.autocast("cpu", None):  # full precision: no autocast at all
        assert not torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype is torch.float32
    with fast.autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype is torch.bfloat16


def test_speed_from_config(tmp_path, monkeypatch):
    from uniremoval.config import KTStage

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cfg = KTStage.model_validate({"model": {"preset": "tiny", "channels_last": True},
                                  "train": {"mixed_precision": "bf16"}, "stage": "kt",
                                  "output_dir": str(tmp_path)})
    speed = fast.Speed.from_config(cfg, "cpu")
    assert (speed.dtype, speed.channels_last, speed.compile) == (torch.bfloat16, True, False)
    assert speed.compile_cache == str(tmp_path / "default" / "compile_cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's export wins
    assert fast.Speed.from_config(cfg, "cpu").compile_cache == str(tmp_path / "mine")


def test_compile_refused_up_front_on_a_torch_without_set_stance(tmp_path, monkeypatch):
    # an older torch (< 2.6) is simulated: it cannot be installed here beside the pinned one
    from uniremoval.config import KTStage
    from uniremoval.errors import ConfigError

    cfg = KTStage.model_validate({"model": {"preset": "tiny", "compile": True}, "stage": "kt",
                                  "output_dir": str(tmp_path)})
    assert fast.Speed.from_config(cfg, "cpu").compile  # this torch has it
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ConfigError, match=r"model.compile=true needs torch>=2.6.*model.compile=false"):
        fast.Speed.from_config(cfg, "cpu")
    cfg_eager = KTStage.model_validate({"model": {"preset": "tiny"}, "stage": "kt", "output_dir": str(tmp_path)})
    assert not fast.Speed.from_config(cfg_eager, "cpu").compile  # without compile, nothing is asked of torch


def test_compile_in_place_keeps_keys_and_eager_stance(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.manual_seed(3)
    model = MPRNet("tiny")
    keys = list(model.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = model(x)[0]
    same = fast.compile_module(model, tmp_path / "inductor")
    assert same is model and type(model) is MPRNet  # checkpoints and wrappers see the plain network
    assert list(model.state_dict()) == keys
    assert (tmp_path / "inductor").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "inductor").resolve())
    with torch.no_grad(), fast.eager():  # no compilation here (it would take minutes on this CPU)
        torch.testing.assert_close(model(x)[0], want, rtol=0, atol=0)
    assert not fast.load_compile_artifacts(tmp_path / "missing.bin")
