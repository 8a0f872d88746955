"""Teacher training and the teacher-output cache, for real: two CPU processes (accelerate launch),
a kill -9 in the middle of training then --resume auto, and a cache that KT reads and that is
refused once stale. Tiny MPRNet, 40x48 images, a handful of steps."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import H, W, one_torch_thread, write_shards

from uniremoval.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_trainer_teacher.py"
one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # 2 threads on 2 shared cores: ~100x slower


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    train_keys = write_shards(root / "shards" / "syn", "syn", 4, 3, split="train", seed=0)
    write_shards(root / "shards" / "val", "val", 1, 4, split="test", seed=1)
    teacher = {
        "stage": "teacher", "project": "tc", "name": "teacher-haze", "output_dir": str(root / "outputs"),
        "degradation": "haze", "model": {"preset": "tiny"},
        "data": {"degradations": ["haze"], "batch_size": 2, "crop_size": 32, "num_workers": 0, "shuffle_buffer": 4,
                 "train": [{"name": "syn", "shards": str(root / "shards" / "syn"), "degradation": "haze"}],
                 "val": [{"name": "val", "shards": str(root / "shards" / "val"), "degradation": "haze"}]},
        "optim": {"lr": 2e-3},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 2, "min_lr": 1e-5},
        "train": {"epochs": 2, "steps_per_epoch": 4, "log_every": 2, "val_every": 4, "image_every": 4, "seed": 5},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    return {"root": root, "teacher": teacher, "train_keys": train_keys}


def _write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same thread count as this process (see one_thread): same floats
    return env


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_kill9_then_resume_auto_equals_uninterrupted(workspace):
    from mlflow.tracking import MlflowClient

    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    root = workspace["root"]
    cfg_path = _write_cfg(root / "teacher.yaml", workspace["teacher"])
    run_dir = root / "outputs" / "teacher-haze"
    # Killed inside the step after update 5: the step-4 checkpoint is the newest complete one.
    p = subprocess.run([sys.executable, str(WORKER), "kill", str(cfg_path), "5"], env=_env(), cwd=root,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == -9, p.stderr[-3000:]
    ckpts = sorted(x.name for x in (run_dir / "checkpoints").iterdir() if not x.name.startswith("."))
    assert ckpts == ["step-00000002", "step-00000004"]
    assert not (run_dir / "last.safetensors").exists()
    first_id = json.loads((run_dir / "checkpoints" / "step-00000004" / "teacher.json").read_text())["mlflow_run_id"]
    assert first_id

    p = subprocess.run([sys.executable, "-m", "uniremoval", "train", "teacher", "--config", str(cfg_path),
                        "--resume", "auto"], env=_env(), cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "at step 4" in p.stderr
    last_meta = json.loads((run_dir / "last.json").read_text())
    assert last_meta["step"] == 8 and last_meta["mlflow_run_id"] == first_id
    assert last_meta["input_range"] == "minus_one_one" and last_meta["degradation"] == "haze"
    assert (run_dir / "best.safetensors").is_file()

    # The same run, uninterrupted, in this process.
    ref_cfg = dict(workspace["teacher"], output_dir=str(root / "ref"), tracking={"enabled": False})
    cfg = load_config(_write_cfg(root / "ref.yaml", ref_cfg), stage="teacher")
    Trainer(cfg, TeacherTraining(cfg)).fit()
    ref = _weights(root / "ref" / "teacher-haze" / "last.safetensors")
    got = _weights(run_dir / "last.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tc")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'teacher'")
    assert [r.info.run_id for r in runs] == [first_id]
    run = runs[0]
    assert run.info.run_name == "teacher-haze" and run.info.status == "FINISHED"
    assert run.data.tags["degradation"] == "haze" and run.data.tags["resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(first_id, "train/total")]
    assert steps == [2, 4, 6, 8]  # before and after the kill, one run
    assert {m.step for m in client.get_metric_history(first_id, "val/val/psnr")} == {4, 8}
    assert run.data.params["model.preset"] == "tiny"
    arts = [a.path for a in client.list_artifacts(first_id, "images")]
    assert "images/train-step00000000.png" in arts


@pytest.mark.slow
def test_two_processes_teacher_then_cache(workspace, capsys):
    from uniremoval.config import load_config
    from uniremoval.data.pipelines import kt_loader
    from uniremoval.stages import cache as cache_stage
    from uniremoval.stages.cache import check_cache

    # accelerate is a dependency (pyproject.toml): a missing CLI is a broken install, not a reason to skip
    assert shutil.which("accelerate", path=str(Path(sys.executable).parent)), "accelerate CLI missing beside python"
    root = workspace["root"]
    tcfg = dict(workspace["teacher"], output_dir=str(root / "dist"))
    teacher_path = root / "dist" / "teacher-haze" / "last.safetensors"
    ccfg = {"stage": "cache", "project": "tc", "name": "cache", "output_dir": str(root / "dist"),
            "model": {"preset": "tiny"}, "teachers": {"checkpoints": {"haze": str(teacher_path)}},
            "data": {"degradations": ["haze"], "feature_cell": 16,
                     "train": [{"name": "syn", "shards": str(root / "shards" / "syn"), "degradation": "haze"}]},
            "cache": {"out": str(root / "cache")}, "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}}
    t_path = _write_cfg(root / "dist_teacher.yaml", tcfg)
    c_path = _write_cfg(root / "dist_cache.yaml", ccfg)
    accelerate = Path(sys.executable).parent / "accelerate"
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                        str(WORKER), "dist", str(t_path), str(c_path), str(root / "dist_out")],
                       env=_env(), cwd=root, capture_output=True, text=True, timeout=480, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    launch_stderr = p.stderr
    r0, r1 = (json.loads((root / "dist_out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r1["world"] == 2 and r0["step"] == r1["step"] == 8
    assert r0["weights_sha"] == r1["weights_sha"]  # DDP kept the ranks identical
    assert r0["loss_after"] < 0.9 * r0["loss_before"]  # it learns the haze map (0.813 -> 0.709 here)
    assert r0["run_id"] and r1["run_id"] is None  # only the main process talks to MLflow
    assert r0["metrics"]["val/val/psnr"] == r1["metrics"]["val/val/psnr"]  # gathered, not rank 0's share
    # One rank's NaN and one rank's SIGUSR1: both ranks skip the same update and stop together, with
    # the host check (foreach Adam) and with the device check (fused Adam; step 4 logs, which reads
    # its flags, so the stop comes at the same step).
    assert (r0["toy_deferred"], r0["fused_deferred"]) == (False, True)
    for p in ("toy", "fused"):
        for r in (r0, r1):
            assert (r[f"{p}_status"], r[f"{p}_step"], r[f"{p}_skipped"]) == ("preempted", 4, 1), p
        assert r0[f"{p}_sha"] == r1[f"{p}_sha"]
        # step 4 is off checkpoint.every_steps=3: that checkpoint is the signal's, written for both ranks
        assert r0[f"{p}_checkpoint"] == ["step-00000003", "step-00000004"]
        assert any("non-finite loss at step 2" in m and "mse=nan" in m for m in r1[f"{p}_warnings"])
        assert any("on another rank" in m for m in r0[f"{p}_warnings"])

    # Every sample exactly once, with the teacher's image and pooled feature.
    cdir = root / "cache" / "syn"
    man = check_cache(cdir, {"haze": str(teacher_path)}, str(root / "shards" / "syn"), cell=16)
    assert man["counts"]["total"] == 12 and len(man["shards"]) == 4
    assert "(12 samples); recomputed 4, reused 0" in launch_stderr  # both ranks' shards, not rank 0's two
    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.transforms import decode_feature, decode_image

    keys = []
    for entry in man["shards"]:
        for key, files in iter_tar_samples(cdir / entry["name"]):
            keys.append(key)
            assert decode_image(files["teacher.png"]).shape == (H, W, 3)
            feat = decode_feature(files["feature.npy"])
            assert feat.dtype == np.float16 and feat.shape == (16, H // 16, W // 16)  # tiny: 12 + 4 channels
            assert json.loads(files["json"])["teacher_sha256"] == man["cache"]["teacher"]["sha256"]
            assert "input.png" in files and "target.png" in files
    assert sorted(keys) == sorted(workspace["train_keys"])

    # The cache matches what the teacher computes in this process.
    from uniremoval.stages.teachers import load_teachers

    t = load_teachers({"haze": str(teacher_path)}, ["haze"], "tiny")["haze"]
    key, files = next(iter_tar_samples(cdir / man["shards"][0]["name"]))
    from uniremoval.data.transforms import to_tensor

    img, feat = t(to_tensor(decode_image(files["input.png"]))[None], 16)
    cached = to_tensor(decode_image(files["teacher.png"]))
    assert (cached - img[0]).abs().max() <= 1.0 / 255 + 1e-6
    torch.testing.assert_close(torch.from_numpy(decode_feature(files["feature.npy"]).astype(np.float32)),
                               feat[0], rtol=2e-3, atol=2e-3)

    # KT's data path reads it.
    loader = kt_loader([("syn", str(cdir), "haze", 1.0)], ["haze"], batch_size=2, crop_size=32, steps_per_epoch=2,
                       num_workers=0, seed=0, rank=0, world_size=1, cell=16)
    batch = next(iter(loader))
    assert batch["teacher"].shape == (2, 3, 32, 32) and batch["feature"].shape == (2, 16, 2, 2)

    # Resumable: a second run recomputes nothing (done-records match); a deleted shard is rebuilt.
    done = sorted(cdir.glob(".*.done.json"))
    stamps = {d: d.stat().st_mtime_ns for d in done}
    (cdir / man["shards"][1]["name"]).unlink()
    cache_stage.run(load_config(c_path, ["tracking.enabled=false"], stage="cache"))
    changed = [d for d in done if d.stat().st_mtime_ns != stamps[d]]
    assert [d.name for d in changed] == [f".{man['shards'][1]['name']}.done.json"]
    assert check_cache(cdir, {"haze": str(teacher_path)})["counts"]["total"] == 12
    from uniremoval.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["cache", "--config", str(c_path), "--check"]) == 0
    assert "would recompute" not in capsys.readouterr().out
    # ok for KT under any precision, but a build under another one would recompute every shard: said
    assert cli_main(["cache", "--config", str(c_path), "--check", "train.mixed_precision=bf16"]) == 0
    assert ("; built with train.mixed_precision=no: `uniremoval cache` with bf16 would recompute every shard"
            in capsys.readouterr().out)
    # A rerun trusts a done-record whose tar has the recorded size; `shards verify` re-hashes the
    # cache (its manifest has the datasets' format) and finds a byte changed in place.
    from uniremoval.data.manifest import verify_shards

    assert verify_shards(cdir) == []
    tar = cdir / man["shards"][2]["name"]
    data = tar.read_bytes()
    tar.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    assert any(man["shards"][2]["name"] in p and "sha256" in p for p in verify_shards(cdir))
    tar.write_bytes(data)

    # Stale: other teacher weights (the step-4 checkpoint), or changed source shards.
    other = root / "dist" / "teacher-haze" / "checkpoints" / "step-00000004" / "teacher.safetensors"
    with pytest.raises(DataError, match=r"stale cache .* built by teacher .* teachers.checkpoints.haze"):
        check_cache(cdir, {"haze": str(other)})
    with pytest.raises(DataError, match="not cached"):
        check_cache(cdir, {"haze": str(teacher_path)}, [str(root / "shards" / "syn"), str(root / "shards" / "val")])
    src = root / "shards" / "syn"
    m = json.loads((src / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "0" * 64  # the source shard was rebuilt since
    (src / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="changed since it was cached"):
        check_cache(cdir, {"haze": str(teacher_path)})


def _mixed_size_shard(path: Path) -> list[str]:
    """Six samples: three 40x48, one 24x32, one that does not decode, one 40x48 again."""
    import webdataset as wds
    from _fixtures import png

    rng = np.random.default_rng(7)
    sizes = [(H, W), (H, W), (H, W), (24, 32), None, (H, W)]
    keys = []
    with wds.TarWriter(str(path)) as tw:
        for i, hw in enumerate(sizes):
            key = f"mix_{i}"
            keys.append(key)
            img = png(rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)) if hw else b"not an image"
            tw.write({"__key__": key, "input.png": img, "json": {"degradation": "haze", "split": "train"}})
    return keys


def test_cache_done_record_reused_only_when_everything_matches(tmp_path):
    """A cache shard is reused only when its done-record names the same source, teacher, cell,
    input range and precision, and its tar is there with the recorded size; otherwise rebuilt."""
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import fast
    from uniremoval.stages.cache import _done_path, _is_done, _want, cache_shard
    from uniremoval.stages.teachers import Teacher, freeze

    src = tmp_path / "src.tar"
    _mixed_size_shard(src)
    torch.manual_seed(0)
    teacher = Teacher("haze", freeze(MPRNet("tiny")), "minus_one_one", "random", sha256="ab" * 32)
    item = {"url": str(src), "source_sha256": "cd" * 32}
    want = _want(item, teacher, 16, "no")
    rec = cache_shard(str(src), tmp_path, "c.tar", teacher, 16, fast.Speed(device=torch.device("cpu")), want,
                      batch_size=3)
    done, tar = _done_path(tmp_path, "c.tar"), tmp_path / "c.tar"
    assert json.loads(done.read_text()) == rec and rec["bytes"] == tar.stat().st_size
    assert _is_done(tmp_path, "c.tar", want) == rec
    for key, other in (("teacher_sha256", "ef" * 32), ("source_sha256", "00" * 32), ("cell", 8),
                       ("input_range", "zero_one"), ("precision", "bf16")):
        assert _is_done(tmp_path, "c.tar", {**want, key: other}) is None, key
    # the same source bytes at another path (a moved workspace) are the same source; unknown bytes are not
    assert _is_done(tmp_path, "c.tar", {**want, "source_url": str(tmp_path / "x.tar")}) == rec
    assert _is_done(tmp_path, "c.tar", {**want, "source_url": "https://h/x.tar", "source_sha256": None}) is None
    # the same, as the stage asks: another teacher (weights or input range), cell, source or precision
    import dataclasses

    for t, it, cell, prec in ((dataclasses.replace(teacher, sha256="ef" * 32), item, 16, "no"),
                              (dataclasses.replace(teacher, input_range="zero_one"), item, 16, "no"),
                              (teacher, {**item, "source_sha256": "00" * 32}, 16, "no"),
                              (teacher, item, 8, "no"), (teacher, item, 16, "bf16")):
        assert _is_done(tmp_path, "c.tar", _want(it, t, cell, prec)) is None, (t.sha256, t.input_range, it, cell, prec)
    data = tar.read_bytes()
    tar.write_bytes(data[:-512])  # a tar cut short under its final name
    assert _is_done(tmp_path, "c.tar", want) is None
    tar.unlink()  # the tar gone, its done-record left
    assert _is_done(tmp_path, "c.tar", want) is None
    tar.write_bytes(data)
    assert _is_done(tmp_path, "c.tar", want) == rec
    done.write_text(done.read_text()[:20])  # a done-record that does not parse
    assert _is_done(tmp_path, "c.tar", want) is None


def test_cache_batches_same_size_samples_in_source_order(tmp_path):
    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.transforms import decode_feature, decode_image
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import fast
    from uniremoval.stages.cache import _is_done, _want, cache_shard
    from uniremoval.stages.teachers import Teacher, freeze

    src = tmp_path / "src.tar"
    keys = _mixed_size_shard(src)
    torch.manual_seed(0)
    teacher = Teacher("haze", freeze(MPRNet("tiny")), "minus_one_one", "random", sha256="ab" * 32)
    calls = []
    inner = teacher.model.forward
    teacher.model.forward = lambda x, **kw: (calls.append(x.shape[0]), inner(x, **kw))[1]
    item = {"url": str(src), "source_sha256": "cd" * 32}
    fp32 = fast.Speed(device=torch.device("cpu"))
    out = {}
    for batch_size in (1, 3):
        calls.clear()
        d = tmp_path / f"b{batch_size}"
        d.mkdir()
        rec = cache_shard(str(src), d, "c.tar", teacher, 16, fp32, _want(item, teacher, 16, "no"),
                          batch_size=batch_size)
        assert rec["samples"] == 5 and [s["key"] for s in rec["skipped"]] == ["mix_4"]
        out[batch_size] = list(iter_tar_samples(d / "c.tar"))
        assert [k for k, _ in out[batch_size]] == [k for k in keys if k != "mix_4"]  # source order kept
        assert _is_done(d, "c.tar", _want(item, teacher, 16, "no"))
        assert _is_done(d, "c.tar", _want(item, teacher, 16, "bf16")) is None  # other precision: rebuilt
        out[f"calls{batch_size}"] = list(calls)
    # A run breaks at the size change and at the undecodable sample: [3 x 40x48], [24x32], [40x48].
    assert out["calls1"] == [1] * 5 and out["calls3"] == [3, 1, 1]
    for (_, a), (_, b) in zip(out[1], out[3]):
        la = decode_image(a["teacher.png"]).astype(int)
        lb = decode_image(b["teacher.png"]).astype(int)
        assert np.abs(la - lb).max() <= 1  # batching changes the conv summation order only
        np.testing.assert_allclose(decode_feature(a["feature.npy"]).astype(np.float32),
                                   decode_feature(b["feature.npy"]).astype(np.float32), rtol=2e-3, atol=2e-3)

    # bf16 autocast + channels_last (configs/cache.yaml): the stored image within a few 8-bit levels.
    import copy
    import dataclasses

    fast_teacher = copy.copy(teacher)
    fast_teacher.model = fast.to_channels_last(copy.deepcopy(teacher.model))
    bf16 = dataclasses.replace(fp32, dtype=torch.bfloat16, channels_last=True)
    (tmp_path / "bf16").mkdir()
    cache_shard(str(src), tmp_path / "bf16", "c.tar", fast_teacher, 16, bf16, _want(item, teacher, 16, "bf16"),
                batch_size=3)
    levels_moved = 0
    for (_, a), (_, b) in zip(out[1], iter_tar_samples(tmp_path / "bf16" / "c.tar")):
        diff = np.abs(decode_image(a["teacher.png"]).astype(int) - decode_image(b["teacher.png"]).astype(int))
        assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())  # measured: 2, 0.21
        levels_moved += int(diff.sum())
        fa, fb = (decode_feature(f["feature.npy"]).astype(np.float32) for f in (a, b))
        assert np.linalg.norm(fa - fb) / np.linalg.norm(fa) < 0.02  # measured: 0.006
    assert levels_moved > 0  # bf16 really ran


def test_cache_with_encoder_threads_writes_the_same_bytes(tmp_path, monkeypatch):
    """cache.workers: inputs decoded ahead by a thread and outputs PNG-encoded by a pool while the
    teacher runs; the shard (sizes that change, an undecodable sample) is byte for byte the serial
    one, with the same record. A source shard cut short still fails as a DataError naming it, and the
    threads are gone afterwards."""
    import threading

    from uniremoval.errors import DataError
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import fast
    from uniremoval.stages.cache import _want, cache_shard
    from uniremoval.stages.teachers import Teacher, freeze

    src = tmp_path / "src.tar"
    _mixed_size_shard(src)
    torch.manual_seed(0)
    teacher = Teacher("haze", freeze(MPRNet("tiny")), "minus_one_one", "random", sha256="ab" * 32)
    want = _want({"url": str(src), "source_sha256": "cd" * 32}, teacher, 16, "no")
    cpu = fast.Speed(device=torch.device("cpu"))
    recs = {}
    for workers in (0, 3):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        recs[workers] = cache_shard(str(src), d, "c.tar", teacher, 16, cpu, want, batch_size=2, workers=workers)
    assert (tmp_path / "w0" / "c.tar").read_bytes() == (tmp_path / "w3" / "c.tar").read_bytes()
    assert recs[0] == recs[3] and recs[0]["samples"] == 5 and [x["key"] for x in recs[0]["skipped"]] == ["mix_4"]

    # cache.png_level: any zlib level stores the same pixels (PNG is lossless); only the bytes differ.
    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.transforms import decode_image

    (tmp_path / "l9").mkdir()
    cache_shard(str(src), tmp_path / "l9", "c.tar", teacher, 16, cpu, want, batch_size=2, workers=2, png_level=9)
    fast_png, small_png = (list(iter_tar_samples(tmp_path / d / "c.tar")) for d in ("w0", "l9"))
    assert [k for k, _ in fast_png] == [k for k, _ in small_png]
    for (_, a), (_, b) in zip(fast_png, small_png):
        np.testing.assert_array_equal(decode_image(a["teacher.png"]), decode_image(b["teacher.png"]))
        assert a["feature.npy"] == b["feature.npy"]
    assert sum(len(b["teacher.png"]) for _, b in small_png) < sum(len(a["teacher.png"]) for _, a in fast_png)

    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (tmp_path / "cut").mkdir()
    with pytest.raises(DataError, match=r"cut\.tar is unreadable"):
        cache_shard(str(cut), tmp_path / "cut", "c.tar", teacher, 16, cpu, want, batch_size=2, workers=3)
    assert not list((tmp_path / "cut").iterdir())  # nothing half-written
    # The pool is shut down without waiting: its threads end on their own, soon (polled, not slept on).
    def pool_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(("cache-decode", "cache-encode"))]

    deadline = time.monotonic() + 30
    while pool_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pool_threads()


def test_teacher_and_kt_validation_score_as_eval_does(tmp_path):
    """The one validation of paired sets (teacher and KT stages): each image restored whole in the
    model's input range, rounded to 8 bits, PSNR by the textbook formula and SSIM as scikit-image's
    Gaussian SSIM; the input's own PSNR as baseline; every set and their mean PSNR."""
    from types import SimpleNamespace

    import skimage.metrics as skm  # a declared dependency
    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures import write_shards

    from uniremoval.data.pipelines import eval_samples
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    write_shards(tmp_path / "a", "a", 1, 3, seed=1)
    write_shards(tmp_path / "b", "b", 1, 2, seed=2)
    torch.manual_seed(0)
    model = MPRNet("tiny").eval()
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    sources = [SimpleNamespace(name=n, shards=str(tmp_path / n), max_samples=None) for n in ("a", "b")]
    got = validate_paired(ctx, model, "zero_one", sources, lockstep=False)

    def u8(t):  # [-1, 1] CHW -> 8-bit HWC, as --save-images writes it
        return ((t.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).double().numpy()

    want = {}
    for n in ("a", "b"):
        rows = []
        for item in eval_samples(str(tmp_path / n), require=("target",)):
            with torch.no_grad():
                out = model(((item["input"] + 1) / 2)[None])[0][0] * 2 - 1  # zero_one: the net sees [0, 1]
            a, t, x = u8(out), u8(item["target"]), u8(item["input"])
            rows.append((10 * np.log10(255**2 / ((a - t) ** 2).mean()),
                         skm.structural_similarity(a, t, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                                   use_sample_covariance=False, data_range=255),
                         10 * np.log10(255**2 / ((x - t) ** 2).mean())))
        want.update({f"val/{n}/{k}": float(np.mean([r[i] for r in rows]))
                     for i, k in enumerate(("psnr", "ssim", "psnr_input"))})
    want["val/mean/psnr"] = (want["val/a/psnr"] + want["val/b/psnr"]) / 2
    assert got.keys() == want.keys()
    for k, value in want.items():
        assert got[k] == pytest.approx(value, abs=2e-3), k


def test_cache_refuses_an_out_folder_that_would_overwrite_shards(tmp_path):
    """cache.out pointing at (or into) the source shards, or at a folder holding a dataset, is refused
    before anything is written; a folder of its own, or an earlier cache, passes."""
    from uniremoval.errors import ConfigError
    from uniremoval.stages.cache import check_out_folders

    src = tmp_path / "shards" / "syn"
    src.mkdir(parents=True)
    (src / "syn-000000.tar").write_bytes(b"x" * 512)
    (src / "manifest.json").write_text(json.dumps({"shards": [], "counts": {}}))
    items = [{"source": "syn", "url": str(src / "syn-000000.tar"), "name": "syn-000000.tar", "degradation": "haze"}]
    with pytest.raises(ConfigError, match=r"cache.out=.*shards: the cache of 'syn' would be written to .*shards/syn, "
                                          r"the folder of the source shards"):
        check_out_folders(tmp_path / "shards", items)
    with pytest.raises(ConfigError, match="overlapping the source shards"):
        check_out_folders(src / "inner", items)
    other = tmp_path / "other"
    (other / "syn").mkdir(parents=True)
    (other / "syn" / "manifest.json").write_text(json.dumps({"shards": [], "counts": {}}))
    with pytest.raises(ConfigError, match=r"other/syn holds a dataset .*no cache section"):
        check_out_folders(other, items)
    (other / "syn" / "manifest.json").write_text(json.dumps({"shards": [], "counts": {}, "cache": {}}))
    check_out_folders(other, items)  # an earlier cache: completed or rebuilt, as designed
    check_out_folders(tmp_path / "cache", items)
    assert (src / "syn-000000.tar").read_bytes() == b"x" * 512

    # A second cache job on the same cache.out while one runs (here: the lock the first holds) stops
    # before it loads a teacher or writes a shard, naming the holder.
    from uniremoval.config import CacheStage
    from uniremoval.errors import UniremovalError
    from uniremoval.io import folder_lock
    from uniremoval.stages import cache

    cfg = CacheStage(stage="cache", data={"train": [{"name": "syn", "shards": str(src / "syn-000000.tar"),
                                                "degradation": "haze"}]},
                     teachers={"checkpoints": {"haze": str(tmp_path / "no-such-teacher.safetensors")}},
                     cache={"out": str(tmp_path / "cache")}, tracking={"enabled": False}, train={"cpu": True})
    with folder_lock(tmp_path / "cache", ".lock", "a teacher cache"), \
            pytest.raises(UniremovalError, match=r"cache is in use: pid \d+ on .* is writing a teacher cache there"):
        cache.run(cfg)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]
    with pytest.raises(UniremovalError, match="no-such-teacher"):  # unlocked: it goes on to the teachers
        cache.run(cfg)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]  # a folder it found stays
    # A refused teacher leaves no empty cache folder behind where the run had to make one
    fresh = tmp_path / "new" / "cache"
    with pytest.raises(UniremovalError, match="no-such-teacher"):
        cache.run(cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"out": str(fresh)})}))
    assert not (tmp_path / "new").exists()  # nor the folder above it, which it made too


