"""MPRNet against the official state_dict specs, checkpoints (ours and official), discriminator, VGG."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from uniremoval.errors import CheckpointError, ConfigError
from uniremoval.models import build_model
from uniremoval.models.checkpoint import alias_groups, checkpoint_sha256, load_checkpoint, save_checkpoint
from uniremoval.models.discriminator_arch import PatchDiscriminator, min_input_size
from uniremoval.models.mprnet_arch import (
    MPRNet,
    infer_config,
    pad_to_multiple,
    preset_and_overrides,
)
from uniremoval.models.vgg_arch import LAYER_NAMES, VGG19_FILE, VGG19_URL, VGGFeatures

REPO = Path(__file__).resolve().parents[1]
SPEC_DIRS = (Path("/work/shared/specs"), REPO.parent / "shared" / "specs")


def read_spec(preset: str) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    for d in SPEC_DIRS:
        f = d / f"mprnet_{preset}_state_dict.tsv"
        if f.is_file():
            break
    else:
        pytest.skip(f"spec mprnet_{preset}_state_dict.tsv not found")
    rows, total = [], None
    for line in f.read_text().splitlines():
        if line.startswith("#"):
            # "... 316 entries; 20127073 trainable parameters (unique) ..."
            total = int(line.split("entries;")[1].split()[0])
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split("x"))))
    assert total is not None
    return rows, total


def prelu_modules(model: nn.Module) -> set[int]:
    return {id(m) for m in model.modules() if isinstance(m, nn.PReLU)}


# ------------------------------------------------------------------------------------------ MPRNet


@pytest.mark.parametrize(("preset", "expected"), [("deblur", 20_127_073), ("derain", 3_637_249)])
def test_spec_state_dict_loads_strictly_and_counts_match(preset: str, expected: int) -> None:
    rows, total = read_spec(preset)
    assert total == expected
    model = MPRNet(preset)
    sd = model.state_dict()
    # Same keys, same order, same shapes as the official state_dict.
    assert list(sd) == [k for k, _ in rows]
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(rows)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    spec_sd = {k: torch.zeros(shape) for k, shape in rows}
    result = model.load_state_dict(spec_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # One PReLU shared by every CAB, as in the official model.
    assert len(prelu_modules(model)) == 1
    groups = alias_groups(model)
    assert len(groups) == 1 and groups == alias_groups(sd)
    assert groups[0] == [k for k in sd if k.endswith(".body.1.weight") and sd[k].shape == (1,)]
    assert sum(k.endswith("body.1.weight") for k in sd) > 50


def test_official_pth_with_prefix_loads_and_infers_preset(tmp_path: Path) -> None:
    rows, _ = read_spec("derain")
    # Distinct values per key (so a mis-routed key would show), one value for the shared PReLU.
    spec_sd = {
        k: torch.full(shape, 0.25 if k.endswith("body.1.weight") else 0.001 * i)
        for i, (k, shape) in enumerate(rows)
    }
    f = tmp_path / "model_deraining.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in spec_sd.items()}, "epoch": 250}, f)
    model, meta = load_checkpoint(f)
    assert meta["preset"] == "derain" and meta["input_range"] == "zero_one" and meta["arch"] == "mprnet"
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, spec_sd[k]), k
    assert len(prelu_modules(model)) == 1
    # A bare state_dict (no wrapper, no prefix) loads too, with the preset given.
    torch.save(spec_sd, tmp_path / "bare.pth")
    model2, _ = load_checkpoint(tmp_path / "bare.pth", preset="derain")
    assert torch.equal(model2.tail.weight, spec_sd["tail.weight"])


def test_spec_file_refused_by_wrong_preset(tmp_path: Path) -> None:
    rows, _ = read_spec("derain")
    f = tmp_path / "derain.pth"
    torch.save({"state_dict": {k: torch.zeros(s) for k, s in rows}}, f)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(f, preset="denoise")
    msg = str(err.value)
    assert "derain.pth" in msg and "mismatched shapes (261): shallow_feat1.0.weight" in msg
    assert "look like MPRNet preset 'derain'" in msg


def tiny(seed: int = 0) -> MPRNet:
    torch.manual_seed(seed)
    return MPRNet("tiny").eval()


def test_forward_outputs_feature_and_residual() -> None:
    model = tiny()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        images, feat = model(x, return_feature=True)
        plain = model(x)
    assert isinstance(images, list) and len(images) == 3
    assert all(im.shape == x.shape for im in images)
    assert feat.shape == (2, model.feature_channels, 32, 32)
    assert model.feature_channels == 12 + 4
    torch.testing.assert_close(plain[0], images[0])
    # final = tail(feature) + input: the feature is exactly what the output is read from.
    torch.testing.assert_close(images[0], model.tail(feat) + x)


# Produced by the official implementation (swz30/MPRNet, Deraining/MPRNet.py, run outside this repo) in
# float64 with the formula weights and input below, tiny widths (12/6/4, 1 CAB per ORB): per output
# image [final, stage2, stage1]: sum, mean |.|, and pixels (c, y, x) = (0,0,0), (1,7,11), (2,15,23), (0,8,12).
OFFICIAL_GOLDEN = [
    (
        557.077211186546,
        0.4835894023221101,
        (0.5268300514262725, 0.4487640565678804, 0.9619860811535828, 0.21075231493707391),
    ),
    (
        557.8640148456017,
        0.4974229284237148,
        (0.54790726260745, 0.5429386027840155, 0.9264348113267415, 0.26179205157276186),
    ),
    (
        556.8875001854457,
        0.4839985234873687,
        (0.4843177835512893, 0.3731968042076726, 0.9953123612192055, 0.13854322208178274),
    ),
]


def test_matches_official_implementation_outputs() -> None:
    import math

    model = MPRNet("tiny").double().eval()
    weights = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        if v.dim() > 1:
            t = (
                torch.sin(torch.arange(v.numel(), dtype=torch.float64) * 0.7 + i)
                * 0.5
                / math.sqrt(v[0].numel())
            )
            weights[k] = t.view(v.shape)
        else:
            weights[k] = torch.tensor([0.2], dtype=torch.float64)  # the shared PReLU
    model.load_state_dict(weights, strict=True)
    yy, xx = torch.meshgrid(
        torch.arange(16.0, dtype=torch.float64), torch.arange(24.0, dtype=torch.float64), indexing="ij"
    )
    x = torch.stack(
        [0.5 + 0.4 * torch.sin(0.3 * xx + 0.2 * yy), 0.5 + 0.4 * torch.cos(0.25 * yy), (xx + yy) / 40]
    ).unsqueeze(0)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(OFFICIAL_GOLDEN) == 3  # zip below would stop at the shorter
    for out, (total, mean_abs, pixels) in zip(outs, OFFICIAL_GOLDEN):
        assert out.sum().item() == pytest.approx(total, rel=1e-9)
        assert out.abs().mean().item() == pytest.approx(mean_abs, rel=1e-9)
        got = [out[0, c, r, q].item() for c, r, q in [(0, 0, 0), (1, 7, 11), (2, 15, 23), (0, 8, 12)]]
        assert got == pytest.approx(list(pixels), rel=1e-9, abs=1e-12)


def test_batched_patches_keep_samples_apart() -> None:
    # Stages 1 and 2 stack their patches on the batch dimension: sample i of a batch must come out
    # as sample i alone (a mixed-up stacking order would swap quarters between images).
    model = tiny().double().eval()
    x = torch.rand(3, 3, 24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        images, feat = model(x, return_feature=True)
        for i in range(3):
            alone, alone_feat = model(x[i : i + 1], return_feature=True)
            for out, ref in zip(images, alone):
                torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(feat[i : i + 1], alone_feat, rtol=1e-12, atol=1e-12)


def test_compiled_upsampling_is_the_official_bilinear_without_a_scatter() -> None:
    """Under torch.compile, UpSample's bilinear x2 is a gather stencil: the official values (float64,
    forward and every gradient, odd and even sides, channels-last kept), and the traced forward and
    backward graphs hold no up-sampling op, whose decomposition scatters its gradient with atomics."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    from uniremoval.models.mprnet_arch import upsample2x

    ops: set[str] = set()

    def record(gm, example_inputs):  # traces as inductor would (AOT forward + backward), runs as traced
        def keep(graph, _inputs):
            ops.update(str(n.target) for n in graph.graph.nodes)
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    gen = torch.Generator().manual_seed(3)
    for shape, channels_last in (((2, 5, 3, 7), False), ((2, 4, 6, 8), True)):
        x = torch.randn(*shape, dtype=torch.float64, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=torch.float64, generator=gen)
        ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = torch.compile(upsample2x, backend=record, fullgraph=True)(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=0, atol=1e-13)
        torch._dynamo.reset()
    # bf16 (autocast's conv outputs): computed in fp32 and rounded once, as PyTorch's kernel does.
    from uniremoval.models.mprnet_arch import upsample2x_stencil

    xb = torch.randn(2, 16, 10, 12, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.interpolate(xb, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample2x_stencil(xb), ref, rtol=8e-3, atol=0)  # one bf16 rounding (exact here)

    model = tiny().double()
    x = torch.rand(2, 3, 24, 32, dtype=torch.float64, generator=gen)
    grads = []
    for compiled in (False, True):
        m = tiny().double()
        m.load_state_dict(model.state_dict())
        if compiled:
            m.compile(backend=record)
        images, feat = m(x, return_feature=True)
        loss = images[0].square().mean() + feat.square().mean()
        grads.append((loss.detach(), torch.autograd.grad(loss, list(m.parameters()))))
    torch._dynamo.reset()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=0)
    for a, b in zip(*(g for _, g in grads)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert ops and not [op for op in ops if "upsample" in op or "index_put" in op or "scatter" in op]


def test_odd_size_pads_and_crops() -> None:
    model = tiny()
    x = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        images, feat = model(x, return_feature=True)
        # Same as padding by hand (reflect, bottom/right, to 40x48) and cropping.
        padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="reflect")
        ref_images, ref_feat = model(padded, return_feature=True)
    assert [tuple(im.shape) for im in images] == [(1, 3, 37, 45)] * 3
    assert feat.shape == (1, model.feature_channels, 37, 45)
    torch.testing.assert_close(images[0], ref_images[0][..., :37, :45])
    torch.testing.assert_close(feat, ref_feat[..., :37, :45])
    # Tiny inputs (pad >= side) fall back to replicate padding instead of failing.
    small, h, w = pad_to_multiple(torch.rand(1, 3, 3, 5))
    assert small.shape[-2:] == (8, 8) and (h, w) == (3, 5)


