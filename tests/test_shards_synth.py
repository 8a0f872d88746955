"""Synthesis: the physics of each degradation, seeding, recorded parameters, and `shards synth`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from test_shards_layouts import decode, run_cli, samples

from uniremoval.data.manifest import load_manifest, verify_shards
from uniremoval.data.synth import (
    PRESETS,
    BlurRanges,
    HazeRanges,
    RainRanges,
    SynthRanges,
    encode_image,
    get_preset,
    shake_kernel,
    synthesize,
)
from uniremoval.errors import ConfigError, DataError


def textured(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 3, ys * 4, (xs + ys) * 2], -1) % 200 + 20
    return (base + rng.integers(0, 30, base.shape)).astype(np.uint8)


@pytest.mark.parametrize("degradation", ["haze", "rain", "blur"])
@pytest.mark.parametrize("preset", ["default", "real-like"])
def test_seeded_and_recorded(degradation: str, preset: str) -> None:
    img = textured()
    a, pa = synthesize(img, degradation, np.random.default_rng(7), PRESETS[preset])
    b, pb = synthesize(img, degradation, np.random.default_rng(7), PRESETS[preset])
    c, pc = synthesize(img, degradation, np.random.default_rng(8), PRESETS[preset])
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c) and pa != pc
    assert np.abs(a.astype(int) - img).mean() > 0.5, "the degradation must be visible"
    json.dumps(pa)  # parameters are plain JSON
    if preset == "real-like":
        assert 55 <= pa["jpeg_quality"] <= 90 and pa["noise_sigma"] > 0
        data, ext = encode_image(a, pa)
        assert ext == "jpg" and data[:2] == b"\xff\xd8"
    else:
        assert pa["jpeg_quality"] is None and pa["noise_sigma"] == 0
        data, ext = encode_image(a, pa)
        assert ext == "png" and np.array_equal(decode(data), a)


def test_haze_follows_scattering_model() -> None:
    ranges = SynthRanges(
        haze=HazeRanges(
            beta=(1.2, 1.2),
            airlight=(0.9, 0.9),
            airlight_tint=(0, 0),
            near=(0.2, 0.2),
            vertical_weight=(1.0, 1.0),
        )
    )
    clean = np.full((40, 30, 3), 51, np.uint8)  # J = 0.2 everywhere: only the depth ramp varies
    out, p = synthesize(clean, "haze", np.random.default_rng(0), ranges)
    t_top, t_bottom = np.exp(-1.2 * 1.0), np.exp(-1.2 * 0.2)  # depth 1 at the top, `near` at the bottom
    expect_top = 0.2 * t_top + 0.9 * (1 - t_top)
    expect_bottom = 0.2 * t_bottom + 0.9 * (1 - t_bottom)
    assert abs(out[0].mean() / 255 - expect_top) < 0.02
    assert abs(out[-1].mean() / 255 - expect_bottom) < 0.02
    assert np.all(np.diff(out[:, :, 0].mean(axis=1)) <= 0.5), "farther (higher) rows are hazier"
    assert p["beta"] == 1.2 and p["airlight"] == [0.9, 0.9, 0.9]
    assert abs(p["transmission_min"] - t_top) < 0.01


def test_blur_kernel_is_normalised_and_centred() -> None:
    rng = np.random.default_rng(3)
    for size in (9, 17, 31):
        k = shake_kernel(rng, size, 0.9, 0.2)
        assert k.shape == (size, size) and k.min() >= 0 and abs(k.sum() - 1) < 1e-9
        ys, xs = np.mgrid[0:size, 0:size]
        c = (size - 1) / 2
        assert abs((k * ys).sum() - c) < 0.6 and abs((k * xs).sum() - c) < 0.6
    flat = np.full((32, 32, 3), 123, np.uint8)
    out, p = synthesize(flat, "blur", rng, PRESETS["default"])
    assert np.abs(out.astype(int) - 123).max() <= 1, "a constant image stays constant (borders reflected)"
    assert p["kernel_size"] % 2 == 1 and 9 <= p["kernel_size"] <= 25
    img = textured(64, 64)
    out, _ = synthesize(img, "blur", rng, SynthRanges(blur=BlurRanges(kernel_size=(15, 15))))
    assert abs(out.astype(float).mean() - img.astype(float).mean()) < 3
    assert (
        np.abs(np.diff(out.astype(float), axis=1)).mean() < np.abs(np.diff(img.astype(float), axis=1)).mean()
    )


def test_rain_only_adds_light_streaks() -> None:
    img = textured()
    out, p = synthesize(img, "rain", np.random.default_rng(1), SynthRanges(rain=RainRanges(layers=(2, 2))))
    assert np.all(out.astype(int) >= img.astype(int) - 1), "screen blending never darkens"
    assert len(p["layers"]) == 2 and all(0 < layer["coverage"] < 0.6 for layer in p["layers"])
    assert all(-30 <= layer["angle"] <= 30 for layer in p["layers"])


def test_ranges_are_validated() -> None:
    with pytest.raises(ValidationError, match="beta"):
        HazeRanges(beta=(2.0, 1.0))
    with pytest.raises(ValidationError):
        HazeRanges(betta=(1.0, 2.0))
    with pytest.raises(ConfigError, match="real-like"):
        get_preset("realistic")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        synthesize(np.zeros((8, 8), np.uint8), "haze", np.random.default_rng(0))


def test_a_params_file_is_refused_key_by_key_in_one_line(tmp_path: Path) -> None:
    """A negative blur kernel size raised a numpy traceback mid-build; now the file is refused up front,
    each bad key on the error line, without pydantic's multi-line dump."""
    bad = tmp_path / "p.yaml"
    bad.write_text("blur: {kernel_size: [-3, 5]}\nhaze: {bogus: 1}\n")
    with pytest.raises(ConfigError) as err:
        get_preset(str(bad))
    msg = str(err.value)
    assert "\n" not in msg and "errors.pydantic.dev" not in msg
    assert "blur.kernel_size.0: Input should be greater than 0" in msg and "haze.bogus: Extra inputs" in msg


