"""Ctrl-C (SIGINT) and a scheduler's SIGTERM part-way through eval, restore, cache and report, in real
processes: one line and status 128+signal (no traceback), no temporary file left beside an output, and
an MLflow run the job had opened marked KILLED (not RUNNING forever), which `report` then ignores.

The job is stopped at a known point, without sleeps: a wrapper (`_STOP`) replaces one function with
one that touches a marker file and blocks, and the test signals the process once the marker exists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = [pytest.param(signal.SIGINT, "interrupted", id="sigint"),
           pytest.param(signal.SIGTERM, "terminated (SIGTERM)", id="sigterm")]

# python -c _STOP MODULE ATTR MARKER ARGS...: run the CLI with MODULE.ATTR stopping at MARKER.
# PARTIAL=1: first write part of the file the call was writing (a PIL save into atomic_writer).
# AFTER=N: let the first N calls run as usual, stop in the next one.
_STOP = textwrap.dedent("""
    import importlib, os, sys, time
    mod, attr, marker = sys.argv[1:4]
    owner, name = importlib.import_module(mod), attr
    if "." in attr:
        cls, name = attr.split(".")
        owner = getattr(owner, cls)
    original, calls = getattr(owner, name), []
    def stop(*a, **k):
        if len(calls) < int(os.environ.get("AFTER", "0")):
            calls.append(1)
            return original(*a, **k)
        if os.environ.get("PARTIAL"):
            a[1].write(b"\\x89PNG partial")
            a[1].flush()
        open(marker, "w").close()
        time.sleep(120)
    setattr(owner, name, stop)
    from uniremoval.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def _stopped(tmp_path: Path, where: str, args: list[str], sig: int, **env: str) -> tuple[int, str]:
    """Run `uniremoval ARGS` with `where` (module:attr) blocking; send `sig` once it is reached."""
    mod, attr = where.split(":")
    marker = tmp_path / "reached"
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    e.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-c", _STOP, mod, attr, str(marker), *args], cwd=tmp_path, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{where} not reached:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a scheduler signals the whole job
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running 60 s after signal {sig}")
    return proc.returncode, err


def _one_line(rc: int, err: str, sig: int, line: str) -> None:
    assert rc == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == line


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _images(folder: Path, n: int, size: int = 24, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / sub / f"im{i}.png")
    return folder


def _runs(db: str, experiment: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]


@pytest.mark.parametrize("sig, line", SIGNALS)
def test_eval_stopped_while_logging_marks_the_run_killed_and_report_skips_it(tmp_path, sig, line):
    from uniremoval.errors import UniremovalError
    from uniremoval.eval.report import make_report

    data = _images(tmp_path / "data", 2)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = _stopped(tmp_path, "uniremoval.eval.evaluate:log_saved_images",
                       ["eval", "--checkpoint", "none", "--data", str(data), "--name", "set", "--metrics", "psnr",
                        "--device", "cpu", "--json", "scores.json", "--save-images", "saved",
                        "--tracking-uri", db, "--experiment", "stops"], sig)
    _one_line(rc, err, sig, line)
    runs = _runs(db, "stops", "eval-set")
    assert [r.info.status for r in runs] == ["KILLED"]  # was RUNNING forever, its images half uploaded
    assert "eval/set/psnr" in runs[0].data.metrics
    assert len(__import__("json").loads((tmp_path / "scores.json").read_text())["images"]) == 2
    assert not _temporaries(tmp_path / "saved")
    with pytest.raises(UniremovalError, match="no eval runs with scores"):  # a stopped run is no result
        make_report("stops", tracking_uri=db)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "kill9"])