def test_tiny_trains_one_step() -> None:
    model = tiny().train()
    x = torch.rand(2, 3, 32, 32)
    images, feat = model(x, return_feature=True)
    (images[0].abs().mean() + feat.pow(2).mean()).backward()
    prelu = model.shallow_feat1[1].body[1].weight
    assert prelu.grad is not None and prelu.grad.abs().item() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_infer_config_and_build_model() -> None:
    for preset in ("tiny", "derain"):
        m = build_model("mprnet", preset)
        cfg = infer_config({k: tuple(v.shape) for k, v in m.state_dict().items()})
        assert preset_and_overrides(cfg) == (preset, {})
    custom = MPRNet("tiny", num_cab=2)
    cfg = infer_config({k: tuple(v.shape) for k, v in custom.state_dict().items()})
    assert preset_and_overrides(cfg) == ("tiny", {"num_cab": 2})
    with pytest.raises(ConfigError, match=r"unknown mprnet preset 'huge'; choose one of \['deblur', 'denoise', "):
        build_model("mprnet", "huge")
    # the registry the config reads without torch names the presets the module builds
    from uniremoval.models import ARCH_SPECS
    from uniremoval.models.mprnet_arch import PRESETS

    assert sorted(ARCH_SPECS["mprnet"].presets) == sorted(PRESETS) and ARCH_SPECS["mprnet"].default_preset in PRESETS
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model("unet", "tiny")


