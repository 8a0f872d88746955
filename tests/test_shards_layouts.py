"""Every reader on a tiny tree in its dataset's own layout: build, inspect, verify, and check each
sample against the tree (pairing, bytes kept as-is, json fields).

Each pair has an id written into its pixels (red channel = id, in both input and target), so a
sample whose target belongs to another input is caught by looking at the pixels, not the names.
The helpers here are reused by the other tests/test_shards_*.py files.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniremoval.commands import shards as shards_cmd
from uniremoval.data.manifest import (
    inspect_shards,
    iter_tar_samples,
    load_manifest,
    sample_fields,
    verify_shards,
)
from uniremoval.data.shard_stream import resolve_shards
from uniremoval.errors import ConfigError, DataError

H, W = 24, 32


@dataclass
class Expected:
    target: str | None
    split: str
    pid: int


@dataclass
class Tree:
    root: Path
    expected: dict[str, Expected] = field(default_factory=dict)
    next_pid: int = 10

    def image(self, rel: str, pid: int, green: int, size: tuple[int, int] = (H, W)) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.zeros((*size, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2] = pid, green, 255 - pid
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        Image.fromarray(arr).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return path

    def new_pid(self) -> int:
        self.next_pid += 7
        assert self.next_pid < 250, "tree too large for the pixel ids"
        return self.next_pid

    def pair(
        self, inp: str, tgt: str | None, split: str, pid: int | None = None, write_target: bool = True
    ) -> int:
        """Degraded `inp` (+ clean `tgt`, written once even if shared) with the same pixel id."""
        pid = pid if pid is not None else self.new_pid()
        self.image(inp, pid, 150)
        if tgt and write_target and not (self.root / tgt).exists():
            self.image(tgt, pid, 40)
        self.expected[inp] = Expected(tgt, split, pid)
        return pid


# ---------------------------------------------------------------------------------------------
# one tree per layout, as each dataset is downloaded (see shards/README.md)


def tree_reside_its(root: Path) -> Tree:
    t = Tree(root)
    for i in (1, 2, 3):
        pid = t.new_pid()
        for k in (1, 2, 3):
            t.pair(f"hazy/{i}_{k}_0.{80 + k}179.png", f"clear/{i}.png", "train", pid)
    t.image("clear/99.png", 200, 40)  # a clear image with no hazy version: unused, not an error
    return t


def tree_reside_ots(root: Path) -> Tree:
    t = Tree(root)
    for i in ("0001", "0025"):
        pid = t.new_pid()
        for a, b in (("0.8", "0.2"), ("1", "0.04")):
            t.pair(f"hazy/{i}_{a}_{b}.jpg", f"clear/{i}.jpg", "train", pid)
    return t


def tree_reside_sots(root: Path) -> Tree:
    t = Tree(root)
    for i in ("1400", "1401"):
        pid = t.new_pid()
        for k in (1, 2):
            t.pair(f"indoor/hazy/{i}_{k}.png", f"indoor/gt/{i}.png", "test", pid)
    pid = t.new_pid()
    t.pair("outdoor/hazy/0001_0.8_0.2.jpg", "outdoor/gt/0001.png", "test", pid)
    return t


def tree_reside_unpaired(root: Path) -> Tree:
    t = Tree(root)  # RTTS
    for name in ("AM_Bing_211", "BD_Baidu_074", "YT_Google_406"):
        t.pair(f"JPEGImages/{name}.png", None, "test")
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text("<annotation/>")
    return t


def tree_rain1400(root: Path) -> Tree:
    t = Tree(root)
    for split, folder, ids in (("train", "training", (1, 2)), ("test", "testing", (901,))):
        for i in ids:
            pid = t.new_pid()
            for k in (1, 2, 14):
                t.pair(f"{folder}/rainy_image/{i}_{k}.jpg", f"{folder}/ground_truth/{i}.jpg", split, pid)
    return t


def tree_gopro(root: Path) -> Tree:
    t = Tree(root)
    for split, seq in (("train", "GOPR0372_07_00"), ("train", "GOPR0374_11_00"), ("test", "GOPR0384_11_00")):
        for frame in ("000047", "000048"):
            base = f"GOPRO_Large/{split}/{seq}"
            pid = t.pair(f"{base}/blur/{frame}.png", f"{base}/sharp/{frame}.png", split)
            t.image(f"{base}/blur_gamma/{frame}.png", pid, 150)
    return t


def tree_spa(root: Path) -> Tree:
    """Official lists: Testing/real_test_1000.txt and Training/real_world.txt, dataset-relative with '/'."""
    t = Tree(root)
    lines = []
    for n in ("001", "002"):
        inp, tgt = f"Testing/real_test_1000/rain/{n}.png", f"Testing/real_test_1000/gt/{n}gt.png"
        t.pair(inp, tgt, "test")
        lines.append(f"/real_test_1000/rain/{n}.png /real_test_1000/gt/{n}gt.png")
    (root / "Testing/real_test_1000.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for f in (1, 2):
        inp, tgt = (
            f"Training/real_world/000/000-{f}/000-{f}_1_1.png",
            "Training/real_world_gt/000/000_1_1.png",
        )
        t.pair(inp, tgt, "train", pid=60)
        lines.append(f"/real_world/000/000-{f}/000-{f}_1_1.png /real_world_gt/000/000_1_1.png")
    (root / "Training/real_world.txt").write_text("\n".join(lines) + "\n")
    return t


def tree_realblur(root: Path) -> Tree:
    t = Tree(root)
    base = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
    for split, scenes in (("train", ("scene001", "scene002")), ("test", ("scene230",))):
        lines = []
        for scene in scenes:
            for n in (1, 2):
                gt, blur = f"{base}/{scene}/gt/gt_{n}.png", f"{base}/{scene}/blur/blur_{n}.png"
                t.pair(blur, gt, split)
                lines.append(f"{gt} {blur}")
        (root / f"RealBlur_J_{split}_list.txt").write_text("\n".join(lines) + "\n")
    return t


def tree_paired_folder(root: Path) -> Tree:
    t = Tree(root)
    for name in ("a", "b_1", "c.d"):
        t.pair(f"input/{name}.png", f"target/{name}.jpg", "train")
    return t


def tree_folder(root: Path) -> Tree:
    t = Tree(root)
    for rel in ("x.png", "sub/y.jpg", "sub/deeper/z.PNG"):
        t.pair(rel, None, "train")
    return t


# format -> (tree maker, extra CLI args, degradation, domain)
LAYOUTS = {
    "reside-its": (tree_reside_its, [], "haze", "synthetic"),
    "reside-ots": (tree_reside_ots, [], "haze", "synthetic"),
    "reside-sots": (tree_reside_sots, [], "haze", "synthetic"),
    "reside-unpaired": (tree_reside_unpaired, ["--split", "test"], "haze", "real"),
    "rain1400": (tree_rain1400, [], "rain", "synthetic"),
    "gopro": (tree_gopro, [], "blur", "synthetic"),
    "spa": (tree_spa, [], "rain", "real"),
    "realblur": (tree_realblur, [], "blur", "real"),
    "paired-folder": (tree_paired_folder, ["--degradation", "rain"], "rain", "synthetic"),
    "folder": (tree_folder, ["--degradation", "clear"], "clear", "real"),
}


# ---------------------------------------------------------------------------------------------
# helpers shared with the other shard tests


def run_cli(*argv: str) -> int:
    """`uniremoval shards ...` in-process, through this command group's own parser."""
    parser = argparse.ArgumentParser(prog="uniremoval")
    shards_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shards", *argv])
    return args.func(args)