def test_a_student_or_another_types_teacher_is_refused_as_a_teacher(tmp_path):
    """Checkpoints record the stage and type that trained them: the rain teacher given as the haze
    teacher, or a KT student given as a teacher, is refused naming the key; the right one loads."""
    from uniremoval.errors import CheckpointError
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.teachers import load_teachers

    model = MPRNet("tiny")
    rain = save_checkpoint(tmp_path / "teacher-rain" / "last", model, {"stage": "teacher", "degradation": "rain"})
    student = save_checkpoint(tmp_path / "kt" / "last", model, {"stage": "kt", "degradation": None})
    with pytest.raises(CheckpointError, match=r"teachers.checkpoints.haze=.*teacher-rain.* is the 'rain' teacher, "
                                              r"not the 'haze' one; give outputs/teacher-haze/best.safetensors"):
        load_teachers({"haze": str(rain)}, ["haze"], "tiny")
    with pytest.raises(CheckpointError, match=r"teachers.checkpoints.haze=.*kt/last.* holds a kt student, not a teacher"):
        load_teachers({"haze": str(student)}, ["haze"], "tiny")
    assert load_teachers({"rain": str(rain)}, ["rain"], "tiny")["rain"].degradation == "rain"


def test_pool_feature_is_the_mean_of_each_cell_on_a_top_left_grid():
    """Checked against plain loops: cell x cell means, anchored at (0, 0), partial cells dropped; a crop
    on the grid pools to the matching sub-grid (what lets random crops read cached features)."""
    from uniremoval.stages.teachers import pool_feature

    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 9, 14, generator=g, dtype=torch.float64) + torch.arange(14.0, dtype=torch.float64)
    got = pool_feature(f, 4)
    assert got.shape == (2, 3, 2, 3) and got.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    cell = [float(f[n, c, 4 * i + a, 4 * j + b]) for a in range(4) for b in range(4)]
                    assert float(got[n, c, i, j]) == pytest.approx(sum(cell) / 16, rel=1e-6, abs=1e-6)
    torch.testing.assert_close(pool_feature(f[..., 4:8, 4:12], 4), got[..., 1:2, 1:3])