# ------------------------------------------------------------------------------------- checkpoints


def test_save_load_roundtrip_keeps_shared_prelu(tmp_path: Path) -> None:
    model = tiny()
    with torch.no_grad():
        model.stage2_decoder.skip_attn1.body[1].weight.fill_(0.37)  # any alias: it is one Parameter
    path = save_checkpoint(tmp_path / "kt" / "step_10", model, {"step": 10, "config_hash": "abc"})
    assert path == tmp_path / "kt" / "step_10.safetensors" and path.is_file()
    meta_file = json.loads((tmp_path / "kt" / "step_10.json").read_text())
    assert meta_file["arch"] == "mprnet" and meta_file["preset"] == "tiny"
    assert meta_file["input_range"] == "minus_one_one" and meta_file["step"] == 10
    assert meta_file["config_hash"] == "abc"
    n_prelu_keys = sum(tuple(v.shape) == (1,) for v in model.state_dict().values())
    assert n_prelu_keys == 34 and len(meta_file["aliases"]) == n_prelu_keys - 1

    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 10
    prelus = [m for m in loaded.modules() if isinstance(m, nn.PReLU)]
    assert len({id(m) for m in prelus}) == 1
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert prelus[0].weight.item() == pytest.approx(0.37)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    # The same checkpoint loads from its JSON name or its base name; the hash is the weights file's.
    load_checkpoint(tmp_path / "kt" / "step_10.json")
    assert checkpoint_sha256(tmp_path / "kt" / "step_10") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta_file["weights_sha256"] == checkpoint_sha256(path)