# ---------------------------------------------------------------------------------------------
# `uniremoval shards synth`


def clean_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate([(48, 64), (40, 40), (56, 32)]):
        Image.fromarray(textured(h, w, seed=i)).save(root / f"img{i}.png")
    Image.fromarray(textured(32, 48, seed=9)).save(root / "photo.jpg", quality=90)
    return root


def synth(clean: Path, out: Path, *extra: str) -> int:
    return run_cli(
        "synth", "--clean", str(clean), "--out", str(out), "--workers", "1", "--no-progress", *extra
    )


def test_synth_scales_sixteen_bit_grey_clean_images(tmp_path: Path) -> None:
    # The same picture as a 16-bit and as an 8-bit grey PNG, under the same name (same sample
    # seed): the synthesized inputs match. PIL's convert("RGB") clipped the 16-bit one at 255.
    grey8 = textured(40, 48, seed=3)[:, :, 0]
    for depth in (8, 16):
        (tmp_path / f"c{depth}").mkdir()
        arr = grey8.astype(np.uint16) * 257 if depth == 16 else grey8
        Image.fromarray(arr).save(tmp_path / f"c{depth}" / "g.png")
        assert synth(tmp_path / f"c{depth}", tmp_path / f"o{depth}", "--degradation", "haze", "--seed", "1") == 0
    (k8, f8), = samples(tmp_path / "o8")
    (k16, f16), = samples(tmp_path / "o16")
    assert k8 == k16 and json.loads(f16["json"])["synthesis"] == json.loads(f8["json"])["synthesis"]
    assert np.array_equal(decode(f16["input.png"]), decode(f8["input.png"]))
    assert decode(f16["input.png"]).mean() < 250