def test_teacher_targets_route_each_sample_to_its_types_teacher_in_its_range():
    """Sample i goes to the teacher of labels[i] and comes back in batch order; a [0, 1] teacher
    (official MPRNet weights) sees (x + 1) / 2 and its output is mapped back to [-1, 1]."""
    from uniremoval.stages.teachers import Teacher, teacher_targets

    class Affine(torch.nn.Module):
        """images = [scale * x + shift], feature = x repeated on 2 channels, times scale."""

        def __init__(self, scale: float, shift: float) -> None:
            super().__init__()
            self.scale, self.shift = scale, shift

        def forward(self, x, return_feature=False):
            return [self.scale * x + self.shift], self.scale * x[:, :2]

    x = torch.linspace(-0.9, 0.9, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    teachers = {"haze": Teacher("haze", Affine(0.5, 0.0), "minus_one_one", "a"),
                "rain": Teacher("rain", Affine(0.5, 0.25), "zero_one", "b"),
                "blur": Teacher("blur", Affine(-1.0, 0.0), "minus_one_one", "c")}
    labels = torch.tensor([2, 0, 1, 0, 2])
    images, feats = teacher_targets(teachers, ["haze", "rain", "blur"], x, labels, 2)
    for i, k in enumerate(labels.tolist()):
        xi = x[i]
        if k == 0:
            img, feat = 0.5 * xi, 0.5 * xi[:2]
        elif k == 1:  # [0, 1] model: in (x + 1) / 2, out y * 2 - 1
            img, feat = (0.5 * (xi + 1) / 2 + 0.25) * 2 - 1, 0.5 * (xi[:2] + 1) / 2
        else:
            img, feat = -xi, -xi[:2]
        torch.testing.assert_close(images[i], img.clamp(-1, 1))
        torch.testing.assert_close(feats[i], feat.reshape(2, 2, 2, 2, 2).mean(dim=(2, 4)))


def test_cache_compiles_its_teachers_under_model_compile(tmp_path, monkeypatch, capsys):
    """model.compile in the cache stage: each teacher goes through fast.compile_module (in
    model.compile_mode) and the cache holds what an eager run writes, up to rounding (traced, the
    model up-samples with its stencil: the same maths, other float rounding). CUDA-graph modes, whose
    replays reuse output memory the encoder threads still read, are refused when the config loads."""
    from pydantic import ValidationError

    from uniremoval.config import CacheStage
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import cache, fast

    write_shards(tmp_path / "shards" / "syn", "syn", 1, 5, seed=3)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "teacher-haze" / "best", MPRNet("tiny"), {"stage": "teacher", "degradation": "haze"})
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # compiling sets it: restored after the test
    compiled: list[tuple[type, str | None]] = []
    real = fast.compile_module

    def record(module, cache_dir=None, mode=None, **kw):
        compiled.append((type(module), mode))
        return real(module, cache_dir, backend="eager")  # dynamo traces; no code generated on this CPU

    monkeypatch.setattr(fast, "compile_module", record)

    def cfg(out: str, **model) -> CacheStage:
        return CacheStage(stage="cache", output_dir=str(tmp_path / "outputs"),
                          model={"preset": "tiny", "channels_last": True, **model},
                          data={"degradations": ["haze"], "feature_cell": 8,
                                "train": [{"name": "syn", "shards": str(tmp_path / "shards" / "syn"),
                                           "degradation": "haze"}]},
                          teachers={"checkpoints": {"haze": str(ckpt)}},
                          cache={"out": str(tmp_path / out), "batch_size": 2}, tracking={"enabled": False},
                          train={"cpu": True})

    assert cache.run(cfg("eager")) == 0 and compiled == []
    assert cache.run(cfg("compiled", compile=True, compile_mode="max-autotune-no-cudagraphs")) == 0
    assert compiled == [(MPRNet, "max-autotune-no-cudagraphs")]
    assert "model.compile: the teachers compile at their first batch of each shape" in capsys.readouterr().err
    tars = sorted(p.name for p in (tmp_path / "eager" / "syn").glob("*.tar"))
    assert tars == ["syn-000000.tar"]
    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.transforms import decode_feature, decode_image

    for name in tars:
        eager, compiled_ = (list(iter_tar_samples(tmp_path / d / "syn" / name)) for d in ("eager", "compiled"))
        assert [k for k, _ in eager] == [k for k, _ in compiled_] and len(eager) == 5
        for (_, a), (_, b) in zip(eager, compiled_):
            assert a["input.png"] == b["input.png"] and a["json"] == b["json"]
            diff = np.abs(decode_image(a["teacher.png"]).astype(int) - decode_image(b["teacher.png"]).astype(int))
            assert diff.max() <= 1
            np.testing.assert_allclose(decode_feature(a["feature.npy"]).astype(np.float32),
                                       decode_feature(b["feature.npy"]).astype(np.float32), rtol=1e-3, atol=1e-3)
    for mode in fast.CUDA_GRAPH_MODES:
        with pytest.raises(ValidationError, match=f"model.compile_mode={mode} replays CUDA graphs.*compile_mode=default"):
            cfg("x", compile=True, compile_mode=mode)
    cfg("x", compile=False, compile_mode="reduce-overhead")  # not compiled: the mode is never used
    from uniremoval.config import load_config
    from uniremoval.errors import ConfigError

    with pytest.raises(ConfigError) as err:  # as the CLI reports it: the message, not the whole config
        load_config(ROOT / "configs" / "cache.yaml", ["model.compile=true", "model.compile_mode=reduce-overhead"])
    assert str(err.value) == (f"invalid config:\n  {ROOT / 'configs' / 'cache.yaml'}: model.compile_mode=reduce-overhead replays CUDA "
                              "graphs, which the cache does not use; set model.compile_mode=default (or "
                              "max-autotune-no-cudagraphs)")


