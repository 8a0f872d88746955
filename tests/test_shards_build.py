"""Shard writing: resume after interruption, workers, array jobs + merge, bad inputs, manifest API."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_shards_layouts import Tree, build, check_samples, run_cli, samples, tree_reside_its

from uniremoval.data import shardwriter
from uniremoval.data.manifest import (
    format_inspect,
    inspect_shards,
    load_manifest,
    verify_shards,
)
from uniremoval.data.shard_stream import resolve_shards
from uniremoval.errors import DataError
from uniremoval.io import sha256_file


def shas(out: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in load_manifest(out)["shards"]}


def big_its(root: Path) -> Tree:
    """ITS layout with 7 clear images x 3 hazy = 21 pairs (-> 6 shards of <= 4)."""
    t = Tree(root)
    for i in range(1, 8):
        pid = t.new_pid()
        for k in (1, 2, 3):
            t.pair(f"hazy/{i}_{k}_0.{k}.png", f"clear/{i}.png", "train", pid)
    return t


def build_killed_at(monkeypatch, nth: int, tree: Tree, out: Path, leave_temporary: bool = False) -> None:
    """`shards build` of `tree` (ITS, <= 4 samples a shard) interrupted as it starts writing its
    `nth` shard (Ctrl-C), optionally leaving that shard's half-written temporary behind."""
    real_write, calls = shardwriter.write_shard, []

    def dying_write(out_dir, plan, results, strict):
        calls.append(plan.name)
        if len(calls) == nth:
            if leave_temporary:
                (Path(out_dir) / f".{plan.name}.k3j4h5.tmp").write_bytes(b"half a tar")
            raise KeyboardInterrupt
        return real_write(out_dir, plan, results, strict)

    with monkeypatch.context() as m:
        m.setattr(shardwriter, "write_shard", dying_write)
        with pytest.raises(KeyboardInterrupt):
            build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")