def test_eval_rerun_stopped_part_way_keeps_the_previous_saved_images(tmp_path, sig):
    """A rerun of eval --save-images into the same folder, stopped after its first image was written:
    the folder still holds exactly the previous set (which the previous scores describe), and the
    next complete rerun replaces it as a whole, clearing the staging folder a kill -9 left."""
    import json

    saved, scores = tmp_path / "saved", tmp_path / "scores.json"
    args = ["eval", "--checkpoint", "none", "--metrics", "psnr", "--device", "cpu", "--batch-size", "1",
            "--no-mlflow", "--json", str(scores), "--save-images", str(saved)]
    from uniremoval.cli import main

    assert main([*args, "--data", str(_images(tmp_path / "old", 2))]) == 0
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert sorted(before) == [".uniremoval-eval.json", "im0.png", "im1.png"]
    old_scores = scores.read_text()
    new = _images(tmp_path / "new", 3, seed=1)  # other pixels, and one image more
    rc, err = _stopped(tmp_path, "uniremoval.eval.metrics:Scorer.score", [*args, "--data", str(new)], sig, AFTER="1")
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        assert (tmp_path / ".saved.eval-staging").is_dir()  # what a kill -9 leaves: hidden, beside the folder
    else:
        _one_line(rc, err, sig, "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)")
        assert not list(tmp_path.glob(".saved.*"))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # new im0.png was written, elsewhere
    assert scores.read_text() == old_scores
    assert main([*args, "--data", str(new)]) == 0
    assert sorted(p.name for p in saved.iterdir()) == [".uniremoval-eval.json", "im0.png", "im1.png", "im2.png"]
    assert (saved / "im0.png").read_bytes() != before["im0.png"]
    assert [r["name"] for r in json.loads(scores.read_text())["images"]] == ["im0.png", "im1.png", "im2.png"]
    assert not list(tmp_path.glob(".saved.*")) and not _temporaries(saved)


def test_report_log_stopped_while_uploading_marks_the_run_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(db)
    exp = client.create_experiment("rep", artifact_location=(tmp_path / "mlruns").as_uri())
    for model, value in (("input", 20.0), ("m1", 25.0)):
        run = client.create_run(exp, run_name="eval-set", tags={"stage": "eval", "dataset": "set",
                                                                "uniremoval.model": model})
        client.log_metric(run.info.run_id, "eval/set/psnr", value)
        client.set_terminated(run.info.run_id)
    rc, err = _stopped(tmp_path, "mlflow.tracking:MlflowClient.log_artifact",
                       ["report", "--experiment", "rep", "--tracking-uri", db, "--out-dir", "out", "--log"],
                       signal.SIGTERM)
    _one_line(rc, err, signal.SIGTERM, "terminated (SIGTERM)")
    assert [r.info.status for r in _runs(db, "rep", "report")] == ["KILLED"]
    assert "**25.00**" in (tmp_path / "out" / "report.md").read_text()  # written before the upload, complete


@pytest.mark.parametrize("sig, line", SIGNALS)
def test_restore_stopped_mid_write_leaves_no_temporary(tmp_path, sig, line):
    from PIL import Image

    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    ckpt = save_checkpoint(tmp_path / "ck" / "student", MPRNet("tiny").eval(), {"step": 1})
    src = _images(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    from PIL.PngImagePlugin import PngInfo

    from uniremoval.eval.restore import WRITTEN_BY

    mark = PngInfo()
    mark.add_text(*WRITTEN_BY)
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "im0.png", pnginfo=mark)  # an earlier restore's output
    before = (tmp_path / "out" / "im0.png").read_bytes()
    rc, err = _stopped(tmp_path, "PIL.Image:Image.save",
                       ["restore", "--checkpoint", str(ckpt), "--input", str(src / "target"), "--output", "out",
                        "--device", "cpu"], sig, PARTIAL="1")
    _one_line(rc, err, sig, line)
    # what is there is said: a stop printed only its one line
    assert err.rstrip().splitlines()[-2] == ("restore: stopped; 0 of 2 image(s) written into out by this run (a rerun "
                                             "restores every image again, replacing restore's own outputs)"), err
    assert not _temporaries(tmp_path / "out")  # SIGTERM left .im0.png.*.tmp behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["im0.png"]
    assert (tmp_path / "out" / "im0.png").read_bytes() == before  # the output being replaced is intact