def test_teacher_model_init_of_another_preset_is_refused_naming_model_preset(tmp_path):
    """Fine-tuning a teacher from model.init checks model.preset against the file (as KT's student
    does): the file's preset was taken silently, so a run logged as model.preset=derain trained and
    exported a tiny MPRNet that the cache then refused under teachers.preset=derain."""
    from uniremoval.config import TeacherStage
    from uniremoval.errors import CheckpointError
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.teacher import TeacherTraining

    init = save_checkpoint(tmp_path / "teacher-haze" / "best", MPRNet("tiny"), {"stage": "teacher", "degradation": "haze"})

    def stage(preset: str) -> TeacherTraining:
        cfg = TeacherStage(stage="teacher", degradation="snow", output_dir=str(tmp_path), tracking={"enabled": False},
                           model={"preset": preset, "init": str(init)},
                           data={"degradations": ["snow"], "train": [{"name": "s", "shards": "x", "degradation": "snow"}]})
        return TeacherTraining(cfg)

    with pytest.raises(CheckpointError, match=r"teacher-haze/best.safetensors: was saved from preset 'tiny', not "
                                              r"'derain'; set model.preset=tiny"):
        stage("derain").build_models()
    assert stage("tiny").build_models()["teacher"].preset == "tiny"


def test_a_run_folder_given_as_a_teacher_is_named_as_a_folder_not_as_missing(tmp_path):
    """teachers.checkpoints.snow=outputs/teacher-snow (the run folder, not its best.safetensors) was
    reported as "does not exist" although it does; now the folder and its weights files are named."""
    from uniremoval.config import CacheStage
    from uniremoval.errors import ConfigError
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.preflight import check_inputs

    run = tmp_path / "outputs" / "teacher-snow"
    save_checkpoint(run / "best", MPRNet("tiny"), {"stage": "teacher", "degradation": "snow"})
    write_shards(tmp_path / "snow", "snow", 1, 1, degradation="snow")
    cfg = CacheStage(stage="cache", output_dir=str(tmp_path), tracking={"enabled": False}, model={"preset": "tiny"},
                     teachers={"checkpoints": {"snow": str(run)}},
                     data={"degradations": ["snow"], "train": [{"name": "s", "shards": str(tmp_path / "snow"),
                                                                "degradation": "snow"}]})
    with pytest.raises(ConfigError, match=r"teachers.checkpoints.snow: checkpoint .*teacher-snow is a folder, not a "
                                          r"weights file; give one of its weights files: .*teacher-snow/best.safetensors"):
        check_inputs(cfg)