def test_resume_after_interrupt_gives_identical_shards(tmp_path: Path, monkeypatch, capsys) -> None:
    tree = big_its(tmp_path / "its")
    ref = tmp_path / "ref"
    build("reside-its", tree.root, ref, "--max-samples-per-shard", "4", "--name", "its")
    reference = shas(ref)
    assert len(reference) == 6

    # A build killed after two shards: the third shard's temporary file is left behind.
    out = tmp_path / "out"
    build_killed_at(monkeypatch, 3, tree, out, leave_temporary=True)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["its-000000.tar", "its-000001.tar"]

    capsys.readouterr()
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    text = capsys.readouterr().out
    assert "4 shard(s) written, 2 already complete" in text
    assert "removed 1 temporary file" in text
    assert shas(out) == reference
    assert not list(out.glob(".*.tmp"))
    assert verify_shards(out) == []
    check_samples(out, tree, "reside-its", "haze", "synthetic")

    # A deleted shard and a corrupted one are rebuilt; the others are kept untouched.
    (out / "its-000002.tar").unlink()
    data = bytearray((out / "its-000004.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "its-000004.tar").write_bytes(bytes(data))
    kept = (out / "its-000000.tar").stat().st_mtime_ns
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert "2 shard(s) written, 4 already complete" in capsys.readouterr().out
    assert shas(out) == reference and (out / "its-000000.tar").stat().st_mtime_ns == kept
    assert len(samples(out)) == 21  # nothing duplicated

    # A rerun with nothing to do re-hashes no shard its state records as untouched (size and mtime):
    # each rerun read the whole dataset again (tens of GB for OTS); a touched one is still re-hashed.
    from uniremoval.data import shardwriter

    hashed = []
    real_sha = shardwriter.sha256_file
    monkeypatch.setattr(shardwriter, "sha256_file", lambda p: hashed.append(Path(p).name) or real_sha(p))
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert "0 shard(s) written, 6 already complete" in capsys.readouterr().out and hashed == []
    os.utime(out / "its-000003.tar")
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert "0 shard(s) written, 6 already complete" in capsys.readouterr().out and hashed == ["its-000003.tar"]
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")  # trusted again
    assert "0 shard(s) written, 6 already complete" in capsys.readouterr().out and hashed == ["its-000003.tar"]
    monkeypatch.undo()

    # Without the state file, the finished manifest is enough to resume from.
    (out / ".build-state-job000of001.json").unlink()
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert "0 shard(s) written, 6 already complete" in capsys.readouterr().out


def test_rerun_removes_temporaries_of_the_manifest_report_and_state(tmp_path: Path, capsys) -> None:
    """A kill while the manifest, the report or the build state was written leaves its temporary
    (atomic_writer's `.<name>.<random>.tmp`); no later write reuses that name, so the rerun removes it."""
    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    left = [out / f".{name}.k3j4h5.tmp" for name in ("manifest.json", "report.jsonl", ".build-state-job000of001.json")]
    other = out / ".notes.txt.k3j4h5.tmp"  # not a file of this build: kept
    for p in [*left, other]:
        p.write_bytes(b"half written")
    capsys.readouterr()
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert "removed 3 temporary file(s) of an interrupted build" in capsys.readouterr().out
    assert not any(p.exists() for p in left) and other.exists()

    # A changed dataset changes the plan: affected shards are rebuilt, stale ones beyond it removed.
    for k in (1, 2, 3):
        (tree.root / f"hazy/7_{k}_0.{k}.png").unlink()
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert len(load_manifest(out)["shards"]) == 5 and not (out / "its-000005.tar").exists()
    assert len(samples(out)) == 18 and verify_shards(out) == []


def test_two_workers_match_one(tmp_path: Path) -> None:
    """Whole shards per worker (6 shards) and sample groups per worker (1 shard): same bytes."""
    tree = big_its(tmp_path / "its")
    for cap in ("4", "0"):
        one, two = tmp_path / f"a{cap}", tmp_path / f"b{cap}"
        build("reside-its", tree.root, one, "--max-samples-per-shard", cap, "--name", "its")
        build("reside-its", tree.root, two, "--max-samples-per-shard", cap, "--name", "its", "--workers", "2")
        assert shas(one) == shas(two) and len(shas(one)) == (6 if cap == "4" else 1)
    check_samples(two, tree, "reside-its", "haze", "synthetic")


def test_array_jobs_and_merge(tmp_path: Path, capsys) -> None:
    tree = big_its(tmp_path / "its")
    single = tmp_path / "single"
    build("reside-its", tree.root, single, "--max-samples-per-shard", "4", "--name", "its")
    out = tmp_path / "jobs"
    for job in (2, 0):  # any order; job 1 not run yet
        build(
            "reside-its",
            tree.root,
            out,
            "--max-samples-per-shard",
            "4",
            "--name",
            "its",
            "--num-jobs",
            "3",
            "--job-index",
            str(job),
        )
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "its-000000.tar",
        "its-000002.tar",
        "its-000003.tar",
        "its-000005.tar",
    ]
    with pytest.raises(DataError, match=r"jobs \[1\] of 3 have no manifest"):
        run_cli("merge", str(out))
    with pytest.raises(DataError, match="shards merge"):
        load_manifest(out)
    build(
        "reside-its",
        tree.root,
        out,
        "--max-samples-per-shard",
        "4",
        "--name",
        "its",
        "--num-jobs",
        "3",
        "--job-index",
        "1",
    )
    capsys.readouterr()
    assert run_cli("merge", str(out)) == 0
    assert "6 shard(s), 21 samples" in capsys.readouterr().out
    merged = load_manifest(out)
    assert shas(out) == shas(single)
    assert merged["counts"] == load_manifest(single)["counts"]
    assert merged["plan"]["job_indices"] == [0, 1, 2]
    assert verify_shards(out) == []


def one_error(capsys) -> str:
    """The stderr of a command that failed with one `error:` line (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_merge_refuses_missing_shards_and_damaged_job_manifests(tmp_path: Path, capsys) -> None:
    """A merge that would list missing tars (or read a cut per-job manifest) writes nothing and names
    the tars, how many, the job manifest that listed them and the job to rerun."""
    from uniremoval.cli import main

    tree = big_its(tmp_path / "its")
    out = tmp_path / "jobs"
    opts = ["--max-samples-per-shard", "4", "--name", "its", "--num-jobs", "3"]
    for job in range(3):
        build("reside-its", tree.root, out, *opts, "--job-index", str(job))
    assert main(["shards", "merge", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in ("manifest.json", "report.jsonl")}
    (out / "its-000001.tar").unlink()  # job 1 wrote shards 1 and 4
    size = (out / "its-000004.tar").stat().st_size
    (out / "its-000004.tar").write_bytes((out / "its-000004.tar").read_bytes()[:1000])
    capsys.readouterr()
    assert main(["shards", "merge", str(out)]) == 2
    err = one_error(capsys)
    assert (f"{out}: 2 shard(s) listed in per-job manifests are missing or damaged (manifest-job001of003.json "
            f"lists 2: its-000001.tar (missing), its-000004.tar (1000 bytes, listed with {size}))") in err
    assert "nothing was merged. Rerun job 1 of 3" in err and "--num-jobs 3 --job-index 1" in err
    assert {n: (out / n).read_bytes() for n in before} == before  # the last good merge is kept
    build("reside-its", tree.root, out, *opts, "--job-index", "1")  # what the message says
    assert main(["shards", "merge", str(out)]) == 0 and verify_shards(out) == []

    job2 = out / "manifest-job002of003.json"
    job2.write_text(job2.read_text()[:100])  # cut mid-write
    capsys.readouterr()
    assert main(["shards", "merge", str(out)]) == 2
    err = one_error(capsys)
    assert f"shard manifest {job2} is not valid JSON" in err and "rerun job 2 of 3" in err
    job2.write_text(json.dumps({"format_version": 1, "dataset": "its", "shards": [], "counts": {}}))
    assert main(["shards", "merge", str(out)]) == 2
    assert f"per-job manifest {job2} lacks its plan" in one_error(capsys)
    for path, what in ((tmp_path / "nope", "does not exist"), (out / "its-000000.tar", "is a file, not a folder")):
        assert main(["shards", "merge", str(path)]) == 2
        assert f"error: {path} {what}; `shards merge` takes the shard folder" in one_error(capsys)


# ---------------------------------------------------------------------------------------------
# bad inputs


def bad_tree(root: Path) -> Tree:
    """paired-folder with one good pair and one of each problem."""
    t = Tree(root)
    t.pair("input/good.png", "target/good.png", "train")
    t.image("input/orphan.png", 20, 150)  # missing partner
    t.image("target/garbage.png", 30, 40)
    (root / "input/garbage.png").write_bytes(b"this is not an image")  # unreadable
    t.image("target/cut.png", 31, 40)
    full = t.image("input/cut.png", 31, 150).read_bytes()
    (root / "input/cut.png").write_bytes(full[: len(full) // 2])  # truncated
    t.image("input/wide.png", 32, 150)
    t.image("target/wide.png", 32, 40, size=(24, 30))  # size mismatch
    return t


def test_bad_inputs_reported(tmp_path: Path, capsys) -> None:
    tree = bad_tree(tmp_path / "bad")
    out = tmp_path / "out"
    assert build("paired-folder", tree.root, out, "--degradation", "rain") == 0
    text = capsys.readouterr().out
    assert "skipped inputs: 4 (missing_partner 1, size_mismatch 1, truncated 1, unreadable 1)" in text
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    got = {r["kind"]: r for r in report}
    assert set(got) == {"missing_partner", "unreadable", "truncated", "size_mismatch"}
    assert got["missing_partner"]["path"] == "input/orphan.png"
    assert (got["unreadable"]["path"], got["unreadable"]["partner"]) == ("input/garbage.png", "target/garbage.png")
    assert got["truncated"]["path"] == "input/cut.png" and "truncated" in got["truncated"]["reason"]
    assert got["truncated"]["partner"] == "target/cut.png"
    assert got["size_mismatch"]["path"] == "input/wide.png" and "24x32" in got["size_mismatch"]["reason"]
    assert got["size_mismatch"]["partner"] == "target/wide.png"
    manifest = load_manifest(out)
    assert manifest["counts"]["total"] == 1
    assert manifest["issues"] == {
        "total": 4,
        "missing_partner": 1,
        "size_mismatch": 1,
        "truncated": 1,
        "unreadable": 1,
    }
    check_samples(
        out,
        Tree(tree.root, {"input/good.png": tree.expected["input/good.png"]}),
        "paired-folder",
        "rain",
        "synthetic",
    )
    # The report survives a resume that rebuilds nothing.
    build("paired-folder", tree.root, out, "--degradation", "rain")
    assert len((out / "report.jsonl").read_text().splitlines()) == 4


def test_dangling_link_and_vanished_file_are_reported(tmp_path: Path, monkeypatch, capsys) -> None:
    """A broken symlink in the tree, or a file deleted between listing and planning, is a bad input
    in the report (it used to crash the build with a FileNotFoundError traceback)."""
    t = Tree(tmp_path / "ds")
    for name in ("a", "b", "c"):
        t.pair(f"input/{name}.png", f"target/{name}.png", "train")
    (t.root / "input/b.png").unlink()
    (t.root / "input/b.png").symlink_to(t.root / "input/nowhere.png")
    out = tmp_path / "out"
    assert build("paired-folder", t.root, out, "--degradation", "rain") == 0
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["path"]) for r in report] == [("unreadable", "input/b.png")]
    assert "broken link" in report[0]["reason"]

    from uniremoval.data import readers

    listed = readers.read_dataset

    def list_then_delete(*args, **kwargs):
        result = listed(*args, **kwargs)
        (t.root / "input/c.png").unlink()
        return result

    monkeypatch.setattr(readers, "read_dataset", list_then_delete)
    assert build("paired-folder", t.root, tmp_path / "out2", "--degradation", "rain") == 0
    report = [json.loads(line) for line in (tmp_path / "out2" / "report.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["path"]) for r in report) == [
        ("unreadable", "input/b.png"),
        ("unreadable", "input/c.png"),
    ]
    assert load_manifest(tmp_path / "out2")["counts"]["total"] == 1


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ((), "missing_partner: input/orphan.png"),
        (("orphan",), "truncated: input/cut.png"),  # items go in path order: cut, garbage, good, wide
        (("orphan", "cut"), "unreadable: input/garbage.png"),
        (("orphan", "cut", "garbage"), "size_mismatch: input/wide.png"),
    ],
)
def test_strict_fails_on_first(tmp_path: Path, remove: tuple[str, ...], message: str) -> None:
    tree = bad_tree(tmp_path / "bad")
    for name in remove:
        (tree.root / f"input/{name}.png").unlink()
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        build("paired-folder", tree.root, tmp_path / "out", "--degradation", "rain", "--strict")
    assert not (tmp_path / "out").exists()  # no empty --out left behind
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, with what it held
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        build("paired-folder", tree.root, tmp_path / "kept", "--degradation", "rain", "--strict")
    assert [p.name for p in (tmp_path / "kept").iterdir() if not p.name.startswith(".")] == ["notes.txt"]


def test_empty_or_wrong_root_says_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"reside-its dataset.*hazy/<id>_<k>_<x>\.png \+ clear/<id>\.png"):
        build("reside-its", tmp_path / "empty", tmp_path / "o")
    its = tree_reside_its(tmp_path / "its")
    with pytest.raises(DataError, match=r"gopro dataset.*\{train,test\}/<sequence>/"):
        build("gopro", its.root, tmp_path / "o")
    with pytest.raises(DataError, match=r"no RealBlur_J_train_list\.txt or RealBlur_J_test_list\.txt"):
        build("realblur", its.root, tmp_path / "o")
    with pytest.raises(DataError, match="not a folder"):
        build("rain1400", tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty/hazy").mkdir()
    (tmp_path / "empty/clear").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build("reside-its", tmp_path / "empty", tmp_path / "o")


def test_list_entries_cannot_leave_root(tmp_path: Path) -> None:
    outside = Tree(tmp_path / "elsewhere")
    outside.image("secret.png", 1, 1)
    tree = Tree(tmp_path / "rb")
    tree.pair("s/blur/blur_1.png", "s/gt/gt_1.png", "train")
    (tree.root / "s/link.png").symlink_to(outside.root / "secret.png")
    lines = [
        "s/gt/gt_1.png s/blur/blur_1.png",
        "s/gt/gt_1.png ../elsewhere/secret.png",
        f"s/gt/gt_1.png {outside.root / 'secret.png'}",
        "s/gt/gt_1.png s/link.png",
        "s/gt/gt_1.png s/blur/missing.png",
    ]
    (tree.root / "RealBlur_J_train_list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    build("realblur", tree.root, out)
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in report] == ["outside_root"] * 3 + ["missing_partner"]
    assert "'..'" in report[0]["reason"] and "outside --root" in report[1]["reason"]
    check_samples(out, tree, "realblur", "blur", "real")


def test_folder_needs_degradation(tmp_path: Path) -> None:
    from uniremoval.errors import ConfigError

    tree = Tree(tmp_path / "f")
    tree.image("a.png", 1, 1)
    with pytest.raises(ConfigError, match="needs --degradation"):
        build("folder", tree.root, tmp_path / "o")


@pytest.mark.parametrize(("args", "message"), [
    (["--max-samples-per-shard", "-1"], r"--max-samples-per-shard must be >= 0, 0 for no cap \(got -1\)"),
    (["--num-jobs", "0"], r"--num-jobs must be >= 1 \(got 0\)"),
    (["--num-jobs", "2", "--job-index", "2"], r"--job-index 2 must be in 0..1"),
])
def test_bad_writer_options_are_named_and_write_nothing(tmp_path: Path, args, message) -> None:
    from uniremoval.errors import ConfigError

    tree = Tree(tmp_path / "f")
    tree.image("a.png", 8, 8)
    with pytest.raises(ConfigError, match=message):
        build("folder", tree.root, tmp_path / "o", "--degradation", "haze", *args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["build", "verify"])
def test_workers_below_one_are_refused_by_the_parser(tmp_path: Path, command: str, capsys) -> None:
    args = (["build", "--format", "folder", "--root", str(tmp_path), "--degradation", "haze"]
            if command == "build" else ["verify", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        run_cli(*args, "--workers", "-1")
    assert stop.value.code == 2
    assert "--workers: must be a whole number >= 1 (processes), got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [
    *[("--shard-size-mb", v, f"must be a finite number > 0 (MB), got '{v}'") for v in ("nan", "inf", "0", "-3", "big")],
    # --name and --degradation were checked, --split (recorded in every sample and counted in the
    # manifest) took anything
    *[("--split", v, f"{v!r}: a split is letters, digits, '_' and '-'") for v in ("a/b", "", "train test", "../x")],
])
def test_a_bad_build_option_is_refused_by_the_parser(tmp_path: Path, flag: str, value: str, message: str,
                                                     capsys) -> None:
    tree = Tree(tmp_path / "f")
    tree.image("a.png", 8, 8)
    with pytest.raises(SystemExit) as stop:
        run_cli("build", "--format", "folder", "--root", str(tree.root), "--degradation", "haze",
                "--out", str(tmp_path / "o"), flag, value)
    assert stop.value.code == 2
    assert f"{flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# verify and the manifest API


def _rewrite_shard(out: Path, index: int, change) -> dict:
    """Rewrite shard `index` of the folder `out` with each member's bytes passed through
    `change(name, data)`, and its manifest entry's size and sha256 made to agree (so that only the
    checks of the samples themselves can catch the change); returns the entry."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][index]
    shard = out / entry["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    entry["sha256"], entry["bytes"] = sha256_file(shard), shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return entry


def test_verify_lists_problems(tmp_path: Path, capsys) -> None:
    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    # Replace shard 1 with one whose pair sizes differ, keeping the manifest's checksum consistent
    # so that only the sample check can catch it; corrupt shard 3's bytes; add an unlisted tar.
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(buf, "PNG")
    first_target = []

    def small_first_target(name: str, data: bytes) -> bytes:
        if name.endswith(".target.png") and not first_target:  # members: input, target, json per sample
            first_target.append(name)
            return buf.getvalue()
        return data

    _rewrite_shard(out, 1, small_first_target)
    assert first_target
    data = bytearray((out / "its-000003.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "its-000003.tar").write_bytes(bytes(data))
    shutil.copy(out / "its-000000.tar", out / "stray.tar")

    problems = verify_shards(out)
    text = "\n".join(problems)
    assert "its-000001.tar:" in text and "target.png is 10x10 but input.png is 24x32" in text
    assert "its-000003.tar: sha256 differs" in text
    assert "stray.tar: a tar in the folder that the manifest does not list" in text
    assert run_cli("verify", str(out)) == 1
    assert "problem(s)" in capsys.readouterr().err
    # a json that parses but is no object is one problem, not an AttributeError traceback
    from uniremoval.data.manifest import _verify_sample

    assert _verify_sample("x.tar", "k", {"json": b"[]", "input.png": buf.getvalue()}) == [
        "x.tar:k: json is a list, not an object"]


def test_verify_compares_each_shards_degradation_domain_and_split_counts(tmp_path: Path, capsys) -> None:
    """Every sample's json saying another degradation than the manifest (checksums made to agree)
    passed verify: only totals were compared. Training refuses such a shard hours in; verify names it."""
    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert verify_shards(out) == []
    entry = _rewrite_shard(out, 2, lambda name, data: json.dumps(
        {**json.loads(data), "degradation": "rain", "split": "val"}).encode() if name.endswith(".json") else data)
    n = entry["samples"]
    assert verify_shards(out) == [
        f"its-000002.tar: degradation counts: rain {n} in its samples' json, haze {n} in the manifest",
        f"its-000002.tar: split counts: val {n} in its samples' json, train {n} in the manifest",
    ]
    assert run_cli("verify", str(out)) == 1
    assert "its-000002.tar: degradation counts: rain" in capsys.readouterr().err


def test_a_shard_that_cannot_be_read_is_not_called_damaged(tmp_path: Path, capsys, monkeypatch) -> None:
    """inspect advised rebuilding a shard the user may not read ("damaged shards are rebuilt") and verify
    stopped with a bare "Permission denied". (Opening is refused by a stand-in: chmod does not stop root.)"""
    import builtins
    import errno
    import os

    from uniremoval.data import manifest as manifest_mod

    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    locked = out / "its-000001.tar"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
    real_open, real_iter = builtins.open, manifest_mod.iter_tar_samples

    def guarded_open(file, *a, **kw):
        if Path(str(file)) == locked:
            raise denied
        return real_open(file, *a, **kw)

    def guarded_iter(path, *a, **kw):
        if Path(path) == locked:
            raise denied
        return real_iter(path, *a, **kw)

    monkeypatch.setattr(manifest_mod, "open", guarded_open, raising=False)
    monkeypatch.setattr(manifest_mod, "iter_tar_samples", guarded_iter)
    why = "cannot be read (Permission denied); give the user running this read access to it"
    assert verify_shards(out) == [f"its-000001.tar: {why}"]
    assert run_cli("verify", str(out)) == 1
    assert f"its-000001.tar: {why}" in capsys.readouterr().err
    for target in (out, locked):
        with pytest.raises(DataError) as caught:
            run_cli("inspect", str(target))
        assert str(caught.value) == f"shard {locked} {why}"


def test_verify_takes_no_progress_as_build_does(tmp_path: Path, capsys) -> None:
    """`shards verify` always drew its progress bar on stderr; --no-progress (as build and synth take
    it) leaves stderr empty for a log."""
    tree = tree_reside_its(tmp_path / "its")
    build("reside-its", tree.root, tmp_path / "out")
    capsys.readouterr()
    assert run_cli("verify", str(tmp_path / "out"), "--no-progress") == 0
    captured = capsys.readouterr()
    assert captured.err == "" and ": OK, " in captured.out
    for workers in ("1", "2"):
        assert run_cli("verify", str(tmp_path / "out"), "--workers", workers) == 0
        err = capsys.readouterr().err  # in a log: whole lines (tqdm's redraws were one endless line)
        assert re.fullmatch(r"verify: (\d+)/\1 shard \(100%\), .*\n", err), err


def test_inspect_and_verify_take_a_folder_or_one_tar_and_name_bad_ones(tmp_path: Path, capsys) -> None:
    """One tar can be inspected and verified on its own; an empty, cut or foreign file, a missing path
    and a folder of tars without a manifest are one `error:` line (inspect) or a listed problem (verify
    of a damaged shard), never a traceback."""
    from uniremoval.cli import main

    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    tar0 = out / "its-000000.tar"
    capsys.readouterr()
    assert main(["shards", "inspect", str(tar0), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dataset"], info["shards"], info["samples"], info["counts"]["total"]) == ("its", 1, 4, 4)
    assert info["counts"]["degradation"] == {"haze": 4} and info["bytes"] == tar0.stat().st_size
    assert main(["shards", "verify", str(tar0)]) == 0
    assert capsys.readouterr().out == f"{tar0}: OK, 1 shard, 4 samples verified\n"  # checked against the manifest
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tar0, lone / "x.tar")
    assert main(["shards", "inspect", str(lone / "x.tar")]) == 0
    assert capsys.readouterr().out.startswith(f"dataset x  ({lone / 'x.tar'})\n  shards 1, samples 4")
    assert main(["shards", "verify", str(lone / "x.tar")]) == 0
    assert "4 samples verified (no manifest beside it lists it: size and sha256 not checked)" in capsys.readouterr().out
    assert main(["shards", "inspect", str(lone)]) == 2
    assert (f"error: no shard manifest at {lone / 'manifest.json'}, but 1 .tar file(s) beside it: inspect one "
            f"with `uniremoval shards inspect {lone / 'x.tar'}`") in one_error(capsys)

    # A 0-byte shard: in its folder, and on its own.
    size = (out / "its-000002.tar").stat().st_size
    (out / "its-000002.tar").write_bytes(b"")
    assert main(["shards", "inspect", str(out)]) == 2
    err = one_error(capsys)
    assert f"error: shard {out / 'its-000002.tar'} is 0 bytes, its manifest says {size}" in err
    assert f"`uniremoval shards verify {out}` lists every problem" in err
    assert main(["shards", "inspect", str(out / "its-000002.tar")]) == 2
    assert "is an empty file (0 bytes), not a tar" in one_error(capsys)
    for target in (out, out / "its-000002.tar"):
        assert main(["shards", "verify", str(target)]) == 1
        err = capsys.readouterr().err
        assert "its-000002.tar: empty file (0 bytes), not a tar" in err and "Traceback" not in err
    # A tar cut mid-member (tarfile alone would read it as a smaller, valid one).
    (lone / "x.tar").write_bytes(tar0.read_bytes()[:3000])
    assert main(["shards", "inspect", str(lone / "x.tar")]) == 2
    assert "is cut short: 3000 bytes is not a whole number of 512-byte tar blocks" in one_error(capsys)
    assert main(["shards", "verify", str(lone / "x.tar")]) == 1
    assert "x.tar: cut short" in capsys.readouterr().err
    (lone / "notes.txt").write_text("hello")
    for action in ("inspect", "verify"):
        assert main(["shards", action, str(tmp_path / "nope")]) == 2
        assert (f"error: {tmp_path / 'nope'} does not exist; `shards {action}` takes a shard folder (the one "
                "holding manifest.json) or one .tar shard") in one_error(capsys)
        assert main(["shards", action, str(lone / "notes.txt")]) == 2
        assert "is neither a shard folder nor a tar shard" in one_error(capsys)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "manifest.json")):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json is not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "dataset": "x"}))
    with pytest.raises(DataError, match="lacks shards, counts"):
        load_manifest(tmp_path)