@pytest.fixture()
def cache_cfg(tmp_path):
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from _fixtures import write_shards

    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    write_shards(tmp_path / "shards" / "syn", "syn", 2, 2)
    teacher = save_checkpoint(tmp_path / "teacher-haze" / "last", MPRNet("tiny").eval(),
                              {"stage": "teacher", "degradation": "haze"})
    cfg = {"stage": "cache", "project": "stops", "name": "cache", "output_dir": str(tmp_path / "outputs"),
           "model": {"preset": "tiny"}, "teachers": {"checkpoints": {"haze": str(teacher)}},
           "data": {"degradations": ["haze"], "feature_cell": 16,
                    "train": [{"name": "syn", "shards": str(tmp_path / "shards" / "syn"), "degradation": "haze"}]},
           "train": {"cpu": True}, "cache": {"out": str(tmp_path / "cache"), "batch_size": 1},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cache.yaml"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])  # USR1: launch/slurm_paper.sh's warning
def test_cache_stopped_mid_shard_removes_its_temporary(tmp_path, cache_cfg, sig):
    rc, err = _stopped(tmp_path, "uniremoval.stages.cache:run_teacher", ["cache", "--config", str(cache_cfg)], sig)
    _one_line(rc, err, sig, f"terminated ({signal.Signals(sig).name})")
    out = tmp_path / "cache" / "syn"
    assert not _temporaries(out)  # the shard being written (SIGTERM left it until the next run)
    assert not list(out.glob("*.tar")) and not list(out.glob(".*.done.json"))


def test_cache_interrupted_while_logging_marks_the_run_killed(tmp_path, cache_cfg):
    rc, err = _stopped(tmp_path, "mlflow.tracking:MlflowClient.log_artifact", ["cache", "--config", str(cache_cfg)],
                       signal.SIGINT)
    _one_line(rc, err, signal.SIGINT, "interrupted")
    assert [r.info.status for r in _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "stops", "cache")] == ["KILLED"]
    assert (tmp_path / "cache" / "syn" / "manifest.json").is_file()  # the finished cache is kept


def test_a_lost_peer_error_without_a_message_is_still_one_line(monkeypatch, capsys):
    """torch.distributed's network and store errors count as a lost peer whatever they say; one raised
    with no message ended in an IndexError traceback while cli.main built its error line."""
    import torch.distributed as dist

    from uniremoval import cli

    def lost(args):
        raise dist.DistStoreError()

    args = cli.parse(cli.build_parser(), ["shards", "inspect", "x"])
    args.func = lost
    monkeypatch.setattr(cli, "parse", lambda parser, argv: args)
    assert cli.main([]) == 1
    assert "lost contact with another process of the job (a node or process died, or the network failed): " \
           "DistStoreError; " in capsys.readouterr().err


def test_a_second_ctrl_c_while_the_program_exits_ends_it_without_a_traceback(tmp_path):
    """A second Ctrl-C a few ms after the first landed in an exit handler: 'Exception ignored in atexit
    callback' and a KeyboardInterrupt traceback. Once a stop is handled, the program takes SIGINT's default
    action (it ends at once); main() called with arguments (a library caller, the tests) changes nothing."""
    script = textwrap.dedent("""
        import signal, sys
        import uniremoval.cli as cli

        parse = cli.parse
        def stopped(parser, argv):
            args = parse(parser, argv)
            def run(_args):
                raise KeyboardInterrupt
            args.func = run
            return args
        cli.parse = stopped
        rc = cli.main(["config", "show", "configs/kt.yaml"])
        print(rc, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        sys.argv = ["uniremoval", "config", "show", "configs/kt.yaml"]
        rc = cli.main()
        print(rc, signal.getsignal(signal.SIGINT) is signal.SIG_DFL)
    """)
    r = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split("\n")[:2] == ["130 True", "130 True"], (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_train_stopped_while_it_sets_up_says_so_and_marks_the_run_killed(tmp_path, sig):
    """The trainer takes SIGTERM/SIGUSR1 over for its loop (a checkpoint at the next step's end); before
    that - loading, opening its MLflow run - a stop took the signal's default action: a silent kill
    (exit -15 under torchrun when another rank failed at its first batch) and a run left RUNNING."""
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from _fixtures import write_shards

    write_shards(tmp_path / "shards" / "syn", "syn", 1, 4)
    cfg = {"stage": "teacher", "degradation": "haze", "project": "stops", "name": "teacher",
           "output_dir": str(tmp_path / "outputs"), "model": {"preset": "tiny"},
           "data": {"degradations": ["haze"], "batch_size": 2, "crop_size": 32, "num_workers": 0,
                    "train": [{"name": "syn", "shards": str(tmp_path / "shards" / "syn"), "degradation": "haze"}]},
           "train": {"cpu": True, "max_steps": 2}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = _stopped(tmp_path, "uniremoval.tracking:Tracker.log_config",
                       ["train", "teacher", "--config", str(tmp_path / "teacher.yaml")], sig)
    _one_line(rc, err, sig, f"terminated ({signal.Signals(sig).name})")
    assert [r.info.status for r in _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "stops", "teacher")] == ["KILLED"]