def test_a_teacher_of_another_preset_is_refused_naming_its_entry_and_the_retraining(tmp_path):
    """One teacher of k trained with another model.preset: the error named neither the
    teachers.checkpoints entry nor a fix that works (it said set teachers.preset=<its preset>,
    which the other teachers then refused in turn)."""
    from uniremoval.errors import CheckpointError
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.teachers import load_teachers

    haze = save_checkpoint(tmp_path / "teacher-haze" / "best", MPRNet("tiny"), {"stage": "teacher", "degradation": "haze"})
    snow = save_checkpoint(tmp_path / "teacher-snow" / "best", MPRNet("derain"), {"stage": "teacher", "degradation": "snow"})
    with pytest.raises(CheckpointError, match=r"teachers.checkpoints.snow=.*teacher-snow/best.safetensors: is a "
                                              r"'derain' mprnet, .* preset 'tiny' .*retrain this teacher with "
                                              r"model.preset=tiny"):
        load_teachers({"haze": str(haze), "snow": str(snow)}, ["haze", "snow"], "tiny")
    with pytest.raises(CheckpointError, match=r"^teachers.checkpoints.haze: .*nope.safetensors not found"):
        load_teachers({"haze": str(tmp_path / "nope.safetensors")}, ["haze"], "tiny")


def test_a_cache_of_other_types_extends_the_shipped_config_dropping_its_teachers_with_null(tmp_path):
    """configs/cache.yaml names haze/rain/blur teachers; mappings merge, so a config of haze and a
    custom type extending it kept rain and blur and was refused, with no way to drop them (null was
    refused as not a string). Now `null` drops an inherited entry, and the refusal says so."""
    from uniremoval.config import load_config
    from uniremoval.errors import ConfigError

    cfg_file = _write_cfg(tmp_path / "cache.yaml", {
        "extends": str(ROOT / "configs" / "cache.yaml"),
        "teachers": {"checkpoints": {"haze": "t/haze.safetensors", "snow": "t/snow.safetensors"}},
        "data": {"degradations": ["haze", "snow"], "train": [{"name": "s", "shards": "s", "degradation": "snow"}]}})
    with pytest.raises(ConfigError, match=r"teachers.checkpoints.rain.*names no type of data.degradations "
                                          r"\['haze', 'snow'\]: add 'rain' to data.degradations \(a type of your own\), "
                                          r"or drop the entry .*teachers.checkpoints.rain=null"):
        load_config(cfg_file)
    cfg = load_config(cfg_file, ["teachers.checkpoints.rain=null", "teachers.checkpoints.blur=null"])
    assert cfg.teachers.checkpoints == {"haze": "t/haze.safetensors", "snow": "t/snow.safetensors"}
    # a source of no type: said so (it read "has degradation None, which has no teacher")
    from uniremoval.stages.cache import _plan

    with pytest.raises(ConfigError, match=r"source 's' \(data.train\) has no degradation, so no teacher runs on it; "
                                          r"give it degradation: <type>, one of teachers.checkpoints \['haze', 'snow'\]"):
        _plan(load_config(cfg_file, ["teachers.checkpoints.rain=null", "teachers.checkpoints.blur=null",
                                     "data.train.0.degradation=null"]))


@pytest.mark.parametrize("names", [["mean", "b"], ["a", "a"], ["Rain100L (test)"], ["sets/."]])
def test_validation_sets_named_mean_or_twice_are_refused(tmp_path, names):
    """Each set logs val/<name>/psnr and val/mean/psnr is the mean over the sets: a set named
    "mean" had its PSNR overwritten by that mean (and best.safetensors chose by the mean, not the
    first set), and a second set of one name overwrote the first's scores, silently. A name MLflow
    refuses ('(' in it) was scored at every validation and never logged."""
    from uniremoval.config import load_config
    from uniremoval.errors import ConfigError

    val = [{"name": n, "shards": "v", "degradation": "snow"} for n in names]
    cfg_file = _write_cfg(tmp_path / "t.yaml", {
        "stage": "teacher", "degradation": "snow", "tracking": {"enabled": False},
        "data": {"degradations": ["snow"], "train": [{"name": "s", "shards": "s", "degradation": "snow"}], "val": val}})
    with pytest.raises(ConfigError, match=r"key 'data.val'.*(may not be named 'mean'|\['a'\] are given twice|"
                                          r"'Rain100L \(test\)': MLflow metric names \(val/<name>/<metric>\) cannot "
                                          r"hold \( \); use .*'Rain100L _test_'|'sets/.': MLflow metric names "
                                          r"\(val/<name>/<metric>\) cannot be '.' or '..', nor hold .*e.g. 'sets/_')"):
        load_config(cfg_file)