def build(fmt: str, root: Path, out: Path, *extra: str) -> int:
    return run_cli(
        "build",
        "--format",
        fmt,
        "--root",
        str(root),
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
        *extra,
    )


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def samples(out: Path) -> list[tuple[str, dict]]:
    return [s for p in resolve_shards(out) for s in iter_tar_samples(p)]


def check_samples(out: Path, tree: Tree, fmt: str, degradation: str, domain: str) -> None:
    """Every expected pair appears exactly once, with its own bytes and its own partner."""
    seen: dict[str, str] = {}
    for key, fields in samples(out):
        assert "." not in key and "/" not in key, key
        assert key not in seen, f"duplicate key {key}"
        meta = json.loads(fields["json"])
        exp = tree.expected[meta["input_name"]]
        inp, tgt = sample_fields(fields)
        src = tree.root / meta["input_name"]
        ext = src.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        assert inp == f"input.{ext}"
        assert fields[inp] == src.read_bytes(), "input bytes must be the original file's, not re-encoded"
        a = decode(fields[inp])
        assert a.shape == (H, W, 3) and (meta["height"], meta["width"]) == (H, W)
        assert abs(a[..., 0].astype(float).mean() - exp.pid) < 3, (
            f"{key}: input pixels are not pair {exp.pid}"
        )
        if exp.target is None:
            assert tgt is None and meta["target_name"] is None
        else:
            assert meta["target_name"] == exp.target
            assert fields[tgt] == (tree.root / exp.target).read_bytes()
            b = decode(fields[tgt])
            assert abs(b[..., 0].astype(float).mean() - exp.pid) < 3, f"{key}: target belongs to another pair"
            assert (
                abs(b[..., 1].astype(float).mean() - 40) < 3 and abs(a[..., 1].astype(float).mean() - 150) < 3
            )
        assert (meta["degradation"], meta["domain"], meta["source"], meta["split"]) == (
            degradation,
            domain,
            fmt,
            exp.split,
        )
        seen[key] = meta["input_name"]
    assert sorted(seen.values()) == sorted(tree.expected)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_layout_build_inspect_verify(tmp_path: Path, fmt: str, capsys) -> None:
    make, extra, degradation, domain = LAYOUTS[fmt]
    tree = make(tmp_path / "data")
    out = tmp_path / "shards" / fmt.replace("-", "_")
    assert build(fmt, tree.root, out, "--max-samples-per-shard", "4", *extra) == 0
    check_samples(out, tree, fmt, degradation, domain)

    n = len(tree.expected)
    manifest = load_manifest(out)
    assert manifest["counts"]["total"] == n
    assert manifest["counts"]["degradation"] == {degradation: n}
    assert manifest["counts"]["domain"] == {domain: n}
    splits: dict[str, int] = {}
    for e in tree.expected.values():
        splits[e.split] = splits.get(e.split, 0) + 1
    assert manifest["counts"]["split"] == splits
    assert len(manifest["shards"]) == -(-n // 4)  # tiny files: the sample cap decides
    assert [s["samples"] for s in manifest["shards"]][:-1] == [4] * (len(manifest["shards"]) - 1)
    assert manifest["issues"]["total"] == 0
    assert manifest["created_by"]["version"] and "build" in manifest["created_by"]["command"]

    info = inspect_shards(out)
    assert info["samples"] == n and info["shards"] == len(manifest["shards"])
    assert info["paired"] == sum(e.target is not None for e in tree.expected.values())
    assert info["resolution"]["most_common"] == {f"{W}x{H}": n}
    assert verify_shards(out) == []
    capsys.readouterr()
    assert run_cli("inspect", str(out)) == 0
    assert f"samples {n}" in capsys.readouterr().out
    assert run_cli("verify", str(out)) == 0


def test_layout_options(tmp_path: Path) -> None:
    """--split, --subset and --blur-dir select what their layouts offer."""
    gopro = tree_gopro(tmp_path / "gopro")
    out = tmp_path / "g"
    build("gopro", gopro.root, out, "--split", "test", "--blur-dir", "blur_gamma")
    metas = [json.loads(f["json"]) for _, f in samples(out)]
    assert len(metas) == 2 and all(m["split"] == "test" and "/blur_gamma/" in m["input_name"] for m in metas)
    # a split the dataset does not have is named as such (GoPro said "no train/ or test/ folder")
    with pytest.raises(DataError, match=r"--split val: .* has no such split folder; its splits are test, train"):
        build("gopro", gopro.root, tmp_path / "gv", "--split", "val")
    realblur = tree_realblur(tmp_path / "realblur")
    with pytest.raises(DataError, match=r"no RealBlur_R_val_list\.txt"):
        build("realblur", realblur.root, tmp_path / "rv", "--subset", "R", "--split", "val")

    sots = tree_reside_sots(tmp_path / "sots")
    build("reside-sots", sots.root, tmp_path / "s", "--subset", "outdoor")
    metas = [json.loads(f["json"]) for _, f in samples(tmp_path / "s")]
    assert [(m["subset"], m["airlight"], m["beta"]) for m in metas] == [("outdoor", 0.8, 0.2)]
    with pytest.raises(ConfigError, match=r"--subset 'middle': reside-sots has subsets indoor and outdoor"):
        build("reside-sots", sots.root, tmp_path / "s2", "--subset", "middle")
    shutil.rmtree(sots.root / "indoor")
    with pytest.raises(DataError, match=r"\(no indoor/ subset; found only outdoor/\)"):
        build("reside-sots", sots.root, tmp_path / "s3", "--subset", "indoor")

    its = tree_reside_its(tmp_path / "its")
    build("reside-its", its.root, tmp_path / "i")
    metas = {json.loads(f["json"])["input_name"]: json.loads(f["json"]) for _, f in samples(tmp_path / "i")}
    assert metas["hazy/2_3_0.83179.png"]["variant"] == 3
    assert metas["hazy/2_3_0.83179.png"]["name_fields"] == ["3", "0.83179"]

    # OTS writes A = 1 as "1": still an airlight, not an ITS-style version number.
    ots = tree_reside_ots(tmp_path / "ots")
    build("reside-ots", ots.root, tmp_path / "o")
    metas = {json.loads(f["json"])["input_name"]: json.loads(f["json"]) for _, f in samples(tmp_path / "o")}
    assert {k: (m["airlight"], m["beta"], "variant" in m) for k, m in metas.items() if "0001" in k} == {
        "hazy/0001_0.8_0.2.jpg": (0.8, 0.2, False),
        "hazy/0001_1_0.04.jpg": (1.0, 0.04, False),
    }

    rain = tree_rain1400(tmp_path / "rain")
    build("rain1400", rain.root, tmp_path / "r", "--split", "test")
    metas = [json.loads(f["json"]) for _, f in samples(tmp_path / "r")]
    assert sorted(m["rain_index"] for m in metas) == [1, 2, 14] and {m["split"] for m in metas} == {"test"}


def test_every_split_folder_is_read(tmp_path: Path) -> None:
    """paired-folder with train/, val/ and test/: none is dropped unseen, and --split asking for a
    folder that is not there names the splits that are (val/ was silently skipped)."""
    t = Tree(tmp_path / "pf")
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        t.pair(f"{folder}/input/a.png", f"{folder}/target/a.png", split)
    build("paired-folder", t.root, tmp_path / "o", "--degradation", "rain")
    check_samples(tmp_path / "o", t, "paired-folder", "rain", "synthetic")
    build("paired-folder", t.root, tmp_path / "v", "--degradation", "rain", "--split", "val")
    assert [json.loads(f["json"])["input_name"] for _, f in samples(tmp_path / "v")] == [
        "validation/input/a.png"
    ]
    with pytest.raises(DataError, match="--split dev: .* its splits are test, train, val"):
        build("paired-folder", t.root, tmp_path / "d", "--degradation", "rain", "--split", "dev")


def test_a_root_that_is_a_split_folder_takes_its_split_from_its_name(tmp_path: Path) -> None:
    """--root Rain1400/testing (the layout itself, no --split) was labelled split train."""
    tree = tree_rain1400(tmp_path / "Rain1400")
    testing = Tree(tree.root / "testing", {k.removeprefix("testing/"): Expected(v.target.removeprefix("testing/"),
                                                                                v.split, v.pid)
                                          for k, v in tree.expected.items() if k.startswith("testing/")})
    build("rain1400", testing.root, tmp_path / "t")
    check_samples(tmp_path / "t", testing, "rain1400", "rain", "synthetic")  # split test, from the expectations
    assert {json.loads(f["json"])["split"] for _, f in samples(tmp_path / "t")} == {"test"}
    build("rain1400", testing.root, tmp_path / "asked", "--split", "val")  # --split still decides
    assert {json.loads(f["json"])["split"] for _, f in samples(tmp_path / "asked")} == {"val"}
    plain = tmp_path / "mine"  # any other name: train, as before
    shutil.copytree(testing.root, plain)
    build("rain1400", plain, tmp_path / "m")
    assert {json.loads(f["json"])["split"] for _, f in samples(tmp_path / "m")} == {"train"}


def test_spa_folder_layout(tmp_path: Path) -> None:
    """Without list files: real_test_1000/rain + real_test_1000/gt (<n>gt names), and unpaired rain."""
    tree = Tree(tmp_path / "spa")
    for n in ("1", "2"):
        tree.pair(f"real_test_1000/rain/{n}.png", f"real_test_1000/gt/{n}gt.png", "test")
    tree.pair("train/rain/r1.png", None, "train")
    out = tmp_path / "o"
    build("spa", tree.root, out)
    check_samples(out, tree, "spa", "rain", "real")


def test_rtts_keeps_image_ids(tmp_path: Path) -> None:
    tree = tree_reside_unpaired(tmp_path / "RTTS")
    build("reside-unpaired", tree.root, tmp_path / "o")
    got = {k: json.loads(f["json"])["image_id"] for k, f in samples(tmp_path / "o")}
    assert got == {n: n for n in ("AM_Bing_211", "BD_Baidu_074", "YT_Google_406")}


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    """webdataset itself groups the members into the same samples (keys, `input.png`...)."""
    import webdataset as wds  # a declared dependency
    tree = tree_gopro(tmp_path / "gopro")
    out = tmp_path / "o"
    build("gopro", tree.root, out, "--max-samples-per-shard", "4")
    got = {s["__key__"]: s for s in wds.WebDataset(resolve_shards(out), shardshuffle=False)}
    assert sorted(got) == sorted(k for k, _ in samples(out))
    for s in got.values():
        assert {"input.png", "target.png", "json"} <= set(s)
        assert json.loads(s["json"])["input_name"].endswith(s["__key__"].split("__")[-1] + ".png")


def test_urhi_flat_folder(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "URHI")
    for rel in ("a.jpg", "b.png", "more/c.jpg"):
        tree.pair(rel, None, "train")
    (tree.root / "notes.txt").write_text("not an image")
    out = tmp_path / "o"
    build("reside-unpaired", tree.root, out)
    check_samples(out, tree, "reside-unpaired", "haze", "real")


def test_id_layouts_never_guess_between_same_named_files(tmp_path: Path) -> None:
    """RESIDE/DDN pair by id as paired-folder pairs by name: a hazy image whose id names two clear
    files (`clear/2.png`, `clear/2.jpg`) is a duplicate, not paired with whichever sorts first, and
    two hazy files differing only in extension are duplicates, not two samples (both were built)."""
    tree = Tree(tmp_path / "ITS")
    tree.pair("hazy/1_2_0.9.png", "clear/1.png", "train")
    tree.image("hazy/2_1_0.9.png", 90, 150)
    tree.image("clear/2.png", 90, 40)
    tree.image("clear/2.jpg", 91, 40)
    tree.image("hazy/3_1_0.9.png", 92, 150)
    tree.image("hazy/3_1_0.9.jpg", 92, 150)
    tree.image("clear/3.png", 92, 40)
    out = tmp_path / "out"
    build("reside-its", tree.root, out)
    check_samples(out, tree, "reside-its", "haze", "synthetic")
    report = {r["path"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert {p: r["kind"] for p, r in report.items()} == {
        "hazy/2_1_0.9.png": "duplicate", "hazy/3_1_0.9.jpg": "duplicate", "hazy/3_1_0.9.png": "duplicate"}
    assert "clear/2.jpg, clear/2.png" in report["hazy/2_1_0.9.png"]["reason"]
    assert [k for k, _ in samples(out)] == ["1_2_0_9"]  # keys stay the stems


def test_id_pairing_makes_no_path_objects_per_file(tmp_path: Path, monkeypatch) -> None:
    """RESIDE OTS has 300k hazy files: three Path.with_suffix calls per file (to find files differing
    only in extension) doubled the pairing time (224k files: 2.1 s -> 4.8 s); a string key is made
    once per file instead."""
    from pathlib import PurePath

    from uniremoval.data import readers

    tree = Tree(tmp_path / "ITS")
    for i in range(1, 31):
        tree.pair(f"hazy/{i}_1_0.9.png", f"clear/{i}.png", "train")
    calls = []
    real = PurePath.with_suffix
    monkeypatch.setattr(PurePath, "with_suffix", lambda self, s: calls.append(self) or real(self, s))
    result = readers.read_dataset("reside-its", tree.root, readers.ReaderOptions())
    monkeypatch.undo()
    assert len(result.items) == 30 and not result.issues
    assert len(calls) < 30, f"{len(calls)} with_suffix calls for 30 files"


def test_listing_resolves_each_folder_once_not_each_file(tmp_path: Path, monkeypatch) -> None:
    """SPA-Data lists 638k pairs: resolving every entry's path (4 realpath calls, each a system call
    per path component) kept a build silent for minutes before its first progress bar. Folders are
    resolved once; a file itself only when it is a link, so links are still checked."""
    import os

    from uniremoval.data import readers

    tree = Tree(tmp_path / "SPA")
    lines = []
    for f in range(3):
        for x in range(20):
            inp, gt = f"real_world/000/000-{f}/000-{f}_{x}_1.png", f"real_world_gt/000/000_{x}_1.png"
            tree.pair(f"Training/{inp}", f"Training/{gt}", "train", pid=20 + x)
            lines.append(f"/{inp} /{gt}")
    (tree.root / "Training/real_world.txt").write_text("\n".join(lines) + "\n")
    outside = Tree(tmp_path / "elsewhere")
    outside.image("far.png", 30, 150)
    (tree.root / "Training/real_world/000/000-0/000-0_0_1.png").unlink()
    (tree.root / "Training/real_world/000/000-0/000-0_0_1.png").symlink_to(outside.root / "far.png")
    del tree.expected["Training/real_world/000/000-0/000-0_0_1.png"]
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    result = readers.read_dataset("spa", tree.root, readers.ReaderOptions())
    monkeypatch.undo()
    assert len(calls) < 20, f"{len(calls)} realpath calls for {len(lines)} list lines"
    assert sorted(i.input for i in result.items) == sorted(tree.expected)
    assert [(i.kind, i.path) for i in result.issues] == [("outside_root", "Training/real_world.txt:1")]
    out = tmp_path / "o"
    build("spa", tree.root, out)
    check_samples(out, tree, "spa", "rain", "real")


def test_a_cut_list_line_is_reported_not_unpaired_or_dropped(tmp_path: Path) -> None:
    """A list line holding one path (a list file cut short) became an unpaired sample in SPA's paired
    test set, and was dropped unseen by RealBlur (gt column first); both are now missing_partner."""
    spa = tree_spa(tmp_path / "spa")
    test_list = spa.root / "Testing/real_test_1000.txt"
    test_list.write_text(test_list.read_text() + "/real_test_1000/rain/9.png\n")
    spa.image("Testing/real_test_1000/rain/9.png", 99, 150)
    build("spa", spa.root, tmp_path / "s")
    check_samples(tmp_path / "s", spa, "spa", "rain", "real")
    realblur = tree_realblur(tmp_path / "rb")
    train_list = realblur.root / "RealBlur_J_train_list.txt"
    train_list.write_text(train_list.read_text() + "RealBlur-J_ECC_IMCORR_centroid_itensity_ref/scene001/gt/gt_9.png\n")
    build("realblur", realblur.root, tmp_path / "r")
    check_samples(tmp_path / "r", realblur, "realblur", "blur", "real")
    for out, where in (("s", "Testing/real_test_1000.txt:3"), ("r", "RealBlur_J_train_list.txt:5")):
        (issue,) = map(json.loads, (tmp_path / out / "report.jsonl").read_text().splitlines())
        assert (issue["kind"], issue["path"]) == ("missing_partner", where)
        assert "holds 1 path(s) where 2 are expected" in issue["reason"]


def test_an_input_listed_twice_is_written_once_and_one_listed_with_two_partners_never(tmp_path: Path) -> None:
    """SPA and RealBlur list lines were taken one by one: a repeated line wrote its sample twice (the
    second key given a _2), and a blurred image listed again with another scene's gt was written a
    second time with that wrong target. Now a repeat is written once, and an input listed with other
    partners (or in another split) is left out and reported, as the folder readers do."""
    base = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
    realblur = tree_realblur(tmp_path / "rb")
    train_list = realblur.root / "RealBlur_J_train_list.txt"
    lines = train_list.read_text().splitlines()
    train_list.write_text("\n".join([*lines, lines[1], f"{base}/scene002/gt/gt_2.png {base}/scene001/blur/blur_1.png",
                                     ]) + "\n")
    test_list = realblur.root / "RealBlur_J_test_list.txt"  # a train pair in the test list too: a leak
    test_list.write_text(test_list.read_text() + f"{base}/scene002/gt/gt_1.png {base}/scene002/blur/blur_1.png\n")
    spa = tree_spa(tmp_path / "spa")
    spa_test = spa.root / "Testing/real_test_1000.txt"
    spa_test.write_text(spa_test.read_text() + "/real_test_1000/rain/002.png /real_test_1000/gt/002gt.png\n")
    for tree, fmt in ((realblur, "realblur"), (spa, "spa")):
        out = tmp_path / f"{fmt}-out"
        build(fmt, tree.root, out)
        issues = {(i["kind"], i["path"]): i["reason"]
                  for i in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
        if fmt == "realblur":
            for left_out in (f"{base}/scene001/blur/blur_1.png", f"{base}/scene002/blur/blur_1.png"):
                del tree.expected[left_out]
                assert "never guessed, so left out" in issues.pop(("duplicate", left_out))
            assert issues.pop(("duplicate", f"{base}/scene001/blur/blur_2.png")) == (
                "RealBlur_J_train_list.txt:5 repeats RealBlur_J_train_list.txt:2 (the same pair): written once")
        else:
            assert issues.pop(("duplicate", "Testing/real_test_1000/rain/002.png")) == (
                "Testing/real_test_1000.txt:3 repeats Testing/real_test_1000.txt:2 (the same pair): written once")
        assert not issues
        check_samples(out, tree, fmt, *LAYOUTS[fmt][2:])  # each remaining pair exactly once, its own target


def test_a_list_saved_with_a_bom_and_crlf_keeps_its_first_pair(tmp_path: Path) -> None:
    """A list file re-saved by a Windows editor (UTF-8 BOM, CRLF) lost its first pair as a
    missing_partner naming a path that looked right (the BOM glued to it)."""
    realblur = tree_realblur(tmp_path / "rb")
    for lst in realblur.root.glob("*_list.txt"):
        lst.write_bytes(b"\xef\xbb\xbf" + lst.read_text().replace("\n", "\r\n").encode())
    build("realblur", realblur.root, tmp_path / "r")
    check_samples(tmp_path / "r", realblur, "realblur", "blur", "real")
    assert (tmp_path / "r" / "report.jsonl").read_text() == ""


def test_split_folders_are_never_read_in_part(tmp_path: Path) -> None:
    """A root holding input/+target/ and also test/input/+test/target/ read only the root's pairs,
    and val/ beside validation/ read only the first: the other pairs were dropped unseen."""
    t = Tree(tmp_path / "pf")
    t.pair("input/a.png", "target/a.png", "train")
    t.pair("test/input/b.png", "test/target/b.png", "test")
    with pytest.raises(DataError, match=r"holds the layout itself and in sub-folders \(test/\)"):
        build("paired-folder", t.root, tmp_path / "o", "--degradation", "rain")
    t2 = Tree(tmp_path / "rain")
    t2.pair("val/rainy_image/1_1.jpg", "val/ground_truth/1.jpg", "val")
    t2.pair("validation/rainy_image/2_1.jpg", "validation/ground_truth/2.jpg", "val")
    with pytest.raises(DataError, match=r"val/ and validation/ are both the val split"):
        build("rain1400", t2.root, tmp_path / "r")


def test_a_reader_registered_in_readers_is_a_format_of_shards_build(tmp_path: Path, monkeypatch) -> None:
    """A layout of one's own is one ReaderSpec in `readers.READERS`: the command's --format choices were
    a second list of names, which refused the new one ("invalid choice")."""
    from uniremoval.data import readers

    tree = tree_paired_folder(tmp_path / "mine")
    spec = readers.ReaderSpec("my-layout", readers.READERS["paired-folder"].read, "input/ + target/")
    monkeypatch.setitem(readers.READERS, "my-layout", spec)
    assert build("my-layout", tree.root, tmp_path / "out", "--degradation", "rain") == 0
    check_samples(tmp_path / "out", tree, "paired-folder", "rain", "synthetic")