def test_save_gathered_state_dict(tmp_path: Path) -> None:
    """A gathered state_dict (ZeRO-3 style: every key its own tensor, `module.` prefix) saves and reloads shared."""
    model = tiny()
    gathered = {"module." + k: v.clone() + 1 for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "z", model, {}, state_dict=gathered)
    loaded, _ = load_checkpoint(path)
    assert len(prelu_modules(loaded)) == 1
    torch.testing.assert_close(loaded.tail.weight, model.tail.weight + 1)
    with pytest.raises(CheckpointError, match="keys differ"):
        save_checkpoint(tmp_path / "bad", model, {}, state_dict={"tail.weight": model.tail.weight})


def test_custom_overrides_roundtrip(tmp_path: Path) -> None:
    model = MPRNet("tiny", num_cab=2)
    path = save_checkpoint(tmp_path / "c", model, {"input_range": "zero_one"})
    loaded, meta = load_checkpoint(path)
    assert loaded.config.num_cab == 2 and meta["input_range"] == "zero_one"
    with pytest.raises(CheckpointError, match="preset 'tiny', not 'derain'"):
        load_checkpoint(path, preset="derain")


def _official_tiny(tmp_path: Path, name: str, mutate=None) -> Path:
    sd = dict(tiny().state_dict())
    if mutate:
        mutate(sd)
    f = tmp_path / name
    torch.save({"state_dict": sd}, f)
    return f


def test_truncated_files(tmp_path: Path) -> None:
    f = _official_tiny(tmp_path, "cut.pth")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: truncated or corrupt"):
        load_checkpoint(f, preset="tiny")
    ours = save_checkpoint(tmp_path / "ours", tiny(), {})
    data = ours.read_bytes()
    ours.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"ours\.safetensors: truncated or corrupt"):
        load_checkpoint(ours)


def test_a_checkpoint_that_cannot_be_read_is_not_called_corrupt(tmp_path: Path, monkeypatch) -> None:
    """A weights file without read permission was reported as "truncated or corrupt ... (No such file
    or directory)" with advice to download it again. (Opening is refused by a stand-in: chmod does not
    stop root, who may run the suite.)"""
    import builtins
    import errno
    import os

    from uniremoval.models import checkpoint as checkpoint_mod

    ours = save_checkpoint(tmp_path / "ours", tiny(), {})
    official = _official_tiny(tmp_path, "official.pth")
    real_open = builtins.open

    def refuse(file, *a, **kw):
        if Path(str(file)) in (ours, official):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(checkpoint_mod, "open", refuse, raising=False)
    for path in (ours, official):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path, preset="tiny")
        assert str(caught.value) == f"{path}: cannot be read (Permission denied); give the user running this read access to it"