def test_a_warmup_longer_than_the_run_is_refused(tmp_path):
    """MPRNet's recipe (warmup 1500 = 3 x 500 steps per epoch) kept with fewer steps per epoch: the
    run was all warmup, the LR rising towards optim.lr and never decaying, silently."""
    from uniremoval.config import load_config
    from uniremoval.errors import ConfigError

    recipe = ROOT / "configs" / "teacher" / "blur.yaml"
    with pytest.raises(ConfigError, match=r"key 'schedule.warmup_steps': bad value 1500: is longer than the run, "
                                          r"train.epochs x train.steps_per_epoch = 1000 steps: .*lower it"):
        load_config(recipe, ["train.steps_per_epoch=4"])
    assert load_config(recipe, ["train.steps_per_epoch=4", "schedule.warmup_steps=12"]).schedule.warmup_steps == 12


def test_an_unpaired_validation_set_says_why_it_scored_nothing(tmp_path):
    """A teacher validated on an unpaired set (no target) found out only as "gave no usable pairs",
    thousands of steps in, with no reason and no word that best.safetensors would not be written
    (which configs/cache.yaml then reads)."""
    from types import SimpleNamespace

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    write_shards(tmp_path / "u", "u", 1, 2, paired=False)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    src = SimpleNamespace(name="u", shards=str(tmp_path / "u"), max_samples=None)
    with pytest.warns(RuntimeWarning, match=r"validation set u .* gave no usable pairs; 2 sample\(s\) left out, e\.g\. "
                                            r"u_0_0: missing required 'target'.* no best.safetensors"):
        assert validate_paired(ctx, MPRNet("tiny").eval(), "minus_one_one", [src], lockstep=False) == {}


def test_a_killed_rebuild_by_another_teacher_never_leaves_a_mixed_cache_that_passes(tmp_path, monkeypatch):
    """A complete cache rebuilt by another teacher and killed midway: the old manifest must not vouch
    for the shards already replaced (check_cache refuses the folder), and a kill between a new tar's
    rename and its done-record must not let a rerun by the old teacher reuse the new tar."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.config import CacheStage
    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.stages import cache as cache_stage
    from uniremoval.stages.cache import check_cache

    write_shards(tmp_path / "syn", "syn", 2, 2, seed=3)
    t1 = save_random_mprnet(tmp_path / "t1", seed=1)
    t2 = save_random_mprnet(tmp_path / "t2", seed=2)
    out = tmp_path / "cache"

    def cfg(teacher: Path) -> CacheStage:
        return CacheStage(stage="cache", model={"preset": "tiny"}, teachers={"checkpoints": {"haze": str(teacher)}},
                          data={"degradations": ["haze"], "train": [{"name": "syn", "shards": str(tmp_path / "syn"),
                                                                    "degradation": "haze"}]},
                          cache={"out": str(out), "workers": 0}, tracking={"enabled": False}, train={"cpu": True})

    def kill_after(n: int, real: Any = cache_stage.cache_shard) -> Any:
        calls = []

        def shard(*args: Any, **kwargs: Any) -> Any:
            if len(calls) == n:
                raise KeyboardInterrupt  # the kill
            calls.append(args[2])
            return real(*args, **kwargs)
        return shard

    assert cache_stage.run(cfg(t1)) == 0
    check_cache(out / "syn", {"haze": str(t1)})
    monkeypatch.setattr(cache_stage, "cache_shard", kill_after(1))
    with pytest.raises(KeyboardInterrupt):
        cache_stage.run(cfg(t2))  # shard 0 by t2, shard 1 still t1's
    with pytest.raises(DataError, match="no manifest.json, an unfinished cache build; rerun `uniremoval cache"):
        check_cache(out / "syn", {"haze": str(t1)})
    with pytest.raises(DataError, match="no manifest.json, an unfinished cache build"):
        check_cache(out / "syn", {"haze": str(t2)})
    # Tars no cache build wrote (no done-record, no cache lock): not called an unfinished build.
    (tmp_path / "raw").mkdir()
    shutil.copy(next((out / "syn").glob("*.tar")), tmp_path / "raw" / "a.tar")
    with pytest.raises(DataError, match=r"raw: holds tars but no manifest.json, and `uniremoval cache` did not "
                                        r"write them: it is not a teacher cache"):
        check_cache(tmp_path / "raw", {"haze": str(t1)})

    # Killed after the new tar's rename, before its done-record (here: the record's write fails).
    monkeypatch.setattr(cache_stage, "cache_shard", kill_after(10))
    real_write = cache_stage.atomic_write_json

    def no_done_record(path: Path, obj: Any) -> None:
        if path.name.endswith(cache_stage.DONE_SUFFIX):
            raise KeyboardInterrupt
        real_write(path, obj)
    monkeypatch.setattr(cache_stage, "atomic_write_json", no_done_record)
    with pytest.raises(KeyboardInterrupt):
        cache_stage.run(cfg(t2))  # shard 1's tar is t2's now
    monkeypatch.setattr(cache_stage, "atomic_write_json", real_write)
    assert cache_stage.run(cfg(t1)) == 0  # the old teacher again: every shard must be t1's
    man = check_cache(out / "syn", {"haze": str(t1)})
    shas = {json.loads(files["json"])["teacher_sha256"] for e in man["shards"]
            for _, files in iter_tar_samples(out / "syn" / e["name"])}
    assert shas == {man["cache"]["teacher"]["sha256"]}


def test_shards_verify_decodes_a_cache_samples_teacher_image_and_feature(tmp_path):
    """`shards verify` on a cache decodes what KT reads, naming the key: an undecodable teacher.png, a
    teacher image of another size, a feature.npy that does not load, one with NaN, a grid off the cell."""
    import io
    import tarfile

    from uniremoval.data.manifest import verify_shards, verify_tar
    from uniremoval.io import sha256_file
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import fast
    from uniremoval.stages.cache import _want, cache_shard
    from uniremoval.stages.teachers import Teacher, freeze

    keys = write_shards(tmp_path / "syn", "syn", 1, 6, seed=4)
    torch.manual_seed(0)
    teacher = Teacher("haze", freeze(MPRNet("tiny")), "minus_one_one", "random", sha256="ab" * 32)
    src = str(tmp_path / "syn" / "syn-000000.tar")
    out = tmp_path / "cache"
    out.mkdir()
    cache_shard(src, out, "c.tar", teacher, 16, fast.Speed(device=torch.device("cpu")),
                _want({"url": src, "source_sha256": None}, teacher, 16, "no"))
    assert verify_tar(out / "c.tar")[0] == []
    nan = np.full((16, H // 16, W // 16), np.nan, dtype=np.float16)
    small = np.zeros((16, 1, 1), dtype=np.float16)
    buf = io.BytesIO()
    np.save(buf, nan)
    nan_npy = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, small)
    small_npy = buf.getvalue()
    from _fixtures import png

    bad = {f"{keys[0]}.teacher.png": b"\x89PNG not really", f"{keys[1]}.teacher.png": png(np.zeros((8, 8, 3), np.uint8)),
           f"{keys[2]}.feature.npy": b"\x93NUMPY broken", f"{keys[3]}.feature.npy": nan_npy,
           f"{keys[4]}.feature.npy": small_npy}
    with tarfile.open(out / "c.tar") as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(out / "c.tar", "w", format=tarfile.GNU_FORMAT) as t:
        for m, data in members:
            data = bad.get(m.name, data)
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    problems = verify_tar(out / "c.tar")[0]
    text = "\n".join(problems)
    assert f"c.tar:{keys[0]}: teacher.png unreadable" in text, text
    assert f"c.tar:{keys[1]}: teacher.png is 8x8 but input.png is {H}x{W}" in text, text
    assert f"c.tar:{keys[2]}: feature.npy does not decode" in text, text
    assert f"c.tar:{keys[3]}: feature.npy holds non-finite values" in text, text
    assert len(problems) == 4, text  # no cell known for a lone tar: the 1x1 grid passes
    (out / "manifest.json").write_text(json.dumps({
        "format_version": 1, "dataset": "c", "complete": True,
        "shards": [{"name": "c.tar", "samples": 6, "bytes": (out / "c.tar").stat().st_size,
                    "sha256": sha256_file(out / "c.tar")}],
        "counts": {"total": 6}, "cache": {"feature_cell": 16}}))
    problems = verify_shards(out)
    assert any(f"c.tar:{keys[4]}: feature.npy grid (1, 1) does not match a {W}x{H} image at the cache's cell 16" in p
               for p in problems), problems
    assert not any(keys[5] in p for p in problems), problems


def test_a_bad_source_sample_is_warned_about_or_stops_the_cache_under_bad_samples_fail(tmp_path, capsys):
    """The cache left a source sample that does not decode out without a word on the console (only in
    manifest.json) and ignored data.bad_samples=fail: now it warns naming the shard and key, and the
    summary counts it; with data.bad_samples=fail it stops naming them and writes no manifest."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.config import CacheStage
    from uniremoval.stages import cache as cache_stage

    src = tmp_path / "syn" / "src.tar"
    src.parent.mkdir()
    _mixed_size_shard(src)  # mix_4 does not decode
    teacher = save_random_mprnet(tmp_path / "t", seed=1)

    def cfg(out: str, bad: str) -> CacheStage:
        return CacheStage(stage="cache", model={"preset": "tiny"}, teachers={"checkpoints": {"haze": str(teacher)}},
                          data={"degradations": ["haze"], "bad_samples": bad,
                                "train": [{"name": "syn", "shards": str(src), "degradation": "haze"}]},
                          cache={"out": str(tmp_path / out), "workers": 0}, tracking={"enabled": False},
                          train={"cpu": True})

    with pytest.warns(RuntimeWarning, match=r"skipped the sample in source shard .*src.tar, key mix_4: .*does not "
                                            r"decode.*left out of the cache"):
        assert cache_stage.run(cfg("c1", "skip")) == 0
    err = capsys.readouterr().err
    assert "(5 samples)" in err and "1 bad source sample(s) left out" in err, err
    assert cache_stage.run(cfg("c1", "skip")) == 0  # a rerun reuses the shard and still says so
    assert "1 bad source sample(s) left out" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"bad sample in source shard .*src.tar, key mix_4: .*data.bad_samples=skip"):
        cache_stage.run(cfg("c2", "fail"))
    assert not (tmp_path / "c2" / "syn" / "manifest.json").exists()
    assert not list((tmp_path / "c2" / "syn").glob("*.tar"))


