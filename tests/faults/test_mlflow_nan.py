"""An MLflow server that dies mid-run, and a NaN injected into a loss.

MLflow: a real `mlflow server` (sqlite) on 127.0.0.1; `train teacher` runs against it through the CLI
and the server is SIGKILLed the moment the first checkpoint appears. Training goes on to the end and
says so (naming the spool file), the later metrics land in that local spool (not dropped), and once
a server is back on the same store `replay_spool` sends them: the run's history is complete and the
run FINISHED. (tests/test_tracking.py covers the Tracker itself with a server down at start, up,
down again; here the fault hits a real training job.)

NaN: the real teacher stage with one loss term made NaN at a chosen step: with
`train.nonfinite: skip` the update is skipped with a warning naming the step and the term, the
weights stay finite and the count is logged; with `stop` the CLI exits 2 with the step and term.
(tests/test_trainer.py covers the toy-stage mechanics.)"""

from __future__ import annotations

import json
import math
import signal
import warnings
from pathlib import Path

import pytest
import torch
from _fixtures import MLFLOW, free_port, start_mlflow_server, stop_server  # tests/ is on sys.path (pytest)

from uniremoval.cli import main

from ._faults import Job, tiny_teacher_cfg, write_shards, write_yaml


def teacher_cfg(root: Path, **over) -> dict:
    return tiny_teacher_cfg(root, project="faults-mlflow", steps=6, keep_last=5, **over)


@pytest.mark.slow
def test_server_killed_mid_run_training_continues_metrics_spooled_then_sent(tmp_path):
    if not MLFLOW.exists():
        pytest.skip("mlflow CLI not installed")
    from mlflow.tracking import MlflowClient

    from uniremoval.tracking import replay_spool

    write_shards(tmp_path / "shards" / "syn", "syn", 2, 2)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg_path = write_yaml(tmp_path / "teacher.yaml", teacher_cfg(tmp_path, tracking={"uri": uri}))
    run_dir = tmp_path / "outputs" / "teacher-haze"
    spool = run_dir / "mlflow-spool.jsonl"

    server = start_mlflow_server(tmp_path, port)
    try:
        job = Job(["train", "teacher", "--config", str(cfg_path)], tmp_path)
        job.until(lambda: (run_dir / "checkpoints" / "step-00000002").is_dir())
    finally:
        stop_server(server, signal.SIGKILL)  # the server and its worker, no goodbye
    rc, err = job.wait()
    assert rc == 0, err[-3000:]  # training went on to the end
    assert f"MLflow at {uri} is unreachable" in err and "the job continues" in err, err[-3000:]
    assert f"spooled to {spool}" in err
    assert f"this run's metrics stay in {spool}" in err  # said again at the end, with what to do
    meta = json.loads((run_dir / "last.json").read_text())
    run_id = meta["mlflow_run_id"]
    assert meta["step"] == 6 and run_id

    ops = [json.loads(line) for line in spool.read_text().splitlines()]
    spooled = {op["step"]: op["metrics"] for op in ops if op["op"] == "metrics"}
    assert {4, 6} <= set(spooled)  # logged after the server died: kept locally, not dropped
    assert all(math.isfinite(v) for v in spooled[6].values()) and "train/total" in spooled[6]
    assert any(op["op"] == "terminate" and op["status"] == "FINISHED" for op in ops)
    assert all(op.get("run_id") == run_id for op in ops)

    server = start_mlflow_server(tmp_path, port)  # the server is back, same store
    try:
        assert replay_spool(spool, uri) is True
        assert not spool.exists()
        client = MlflowClient(uri)
        steps = [m.step for m in client.get_metric_history(run_id, "train/total")]
        assert sorted(set(steps)) == [2, 4, 6]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "teacher-haze"
        hist = {m.step: m.value for m in client.get_metric_history(run_id, "train/total")}
        assert hist[6] == pytest.approx(spooled[6]["train/total"])
    finally:
        stop_server(server, signal.SIGKILL)  # the server and its worker, no goodbye


# ------------------------------------------------------------------------------------------- NaN


def _poison(monkeypatch, at_step_call: int, term: str) -> None:
    """Make loss term `term` NaN on the `at_step_call`-th call of the teacher loss (1-based)."""
    from uniremoval.losses import pixel

    real = pixel.mprnet_stage_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        terms = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == at_step_call:
            terms[term] = terms[term] * float("nan")
            terms["total"] = terms["total"] + terms[term]
        return terms

    monkeypatch.setattr(pixel, "mprnet_stage_loss", poisoned)


@pytest.fixture
def nan_ws(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards" / "syn", "syn", 2, 2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_nan_in_loss_skipped_with_step_and_term(nan_ws, monkeypatch):
    from safetensors.torch import load_file

    cfg_path = write_yaml(nan_ws / "t.yaml", teacher_cfg(nan_ws, tracking={"enabled": False},
                                                          train={**teacher_cfg(nan_ws)["train"], "steps_per_epoch": 4}))
    _poison(monkeypatch, 3, "edge")
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    cfg = load_config(cfg_path, stage="teacher")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Trainer(cfg, TeacherTraining(cfg)).fit()
    said = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(said) == 1, said
    assert "non-finite loss at step 3" in said[0] and "edge=nan" in said[0] and "update skipped" in said[0]
    assert res.status == "finished" and res.step == 4 and res.nonfinite_skipped == 1
    assert res.metrics["train/nonfinite_skipped"] == 1.0
    w = load_file(str(nan_ws / "outputs" / "teacher-haze" / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())  # the NaN never reached the weights


def test_nan_in_loss_stop_exits_with_step_and_term(nan_ws, monkeypatch, capsys):
    cfg = teacher_cfg(nan_ws, tracking={"enabled": False})
    cfg["train"] = {**cfg["train"], "nonfinite": "stop"}
    cfg_path = write_yaml(nan_ws / "t.yaml", cfg)
    _poison(monkeypatch, 2, "char")
    code = main(["train", "teacher", "--config", str(cfg_path)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line and "non-finite loss at step 2" in line[0] and "char=nan" in line[0], err[-2000:]
    assert "train.nonfinite=stop" in line[0]
    assert not (nan_ws / "outputs" / "teacher-haze" / "last.safetensors").exists()