def test_files_that_are_no_checkpoint_say_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An HTML page saved as model_deblurring.pth (a failed download) went through torch's unpickler,
    whose parser raised a bare KeyError: a traceback from `restore`, and 'cannot read VGG-19 weights
    (174812789)' for features.path. Each is one error naming the file and what it is."""
    import numpy as np
    from PIL import Image

    from uniremoval.cli import main

    page = tmp_path / "model_deblurring.pth"
    page.write_bytes(b"junk\n")  # torch's unpickler: KeyError(174812789)
    with pytest.raises(CheckpointError, match=r"model_deblurring\.pth: not a PyTorch file \(5 bytes, starting "
                                              r"b'junk\\n'.*download the checkpoint again"):
        load_checkpoint(page)
    memo = tmp_path / "memo.pth"
    memo.write_bytes(b"\x80\x02h\x05.")  # a pickle that fetches a memo slot it never stored: KeyError
    with pytest.raises(CheckpointError, match=r"memo\.pth: truncated or corrupt checkpoint \(KeyError: 5\)"):
        load_checkpoint(memo)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "a.png")
    rc = main(["restore", "--checkpoint", str(page), "--input", str(src), "--output", str(tmp_path / "out"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "not a PyTorch file" in err and "Traceback" not in err, err


class _Payload:
    """Unpickling this calls open(marker, 'w'): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    # The payload really does run code under a plain unpickler (so the test can fail).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"state_dict": {"tail.weight": _Payload(marker)}}))
    zipped = tmp_path / "zipped.pth"
    torch.save({"state_dict": _Payload(marker)}, zipped)
    for f in (legacy, zipped):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(f)
        assert f.name in str(err.value) and "refused" in str(err.value)
        assert not marker.exists()


def test_wrong_keys_and_shapes(tmp_path: Path) -> None:
    def rename(sd):
        sd["tail.kernel"] = sd.pop("tail.weight")
        del sd["sam12.conv1.weight"]

    f = _official_tiny(tmp_path, "keys.pth", rename)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(f, preset="tiny")
    msg = str(err.value)
    assert "keys.pth" in msg
    assert "missing keys (2): " in msg and "tail.weight" in msg and "sam12.conv1.weight" in msg
    assert "unexpected keys (1): tail.kernel" in msg

    def reshape(sd):
        sd["concat12.weight"] = torch.zeros(12, 24, 1, 1)

    f = _official_tiny(tmp_path, "shapes.pth", reshape)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(f, preset="tiny")
    assert "mismatched shapes (1): concat12.weight (file (12, 24, 1, 1), model (12, 24, 3, 3))" in str(
        err.value
    )

    def split_prelu(sd):
        sd["stage3_orsnet.orb1.body.0.body.1.weight"] = torch.tensor([0.9])

    f = _official_tiny(tmp_path, "prelu.pth", split_prelu)
    with pytest.raises(CheckpointError, match="one shared parameter but differ"):
        load_checkpoint(f, preset="tiny")

    f = tmp_path / "list.pth"
    torch.save([1, 2, 3], f)
    with pytest.raises(CheckpointError, match=r"list\.pth: not a state_dict"):
        load_checkpoint(f)


def test_our_checkpoint_needs_its_json(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "a", tiny(), {})
    (tmp_path / "a.json").unlink()
    with pytest.raises(CheckpointError, match=r"a\.json is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pth")


def test_a_base_name_beside_a_folder_of_that_name_still_names_its_weights(tmp_path: Path) -> None:
    """`m` with m.safetensors and a folder m/ beside it named the weights file before folders were
    refused as checkpoints; it still does (only a folder with no such file is refused)."""
    from uniremoval.models.checkpoint import resolve_weights

    path = save_checkpoint(tmp_path / "m", tiny(), {})
    (tmp_path / "m").mkdir()
    assert resolve_weights(tmp_path / "m") == path
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match=r"d is a folder, not a weights file"):
        resolve_weights(tmp_path / "d")


def test_preset_mismatch_names_the_setting_to_change(tmp_path: Path) -> None:
    """A stage names its config key (no --preset option there); the CLI keeps --preset."""
    from uniremoval.stages.teachers import load_teachers

    path = save_checkpoint(tmp_path / "t", tiny(), {})
    with pytest.raises(CheckpointError, match=r"t\.safetensors: was saved from preset 'tiny', not 'deblur'; drop --preset"):
        load_checkpoint(path, preset="deblur")
    with pytest.raises(CheckpointError, match=r"teachers\.checkpoints\.haze=.*is a 'tiny' mprnet, .*preset 'deblur' "
                                              r".*use 'tiny' throughout \(model\.preset=tiny, teachers\.preset null or tiny"):
        load_teachers({"haze": str(path)}, ["haze"], "deblur")
    # another architecture is named as such first (its preset advice led to a student that failed in turn)
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "arch": "rescnn", "preset": "small"}))
    with pytest.raises(CheckpointError, match=r"teachers\.checkpoints\.haze=.*: holds a 'rescnn' model, but the teachers "
                                              r"share the student's architecture, model\.arch='mprnet'; retrain this "
                                              r"teacher with model\.arch=mprnet, or make the student and every teacher "
                                              r"'rescnn' \(model\.arch=rescnn, model\.preset=small\)"):
        load_teachers({"haze": str(path)}, ["haze"], "tiny")


def test_weights_and_json_mixed_up(tmp_path: Path) -> None:
    a = save_checkpoint(tmp_path / "a", tiny(0), {})
    b = save_checkpoint(tmp_path / "b", tiny(1), {})
    a.write_bytes(b.read_bytes())
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(a)


# ----------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("spectral", [False, True])
def test_patch_discriminator_shape_and_checkpoint(tmp_path: Path, spectral: bool) -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(base_channels=8, n_layers=3, spectral_norm=spectral).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y = d(x)
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (4x4 stride-1 convs): one logit per 70x70 patch.
    assert y.shape == (2, 1, 6, 6)
    assert PatchDiscriminator(n_layers=2, base_channels=4)(x).shape == (2, 1, 14, 14)
    path = save_checkpoint(tmp_path / "disc", d, {"step": 3})
    d2, meta = load_checkpoint(path)
    assert meta["arch"] == "patch_discriminator" and isinstance(d2, PatchDiscriminator)
    with torch.no_grad():
        torch.testing.assert_close(d2(x), y)
    with pytest.raises(ConfigError, match="norm"):
        build_model("patch_discriminator", norm="group")


# --------------------------------------------------------------------------------------------- VGG


def test_vgg_layer_names_match_torchvision() -> None:
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):  # structure only: no memory, no init cost
        tv = make_layers(cfgs["E"])
    assert len(LAYER_NAMES) == len(tv) == 37
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, module in zip(LAYER_NAMES, tv):
        assert isinstance(module, kinds[name[:4]]), name
    assert [LAYER_NAMES.index(n) for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")] == [
        1,
        6,
        11,
        20,
        29,
    ]


def test_vgg_loads_torchvision_weights_from_path(tmp_path: Path) -> None:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    tv = make_layers(cfgs["E"][:4]).eval()  # conv1_1 .. pool2 (torchvision indices 0..9)
    f = tmp_path / VGG19_FILE
    torch.save({f"features.{k}": v for k, v in tv.state_dict().items()}, f)
    vgg = VGGFeatures(layers=("relu1_1", "relu2_1"), weights="imagenet", path=f)
    assert vgg.is_pretrained and len(vgg.features) == 7  # stops at relu2_1
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    norm = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    feats = vgg(x)
    with torch.no_grad():
        torch.testing.assert_close(feats[0], tv[:2](norm))
        torch.testing.assert_close(feats[1], tv[:7](norm))
    # Legacy (non-zip) torch files cannot be memory-mapped: they load through the fallback.
    legacy = tmp_path / "legacy.pth"
    torch.save(
        {f"features.{k}": v for k, v in tv.state_dict().items()}, legacy, _use_new_zipfile_serialization=False
    )
    torch.testing.assert_close(VGGFeatures(layers=("relu2_1",), path=legacy)(x)[0], feats[1])


def test_vgg_missing_weights_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError) as err:
        VGGFeatures()
    msg = str(err.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / VGG19_FILE) in msg and VGG19_URL in msg
    assert f"features.path=/path/to/{VGG19_FILE}" in msg and "features.weights=random" in msg  # the config keys
    bad = tmp_path / "vgg.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"vgg\.pth: truncated or corrupt VGG-19 weights file"):
        VGGFeatures(path=bad)
    bad.write_bytes(b"<!DOCTYPE html><title>Not Found</title>")  # what a failed download saves
    with pytest.raises(CheckpointError, match=r"vgg\.pth: not a PyTorch file \(39 bytes, starting b'<!DOCTYPE"):
        VGGFeatures(path=bad)


def test_vgg_random_is_frozen_tagged_and_deterministic() -> None:
    a = VGGFeatures(layers=("relu1_1", "relu2_1", "relu3_1"), weights="random")
    b = VGGFeatures(layers=("relu3_1", "relu1_1"), weights="random")
    assert not a.is_pretrained and len(a.features) == 12
    assert all(not p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    fa = a(x)
    assert [tuple(f.shape) for f in fa] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    fb = b(x)
    torch.testing.assert_close(fb[0], fa[2])  # same fixed-seed weights, order as requested
    torch.testing.assert_close(fb[1], fa[0])
    fa[2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="relu9_1"):
        VGGFeatures(layers=("relu9_1",), weights="random")


def test_identical_weights_give_identical_checkpoint_hashes(tmp_path: Path) -> None:
    """The cache identifies teachers by file sha256: re-saving the same weights must not change it."""
    model = tiny(3)
    hashes = {checkpoint_sha256(save_checkpoint(tmp_path / f"copy{i}", model, {"step": 1})) for i in range(4)}
    assert len(hashes) == 1


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_discriminator_min_input_size_is_the_smallest_it_takes(n_layers: int) -> None:
    """The config check's bound (DA data.crop_size) is exact: a training-mode forward works at it and
    fails (instance norm over a single value) one pixel below."""
    d = PatchDiscriminator(base_channels=4, n_layers=n_layers).train()
    least = min_input_size(n_layers)
    assert d(torch.zeros(2, 3, least, least)).shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        d(torch.zeros(2, 3, least - 1, least - 1))



def test_checkpoint_errors_from_a_config_key_name_the_key_not_a_cli_option(tmp_path: Path) -> None:
    """A training config's model.init or teachers.checkpoints has no --preset option to point at."""
    sd = MPRNet("tiny").state_dict()
    sd.pop("tail.weight")
    torch.save({"state_dict": sd}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): tail\.weight.*check model\.preset, or that"):
        load_checkpoint(tmp_path / "cut.pth", preset="tiny", preset_key="model.preset")
    with pytest.raises(CheckpointError, match=r"check --arch/--preset, or that"):
        load_checkpoint(tmp_path / "cut.pth", preset="tiny")
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not an MPRNet state_dict .*: a \.pth is read as an official MPRNet; "
                                              r"another architecture's weights load from our \.safetensors \+ \.json "
                                              r"\(set teachers\.preset to list the mismatched keys\)"):
        load_checkpoint(tmp_path / "other.pth", preset_key="teachers.preset")
    # eval has no --preset to pass (the message offered one), and a config run no --arch
    with pytest.raises(CheckpointError, match=r"load from our \.safetensors \+ \.json$"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"a \.pth is read as an official MPRNet, not a 'rescnn' model "
                                              r"\(model\.arch\); give the \.safetensors of a rescnn run"):
        load_checkpoint(tmp_path / "other.pth", arch="rescnn", preset_key="model.preset")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_errors_say_what_the_file_is_and_what_to_do(tmp_path: Path) -> None:
    """From a helper moving checkpoints around: our weights renamed .pth were called 'a failed download';
    a truncated .pth's message was cut mid-sentence with no advice; a training checkpoint's state.pt did not
    point to the weights beside it; a refused pickle named torch's advice, not the refused object; and a
    wrong preset's hint came after kilobytes of key lists."""
    import shutil

    weights = save_checkpoint(tmp_path / "run" / "student", tiny(), {"step": 1})
    renamed = tmp_path / "run" / "model.pth"
    shutil.copy(weights, renamed)
    with pytest.raises(CheckpointError, match=r"model\.pth: is a safetensors file .*rename it model\.safetensors and "
                                              r"put the \.json saved with it beside it as model\.json"):
        load_checkpoint(renamed)

    cut = _official_tiny(tmp_path, "cut.pth")
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(cut)
    assert str(err.value).endswith("); a partial download or copy looks like this: fetch the checkpoint again")
    assert "If you are seeing this error" not in str(err.value)

    torch.save({"step": 3, "optimizer": {"lr": 1e-4}}, tmp_path / "run" / "state.pt")
    # a DA step also holds the discriminator, which restores nothing: not offered
    shutil.copy(weights, tmp_path / "run" / "discriminator.safetensors")
    meta = json.loads(weights.with_suffix(".json").read_text())
    (tmp_path / "run" / "discriminator.json").write_text(json.dumps({**meta, "arch": "patchgan"}))
    with pytest.raises(CheckpointError, match=r"state\.pt: not a state_dict .*; the weights beside it: .*student\."
                                              r"safetensors$"):
        load_checkpoint(tmp_path / "run" / "state.pt")

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(tmp_path / "pwned")}, evil)
    with pytest.raises(CheckpointError, match=r"Detail: .*GLOBAL .*open"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()

    other = tmp_path / "tiny.pth"
    torch.save(tiny().state_dict(), other)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other, preset="derain")
    assert str(err.value).startswith(f"{other}: does not match MPRNet(derain); the file's shapes look like MPRNet "
                                     "preset 'tiny'; missing keys"), str(err.value)[:300]