def _one_source_cache(tmp_path: Path, teacher: Path, shards: str) -> Any:
    """A CPU cache config of one haze source 'syn' into tmp_path/cache (no threads, no tracking)."""
    from uniremoval.config import CacheStage

    return CacheStage(stage="cache", model={"preset": "tiny"}, teachers={"checkpoints": {"haze": str(teacher)}},
                      data={"degradations": ["haze"], "train": [{"name": "syn", "shards": shards,
                                                                 "degradation": "haze"}]},
                      cache={"out": str(tmp_path / "cache"), "workers": 0}, tracking={"enabled": False},
                      train={"cpu": True})


def test_a_cache_rebuilt_from_fewer_source_shards_names_the_tars_it_left_out(tmp_path, capsys):
    """A cache built from two source shards, then from one: the second tar stays (it may be the cache of
    shards left out on purpose, a teacher pass each to rebuild) but was not mentioned anywhere; the
    build now names it, and the manifest lists only this run's shard."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.config import CacheStage
    from uniremoval.stages import cache as cache_stage

    src = tmp_path / "syn"
    src.mkdir()
    _mixed_size_shard(src / "syn-000000.tar")
    shutil.copy(src / "syn-000000.tar", src / "syn-000001.tar")
    teacher = save_random_mprnet(tmp_path / "t", seed=1)

    def cfg(shards: str) -> CacheStage:
        return _one_source_cache(tmp_path, teacher, shards)

    with pytest.warns(RuntimeWarning):  # mix_4 does not decode (the fixture's bad sample)
        assert cache_stage.run(cfg(str(src / "syn-{000000..000001}.tar"))) == 0
    assert "not part of this cache" not in capsys.readouterr().err
    assert cache_stage.run(cfg(str(src / "syn-000000.tar"))) == 0
    err = capsys.readouterr().err
    assert re.search(r"cache: .*cache/syn also holds syn-000001.tar, not part of this cache .* delete them", err), err
    manifest = json.loads((tmp_path / "cache" / "syn" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["syn-000000.tar"]
    assert (tmp_path / "cache" / "syn" / "syn-000001.tar").is_file()  # kept


def test_a_source_shard_repaired_in_place_recomputes_its_cache_shard(tmp_path, capsys):
    """A sample left out as bad (a flipped byte) stayed missing after the source tar was repaired: the
    source's identity is its dataset manifest's sha256, which the repair did not change, so the cache
    shard was reused with the sample still missing. Its cached bytes are recorded and compared."""
    import webdataset as wds
    from _fixtures import png
    from dist_kt_common import save_random_mprnet

    from uniremoval.io import sha256_file
    from uniremoval.stages import cache as cache_stage

    src = tmp_path / "syn"
    src.mkdir()
    tar = src / "syn-000000.tar"
    _mixed_size_shard(tar)  # mix_4 does not decode
    broken = tar.read_bytes()
    rng = np.random.default_rng(7)
    with wds.TarWriter(str(tar)) as tw:  # the intact build: every sample decodes
        for i in range(6):
            tw.write({"__key__": f"mix_{i}", "input.png": png(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
                      "json": {"degradation": "haze"}})
    intact = tar.read_bytes()
    (src / "manifest.json").write_text(json.dumps({"shards": [{"name": tar.name, "sha256": sha256_file(tar)}]}))
    tar.write_bytes(broken)  # damaged on this disk after the build
    teacher = save_random_mprnet(tmp_path / "t", seed=1)
    cfg = _one_source_cache(tmp_path, teacher, str(src))
    with pytest.warns(RuntimeWarning):
        assert cache_stage.run(cfg) == 0
    assert "1 bad source sample(s) left out" in capsys.readouterr().err
    assert cache_stage.run(cfg) == 0  # nothing changed: reused
    assert "recomputed 0, reused 1; 1 bad source sample(s) left out" in capsys.readouterr().err
    tar.write_bytes(intact)  # repaired in place
    assert cache_stage.run(cfg) == 0
    err = capsys.readouterr().err
    assert "recomputed 1, reused 0" in err and "left out" not in err
    manifest = json.loads((tmp_path / "cache" / "syn" / "manifest.json").read_text())
    assert manifest["counts"]["total"] == 6 and manifest["issues"]["total"] == 0
    assert cache_stage.run(cfg) == 0  # and a clean shard is reused as before
    assert "recomputed 0, reused 1" in capsys.readouterr().err


def test_a_cache_of_sources_moved_elsewhere_is_reused_and_passes(tmp_path, capsys):
    """The cache tied each source to its path: a workspace copied or a dataset remounted made KT refuse the
    cache as stale ('not cached: [new path]; no longer listed: [old path]') and `uniremoval cache` recompute
    every shard, byte for byte the same. A source is its bytes (sha256): the cache is reused."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.config import CacheStage
    from uniremoval.stages import cache as cache_stage

    src = tmp_path / "syn"
    src.mkdir()
    _mixed_size_shard(src / "syn-000000.tar")
    teacher = save_random_mprnet(tmp_path / "t", seed=1)

    def cfg(shards: str) -> CacheStage:
        return _one_source_cache(tmp_path, teacher, shards)

    with pytest.warns(RuntimeWarning):  # mix_4 does not decode (the fixture's bad sample)
        assert cache_stage.run(cfg(str(src / "syn-000000.tar"))) == 0
    built = (tmp_path / "cache" / "syn" / "syn-000000.tar").read_bytes()
    moved = tmp_path / "elsewhere"
    src.rename(moved)
    cache_stage.check_cache(tmp_path / "cache" / "syn", {"haze": str(teacher)}, str(moved / "syn-000000.tar"), 16)
    capsys.readouterr()
    assert cache_stage.run(cfg(str(moved / "syn-000000.tar"))) == 0
    assert "recomputed 0, reused 1" in capsys.readouterr().err
    assert (tmp_path / "cache" / "syn" / "syn-000000.tar").read_bytes() == built
    manifest = json.loads((tmp_path / "cache" / "syn" / "manifest.json").read_text())
    assert [s["url"] for s in manifest["cache"]["sources"]] == [str(moved / "syn-000000.tar")]
    # other bytes under the moved path are still another source
    other = tmp_path / "other.tar"
    _mixed_size_shard(other)
    with tarfile.open(other, "a") as tar:
        info = tarfile.TarInfo("extra.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(DataError, match="stale cache .*built from other source shards"):
        cache_stage.check_cache(tmp_path / "cache" / "syn", {"haze": str(teacher)}, str(other), 16)


@pytest.mark.parametrize(("extra", "label"), [(["name=n0"], "n0"), (["tracking.run_name=try2"], "try2")])
def test_a_teachers_closing_line_is_led_by_its_runs_name(tmp_path, capsys, extra, label):
    """`train teacher` closed with `teacher-<type>:` whatever the run was named (a config named n0,
    run n0 in MLflow, printed "teacher-haze: ..."), unlike `train kt` and `train da`."""
    from uniremoval.config import load_config
    from uniremoval.stages.trainer import FitResult, Stage, print_weights

    cfg = load_config(ROOT / "configs" / "teacher" / "haze.yaml", [f"output_dir={tmp_path}", *extra])
    print_weights(cfg, Stage(cfg), FitResult("finished", 3, "abc", None))
    assert capsys.readouterr().err == f"{label}: 3 steps; weights: {cfg.run_dir / 'last.safetensors'}; MLflow run abc\n"


def test_a_mixed_cache_an_older_version_left_is_refused_naming_the_rewritten_shards(tmp_path):
    """An older uniremoval rebuilding a cache with other teacher weights replaced shards one by one and
    left the old manifest.json in place: killed midway, the folder held shards of two teachers that
    check_cache (KT, `cache --check`) accepted under the old teacher. The shards' done-records give it
    away: refused, naming them; a rerun with the manifest's teacher recomputes them and passes."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.config import CacheStage
    from uniremoval.stages import cache as cache_stage
    from uniremoval.stages.cache import DONE_SUFFIX, check_cache

    write_shards(tmp_path / "syn", "syn", 2, 2, seed=3)
    t1 = save_random_mprnet(tmp_path / "t1", seed=1)
    t2 = save_random_mprnet(tmp_path / "t2", seed=2)

    def cfg(teacher: Path, out: Path) -> CacheStage:
        return CacheStage(stage="cache", model={"preset": "tiny"}, teachers={"checkpoints": {"haze": str(teacher)}},
                          data={"degradations": ["haze"], "train": [{"name": "syn", "shards": str(tmp_path / "syn"),
                                                                    "degradation": "haze"}]},
                          cache={"out": str(out), "workers": 0}, tracking={"enabled": False}, train={"cpu": True})

    assert cache_stage.run(cfg(t1, tmp_path / "cache")) == 0
    assert cache_stage.run(cfg(t2, tmp_path / "other")) == 0
    mine, theirs = tmp_path / "cache" / "syn", tmp_path / "other" / "syn"
    first = min(p.name for p in mine.glob("*.tar"))
    # What the old version's killed rebuild left: shard 0 (tar and done-record) by t2, t1's manifest.
    for name in (first, f".{first}{DONE_SUFFIX}"):
        shutil.copy(theirs / name, mine / name)
    t2_sha = json.loads((theirs / "manifest.json").read_text())["cache"]["teacher"]["sha256"]
    with pytest.raises(DataError, match=rf"cache {re.escape(str(mine))} mixes two builds: .*1 of its 2 shard\(s\) "
                                        rf"were rewritten .*{re.escape(first)} \(teacher {t2_sha[:12]}\).*Rerun "
                                        r"`uniremoval cache --config \.\.\.`"):
        check_cache(mine, {"haze": str(t1)})
    assert cache_stage.run(cfg(t1, tmp_path / "cache")) == 0  # what the message says to do
    check_cache(mine, {"haze": str(t1)})


def test_loader_workers_started_an_epoch_ahead_train_the_same_weights(workspace, monkeypatch):
    """With loader workers, each epoch's StepLoader is made while the previous epoch drains (its
    workers start up behind the last steps): the run's weights are those of epochs started late."""
    from uniremoval.config import load_config
    from uniremoval.stages import trainer as trainer_mod
    from uniremoval.stages.teacher import TeacherTraining

    root = workspace["root"]
    base = dict(workspace["teacher"], tracking={"enabled": False},
                data=dict(workspace["teacher"]["data"], num_workers=2, val=[]),
                train=dict(workspace["teacher"]["train"], epochs=3, steps_per_epoch=3, val_every=100))
    started: list[int] = []
    start = trainer_mod._NextEpoch.start
    monkeypatch.setattr(trainer_mod._NextEpoch, "start", lambda self, e, b: (started.append(e), start(self, e, b)))
    out = {}
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(trainer_mod._NextEpoch, "due", lambda self, current, left: False)
        cfg = load_config(_write_cfg(root / f"ahead-{ahead}.yaml", dict(base, output_dir=str(root / f"ahead-{ahead}"))),
                          stage="teacher")
        assert trainer_mod.Trainer(cfg, TeacherTraining(cfg)).fit().step == 9
        out[ahead] = _weights(root / f"ahead-{ahead}" / "teacher-haze" / "last.safetensors")
    assert started == [1, 2]  # a StepLoader has a lookahead (2 workers x prefetch 2): epochs 1, 2 ahead
    for k in out[True]:
        assert torch.equal(out[True][k], out[False][k]), k