def test_a_built_folder_resolves_in_every_spec_form(tmp_path: Path) -> None:
    """One resolver (shard_stream.resolve_shards) for every command: training, cache, eval and the demo
    (manifest.shard_paths was a second one that disagreed: it refused a folder of bare tars and passed
    s3:// through, where training's said "does not exist")."""
    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    names = [str(out / f"its-{i:06d}.tar") for i in range(6)]
    assert resolve_shards(out) == names
    assert resolve_shards(str(out / "its-*.tar")) == names
    assert resolve_shards(str(out / "its-{000000..000002}.tar")) == names[:3]
    assert resolve_shards(f"{out}/its-000000.tar::{out}/its-000005.tar") == [names[0], names[5]]
    assert resolve_shards("https://host/x/its-{000..002}.tar") == [f"https://host/x/its-{i:03d}.tar" for i in range(3)]
    assert resolve_shards("pipe:curl -s https://h/a.tar") == ["pipe:curl -s https://h/a.tar"]
    with pytest.raises(DataError, match=r"2 files missing, e\.g\. .*its-000006\.tar"):
        resolve_shards(str(out / "its-{000005..000007}.tar"))
    for url, hint in (("s3://bucket/its-{000000..000001}.tar", "'pipe:aws s3 cp s3://bucket/its-{000000..000001}.tar -'"),
                      ("gs://bucket/its-000000.tar", "'pipe:gcloud storage cat gs://bucket/its-000000.tar'"),
                      ("hdfs://nn/its.tar", "'pipe:<a command that writes hdfs://nn/its.tar to stdout>'")):
        scheme = url.split(":")[0]
        with pytest.raises(DataError, match=rf"{scheme}:// URLs are not opened directly .* {re.escape(hint)}"):
            resolve_shards(url)