def test_synth_degrades_the_pixels_the_loaders_decode(tmp_path: Path) -> None:
    """Clean photos as people have them (CMYK JPEG, palette with transparency, grey+alpha, 16-bit
    RGB, upper-case extension): each input is synthesized from exactly the pixels the loaders
    decode the stored target to (`decode_image`), so a pair differs by the degradation only
    (PIL's CMYK conversion is one level off OpenCV's on most pixels). macOS's ._<name> is not a
    clean image; a HEIC and an empty file are reported by name and kind."""
    import cv2

    from uniremoval.data.synth import _rgb8
    from uniremoval.data.transforms import decode_image

    clean = tmp_path / "clean"
    clean.mkdir()
    rgb = textured(24, 32, seed=9)
    Image.fromarray(rgb).convert("CMYK").save(clean / "cmyk.JPG", quality=95)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32).save(clean / "pal.png", transparency=0)
    Image.fromarray(rgb).convert("LA").save(clean / "la.png")
    cv2.imwrite(str(clean / "rgb16.png"), (rgb.astype(np.uint16) * 257 + 7)[:, :, ::-1])
    (clean / "._cmyk.JPG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (clean / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (clean / "empty.png").write_bytes(b"")
    out = tmp_path / "o"
    assert synth(clean, out, "--degradation", "haze", "--seed", "2") == 0
    report = {(r["kind"], r["path"]): r["reason"] for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert report == {("unsupported_format", "IMG_1.HEIC"): ".heic is not read here; convert it to PNG or JPEG",
                      ("unreadable", "empty.png"): "empty file (0 bytes)"}
    got = samples(out)
    assert sorted(json.loads(f["json"])["input_name"] for _, f in got) == ["cmyk.JPG", "la.png", "pal.png", "rgb16.png"]
    for _, fields in got:
        meta = json.loads(fields["json"])
        target = next(v for k, v in fields.items() if k.startswith("target."))
        assert target == (clean / meta["input_name"]).read_bytes()
        again, _ = synthesize(_rgb8(decode_image(target)), "haze",
                              np.random.default_rng(meta["synthesis"]["sample_seed"]))
        assert np.array_equal(decode(fields["input.png"]), again), meta["input_name"]


def test_synth_build(tmp_path: Path) -> None:
    clean = clean_dir(tmp_path / "clean")
    out = tmp_path / "haze"
    assert synth(clean, out, "--degradation", "haze", "--per-image", "2", "--seed", "5") == 0
    got = samples(out)
    assert len(got) == 8 and len({k for k, _ in got}) == 8
    for key, fields in got:
        meta = json.loads(fields["json"])
        assert key.endswith(("-haze0", "-haze1")) and "." not in key
        assert (meta["degradation"], meta["domain"], meta["split"]) == ("haze", "synthetic", "train")
        syn = meta["synthesis"]
        assert syn["preset"] == "default" and syn["seed"] == 5 and syn["variant"] in (0, 1)
        assert {"beta", "airlight", "sample_seed"} <= syn.keys()
        src = clean / meta["target_name"]
        tgt_ext = "jpg" if src.suffix == ".jpg" else "png"
        assert fields[f"target.{tgt_ext}"] == src.read_bytes(), "the clean target is the original file"
        inp = decode(fields["input.png"])
        assert (
            inp.shape[:2] == (meta["height"], meta["width"]) == decode(fields[f"target.{tgt_ext}"]).shape[:2]
        )
        # reproducible from the recorded seed alone
        again, _ = synthesize(
            np.asarray(Image.open(src).convert("RGB")), "haze", np.random.default_rng(syn["sample_seed"])
        )
        assert np.array_equal(inp, again)
    manifest = load_manifest(out)
    assert manifest["counts"] == {
        "total": 8,
        "degradation": {"haze": 8},
        "domain": {"synthetic": 8},
        "split": {"train": 8},
    }
    assert manifest["source"]["params"] == "default" and verify_shards(out) == []

    same = tmp_path / "same"  # and with two workers sharing the one shard's samples
    synth(
        clean,
        same,
        "--degradation",
        "haze",
        "--per-image",
        "2",
        "--seed",
        "5",
        "--name",
        "haze",
        "--workers",
        "2",
    )
    assert [s["sha256"] for s in load_manifest(same)["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other = tmp_path / "other"
    synth(clean, other, "--degradation", "haze", "--per-image", "2", "--seed", "6", "--name", "haze")
    assert [s["sha256"] for s in load_manifest(other)["shards"]] != [s["sha256"] for s in manifest["shards"]]


def test_synth_real_like_and_bad_clean(tmp_path: Path) -> None:
    clean = clean_dir(tmp_path / "clean")
    full = (clean / "img0.png").read_bytes()
    (clean / "broken.png").write_bytes(full[: len(full) // 3])
    out = tmp_path / "rain"
    synth(clean, out, "--degradation", "rain", "--per-image", "2", "--params", "real-like")
    got = samples(out)
    assert len(got) == 8
    assert all("input.jpg" in f and json.loads(f["json"])["synthesis"]["jpeg_quality"] for _, f in got)
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["path"]) for r in report] == [("truncated", "broken.png")]
    assert load_manifest(out)["issues"] == {"total": 1, "truncated": 1}
    with pytest.raises(DataError, match=r"truncated: broken\.png"):
        synth(clean, tmp_path / "blur", "--degradation", "blur", "--strict")


def test_synth_on_real_clean_images(tmp_path: Path) -> None:
    real = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "clean"
    if not real.is_dir():
        pytest.skip("../shared/realdata is not present")
    img = np.asarray(Image.open(min(real.glob("*.png"))).convert("RGB"))[:128, :128]
    for d in ("haze", "rain", "blur"):
        out, _ = synthesize(img, d, np.random.default_rng(0))
        gray_in, gray_out = img.mean(axis=2), out.astype(float).mean(axis=2)
        if d == "haze":
            assert gray_out.std() < gray_in.std(), "haze lowers contrast"
        if d == "blur":
            assert np.abs(np.diff(gray_out, axis=0)).mean() < np.abs(np.diff(gray_in, axis=0)).mean()
        if d == "rain":
            assert gray_out.mean() > gray_in.mean()


def test_synth_params_file(tmp_path: Path) -> None:
    clean = clean_dir(tmp_path / "clean")
    params = tmp_path / "ranges.yaml"
    params.write_text("haze:\n  beta: [2.0, 2.0]\n  near: [0.5, 0.5]\nnoise:\n  jpeg_quality: [70, 70]\n")
    out = tmp_path / "out"
    synth(clean, out, "--degradation", "haze", "--params", str(params))
    metas = [json.loads(f["json"])["synthesis"] for _, f in samples(out)]
    assert len(metas) == 4 and all(m["beta"] == 2.0 and m["jpeg_quality"] == 70 for m in metas)
    assert all(m["preset"] == str(params) for m in metas)
    params.write_text("haze:\n  beta: [2.0, 1.0]\n")
    with pytest.raises(ConfigError, match="not valid synthesis ranges"):
        synth(clean, tmp_path / "o2", "--degradation", "haze", "--params", str(params))


def test_synth_never_builds_over_another_dataset_or_a_running_build(tmp_path: Path) -> None:
    """An --out that holds another dataset (here: haze, asked for rain) is refused before anything
    is written; the same build again reuses it; while a build holds the folder, a second one stops
    naming the holder instead of interleaving with it."""
    from uniremoval.errors import UniremovalError
    from uniremoval.io import folder_lock

    clean = clean_dir(tmp_path / "clean")
    out = tmp_path / "out"
    assert synth(clean, out, "--degradation", "haze", "--seed", "5") == 0
    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(UniremovalError, match=r"--out .*out holds dataset 'out' \(format=synth, root=.*clean, "
                                              r"degradation=haze\); this command builds 'out' with another "
                                              r"degradation: choose another --out"):
        synth(clean, out, "--degradation", "rain", "--seed", "5")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars
    assert synth(clean, out, "--degradation", "haze", "--seed", "5") == 0  # the same build: reused
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars
    with folder_lock(out, ".lock-job0of1", "shards (job 0)"), \
            pytest.raises(UniremovalError, match=r"out is in use: pid \d+ on .* is writing shards \(job 0\) there"):
        synth(clean, out, "--degradation", "haze", "--seed", "5")
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars


def test_synth_degrades_a_turned_photo_upright_and_keeps_its_bytes(tmp_path: Path) -> None:
    """A clean phone photo stored sideways with EXIF orientation 6: rain is drawn on the picture as
    displayed (streaks fall down it, not across), the target keeps the photo's bytes, and json
    `orientation` turns input and target upright together in the loaders."""
    from uniremoval.data.pipelines import decode_sample
    from uniremoval.data.transforms import apply_orientation

    upright = textured(40, 56, seed=4)
    stored = np.ascontiguousarray(apply_orientation(upright, 8))  # what orientation 6 turns back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    clean = tmp_path / "clean"
    clean.mkdir()
    Image.fromarray(stored).save(clean / "IMG_0001.png", exif=exif.tobytes())
    assert synth(clean, tmp_path / "o", "--degradation", "rain", "--seed", "3") == 0
    (_, fields), = samples(tmp_path / "o")
    meta = json.loads(fields["json"])
    assert meta["orientation"] == 6 and (meta["height"], meta["width"]) == (40, 56)
    assert fields["target.png"] == (clean / "IMG_0001.png").read_bytes()
    s = decode_sample(fields, ("target",))
    assert np.array_equal(s["target"], upright)
    again, _ = synthesize(upright, "rain", np.random.default_rng(meta["synthesis"]["sample_seed"]))
    assert np.array_equal(s["input"], again)