def test_each_input_range_converts_to_the_model_and_back():
    """One definition of the ranges (models/ranges.py) for training, eval and restore: [-1, 1]
    data and [0, 1] images reach a minus_one_one model as [-1, 1] and a zero_one one as [0, 1]."""
    from uniremoval.errors import ConfigError
    from uniremoval.models.ranges import (
        INPUT_RANGES,
        from_model_range,
        model_range_to_unit,
        recorded_range,
        to_model_range,
        unit_to_model_range,
    )

    unit = torch.rand(2, 3, 4, 4)
    signed = unit * 2 - 1
    want = {"minus_one_one": signed, "zero_one": unit}
    for r in INPUT_RANGES:
        torch.testing.assert_close(to_model_range(signed, r), want[r])
        torch.testing.assert_close(unit_to_model_range(unit, r), want[r])
        torch.testing.assert_close(from_model_range(want[r], r), signed)
        torch.testing.assert_close(model_range_to_unit(want[r], r), unit)
    assert recorded_range({}) == "minus_one_one" and recorded_range({"input_range": "zero_one"}) == "zero_one"
    with pytest.raises(ConfigError, match=r"unknown input_range 'zero_255'; use 'minus_one_one' or 'zero_one'"):
        to_model_range(signed, "zero_255")


def test_a_model_breaking_the_output_contract_is_named_not_used(tmp_path: Path) -> None:
    """An architecture of one's own (README: Extending) that returned a bare tensor had its first sample
    taken as the batch's restoration by the cache and KT (images[0]), and a half-resolution feature was
    cached as a grid of half the cells; the teacher loss failed on a shape deep inside. The stages now
    check the outputs' shapes and name the contract."""
    from uniremoval.errors import ConfigError
    from uniremoval.models import checked_outputs
    from uniremoval.stages.teachers import Teacher, restore_with_feature

    class Toy(torch.nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode, self.conv = mode, torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, return_feature=False):
            feat = self.conv(x)
            image = x + feat[:, :3]
            if self.mode == "tensor":
                return (image, feat) if return_feature else image
            if self.mode == "half_feature":
                feat = torch.nn.functional.avg_pool2d(feat, 2)
            if self.mode == "half_image":
                image = torch.nn.functional.avg_pool2d(image, 2)
            return ([image], feat) if return_feature else [image]

    x = torch.rand(2, 3, 32, 48) * 2 - 1
    image, feature = restore_with_feature(Toy("ok"), x)
    assert image.shape == x.shape and feature.shape == (2, 4, 32, 48)
    assert Teacher("haze", Toy("ok"), "minus_one_one", "t")(x, 16)[1].shape == (2, 4, 2, 3)
    with pytest.raises(ConfigError, match=r"forward\(x, return_feature=True\) must return \(images, feature\); its "
                                          r"images are a tensor of shape \(2, 3, 32, 48\)"):
        restore_with_feature(Toy("tensor"), x)
    with pytest.raises(ConfigError, match=r"feature has shape \(2, 4, 16, 24\); it must be \(N, C, H, W\) at the "
                                          r"input's full size \(N, H, W\) = \(2, 32, 48\)"):
        Teacher("haze", Toy("half_feature"), "minus_one_one", "t")(x, 16)
    with pytest.raises(ConfigError, match=r"output 0 has shape \(2, 3, 16, 24\), not the input's \(2, 3, 32, 48\)"):
        checked_outputs(Toy("half_image")(x), x)
    with pytest.raises(ConfigError, match=r"forward\(x\) must return a list of restored images, the final one first"):
        checked_outputs(Toy("tensor")(x), x)
    outs, feat = checked_outputs(build_model("mprnet", "tiny")(x), x)
    assert len(outs) == 3 and feat is None  # MPRNet's three stage outputs, full size