def _png16_grey_alpha(arr: np.ndarray) -> bytes:
    """A valid 16-bit grey+alpha PNG (colour type 4), written by hand: no library here writes one."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_folder_of_real_users_files(tmp_path: Path, capsys) -> None:
    """`--format folder` on a folder as people have it: every image kind is packed with its own bytes
    and decodes to RGB of its stored size (grey, palette, 16-bit, CMYK, WebP, TIFF, upper-case
    extensions, 1x1 and odd sizes); macOS's ._<name>, .DS_Store and a hidden folder are not
    inputs; a HEIC, an empty file and an HTML page saved as .jpg are reported by name, each with a
    reason a person can act on (no Python object in it)."""
    import cv2

    from uniremoval.data.pipelines import eval_samples
    from uniremoval.data.transforms import decode_image

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    rgb = np.random.default_rng(4).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(root / "grey.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(root / "pal.png", transparency=0)
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "g16.png")
    cv2.imwrite(str(root / "rgb16.png"), (rgb.astype(np.uint16) * 257)[:, :, ::-1])
    Image.fromarray(rgb).convert("CMYK").save(root / "sub" / "cmyk.JPG", quality=95)
    Image.fromarray(rgb).save(root / "w.webp", lossless=True)
    Image.fromarray(rgb).save(root / "t.TIF")
    Image.fromarray(rgb[:1, :1]).save(root / "dot.png")
    Image.fromarray(rgb).save(root / ".thumbnails" / "x.png")
    (root / "._grey.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "IMG_1.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "empty.png").write_bytes(b"")
    (root / "page.jpg").write_text("<html>404 Not Found</html>")
    (root / "la16.png").write_bytes(_png16_grey_alpha(np.full((4, 5, 2), 3, dtype=np.uint16)))
    # JPEG under the names Windows and browsers give it, Netpbm's grey and 1-bit: read, not dropped
    # unsaid ("skipped inputs: none" with them left out); a TGA is named as not read
    Image.fromarray(rgb).save(root / "web.jfif", format="JPEG", quality=95)
    Image.fromarray(rgb).save(root / "old.JPE", format="JPEG", quality=95)
    Image.fromarray(rgb).convert("L").save(root / "g.pgm")
    Image.fromarray(rgb).convert("1").save(root / "b.pbm")
    Image.fromarray(rgb).save(root / "game.tga")
    # 32-bit float TIFFs: OpenCV's colour decode made the grey one a black image (0..1 of 255) in the
    # shards while `eval FOLDER` read it right, and the RGB one was "not an image file"
    Image.fromarray((rgb[..., 0] / 255).astype(np.float32), mode="F").save(root / "f_grey.tif")
    cv2.imwrite(str(root / "f_rgb.tif"), (rgb / 255).astype(np.float32))
    out = tmp_path / "out"
    assert build("folder", root, out, "--degradation", "clear") == 0
    assert "skipped inputs: 7 (unreadable 5, unsupported_format 2)" in capsys.readouterr().out
    report = {r["path"]: (r["kind"], r["reason"]) for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert report["IMG_1.heic"] == ("unsupported_format", ".heic is not read here; convert it to PNG or JPEG")
    assert report["empty.png"] == ("unreadable", "empty file (0 bytes)")
    kind, reason = report["page.jpg"]
    assert kind == "unreadable" and reason.startswith("not an image file") and "<html>404" in reason
    assert "BytesIO" not in reason and set(report) == {"IMG_1.heic", "empty.png", "page.jpg", "la16.png", "game.tga",
                                                       "f_grey.tif", "f_rgb.tif"}
    floats = ("TIFF of 32-bit float samples is not supported (unsigned 8- and 16-bit only): save it as a 16-bit "
              "TIFF or PNG (values in [0, 1] scaled to 0..65535)")
    for name in ("f_grey.tif", "f_rgb.tif"):
        assert report[name] == ("unreadable", floats)
        with pytest.raises(ValueError, match="32-bit float samples is not supported"):  # in shards made elsewhere
            decode_image((root / name).read_bytes())
    # PIL reads it at 8 bits and OpenCV with swapped bytes: refused at build, not by the loaders mid-training
    la16 = "16-bit grey+alpha PNG (colour type 4) is not supported: save it as 16-bit grey or RGB"
    assert report["la16.png"] == ("unreadable", la16)
    got = {s["meta"]["input_name"]: s["input"] for s in eval_samples(str(out), 0, 1, bad_samples="fail",
                                                                     as_tensor=False)}
    assert sorted(got) == ["b.pbm", "dot.png", "g.pgm", "g16.png", "grey.png", "old.JPE", "pal.png", "rgb16.png",
                           "sub/cmyk.JPG", "t.TIF", "w.webp", "web.jfif"]
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(got["g.pgm"], np.repeat(grey[..., None], 3, 2))  # lossless, as the PNG of it
    bits = np.asarray(Image.fromarray(rgb).convert("1").convert("L"))
    assert np.array_equal(got["b.pbm"][..., 0], bits) and set(np.unique(bits)) <= {0, 255}
    jpeg = np.asarray(Image.open(root / "web.jfif").convert("RGB"))
    assert np.abs(got["web.jfif"].astype(int) - jpeg).max() <= 1  # the JPEG's pixels (decoder rounding)
    assert all(a.ndim == 3 and a.shape[2] == 3 for a in got.values()) and got["dot.png"].shape == (1, 1, 3)
    assert got["g16.png"].dtype == np.uint16 and np.array_equal(got["g16.png"][..., 1], rgb[..., 0].astype(np.uint16) * 257)
    assert np.array_equal(got["rgb16.png"], rgb.astype(np.uint16) * 257)
    for name in ("t.TIF", "w.webp"):
        assert np.array_equal(got[name], rgb)
    assert np.abs(got["sub/cmyk.JPG"].astype(int) - rgb).mean() < 8  # JPEG loss only
    assert verify_shards(out) == []


def test_all_inputs_rejected_still_writes_report(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "its")
    tree.image("hazy/1_1_0.9.png", 1, 1)
    tree.image("hazy/2_1_0.9.png", 2, 1)
    (tree.root / "clear").mkdir()
    with pytest.raises(DataError, match=r"all 2 input\(s\) were rejected; see .*report\.jsonl"):
        build("reside-its", tree.root, tmp_path / "out")
    assert len((tmp_path / "out/report.jsonl").read_text().splitlines()) == 2


def test_real_cli_exit_codes(tmp_path: Path) -> None:
    """Through `python -m uniremoval`: 0 on success, 2 with one error line, 1 when verify fails."""
    import subprocess
    import sys

    tree = tree_reside_its(tmp_path / "its")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "uniremoval", "shards"]
    ok = subprocess.run(
        [
            *cmd,
            "build",
            "--format",
            "reside-its",
            "--root",
            str(tree.root),
            "--out",
            str(out),
            "--workers",
            "2",
            "--max-samples-per-shard",
            "3",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "9 samples" in ok.stdout and load_manifest(out)["created_by"]["command"][:4] == [
        "uniremoval",
        "shards",
        "build",
        "--format",
    ]
    bad = subprocess.run(
        [*cmd, "build", "--format", "gopro", "--root", str(tree.root), "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --root") and "gopro" in bad.stderr
    (out / "out-000001.tar").write_bytes(b"")
    ver = subprocess.run([*cmd, "verify", str(out)], capture_output=True, text=True, check=False)
    assert ver.returncode == 1 and "out-000001.tar: 0 bytes" in ver.stderr


def test_changed_file_content_rebuilds_its_shard(tmp_path: Path, capsys) -> None:
    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4")
    before = shas(out)
    tree.image("hazy/3_1_0.1.png", 99, 151)  # same name, new pixels (sample 7: shard 1)
    capsys.readouterr()
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4")
    assert "1 shard(s) written, 5 already complete" in capsys.readouterr().out
    after = shas(out)
    assert [n for n in before if before[n] != after[n]] == ["out-000001.tar"]


def test_default_out_is_shards_name(tmp_path: Path, monkeypatch) -> None:
    tree = tree_reside_its(tmp_path / "its")
    monkeypatch.chdir(tmp_path)
    run_cli("build", "--format", "reside-its", "--root", str(tree.root), "--workers", "1", "--no-progress")
    assert load_manifest(tmp_path / "shards/reside-its")["dataset"] == "reside-its"
    assert (tmp_path / "shards/reside-its/reside-its-000000.tar").is_file()


def _save_turned(path: Path, upright: np.ndarray, orientation: int) -> None:
    """Store `upright` as a camera does: pixels turned, with the EXIF tag that turns them back."""
    from uniremoval.data.transforms import apply_orientation, inverse_orientation

    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(apply_orientation(upright, inverse_orientation(orientation)))
    Image.fromarray(stored).save(path, exif=exif.tobytes())  # PNG with an eXIf chunk: lossless


def test_exif_orientation_is_recorded_and_every_reader_turns_pairs_upright(tmp_path: Path, capsys) -> None:
    """Phone photos keep their bytes; json records their EXIF orientation and the size as displayed,
    and the loaders, verify and the cache turn input and target upright (as restore and eval on a
    folder do); a pair whose tags differ is reported by name. The cache's teacher image and feature
    grid are made from the upright input and stored upright, so a turned photo and the same photo
    stored upright give the same cache sample."""
    import torch

    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.pipelines import BadSample, decode_sample, eval_samples
    from uniremoval.data.transforms import decode_feature, decode_image
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import fast
    from uniremoval.stages.cache import _want, cache_shard
    from uniremoval.stages.teachers import Teacher, freeze

    rng = np.random.default_rng(6)
    root = tmp_path / "pairs"
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    upright = {n: (rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
               for n in ("flat", "o3", "o6", "o8", "odd")}
    for name, (inp, tgt) in upright.items():
        turn = {"flat": 1, "o3": 3, "o6": 6, "o8": 8, "odd": 6}[name]
        _save_turned(root / "input" / f"{name}.png", inp, turn)
        _save_turned(root / "target" / f"{name}.png", tgt, 1 if name == "odd" else turn)
    out = tmp_path / "out"
    assert build("paired-folder", root, out, "--degradation", "rain") == 0
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["path"], r["partner"]) for r in report] == [
        ("orientation_mismatch", "input/odd.png", "target/odd.png")]
    assert report[0]["reason"] == (
        "input has EXIF orientation 6 (rotated 90 degrees clockwise for display) but target has 1 (upright): their "
        "sizes say they are aligned as displayed, not as stored; save the input upright without the tag (PIL's "
        "ImageOps.exif_transpose), as its target is displayed")  # a sample's json has one orientation for both
    for key, fields in samples(out):
        meta = json.loads(fields["json"])
        name = Path(meta["input_name"]).stem
        assert fields["input.png"] == (root / "input" / f"{name}.png").read_bytes()  # bytes kept
        assert meta.get("orientation") == {"flat": None, "o3": 3, "o6": 6, "o8": 8}[name]
        assert (meta["height"], meta["width"]) == (32, 48)  # as displayed
    got = {s["meta"]["input_name"]: s for s in eval_samples(str(out), require=("target",), bad_samples="fail",
                                                            as_tensor=False)}
    assert sorted(got) == ["input/flat.png", "input/o3.png", "input/o6.png", "input/o8.png"]
    for rel, s in got.items():
        inp, tgt = upright[Path(rel).stem]
        assert np.array_equal(s["input"], inp) and np.array_equal(s["target"], tgt), rel
    assert verify_shards(out) == []
    info = inspect_shards(out)
    assert info["turned"] == 3 and "  EXIF orientation: 3 sample(s) stored turned, read upright" in format_inspect(info)
    assert info["resolution"]["most_common"] == {"48x32": 4}

    # A value that is no EXIF orientation is one bad sample, named.
    (_, fields), = [s for s in samples(out) if json.loads(s[1]["json"]).get("orientation") == 6]
    with pytest.raises(BadSample, match=r"json orientation 9 is not an EXIF orientation \(an integer 1-8\)"):
        decode_sample({**fields, "json": json.dumps({**json.loads(fields["json"]), "orientation": 9}).encode()}, ())
    # and so is a sample whose json is no object, or whose image is not one (said in words, no BytesIO repr)
    with pytest.raises(BadSample, match=r"^json is a list, not an object$"):
        decode_sample({**fields, "json": b"[6]"}, ())
    with pytest.raises(BadSample, match=r"^target does not decode: not an image file: no image format recognised "
                                        r"\(26 bytes, starting b'<html>404"):
        decode_sample({**fields, "target.png": b"<html>404 Not Found</html>"}, ("target",))

    # The cache: o6 stored turned vs the same pixels stored upright, through one teacher.
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tar:
        members = []
        for key, meta_extra, img in (("turned", {"orientation": 6}, (root / "input" / "o6.png").read_bytes()),
                                     ("upright", {}, png_bytes(upright["o6"][0]))):
            meta = json.dumps({"degradation": "rain", "split": "train", **meta_extra}).encode()
            members += [(f"{key}.input.png", img), (f"{key}.json", meta)]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    torch.manual_seed(0)
    teacher = Teacher("rain", freeze(MPRNet("tiny")), "minus_one_one", "random", sha256="ab" * 32)
    want = _want({"url": str(src), "source_sha256": "cd" * 32}, teacher, 16, "no")
    rec = cache_shard(str(src), tmp_path, "c.tar", teacher, 16, fast.Speed(device=torch.device("cpu")), want)
    assert rec["samples"] == 2 and rec["skipped"] == []
    cached = dict(iter_tar_samples(tmp_path / "c.tar"))
    assert np.array_equal(decode_image(cached["turned"]["teacher.png"]), decode_image(cached["upright"]["teacher.png"]))
    assert np.array_equal(decode_feature(cached["turned"]["feature.npy"]), decode_feature(cached["upright"]["feature.npy"]))
    assert decode_image(cached["turned"]["teacher.png"]).shape == (32, 48, 3)
    kt = decode_sample(cached["turned"], ("teacher", "feature"))  # what the KT loader reads
    assert np.array_equal(kt["input"], upright["o6"][0]) and kt["teacher"].shape == (32, 48, 3)
    assert kt["feature"].shape[1:] == (2, 3)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_a_build_refused_by_the_lock_leaves_the_holders_new_out_alone(tmp_path: Path, monkeypatch) -> None:
    """Two builds of the same job started together into a new --out: the one refused by the lock
    (the other created --out between its check and its lock) removes neither the holder's lock file
    nor the folder the holder is building into."""
    import fcntl

    from uniremoval.errors import UniremovalError

    tree = bad_tree(tmp_path / "bad")
    out = tmp_path / "out"
    real_lock = shardwriter.folder_lock
    held = []

    def other_process_first(folder, name, what):  # the other build takes the lock just before this one
        out.mkdir(exist_ok=True)
        fh = open(out / name, "a+")  # noqa: SIM115 (held until the test ends)
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fh)
        return real_lock(folder, name, what)

    monkeypatch.setattr(shardwriter, "folder_lock", other_process_first)
    with pytest.raises(UniremovalError, match="is in use"):
        build("paired-folder", tree.root, out, "--degradation", "rain")
    assert (out / ".lock-job0of1").is_file()  # the holder's lock (and its folder) are still there
    held[0].close()


def test_paired_folder_pairs_by_path_and_never_guesses(tmp_path: Path) -> None:
    """Sub-folders repeating file names pair folder by folder; a flat target/ pairs by a unique stem;
    an input with two possible targets, or inputs differing only in extension, are reported as
    duplicates and left out, never paired with whichever sorts first."""
    tree = Tree(tmp_path / "pf")
    for scene in ("scene1", "scene2"):
        tree.pair(f"input/{scene}/001.png", f"target/{scene}/001.png", "train")
    tree.pair("input/light/flat.png", "target/flat.png", "train")  # flat target, unique stem
    tree.image("input/two.png", 90, 150)
    tree.image("target/two.jpg", 90, 40)
    tree.image("target/two.png", 91, 40)
    tree.image("input/dup.png", 92, 150)
    tree.image("input/dup.jpg", 93, 150)
    tree.image("target/dup.png", 92, 40)
    tree.image("input/scene3/001.png", 94, 150)  # 001 exists in scene1/ and scene2/ only: no partner
    tree.image("input/scene4/002.png", 95, 150)
    tree.image("target/scene5/002.png", 95, 40)  # the only 002, but in another sequence: no partner
    out = tmp_path / "out"
    build("paired-folder", tree.root, out, "--degradation", "rain")
    check_samples(out, tree, "paired-folder", "rain", "synthetic")
    report = {r["path"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert {p: r["kind"] for p, r in report.items()} == {
        "input/dup.jpg": "duplicate", "input/dup.png": "duplicate", "input/two.png": "duplicate",
        "input/scene3/001.png": "missing_partner", "input/scene4/002.png": "missing_partner"}
    assert "target/two.jpg, target/two.png" in report["input/two.png"]["reason"]
    assert "no 'scene4/002.*' in target/" in report["input/scene4/002.png"]["reason"]


def test_folders_linked_into_the_root_are_read_and_loops_end(tmp_path: Path) -> None:
    """A linked folder is walked like a real one (its files, if they lie outside --root, reported one
    by one), and a link back to an ancestor does not loop."""
    outside = Tree(tmp_path / "elsewhere")
    outside.image("far/a.png", 1, 1)
    tree = Tree(tmp_path / "photos")
    tree.pair("x.png", None, "train")
    tree.pair("real/y.png", None, "train")
    (tree.root / "also").symlink_to(tree.root / "real")  # the same folder twice: read once
    (tree.root / "real/loop").symlink_to(tree.root)
    (tree.root / "far").symlink_to(outside.root / "far")
    out = tmp_path / "out"
    build("folder", tree.root, out, "--degradation", "clear")
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["path"]) for r in report] == [("outside_root", "far/a.png")]
    check_samples(out, tree, "folder", "clear", "real")


def test_spa_list_entry_for_a_missing_file_is_missing_not_outside(tmp_path: Path) -> None:
    """SPA writes every entry with a leading '/': one naming a file the download lacks is a
    missing_partner, not a path 'outside --root'."""
    tree = Tree(tmp_path / "spa")
    tree.pair("Testing/real_test_1000/rain/1.png", "Testing/real_test_1000/gt/1gt.png", "test")
    (tree.root / "Testing/real_test_1000.txt").write_text(
        "/real_test_1000/rain/1.png /real_test_1000/gt/1gt.png\n/real_test_1000/rain/4.png /real_test_1000/gt/4gt.png\n")
    out = tmp_path / "out"
    build("spa", tree.root, out)
    (issue,) = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert (issue["kind"], issue["path"]) == ("missing_partner", "Testing/real_test_1000/rain/4.png")
    assert "Testing/real_test_1000.txt:2" in issue["reason"]
    check_samples(out, tree, "spa", "rain", "real")


def test_rebuilding_another_split_or_subset_into_the_same_out_is_refused(tmp_path: Path) -> None:
    from uniremoval.errors import UniremovalError

    tree = Tree(tmp_path / "pf")
    for split in ("train", "test"):
        tree.pair(f"{split}/input/a.png", f"{split}/target/a.png", split)
    out = tmp_path / "out"
    build("paired-folder", tree.root, out, "--degradation", "rain", "--split", "train")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UniremovalError, match=r"holds dataset 'out' \(format=paired-folder, root=.*pf, "
                                              r"degradation=rain, split=train\); .* with another split"):
        build("paired-folder", tree.root, out, "--degradation", "rain", "--split", "test")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert build("paired-folder", tree.root, out, "--degradation", "rain", "--split", "train") == 0
    # what the options select is compared, defaults filled in: on a root with only a train split,
    # no --split and --split train build the same dataset
    flat = Tree(tmp_path / "flat")
    flat.pair("input/a.png", "target/a.png", "train")
    build("paired-folder", flat.root, tmp_path / "f", "--degradation", "rain")
    assert build("paired-folder", flat.root, tmp_path / "f", "--degradation", "rain", "--split", "train") == 0


def test_merge_refuses_jobs_built_from_other_options_or_other_files(tmp_path: Path) -> None:
    """Each job plans every shard from its own listing: jobs run with another --degradation, or after
    the folder changed, planned another dataset, and merging them would mix the two."""
    tree = Tree(tmp_path / "photos")
    for i in range(6):
        tree.pair(f"p{i}.png", None, "train")

    def job(index: int, *extra: str) -> int:
        return build("folder", tree.root, out, "--max-samples-per-shard", "2", "--num-jobs", "2",
                     "--job-index", str(index), *extra)

    out = tmp_path / "mixed"
    job(0, "--degradation", "rain")
    with pytest.raises(Exception, match=r"holds dataset 'mixed' .* with another degradation"):
        job(1, "--degradation", "clear")  # refused at once: job 0's manifest says rain
    out = tmp_path / "changed"
    job(0, "--degradation", "haze")
    (tree.root / "p0.png").unlink()
    tree.expected.pop("p0.png")
    tree.pair("q9.png", None, "train")
    job(1, "--degradation", "haze")
    with pytest.raises(DataError, match=r"built with different input files .*nothing was merged"):
        run_cli("merge", str(out))
    assert not (out / "manifest.json").exists()
    job(0, "--degradation", "haze")  # rerun with the folder as it now is
    assert run_cli("merge", str(out)) == 0
    check_samples(out, tree, "folder", "haze", "real")


def test_merge_names_a_job_an_older_version_ran_instead_of_calling_its_options_different(tmp_path: Path) -> None:
    """An array build upgraded midway: job 0 ran under an older uniremoval, whose per-job manifest lacks
    the listing's sha256 and source fields this version records. Merge said the jobs were 'built with
    different options' (they were not); it now names the older manifest, what it lacks, and the job to
    rerun, and that rerun (finished shards kept) merges."""
    tree = Tree(tmp_path / "photos")
    for i in range(6):
        tree.pair(f"p{i}.png", None, "train")
    out = tmp_path / "arr"

    def job(index: int) -> int:
        return build("folder", tree.root, out, "--degradation", "haze", "--max-samples-per-shard", "2",
                     "--num-jobs", "2", "--job-index", str(index))

    job(0)
    job(1)
    old = out / "manifest-job000of002.json"
    m = json.loads(old.read_text())
    del m["plan"]["sha256"]
    m["source"] = {k: m["source"][k] for k in ("format", "root")}  # what an older version recorded
    old.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"written by different uniremoval versions: manifest-job000of002\.json lacks "
                                        r"plan\.sha256, source\.blur_dir, source\.degradation, .*nothing was merged\. Rerun job 0 of 2 "
                                        r"\(the same `uniremoval shards build` with --num-jobs 2 --job-index 0; "
                                        r"finished shards are kept\) with this version"):
        run_cli("merge", str(out))
    assert not (out / "manifest.json").exists()
    job(0)
    assert run_cli("merge", str(out)) == 0
    check_samples(out, tree, "folder", "haze", "real")


def test_a_build_where_every_input_fails_to_decode_fails(tmp_path: Path, capsys) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "zero.png").write_bytes(b"")
    (root / "page.jpg").write_bytes(b"<html>not an image</html>")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no usable samples: all 2 input\(s\) failed to decode or pair "
                                        r"\(2 reported\); see .*report\.jsonl"):
        build("folder", root, out, "--degradation", "haze")
    assert not (out / "manifest.json").exists()
    assert {json.loads(line)["kind"] for line in (out / "report.jsonl").read_text().splitlines()} == {"unreadable"}


def test_training_refuses_an_unfinished_build(tmp_path: Path, monkeypatch) -> None:
    """A stream over the finished shards of a stopped build must not pass for one over the dataset.
    (A listed shard missing on disk is data.bad_samples' business: tests/faults.)"""
    from uniremoval.data.shard_stream import resolve_shards

    tree = big_its(tmp_path / "its")
    out = tmp_path / "out"
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert len(resolve_shards(out)) == 6

    # A rebuild (a source file changed) stopped in the shard it rewrites: the old manifest is gone.
    (tree.root / "clear/1.png").write_bytes((tree.root / "clear/2.png").read_bytes())
    build_killed_at(monkeypatch, 1, tree, out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match=r"holds an unfinished build .* rerun the `uniremoval shards build`"):
        resolve_shards(out)
    build("reside-its", tree.root, out, "--max-samples-per-shard", "4", "--name", "its")
    assert len(resolve_shards(out)) == 6 and verify_shards(out) == []


def test_inspect_of_a_tar_of_other_files_says_they_are_not_samples(tmp_path: Path, capsys) -> None:
    """A tar of some other project's files (no json, no input image) is summarised with a warning
    and counted under `foreign`, not shown as samples of degradation None without a word."""
    import tarfile

    from uniremoval.cli import main

    foreign = tmp_path / "photos.tar"
    with tarfile.open(foreign, "w") as tar:
        for name in ("a.jpg", "b.jpg", "notes.txt"):
            src = tmp_path / name
            src.write_bytes(b"x" * 10)
            tar.add(src, arcname=name)
    assert main(["shards", "inspect", str(foreign), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["foreign"]) == (3, 3)
    assert main(["shards", "inspect", str(foreign)]) == 0
    assert (f"WARNING: 3 sample(s) lack a json or an input image, so they are not uniremoval samples "
            f"(the loaders skip or refuse them): run `uniremoval shards verify {foreign}`") in capsys.readouterr().out
    tree = big_its(tmp_path / "its")
    build("reside-its", tree.root, tmp_path / "out", "--max-samples-per-shard", "4", "--name", "its")
    info = inspect_shards(tmp_path / "out")
    assert info["foreign"] == 0 and "WARNING" not in format_inspect(info)


def test_pool_workers_end_with_a_killed_main_process(tmp_path: Path) -> None:
    """A build killed with SIGKILL/SIGTERM (`kill PID`, the OOM killer) left its forked workers
    waiting forever, holding the folder lock: every rerun was refused as "in use" by a dead pid."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from uniremoval.io import folder_lock

    # build_shards with 2 workers, each blocked in its first sample (after saying its pid)
    script = (
        "import os, sys, time\n"
        "from uniremoval.data.readers import Item\n"
        "from uniremoval.data.shardwriter import build_shards\n"
        "class Slow:\n"
        "    def fingerprint(self): return 'slow'\n"
        "    def plan_info(self, item): return 1, []\n"
        "    def build(self, item, cache):\n"
        "        os.write(1, b'%d\\n' % os.getpid())\n"
        "        time.sleep(60)\n"
        "items = [Item(f'{i}.png', None, 'haze', 'real', 'x', 'train', key=str(i)) for i in range(4)]\n"
        "build_shards(items, [], Slow(), sys.argv[1], dataset='x', source={}, shard_bytes=10**6,\n"
        "             max_samples=1, workers=2, progress=False)\n"
    )
    main = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(main.stdout.readline()) for _ in range(2)]
    finally:
        main.kill()
        main.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/status").is_file() and "zombie" not in Path(f"/proc/{pid}/status").read_text()

    try:
        deadline = time.monotonic() + 5
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "pool workers outlived their killed main process"
        with folder_lock(tmp_path, ".lock-job0of1", "shards"):  # free again: a rerun may start
            pass
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _killed(*_args):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class _KilledBuilder:
    def fingerprint(self) -> str:
        return "killed"

    def plan_info(self, item) -> tuple[int, list]:
        return 1, []

    def build(self, item, cache):
        _killed()


@pytest.mark.parametrize("shards", [1, 4])  # fewer shards than workers (the main process writes), or more
def test_a_killed_worker_is_one_error_line_saying_what_to_do(tmp_path: Path, monkeypatch, shards: int) -> None:
    """A worker killed mid-build (the OOM killer, on large images) was a BrokenProcessPool traceback."""
    from uniremoval.data import manifest
    from uniremoval.data.readers import Item

    items = [Item(f"{i}.png", None, "haze", "real", "x", "train", key=str(i)) for i in range(4)]
    with pytest.raises(DataError, match=r"a worker process of `shards build` ended abruptly .* rerun the same "
                                        r"command to go on, with fewer --workers if memory ran out"):
        shardwriter.build_shards(items, [], _KilledBuilder(), tmp_path / "o", dataset="x", source={},
                                 shard_bytes=10**6, max_samples=4 // shards, workers=2, progress=False)
    if shards == 4:  # verify's pool too
        tree = big_its(tmp_path / "its")
        build("reside-its", tree.root, tmp_path / "v", "--max-samples-per-shard", "8")
        monkeypatch.setattr(manifest, "_verify_one", _killed)
        with pytest.raises(DataError, match=r"`shards verify` ended abruptly"):
            verify_shards(tmp_path / "v", workers=2)


@pytest.mark.parametrize(("workers", "cap"), [(1, 0), (2, 0), (2, 3)])
def test_progress_moves_within_a_shard(tmp_path: Path, monkeypatch, workers: int, cap: int) -> None:
    """The bar moved once per finished shard: a test set that fits one 256 MB shard (Rain1400's,
    SOTS') sat at 0% for the whole build. Where this process writes, it moves per sample; where
    workers write whole shards (cap 3: 3 shards), per shard; the total is right either way."""
    updates: list[int] = []

    class Bar:  # records the build's bar (not the one over finished shards a rerun checks)
        def __init__(self, total, desc, unit, **kwargs):
            self.building = desc.startswith("shards ")

        def update(self, n=1):
            if self.building:
                updates.append(n)

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr("uniremoval.data.shardwriter.progress_bar", Bar)
    tree = big_its(tmp_path / "its")
    out = tmp_path / "o"
    run_cli("build", "--format", "reside-its", "--root", str(tree.root), "--out", str(out), "--workers",
            str(workers), *(["--max-samples-per-shard", str(cap)] if cap else []))
    assert sum(updates) == 21
    if cap:
        assert max(updates) == 3
    else:
        assert max(updates) == 1 and updates.count(1) == 21


def test_a_rerun_that_lists_no_usable_input_leaves_the_built_folder_alone(tmp_path: Path) -> None:
    """Rerun over a root whose clean folder went missing (an unmounted disk): every input is rejected
    while listing. It was refused as building 'another split, degradation, domain' (no such option
    was given), and a first-time empty build's path would have overwritten the good report."""
    tree = big_its(tmp_path / "its")
    tree.image("hazy/8_1_0.1.png", 200, 150)  # one rejected input: the report has a line to keep
    out = tmp_path / "o"
    build("reside-its", tree.root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    shutil.move(tree.root / "clear", tmp_path / "clear-elsewhere")
    (tree.root / "clear").mkdir()  # the mount point, empty
    with pytest.raises(DataError, match=r"all 22 input\(s\) were rejected while listing \(first: missing_partner: "
                                        r"hazy/1_1_0\.1\.png.*\); .*/o was left as its last build made it"):
        build("reside-its", tree.root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    assert verify_shards(out) == []


def test_a_tiffs_sample_kind_is_read_from_its_header_in_either_byte_order():
    """The float/signed/32-bit TIFF refusal decoded every TIFF in full to learn its sample type, so the
    loaders and shards build decoded each TIFF twice (LZW 2000x1500: 29 -> 57 ms); the header's tags
    258 (bits per sample) and 339 (sample format) say it. Hand-made headers: little- and big-endian,
    values inline (one or two samples) and at an offset (three)."""
    import struct

    from uniremoval.data.transforms import _tiff_samples, unsupported_tiff

    def tiff(order: str, bits: int, fmt: int, samples: int) -> bytes:
        magic = b"II" if order == "<" else b"MM"
        head = magic + struct.pack(order + "HI", 42, 8)
        entries = []
        extra_at = 8 + 2 + 12 * 2 + 4
        extra = b""
        for tag, v in ((258, bits), (339, fmt)):
            if samples <= 2:
                entries.append(struct.pack(order + "HHI", tag, 3, samples) + struct.pack(order + "HH", v, v))
            else:
                entries.append(struct.pack(order + "HHII", tag, 3, samples, extra_at + len(extra)))
                extra += struct.pack(order + "H", v) * samples
        return head + struct.pack(order + "H", 2) + b"".join(entries) + b"\0\0\0\0" + extra

    for order in "<>":
        assert _tiff_samples(tiff(order, 32, 3, 1)) == (32, 3)
        assert _tiff_samples(tiff(order, 16, 1, 3)) == (16, 1) and unsupported_tiff(tiff(order, 16, 1, 3)) is None
        assert _tiff_samples(tiff(order, 16, 2, 3)) == (16, 2)
        assert "signed 16-bit integer" in unsupported_tiff(tiff(order, 16, 2, 3))
        assert "32-bit float" in unsupported_tiff(tiff(order, 32, 3, 2))
    assert _tiff_samples(tiff("<", 32, 3, 3)[:20]) is None  # cut short: left to the decoder to name


def test_a_panorama_is_packed_up_to_what_the_loaders_decode(tmp_path, monkeypatch):
    """Pillow warns over ~89 Mpixels ("could be decompression bomb DOS attack", printed raw by shards
    build and verify) and refuses over ~179: a panorama or stitched scan is a user's photo. The probe
    takes what the shard loaders decode (OpenCV: 2^30 pixels) without a word, and names a larger file."""
    import io
    import warnings

    from PIL import Image

    from uniremoval.data import manifest

    buf = io.BytesIO()
    Image.new("1", (10000, 9000)).save(buf, format="PNG")  # 90 Mpixels in 11 kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manifest.image_probe(buf.getvalue()) == ((9000, 10000), 1)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's guard is back for everyone else
    # shards synth sizes its work from the header: Pillow's error over ~179 Mpixel was a traceback there
    from uniremoval.data.readers import Item
    from uniremoval.data.synth import SynthRanges, SynthSampleBuilder

    big = tmp_path / "pano.png"
    Image.new("1", (14000, 13000)).save(big)  # 182 Mpixels
    builder = SynthSampleBuilder(str(tmp_path), "d", "default", 0, SynthRanges())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost, identity = builder.plan_info(Item("pano.png", None, "haze", "synthetic", "t", "train"))
    assert cost > 14000 * 13000 and identity[0] == big.stat().st_size
    monkeypatch.setattr(manifest, "LOADER_MAX_PIXELS", 50_000_000)
    with pytest.raises(ValueError, match=r"^unreadable: 10000x9000 is 90,000,000 pixels, more than the 50,000,000 "
                                         r"the shard loaders decode \(OpenCV's limit\); downscale or crop it$"):
        manifest.image_probe(buf.getvalue())
