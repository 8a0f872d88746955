"""kill -9 at a random point of every stage, then the same command again (with `--resume auto` for
training): nothing written twice, nothing lost beyond the last checkpoint, the same MLflow run
continued, valid final artefacts. SIGTERM (preemption): a checkpoint before exit (status 75), and
resume starts from it.

The stages run as a chain through the real CLI on tiny data (tiny MPRNet, 32 px crops, random
VGG): shard build -> teacher (SIGTERM, then kill -9, then resume) -> cache -> kt -> da -> eval.
Each job is killed the moment a marker it writes appears (a checkpoint folder, a cache shard's
done-record, a shard tar, an image of eval's --save-images); eval is stopped at a known image by a
`pipe:` shard that blocks (gate.py). Kill points are random; the seed is printed
(UNIREMOVAL_FAULT_SEED replays one). The uninterrupted-equals-resumed bit equality of a teacher is
pinned in tests/test_teacher_cache.py; here every stage, and what each leaves on disk and in MLflow."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ._faults import GATE, Job, dataset_keys, kill9_when, pick, png, write_shards, write_yaml

pytestmark = pytest.mark.slow
STEPS = 6  # optimiser steps per training stage; a checkpoint every 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    keys = write_shards(root / "shards" / "syn", "syn", 8, 2)
    write_shards(root / "shards" / "val", "val", 1, 2, split="test", seed=1)
    write_shards(root / "shards" / "real", "real", 2, 3, domain="real", paired=False, seed=2)
    common = {"project": "faults", "output_dir": str(root / "outputs"), "model": {"preset": "tiny"},
              "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}}
    data = {"degradations": ["haze"], "batch_size": 2, "crop_size": 32, "num_workers": 0, "shuffle_buffer": 4,
            "pin_memory": False}
    train = {"epochs": 1, "steps_per_epoch": STEPS, "log_every": 2, "val_every": 100, "image_every": 100,
             "seed": 5, "cpu": True}
    ckpt = {"every_steps": 2, "keep_last": 10}
    val = [{"name": "val", "shards": str(root / "shards" / "val"), "degradation": "haze"}]
    return {"root": root, "keys": keys, "common": common, "data": data, "train": train, "ckpt": ckpt, "val": val,
            "db": f"sqlite:///{root / 'mlflow.db'}"}


def _client(ws):
    from mlflow.tracking import MlflowClient

    return MlflowClient(ws["db"])


def _runs(ws, stage: str):
    client = _client(ws)
    exp = client.get_experiment_by_name("faults")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}'") if exp else []


def _ckpts(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def _newest_ckpt_at_least(run_dir: Path, step: int):
    return lambda: any(s >= step for s in _ckpts(run_dir))


def _run_ids(run_dir: Path, model: str) -> set[str]:
    return {json.loads((run_dir / "checkpoints" / f"step-{s:08d}" / f"{model}.json").read_text())["mlflow_run_id"]
            for s in _ckpts(run_dir)}


def kill_then_resume(ws, stage: str, cfg_path: Path, run_dir: Path, model: str) -> dict:
    """kill -9 after a random checkpoint, resume to the end; returns what each run said.

    The checkpoint is one this run writes: a step after any already on disk (the teacher's comes
    after a SIGTERM that left one), else the kill would land while Python is still starting.
    """
    root = ws["root"]
    existing = max(_ckpts(run_dir), default=0)
    later = [s for s in range(2, STEPS, 2) if s > existing]
    assert later, f"checkpoints up to step {existing} already exist; none left to kill after (STEPS={STEPS})"
    at = pick(later, f"train {stage}")
    rc, err1 = kill9_when(["train", stage, "--config", str(cfg_path), "--resume", "auto"], root,
                          _newest_ckpt_at_least(run_dir, at))
    assert rc == -signal.SIGKILL, err1[-3000:]
    newest = _ckpts(run_dir)[-1]
    assert existing < at <= newest < STEPS, (existing, at, newest)
    assert not (run_dir / "last.safetensors").exists()
    job = Job(["train", stage, "--config", str(cfg_path), "--resume", "auto"], root)
    rc, err2 = job.wait()
    assert rc == 0, err2[-3000:]
    # no progress lost beyond the newest checkpoint: it starts exactly there
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{newest:08d}'} at step {newest}" in err2, err2[-2000:]
    return {"newest": newest, "err": err2}


def assert_training_finished(ws, stage: str, run_dir: Path, model: str, run_name: str) -> None:
    from uniremoval.models.checkpoint import load_checkpoint

    meta = json.loads((run_dir / "last.json").read_text())
    assert meta["step"] == STEPS
    load_checkpoint(run_dir / "last.safetensors")  # a valid, complete artefact (sha checked)
    ids = _run_ids(run_dir, model) | {meta["mlflow_run_id"]}
    assert len(ids) == 1 and None not in ids, ids  # one MLflow run across the kill
    runs = _runs(ws, stage)
    assert [r.info.run_id for r in runs] == list(ids), [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == run_name
    assert run.data.tags.get("resumed") == "true"
    hist = _client(ws).get_metric_history(run.info.run_id, "train/total")
    assert {m.step for m in hist} == set(range(2, STEPS + 1, 2))  # every logged step, before and after


# ------------------------------------------------------------------------------------------- shards


def test_shard_build_kill9_then_rerun(ws):
    root = ws["root"]
    imgs = root / "raw"
    imgs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(40):
        (imgs / f"img{i:03d}.png").write_bytes(png(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))
    out = root / "shards" / "built"
    args = ["shards", "build", "--format", "folder", "--root", str(imgs), "--degradation", "haze", "--out", str(out),
            "--max-samples-per-shard", "1", "--workers", "1", "--no-progress"]
    k = pick([1, 2, 3, 4, 5], "shards build after n tars")
    rc, err = kill9_when(args, root, lambda: len(list(out.glob("*.tar"))) >= k)
    assert rc == -signal.SIGKILL, err[-2000:]
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert len(done) >= k and not (out / "manifest.json").exists()
    job = Job(args, root)
    rc, err = job.wait()
    assert rc == 0, err[-2000:]
    keys = dataset_keys(out)
    assert len(keys) == 40 and len(set(keys)) == 40  # every image once
    # Tars complete before the kill keep their bytes. (The builder saves its progress state at most
    # every few seconds, so tars finished since its last save are rebuilt: identical, renamed over.)
    for name, (_, data) in done.items():
        assert (out / name).read_bytes() == data
    assert not list(out.glob(".*.tmp"))
    from uniremoval.data.manifest import verify_shards

    assert verify_shards(out) == []


# ------------------------------------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def teacher(ws):
    root = ws["root"]
    cfg = {**ws["common"], "stage": "teacher", "name": "teacher-haze", "degradation": "haze",
           "data": {**ws["data"], "train": [{"name": "syn", "shards": str(root / "shards" / "syn"),
                                             "degradation": "haze"}], "val": ws["val"]},
           "optim": {"lr": 2e-3}, "train": ws["train"], "checkpoint": ws["ckpt"]}
    cfg_path = write_yaml(root / "teacher.yaml", cfg)
    run_dir = root / "outputs" / "teacher-haze"
    # 1. preemption: SIGTERM once the first checkpoint exists -> a checkpoint at the current step, exit 75
    job = Job(["train", "teacher", "--config", str(cfg_path)], root)
    job.until(_newest_ckpt_at_least(run_dir, 2))
    job.proc.send_signal(signal.SIGTERM)
    rc, err = job.wait()
    term = {"rc": rc, "err": err, "ckpts": _ckpts(run_dir)}
    # 2. kill -9 after a later checkpoint, 3. resume to the end
    info = kill_then_resume(ws, "teacher", cfg_path, run_dir, "teacher") if rc == 75 else {}
    return {"cfg": cfg_path, "run_dir": run_dir, "term": term, **info}


def test_teacher_sigterm_checkpoints_and_resume_starts_there(teacher):
    term = teacher["term"]
    assert term["rc"] == 75, term["err"][-3000:]
    at = term["ckpts"][-1]
    assert 2 <= at < STEPS
    assert f"preempted: checkpoint saved at step {at}" in term["err"]
    ck = teacher["run_dir"] / "checkpoints" / f"step-{at:08d}"
    assert json.loads((ck / "teacher.json").read_text())["step"] == at
    assert not (teacher["run_dir"] / "last.safetensors").exists() or teacher.get("newest")


def test_teacher_kill9_then_resume(ws, teacher):
    assert teacher.get("newest"), "the SIGTERM run did not stop with status 75"
    assert "resumed from" in teacher["err"]
    assert_training_finished(ws, "teacher", teacher["run_dir"], "teacher", "teacher-haze")
    # the killed run was marked KILLED by SIGTERM's clean exit, then RUNNING and FINISHED again
    run = _runs(ws, "teacher")[0]
    hist = _client(ws).get_metric_history(run.info.run_id, "train/nonfinite_skipped")
    assert {m.step for m in hist} >= {2, STEPS}


# ------------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def cache(ws, teacher):
    root = ws["root"]
    teacher_w = teacher["run_dir"] / "last.safetensors"
    cfg = {**ws["common"], "stage": "cache", "name": "cache", "teachers": {"checkpoints": {"haze": str(teacher_w)}},
           "data": {**ws["data"], "feature_cell": 16,
                    "train": [{"name": "syn", "shards": str(root / "shards" / "syn"), "degradation": "haze"}]},
           "train": {"cpu": True}, "cache": {"out": str(root / "cache"), "batch_size": 1}}
    cfg_path = write_yaml(root / "cache.yaml", cfg)
    out = root / "cache" / "syn"
    k = pick([1, 2, 3, 4], "cache after n shards")
    rc, err = kill9_when(["cache", "--config", str(cfg_path)], root, lambda: len(list(out.glob(".*.done.json"))) >= k)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(".*.done.json")}
    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    job = Job(["cache", "--config", str(cfg_path)], root)
    rc2, err2 = job.wait()
    return {"cfg": cfg_path, "out": out, "k": k, "rc": rc, "err": err, "before": before, "tars": tars,
            "rc2": rc2, "err2": err2, "teacher": teacher_w}


def test_cache_kill9_then_rerun(ws, cache):
    from uniremoval.stages.cache import check_cache

    assert cache["rc"] == -signal.SIGKILL, cache["err"][-2000:]
    assert len(cache["before"]) >= cache["k"] and len(cache["before"]) < 8
    assert cache["rc2"] == 0, cache["err2"][-3000:]
    out = cache["out"]
    for name, mtime in cache["before"].items():  # complete shards are not recomputed
        assert (out / name).stat().st_mtime_ns == mtime
    for name, data in cache["tars"].items():
        assert (out / name).read_bytes() == data
    keys = dataset_keys(out)
    assert sorted(keys) == sorted(ws["keys"])  # every sample exactly once
    man = check_cache(out, {"haze": str(cache["teacher"])}, str(ws["root"] / "shards" / "syn"), cell=16)
    assert man["counts"]["total"] == 16
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    runs = _runs(ws, "cache")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed attempt left no half run
    assert runs[0].data.metrics["cache/syn/samples"] == 16


# ------------------------------------------------------------------------------------------- kt


@pytest.fixture(scope="module")
def kt(ws, cache):
    root = ws["root"]
    cfg = {**ws["common"], "stage": "kt", "name": "kt",
           "teachers": {"mode": "cached", "checkpoints": {"haze": str(cache["teacher"])}},
           "data": {**ws["data"], "feature_cell": 16,
                    "train": [{"name": "syn", "shards": str(cache["out"]), "degradation": "haze"}], "val": ws["val"]},
           "optim": {"lr": 1e-3}, "train": ws["train"], "checkpoint": ws["ckpt"],
           "features": {"weights": "random", "layers": ["relu1_1", "relu2_1"], "layer_weights": [0.5, 1.0]}}
    cfg_path = write_yaml(root / "kt.yaml", cfg)
    run_dir = root / "outputs" / "kt"
    return {"cfg": cfg_path, "run_dir": run_dir, **kill_then_resume(ws, "kt", cfg_path, run_dir, "student")}


def test_kt_kill9_then_resume(ws, kt):
    assert_training_finished(ws, "kt", kt["run_dir"], "student", "kt")


# ------------------------------------------------------------------------------------------- da


@pytest.fixture(scope="module")
def da(ws, kt):
    root = ws["root"]
    cfg = {**ws["common"], "stage": "da", "name": "da", "model": {"preset": "tiny", "init": str(kt["run_dir"] / "last.safetensors")},
           "data": {**ws["data"], "feature_cell": 16,
                    "train": [{"name": "real", "shards": str(root / "shards" / "real"), "degradation": "haze"}],
                    "clear": [{"name": "clear", "shards": str(root / "shards" / "syn")}],
                    "val": []},  # no NR-IQA validation: keeps pyiqa out of the killed job (cost only)
           "optim": {"lr": 1e-4, "betas": [0.5, 0.999]}, "optim_d": {"lr": 1e-4, "betas": [0.5, 0.999]},
           "train": ws["train"], "checkpoint": ws["ckpt"],
           "discriminator": {"base_channels": 8, "n_layers": 2},
           "features": {"weights": "random", "layers": ["relu1_1"], "layer_weights": [1.0]},
           "val_iqa": {"metrics": ["piqe"], "max_images": 2}}
    cfg_path = write_yaml(root / "da.yaml", cfg)
    run_dir = root / "outputs" / "da"
    return {"cfg": cfg_path, "run_dir": run_dir, **kill_then_resume(ws, "da", cfg_path, run_dir, "generator")}


def test_da_kill9_then_resume(ws, da):
    assert_training_finished(ws, "da", da["run_dir"], "generator", "da")
    assert (da["run_dir"] / "discriminator-last.safetensors").is_file()


# ------------------------------------------------------------------------------------------- eval


def test_eval_kill9_then_rerun(ws, da):
    """eval stopped (gate.py) while reading image g+1 of 4, killed, run again: 4 images, once each."""

    root = ws["root"]
    src = root / "evalsrc"
    write_shards(src, "ev", 4, 1, split="test", seed=9)
    gate = root / "gate"
    gate.mkdir()
    g = pick([1, 2, 3], "eval after n images")
    entries = [str(src / f"ev-{i:06d}.tar") if i != g else f"pipe:{os.sys.executable} {GATE} "
               f"{src / f'ev-{i:06d}.tar'} {gate}" for i in range(4)]
    data = root / "evalset"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format_version": 1, "dataset": "evalset", "shards": entries}))
    ckpt = da["run_dir"] / "last.safetensors"
    saved = root / "restored"
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--name", "evalset", "--metrics", "psnr,piqe",
            "--batch-size", "1", "--device", "cpu", "--save-images", str(saved), "--json", str(root / "eval.json"),
            "--tracking-uri", ws["db"], "--experiment", "faults"]
    rc, err = kill9_when(args, root, lambda: (gate / "reached").exists())
    assert rc == -signal.SIGKILL, err[-2000:]
    # At most the images before the gate, none after, in the staging folder, each complete (their PNGs are
    # encoded in threads and written at the next image's turn, so the last ones may still be in memory:
    # the rerun starts over anyway); `restored` appears only once complete
    staged = sorted((root / ".restored.eval-staging").glob("*.png"))
    assert len(staged) <= g and not saved.exists(), staged
    assert not list((root / ".restored.eval-staging").glob("*.tmp"))
    for image in staged:
        Image.open(image).load()
    assert not (root / "eval.json").exists()  # no partial score file
    assert not _runs(ws, "eval")  # and no half MLflow run
    (gate / "open").touch()
    job = Job(args, root)
    rc, err = job.wait()
    assert rc == 0, err[-3000:]
    result = json.loads((root / "eval.json").read_text())
    names = [im["name"] for im in result["images"]]
    assert len(names) == 4 and len(set(names)) == 4
    assert sorted(p.stem for p in saved.glob("*.png")) == sorted(Path(n).stem for n in names)
    assert not list(root.glob(".restored.eval-*"))  # the killed run's staging folder was cleared
    runs = _runs(ws, "eval")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["uniremoval.train_run_id"] == json.loads((da["run_dir"] / "last.json").read_text())["mlflow_run_id"]
    assert "eval/evalset/psnr" in runs[0].data.metrics