def test_model_overrides_set_the_architecture_options_from_a_config(tmp_path: Path) -> None:
    """model.overrides (MPRNet: n_feat, num_cab, ...) builds the network, is saved in the checkpoint's JSON
    and rebuilt from it, and is checked wherever weights are loaded under a config: model.init, teachers
    (online, cached, the cache) and a resume. Unset, the config hash is what it was before the setting."""
    from uniremoval.config import config_changes, config_hash, config_to_dict, fixed_on_resume, load_config
    from uniremoval.errors import ConfigError
    from uniremoval.models import build_configured
    from uniremoval.stages.teachers import check_teacher_architecture, load_teachers

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "kt.yaml", ["model.preset=tiny", "model.overrides={num_cab: 2}"])
    plain = load_config(repo / "configs" / "kt.yaml", ["model.preset=tiny"])
    assert config_hash(plain) == config_hash(plain.model_copy(update={"model": plain.model.model_copy(
        update={"overrides": {}})})) != config_hash(cfg)
    net = build_configured(cfg.model)
    assert net.config.num_cab == 2 and sum(p.numel() for p in net.parameters()) != sum(
        p.numel() for p in build_configured(plain.model).parameters())
    path = save_checkpoint(tmp_path / "t", net, {"stage": "teacher", "degradation": "haze"})
    model, meta = load_checkpoint(path)  # rebuilt from its JSON alone (eval, restore)
    assert meta["model_kwargs"] == {"num_cab": 2} and model.config.num_cab == 2
    with pytest.raises(CheckpointError, match=r"saved with the architecture options \{'num_cab': 2\}, not "
                                              r"model\.overrides \{\}; set model\.overrides to \{'num_cab': 2\}"):
        load_checkpoint(path, arch="mprnet", preset="tiny", overrides={}, preset_key="model.preset")
    with pytest.raises(CheckpointError, match=r"teachers\.checkpoints\.haze=.*trained with the architecture options "
                                              r"\{'num_cab': 2\}, but the teachers share the student's"):
        load_teachers({"haze": str(path)}, ["haze"], "tiny", overrides={})
    check_teacher_architecture("haze", str(path), "mprnet", "tiny", {"num_cab": 2})  # the same: no error
    assert list(load_teachers({"haze": str(path)}, ["haze"], "tiny", overrides={"num_cab": 2})) == ["haze"]
    changes = config_changes(config_to_dict(plain), cfg)
    assert [k for k, *_ in changes] == ["model.overrides.num_cab"] and fixed_on_resume(changes[0][0])
    bad = load_config(repo / "configs" / "kt.yaml", ["model.preset=tiny", "model.overrides={width: 2}"])
    with pytest.raises(ConfigError, match=r"model\.overrides \{'width': 2\}: unknown MPRNet option\(s\) \['width'\]"):
        build_configured(bad.model)