def test_a_source_of_many_shards_reads_its_manifest_once_not_once_a_shard(tmp_path, monkeypatch):
    """Each source shard's sha256 was looked up by reading and parsing its folder's manifest.json again:
    quadratic in the shard count (88.8 s at 4,000 shards, a 1.8 MB manifest, on every `uniremoval cache`
    and every KT start). Each folder's manifest is now read once per build and once per check."""
    from dist_kt_common import save_random_mprnet

    from uniremoval.io import sha256_file
    from uniremoval.stages import cache as cache_stage

    src, n = tmp_path / "syn", 8
    src.mkdir()
    _mixed_size_shard(src / "syn-000000.tar")
    for i in range(1, n):
        shutil.copy(src / "syn-000000.tar", src / f"syn-{i:06d}.tar")
    names = [f"syn-{i:06d}.tar" for i in range(n)]
    (src / "manifest.json").write_text(json.dumps({
        "format_version": 1, "dataset": "syn", "counts": {"total": 6 * n, "degradation": {"haze": 6 * n}},
        "shards": [{"name": f, "samples": 6, "bytes": (src / f).stat().st_size, "sha256": sha256_file(src / f)}
                   for f in names]}))
    teacher = save_random_mprnet(tmp_path / "t", seed=1)
    reads = []
    real_read_text = Path.read_text

    def counting_read_text(self, *a, **kw):
        if self == src / "manifest.json":
            reads.append(self)
        return real_read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    with pytest.warns(RuntimeWarning):  # mix_4 does not decode (the fixture's bad sample)
        assert cache_stage.run(_one_source_cache(tmp_path, teacher, str(src))) == 0
    built = len(reads)
    cache_stage.check_cache(tmp_path / "cache" / "syn", {"haze": str(teacher)}, str(src), 16)
    assert built <= 3 and len(reads) - built <= 2, (built, len(reads) - built)
    recorded = json.loads(real_read_text(tmp_path / "cache" / "syn" / "manifest.json"))["cache"]["sources"]
    assert [s["sha256"] for s in recorded] == [sha256_file(src / f) for f in names]


def test_a_source_image_smaller_than_a_feature_cell_is_left_out_saying_why(tmp_path):
    """A real photo under 16 px in a source was left out as a bad sample with "use larger crops or a
    smaller cell": the cache crops nothing, and the file is not bad. The reason now names its size,
    the cell and what to do."""
    import webdataset as wds
    from _fixtures import png
    from dist_kt_common import save_random_mprnet

    from uniremoval.stages import cache as cache_stage

    src = tmp_path / "syn" / "src.tar"
    src.parent.mkdir()
    rng = np.random.default_rng(3)
    with wds.TarWriter(str(src)) as tw:
        for key, hw in (("big", (32, 48)), ("thumb", (12, 20))):
            tw.write({"__key__": key, "input.png": png(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)),
                      "json": {"degradation": "haze", "split": "train"}})
    teacher = save_random_mprnet(tmp_path / "t", seed=1)
    with pytest.warns(RuntimeWarning, match=r"key thumb: ValueError: the input is 20x12, smaller than one 16x16-pixel "
                                            r"feature cell \(data.feature_cell\): no feature to cache; leave it out"):
        assert cache_stage.run(_one_source_cache(tmp_path, teacher, str(src))) == 0
    manifest = json.loads((tmp_path / "cache" / "syn" / "manifest.json").read_text())
    assert manifest["counts"]["total"] == 1 and [i["key"] for i in manifest["issues"]["samples"]] == ["thumb"]
    assert "smaller than one 16x16-pixel feature cell" in manifest["issues"]["samples"][0]["reason"]
