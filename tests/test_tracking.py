"""MLflow tracking against the embedded sqlite store and a real `mlflow server` that is down at the
start, comes up, then goes away mid-run: nothing logged is lost."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import MLFLOW, free_port, start_mlflow_server, stop_server

from uniremoval.config import KTStage, TeacherStage, config_hash
from uniremoval.tracking import Tracker, flatten, image_grid_png, replay_spool, start_run


def teacher_cfg(tmp_path: Path, uri: str | None = None) -> TeacherStage:
    return TeacherStage(stage="teacher", degradation="rain", output_dir=str(tmp_path / "out"), name="t",
                        project="trk", optim={"lr": 1e-3}, tracking={"uri": uri})


def test_flatten_and_grid():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    # A list of sources goes by index, as overrides name them (data.train.1.weight=2): each a param of its
    # own to filter and compare runs on (the whole list was one JSON string); other lists stay JSON.
    sources = {"data": {"train": [{"name": "h", "shards": ["a", "b"]}, {"name": "r", "weight": 2.0}], "val": []}}
    assert flatten(sources) == {"data.train.0.name": "h", "data.train.0.shards": '["a", "b"]',
                                "data.train.1.name": "r", "data.train.1.weight": "2.0", "data.val": "[]"}
    x = torch.zeros(2, 3, 8, 8)
    png = image_grid_png([x - 1, x, x + 1])
    from io import BytesIO

    from PIL import Image

    im = Image.open(BytesIO(png))
    assert im.size == (24, 16)  # 3 columns of 8 px, 2 rows
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((8, 0)) == (128, 128, 128)
    assert im.getpixel((23, 15)) == (255, 255, 255)


def test_embedded_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = teacher_cfg(tmp_path)
    tr = start_run(cfg, run_name="teacher-rain", stage="teacher", degradation="rain")
    assert tr is not None and tr.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for s in (10, 20):
        tr.log_metrics({"train/total": 1.0 / s, "val/rain/psnr": 20.0 + s}, step=s)
    tr.log_image_grid("train", [torch.zeros(1, 3, 8, 8)] * 3, step=20)
    tr.finish()
    # A resumed process continues the same run.
    tr2 = start_run(cfg, run_name="teacher-rain", stage="teacher", degradation="rain", run_id=tr.run_id)
    tr2.log_metrics({"train/total": 0.01}, step=30)
    tr2.finish()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trk")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "teacher-rain" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "teacher" and run.data.tags["degradation"] == "rain"
    assert run.data.tags["config_hash"] == config_hash(cfg) and run.data.tags["resumed"] == "true"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["degradation"] == "rain"
    hist = client.get_metric_history(run.info.run_id, "train/total")
    assert [(m.step, m.value) for m in hist] == [(10, 0.1), (20, 0.05), (30, 0.01)]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "images"} <= files
    assert [f.path for f in client.list_artifacts(run.info.run_id, "images")] == ["images/train-step00000020.png"]
    assert list((tmp_path / "mlruns").rglob("config.yaml"))  # artifacts beside the store
    # DESIGN: the whole resolved config is logged (it loads back as the run's config), every run
    # carries the git commit, and the flattened params cover every config key
    import subprocess

    from uniremoval.config import config_to_dict, load_config

    saved = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert load_config(saved) == cfg
    # Asked of git here, not of the code under test (whose None would skip the check): a checkout, not an
    # unpacked source archive.
    in_checkout = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                 check=False).returncode == 0
    if in_checkout:
        commit = run.data.tags["git_commit"]  # HEAD may move meanwhile: the tag names a commit of this repo
        assert run.data.tags["git_dirty"] in ("true", "false")
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        assert subprocess.run(["git", "cat-file", "-t", commit], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip() == "commit"
    flat = flatten(config_to_dict(cfg))
    assert {k: run.data.params.get(k) for k in flat} == flat

    # The tag for random VGG weights on a contrastive stage.
    kt = KTStage(stage="kt", output_dir=str(tmp_path / "out"), features={"weights": "random"},
                 loss={"use_fcl": False})
    t3 = start_run(kt, run_name="kt", stage="kt")
    t3.finish()
    tags = client.get_run(t3.run_id).data.tags
    assert tags["vgg_weights"] == "random" and tags["ablation.use_fcl"] == "false"


@pytest.mark.slow
def test_server_down_then_up_then_gone_loses_nothing(tmp_path):
    assert MLFLOW.exists(), f"{MLFLOW} missing: mlflow is a dependency (pyproject.toml), the install is broken"
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = teacher_cfg(tmp_path, uri)
    # 1. Server down at the start: the run cannot even be created; training goes on.
    with pytest.warns(RuntimeWarning, match=r"unreachable.*spooled to .*mlflow-spool.jsonl"):
        tr = start_run(cfg, run_name="teacher-rain", stage="teacher", degradation="rain")
    assert tr.offline and tr.run_id is None and tr.spool_path.exists()
    tr.log_metrics({"train/total": 1.0}, step=1)
    tr.log_image_grid("train", [torch.zeros(1, 3, 8, 8)] * 3, step=1)
    # 2. The server comes up: the next call creates the run and replays everything, in order.
    proc = start_mlflow_server(tmp_path, port)
    try:
        tr.retry_s = 0.0
        tr.log_metrics({"train/total": 2.0}, step=2)
        assert not tr.offline and tr.run_id is not None and not tr.spool_path.exists()
        client = MlflowClient(uri)
        run = client.get_run(tr.run_id)
        assert run.info.run_name == "teacher-rain" and run.data.tags["stage"] == "teacher"
        assert run.data.params["optim.lr"] == "0.001"
        history = client.get_metric_history(tr.run_id, "train/total")
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]
        # created only now, the run starts when the job did (before its first metric), not at its creation
        assert run.info.start_time <= history[0].timestamp
        files = {f.path for f in client.list_artifacts(tr.run_id)}
        assert {"config.yaml", "images"} <= files
        text = client.download_artifacts(tr.run_id, "config.yaml", str(tmp_path / "dl"))
        assert "degradation: rain" in Path(text).read_text()
    finally:
        stop_server(proc)  # SIGTERM, then SIGKILL after 20 s
    # 3. The server goes away mid-run: a warning, and the calls wait in the spool.
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr.log_metrics({"train/total": 3.0}, step=3)
    tr.log_metrics({"train/total": 4.0, "val/rain/psnr": 25.0}, step=4)
    with pytest.warns(RuntimeWarning, match="stay in .*mlflow-spool.jsonl"):
        tr.finish()
    lines = [json.loads(x) for x in tr.spool_path.read_text().splitlines()]
    assert [x["op"] for x in lines] == ["metrics", "metrics", "terminate"] and lines[0]["run_id"] == tr.run_id
    # 4. Replayed later into the same run (here straight into the server's store, to save a restart).
    assert replay_spool(tr.spool_path, f"sqlite:///{tmp_path / 'server.db'}")
    store = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    hist = store.get_metric_history(tr.run_id, "train/total")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    run = store.get_run(tr.run_id)
    assert run.data.metrics["val/rain/psnr"] == 25.0 and run.info.status == "FINISHED"
    assert not tr.spool_path.exists()


def test_replay_backs_off_while_the_server_stays_down_and_resets_once_reached(tmp_path, monkeypatch):
    """A server that stays down is retried after retry_s, then twice as long after each failed retry,
    capped at max_retry_s (each try costs the training loop an HTTP timeout); reaching it resets."""
    import time

    from mlflow.tracking import MlflowClient

    from uniremoval.tracking import Tracker, mlflow_client

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr = Tracker(f"http://127.0.0.1:{free_port()}", "backoff", "kt", {"stage": "kt"},
                     spool_dir=tmp_path, retry_s=30.0, max_retry_s=600.0)
    assert tr.offline and tr.failed_retries == 0 and tr.retry_wait() == 30.0
    waits = []
    for step in range(7):
        # just before the wait is over: spooled, not retried
        tr._last_try = time.time() - tr.retry_wait() + 5
        tr.log_metrics({"train/total": float(step)}, step=2 * step)
        assert tr.failed_retries == len(waits)
        # just after it: one retry, which fails and doubles the wait
        waits.append(tr.retry_wait())
        tr._last_try = time.time() - tr.retry_wait() - 1
        tr.log_metrics({"train/total": float(step)}, step=2 * step + 1)
        assert tr.failed_retries == len(waits) and tr.offline
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    # the server is reached (here: a store on disk): everything spooled is sent, the wait starts over
    tr.client = mlflow_client(f"sqlite:///{tmp_path / 'm.db'}")
    tr._last_try = time.time() - tr.retry_wait() - 1
    tr.log_metrics({"train/total": 99.0}, step=99)
    assert not tr.offline and tr.failed_retries == 0 and tr.retry_wait() == 30.0
    hist = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_metric_history(tr.run_id, "train/total")
    assert [m.step for m in hist] == list(range(14)) + [99]


def _run_contents(client, run_id: str) -> tuple:
    run = client.get_run(run_id)
    hist = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/total")]
    files = sorted(f.path for f in client.list_artifacts(run_id, "images"))
    return run.info.status, hist, run.data.params.get("optim.lr"), files


def test_background_tracker_sends_the_same_run_as_a_synchronous_one(tmp_path, monkeypatch):
    """Background mode queues calls for a worker thread; what reaches MLflow (order, params, the
    artifacts whose temporary files are deleted at once) is what the synchronous tracker sends."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    contents = []
    for background in (False, True):
        cfg = teacher_cfg(tmp_path / str(background))
        tr = start_run(cfg, run_name="teacher-rain", stage="teacher", degradation="rain", background=background)
        assert (tr._worker is not None) == background
        for s in range(1, 51):
            tr.log_metrics({"train/total": 1.0 / s}, step=s)
        tr.log_image_grid("train", [torch.zeros(1, 3, 8, 8)] * 3, step=50)
        tr.finish()
        assert tr._worker is None and not tr.offline and not tr.spool_path.exists()
        contents.append(_run_contents(MlflowClient(tr.uri), tr.run_id))
    assert contents[0] == contents[1]
    status, hist, lr, files = contents[1]
    assert status == "FINISHED" and hist == [(s, 1.0 / s) for s in range(1, 51)] and lr == "0.001"
    assert files == ["images/train-step00000050.png"]


def test_background_spool_failure_is_raised_to_the_caller(tmp_path, monkeypatch):
    """An error in the worker (here: the spool cannot be written) is not swallowed: the next call
    raises it, naming the spool."""
    from uniremoval.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr = Tracker(f"http://127.0.0.1:{free_port()}", "e", "kt", {}, spool_dir=tmp_path / "file" / "spool",
                     background=True)
    tr.log_metrics({"train/total": 1.0}, step=1)
    with pytest.raises(RuntimeError, match=r"in the background \(spool .*file/spool/mlflow-spool.jsonl\)"):
        tr.wait()
    tr.close()


@pytest.mark.slow
def test_background_tracker_never_waits_for_a_hung_server(tmp_path):
    """A real `mlflow server` behind a proxy that stops forwarding (a hung server): the training
    loop's calls return while the worker's request is held; once traffic flows again, finish()
    delivers every call in order."""
    from _fixtures import GatedProxy
    from mlflow.tracking import MlflowClient

    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    proxy = GatedProxy(port)
    try:
        cfg = teacher_cfg(tmp_path, f"http://127.0.0.1:{proxy.port}")
        tr = start_run(cfg, run_name="teacher-rain", stage="teacher", degradation="rain", background=True)
        tr.wait()
        assert tr.run_id is not None and not tr.offline
        proxy.gate.clear()  # the server hangs
        for s in range(1, 21):
            tr.log_metrics({"train/total": float(s)}, step=s)
        tr.log_image_grid("train", [torch.zeros(1, 3, 8, 8)] * 3, step=20)
        # every call has returned, yet the server has not answered the first of them
        deadline = time.monotonic() + 30
        while proxy.held == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.held >= 1 and tr._queue.unfinished_tasks >= 21
        proxy.gate.set()
        tr.finish()
        assert not tr.offline and not tr.spool_path.exists()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        status, hist, lr, files = _run_contents(client, tr.run_id)
        assert status == "FINISHED" and hist == [(s, float(s)) for s in range(1, 21)] and lr == "0.001"
        assert files == ["images/train-step00000020.png"]
    finally:
        proxy.close()
        stop_server(proc)


def test_replay_spool_goes_to_the_recorded_server(tmp_path, monkeypatch):
    """A spool written for a server is replayed to that server, not to the shell's default store:
    with the server still down nothing is sent anywhere and the spool stays whole."""
    from uniremoval.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr = Tracker(uri, "e", "kt", {"stage": "kt"}, spool_dir=tmp_path / "run")
    tr.log_metrics({"train/total": 1.0}, step=1)
    with pytest.warns(RuntimeWarning, match="stay in"):
        tr.finish()
    before = tr.spool_path.read_text()
    assert all(json.loads(x)["uri"] == uri for x in before.splitlines())
    with pytest.warns(RuntimeWarning, match=f"MLflow at {uri} is unreachable"):
        assert replay_spool(tr.spool_path) is False
    assert not (tmp_path / "mlflow.db").exists()
    assert [json.loads(x)["op"] for x in tr.spool_path.read_text().splitlines()] == ["run", "metrics", "terminate"]
    # sent elsewhere on request: the run is created there with its name and calls
    from mlflow.tracking import MlflowClient

    assert replay_spool(tr.spool_path, f"sqlite:///{tmp_path / 'other.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    assert run.info.run_name == "kt" and run.info.status == "FINISHED" and run.data.metrics == {"train/total": 1.0}


def test_an_op_after_a_spool_line_a_kill_cut_short_is_kept(tmp_path, monkeypatch):
    """A kill -9 mid-write cut the spool's last line; with the server still down at the restart, the next
    op was appended onto the cut line, and replay dropped both as one unreadable line."""
    from uniremoval.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr = Tracker(uri, "e", "kt", {"stage": "kt"}, spool_dir=tmp_path / "run")
    tr.log_metrics({"train/total": 1.0}, step=1)
    with open(tr.spool_path, "a") as fh:  # what a kill mid-write leaves: half a line, no newline
        fh.write('{"op": "metrics", "metrics": {"train/total": 2.')
    with pytest.warns(RuntimeWarning, match="unreachable"):
        again = Tracker(uri, "e", "kt", {"stage": "kt"}, spool_dir=tmp_path / "run")
    again.log_metrics({"train/total": 3.0}, step=3)
    with pytest.warns(RuntimeWarning, match="stay in"):
        again.finish()
    assert replay_spool(again.spool_path, f"sqlite:///{tmp_path / 'other.db'}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/total")] == [(1, 1.0), (3, 3.0)]


def test_a_name_mlflow_refuses_is_left_out_not_taken_for_an_outage(tmp_path, monkeypatch):
    """MLflow refuses some names ('(' in a metric or tag name). That refusal was taken for a server
    that is down: every later call of the run was spooled, and the spool's replay failed on the same
    call forever (the run stayed RUNNING, with no metric). Only the refused name is left out now, live
    and on replay of a spool written while the server was down."""
    from mlflow.tracking import MlflowClient

    from uniremoval.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    live = f"sqlite:///{tmp_path / 'live.db'}"
    tr = Tracker(live, "e", "eval-x", {}, spool_dir=tmp_path / "live")
    with pytest.warns(RuntimeWarning, match=r"refused the metric 'eval/x \(1\)/piqe'.*left out"):
        tr.log_metrics({"eval/x/psnr": 20.0, "eval/x (1)/piqe": 30.0}, step=0)
    tr.log_metrics({"eval/x/ssim": 0.5}, step=0)
    sent = []
    real_apply = tr._apply
    tr._apply = lambda op: (sent.append(op), real_apply(op))  # what reaches MLflow from here on
    tr.log_metrics({"eval/x (1)/piqe": 31.0, "eval/x/niqe": 4.0}, step=1)
    assert [op["metrics"] for op in sent] == [{"eval/x/niqe": 4.0}]  # the refused name is not sent again
    tr._apply = real_apply
    tr.finish()
    assert not tr.offline and not tr.spool_path.exists()
    run = MlflowClient(live).get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"eval/x/psnr": 20.0, "eval/x/ssim": 0.5,
                                                                  "eval/x/niqe": 4.0}

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tr = Tracker(down, "e", "kt", {}, spool_dir=tmp_path / "run")
    tr.log_metrics({"train/total": 1.0, "train/bad(x)": 2.0}, step=1)
    tr.set_tags({"ok_tag": "1", "bad(tag)": "2"})
    tr.log_metrics({"train/total": 0.5}, step=2)
    with pytest.warns(RuntimeWarning, match="stay in"):
        tr.finish()
    later = f"sqlite:///{tmp_path / 'later.db'}"
    with pytest.warns(RuntimeWarning, match="refused the") as caught:
        assert replay_spool(tr.spool_path, later)
    assert {str(w.message).split("'")[1] for w in caught if "refused" in str(w.message)} == {"train/bad(x)", "bad(tag)"}
    client = MlflowClient(later)
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["ok_tag"] == "1" and "bad(tag)" not in run.data.tags
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/total")] == [1.0, 0.5]


def test_a_tracking_uri_mlflow_cannot_open_stops_the_job_at_once(tmp_path, monkeypatch, capsys):
    """A misspelt scheme used to look like a server that is down: every metric spooled for the whole
    run. It is refused in the config, on the command line and in $MLFLOW_TRACKING_URI."""
    from uniremoval.cli import main
    from uniremoval.config import ConfigError
    from uniremoval.tracking import check_uri, resolve_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # folder stores pass where MLflow opens them
    for ok in ("http://h:5000", "https://h", "sqlite:///m.db", "file:///tmp/r", "postgresql+psycopg2://u@db/m",
               "mlruns"):
        assert check_uri(ok, "x") == ok
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"tracking.uri\n.*unknown tracking URI scheme 'htp'"):
        teacher_cfg(tmp_path, "htp://h:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htpp://h")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI htpp://h: unknown tracking URI scheme 'htpp'"):
        resolve_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["report", "--experiment", "e", "--tracking-uri", "bogus://x"]) == 2
    assert "error: tracking URI bogus://x: unknown tracking URI scheme 'bogus'" in capsys.readouterr().err
    # the database file's path with no scheme: taken for a folder store (said to be one MLflow no longer opens)
    db = tmp_path / "m.db"
    db.write_bytes(b"SQLite format 3\x00")
    assert main(["report", "--experiment", "e", "--tracking-uri", str(db)]) == 2
    assert (f"error: tracking URI {db}: {db} is a file, and a path without a scheme names a folder store: for an "
            f"SQLite database give sqlite:///{db}") in capsys.readouterr().err
    # host:port with no scheme was a folder store too, and the fix offered (MLFLOW_ALLOW_FILE_STORE) made a
    # folder named '127.0.0.1:5917' (folder stores allowed here: the check comes first)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "127.0.0.1:5917")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI 127\.0\.0\.1:5917: a server's address without its "
                                          r"scheme\? give http://127\.0\.0\.1:5917 \(or https://\)"):
        resolve_uri(None)


def test_a_sqlite_uri_that_is_not_a_database_is_one_error_line(tmp_path, monkeypatch, capsys):
    """sqlite:/// on a text file, a folder or below a file used to end in an SQLAlchemy traceback (after
    the whole evaluation, for eval). Each is refused before any work, naming the file, and the file is
    left as it was; a store MLflow will not open (a folder store) is one line too."""
    from pydantic import ValidationError

    from uniremoval.cli import main
    from uniremoval.config import ConfigError
    from uniremoval.tracking import check_uri, resolve_uri

    def one_error() -> str:
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    folder = tmp_path / "runs"
    folder.mkdir()
    for uri, problem in (
        (f"sqlite:///{text}", (f"{text} exists but is not an SQLite database; choose another path for the "
                               "MLflow store, or delete that file if it is not needed")),
        (f"sqlite:///{folder}", (f"{folder} is a folder, not an SQLite database file; name a file in it "
                                 f"(e.g. sqlite:///{folder / 'mlflow.db'})")),
        (f"sqlite:///{text}/m.db", f"{text} is a file, so the database {text}/m.db cannot be created"),
    ):
        assert main(["report", "--experiment", "e", "--tracking-uri", uri]) == 2
        assert one_error().startswith(f"error: tracking URI {uri}: {problem}")
        with pytest.raises(ValidationError, match=r"tracking.uri\n.*" + re.escape(problem)):
            teacher_cfg(tmp_path, uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(ConfigError, match=re.escape(f"MLFLOW_TRACKING_URI {uri}: {problem}")):
            resolve_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert text.read_text() == "not a database\n" and list(folder.iterdir()) == []
    # an empty file is a new database, and a real one opens as before
    (tmp_path / "empty.db").write_bytes(b"")
    assert check_uri(f"sqlite:///{tmp_path / 'empty.db'}", "x")
    tr = start_run(teacher_cfg(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}"), run_name="t", stage="teacher")
    tr.finish()
    assert (tmp_path / "empty.db").read_bytes().startswith(b"SQLite format 3\x00")
    assert check_uri(f"sqlite:///{tmp_path / 'empty.db'}", "x")
    # a folder store: MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE is set (older versions open it)
    # (refused in the config too, so every rank stops at once rather than rank 0 at its first log call)
    import mlflow.environment_variables

    refuses = hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    capsys.readouterr()
    store = tmp_path / "folder-store"  # (tmp_path/mlruns holds the artifacts of the sqlite store above)
    assert main(["report", "--experiment", "e", "--tracking-uri", str(store)]) == 2
    err = one_error()
    if refuses:
        assert err.startswith(f"error: tracking URI {store}: a folder store, which MLflow {mlflow.__version__} no "
                              "longer opens: use a database file (e.g. sqlite:///mlflow.db), or set "
                              "MLFLOW_ALLOW_FILE_STORE=true to keep the folder"), err
        for uri in (str(store), store.as_uri()):
            with pytest.raises(ValidationError, match=r"tracking.uri\n.*a folder store"):
                teacher_cfg(tmp_path, uri)
        assert not store.exists()
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_uri(str(store), "x") and check_uri(store.as_uri(), "x")
    assert main(["report", "--experiment", "e", "--tracking-uri", str(store)]) == 2
    assert "no MLflow experiment 'e'" in one_error()


def test_runs_checkpoints_of_a_stage_are_fetched_from_its_tracking_uri(tmp_path, monkeypatch):
    """teachers.checkpoints = runs:/... is fetched from the store the config's tracking.uri names, not
    from $MLFLOW_TRACKING_URI/./mlflow.db (where the run is not)."""
    from _fixtures import run_with_logged_weights

    from uniremoval.stages.preflight import check_inputs

    _, uri, rid = run_with_logged_weights(tmp_path, "best", {"stage": "teacher", "degradation": "haze",
                                                              "preset": "tiny"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("UNIREMOVAL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "s-000000.tar").touch()  # a shard folder (check_inputs lists it); these tests check the weights
    cfg = KTStage(stage="kt", output_dir=str(tmp_path / "out"), model={"preset": "tiny"},
                  data={"degradations": ["haze"], "train": [{"name": "s", "shards": str(shards), "degradation": "haze"}]},
                  teachers={"mode": "online", "checkpoints": {"haze": f"runs:/{rid}/weights/best"}},
                  tracking={"uri": uri})
    check_inputs(cfg)
    assert (tmp_path / "runs" / rid / "weights" / "best.safetensors").is_file()


def test_stages_take_teachers_and_init_weights_a_run_logged_to_mlflow(tmp_path, monkeypatch):
    """teachers.checkpoints / model.init = runs:/<id>/weights/last: fetched once from the store into
    $UNIREMOVAL_RUNS_DIR and read from that copy afterwards (with the server gone too); the same
    weights and identity (sha256) as the local file; a wrong run id is named by its config key."""
    from _fixtures import run_with_logged_weights

    from uniremoval.errors import ConfigError
    from uniremoval.models.checkpoint import checkpoint_sha256, load_checkpoint
    from uniremoval.stages.preflight import check_inputs
    from uniremoval.stages.teachers import load_teachers

    local, uri, rid = run_with_logged_weights(tmp_path, "best", {"stage": "teacher", "degradation": "haze",
                                                                 "preset": "tiny"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("UNIREMOVAL_RUNS_DIR", str(tmp_path / "runs"))
    spec = f"runs:/{rid}/weights/best"
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "s-000000.tar").touch()  # a shard folder (check_inputs lists it); these tests check the weights
    cfg = KTStage(stage="kt", output_dir=str(tmp_path / "out"), model={"preset": "tiny", "init": spec},
                  data={"degradations": ["haze"], "train": [{"name": "s", "shards": str(shards), "degradation": "haze"}]},
                  teachers={"mode": "online", "checkpoints": {"haze": spec}})
    check_inputs(cfg)  # fetched here, before any stage starts
    assert sorted(p.name for p in (tmp_path / "runs" / rid / "weights").iterdir()) == ["best.json", "best.safetensors"]
    (tmp_path / "m.db").unlink()  # the store is gone: the copy serves
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    model, meta = load_checkpoint(spec, arch="mprnet", preset="tiny")
    ref, _ = load_checkpoint(local)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert checkpoint_sha256(spec) == checkpoint_sha256(local) and meta["degradation"] == "haze"
    (teacher,) = load_teachers({"haze": spec}, ["haze"], "tiny").values()
    assert teacher.sha256 == checkpoint_sha256(local)
    bad = cfg.model_copy(update={"teachers": cfg.teachers.model_copy(update={"checkpoints": {
        "haze": "runs:/0123abcd/weights/best"}})})
    with pytest.raises(ConfigError, match=r"teachers\.checkpoints\.haze: checkpoint runs:/0123abcd/weights/best: "
                                          r"cannot fetch weights/best\.safetensors of run 0123abcd from http://"):
        check_inputs(bad)
    # a failed first fetch leaves no empty <run id>/weights/ folder behind (the good run's copy stays)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [rid]


def test_a_runs_copy_follows_weights_a_resumed_run_logged_again(tmp_path, monkeypatch):
    """A resumed run logs new weights under the same name: an entry point (check_inputs, eval, restore)
    compares the copy with the run's .json and fetches the new weights; later loads use that copy.
    With the store out of reach the copy is used, with a warning naming it."""
    import warnings

    from _fixtures import run_with_logged_weights
    from mlflow.tracking import MlflowClient

    from uniremoval.models.checkpoint import checkpoint_sha256, save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.tracking import fetch_run_checkpoint

    first, uri, rid = run_with_logged_weights(tmp_path, "last", {"step": 10})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = f"runs:/{rid}/weights/last"
    assert checkpoint_sha256(fetch_run_checkpoint(spec)) == checkpoint_sha256(first)
    torch.manual_seed(1)
    second = save_checkpoint(tmp_path / "resumed" / "last", MPRNet("tiny").eval(), {"step": 20})
    client = MlflowClient(uri)
    for f in (second, second.with_suffix(".json")):
        client.log_artifact(rid, str(f), "weights")  # what the resumed run's end logs
    assert checkpoint_sha256(fetch_run_checkpoint(spec, refresh=False)) == checkpoint_sha256(first)  # not asked
    assert checkpoint_sha256(fetch_run_checkpoint(spec)) == checkpoint_sha256(second)  # checked: fetched again
    assert checkpoint_sha256(spec) == checkpoint_sha256(second)  # later loads read the new copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert checkpoint_sha256(fetch_run_checkpoint(spec)) == checkpoint_sha256(second)
    assert any(f"checkpoint {spec}: cannot check it against http://127.0.0.1" in str(w.message) for w in seen)


def test_git_dirty_says_whether_tracked_source_differs_from_its_commit(tmp_path):
    """A run tagged with a commit may have run edited code: `git_dirty` tells, from the tracked files
    of the source folder only (an untracked scratch file is no edit of the code that ran)."""
    import subprocess

    from uniremoval.tracking import git_dirty

    assert git_dirty(tmp_path) is None  # no checkout: no tag at all
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "notes.txt").write_text("n\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    assert git_dirty(repo / "pkg") is False
    (repo / "pkg" / "scratch.py").write_text("y = 2\n")
    (repo / "notes.txt").write_text("edited outside the package\n")
    assert git_dirty(repo / "pkg") is False
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert git_dirty(repo / "pkg") is True


def test_killed_background_tracker_leaves_no_staging_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A training job killed with -9 never runs Tracker.close(): each kill left a /tmp/uniremoval-mlflow-*
    staging folder (measured: 8 -> 9 per killed teacher run, still 9 after its resume). Its staging is
    now inside the run folder and the next job of that run empties it."""
    import atexit
    import tempfile

    from uniremoval.tracking import Tracker

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    picture = tmp_path / "grid.png"
    picture.write_bytes(b"png")
    for _ in range(3):  # three killed jobs: the worker stops, close() never runs
        tr = Tracker(uri, "exp", "run", {}, spool_dir=run_dir, background=True)
        atexit.unregister(tr.close)
        assert tr._queue is not None and tr._worker is not None
        tr._queue.put(None)  # the worker is gone before it sends the artifact queued next
        tr._worker.join()
        tr._call({"op": "artifact", "path": str(picture), "artifact_path": "images"})
    staged = [p for p in tmp.rglob("*") if p.is_file()] + [p for p in run_dir.rglob("*") if p.is_file()
                                                             and "staging" in str(p)]
    assert staged  # what the killed jobs had queued (each job of the run empties the staging of the last)
    tr = Tracker(uri, "exp", "run", {}, spool_dir=run_dir, background=True)  # the resume
    tr.close()
    left = sorted(str(p) for p in tmp.iterdir()) + sorted(str(p) for p in run_dir.rglob("*") if "staging" in str(p))
    assert left == []


def test_an_artifact_path_mlflow_refuses_is_left_out_not_taken_for_an_outage(tmp_path, monkeypatch):
    """MLflow's check of an artifact path ('manifests/../x') raises an INTERNAL_ERROR (HTTP 500): the
    cache stage's run was taken to be unreachable, spooled, and its replay failed the same way for ever.
    The artifact is left out with a warning naming it; the rest of the run is sent."""
    from mlflow.tracking import MlflowClient

    from uniremoval.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'live.db'}"
    tr = Tracker(uri, "e", "cache", {}, spool_dir=tmp_path / "run")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match=r"refused the .*manifests/\.\./escape.*left out"):
        tr.log_artifact(tmp_path / "manifest.json", "manifests/../escape")
    tr.log_artifact(tmp_path / "manifest.json", "manifests/ok")
    tr.log_metrics({"cache/ok/samples": 3.0}, step=0)
    tr.finish()
    assert not tr.offline and not tr.spool_path.exists()
    client = MlflowClient(uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"cache/ok/samples": 3.0}
    assert [a.path for a in client.list_artifacts(tr.run_id, "manifests")] == ["manifests/ok"]


def test_a_runs_fetch_names_the_file_it_could_not_fetch_and_refuses_dot_run_ids(tmp_path, monkeypatch):
    """A run with weights but no .json: the error named the weights it had fetched, not the .json it lacked
    (and the fetched weights were left alone). `runs:/./weights/last` was taken for a run id: its failed
    fetch removed the runs folder itself."""
    from mlflow.tracking import MlflowClient

    from uniremoval.errors import CheckpointError
    from uniremoval.tracking import fetch_run_checkpoint

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("UNIREMOVAL_RUNS_DIR", str(runs))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    (tmp_path / "last.safetensors").write_bytes(b"weights")
    client.log_artifact(run.info.run_id, str(tmp_path / "last.safetensors"), "weights")
    with pytest.raises(CheckpointError, match=r"cannot fetch weights/last\.json of run"):
        fetch_run_checkpoint(f"runs:/{run.info.run_id}/weights/last", uri)
    assert list(runs.iterdir()) == []
    for bad in ("runs:/./weights/last", "runs:/../weights/last"):
        with pytest.raises(CheckpointError, match="expected runs:/<run id>/<artifact path>"):
            fetch_run_checkpoint(bad, uri)
    assert runs.is_dir()


@pytest.mark.slow
def test_a_server_without_mlflow_at_the_address_stops_the_job_instead_of_spooling_it(tmp_path, monkeypatch, capsys):
    """A tracking URI whose path is wrong (a proxy serving MLflow under a prefix, or a typo after the
    port) reaches a live server that answers 404 for MLflow's API: it was taken for an outage, and a
    whole training run (or eval, or cache) was spooled, exit status 0, for a server the replay fails on
    the same way. Now train, cache and eval refuse it at their start, before any work (asked twice, a few
    seconds apart: a proxy answers 404 while the server behind it restarts); a run's Tracker, created
    later, still spools."""
    from uniremoval.cli import main

    port = free_port()
    good, wrong = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/mlflow"
    proc = start_mlflow_server(tmp_path, port)
    monkeypatch.chdir(tmp_path)
    try:
        refusal = (f"error: tracking URI {wrong}: a server answers there, but not MLflow's API "
                   f"(/api/2.0/mlflow/experiments/search answered 404 Not Found)")
        # (the shards and teachers named are not there: the address is checked first)
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(f"stage: teacher\ndegradation: haze\noutput_dir: {tmp_path / 'out'}\n"
                           f"data: {{train: [{{name: s, shards: {tmp_path / 'none'}, degradation: haze}}]}}\n"
                           f"tracking: {{uri: '{wrong}'}}\n")
        cache = tmp_path / "cache.yaml"
        cache.write_text(f"stage: cache\ndata: {{degradations: [haze], train: [{{name: s, shards: "
                         f"{tmp_path / 'none'}, degradation: haze}}]}}\nteachers: {{checkpoints: {{haze: "
                         f"{tmp_path / 'none.safetensors'}}}}}\ncache: {{out: {tmp_path / 'cache'}}}\n"
                         f"tracking: {{uri: '{wrong}'}}\n")
        (tmp_path / "data").mkdir()
        Image.new("RGB", (32, 24), (90, 120, 150)).save(tmp_path / "data" / "a.png")
        for argv in (["train", "teacher", "--config", str(teacher)], ["cache", "--config", str(cache)],
                     ["eval", "--checkpoint", "none", "--data", "data", "--metrics", "psnr", "--device", "cpu",
                      "--tracking-uri", wrong, "--json", "scores.json"]):
            capsys.readouterr()
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 2 and refusal in err and "nothing was run" in err, (argv, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
        assert not (tmp_path / "scores.json").exists() and not list(tmp_path.rglob("mlflow-spool*"))
        # A run's Tracker (made once the job has started) spools rather than stopping the job
        with pytest.warns(RuntimeWarning, match="unreachable"):
            tr = Tracker(wrong, "trk", "t", {}, spool_dir=tmp_path / "run")
        tr.log_metrics({"train/total": 1.0}, step=1)
        assert tr.offline and (tmp_path / "run" / "mlflow-spool.jsonl").is_file()
        # the right address works
        tr = start_run(teacher_cfg(tmp_path, good), run_name="t", stage="teacher", degradation="rain")
        assert not tr.offline and tr.run_id is not None
        tr.finish()
    finally:
        stop_server(proc)


def test_a_param_over_mlflows_limit_is_cut_visibly_and_said(tmp_path):
    """A config with many long shard paths makes a param over MLflow's 6000 characters: it was cut
    silently, and the JSON list it held no longer parsed. Now it is cut with a marker and a warning that
    points at config.yaml; shorter params are untouched."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    shards = json.dumps([f"/data/a/very/long/path/to/shards/set-{i:04d}/{{000000..000099}}.tar" for i in range(200)])
    tr = Tracker(uri, "e", "r", {})
    with pytest.warns(RuntimeWarning, match=r"param\(s\) data\.train over its 6000 characters: logged cut short"):
        tr.log_params({"data.train": shards, "optim.lr": "0.001"})
    tr.finish()
    params = MlflowClient(uri).get_run(tr.run_id).data.params
    assert len(params["data.train"]) == 6000 and params["optim.lr"] == "0.001"
    assert params["data.train"].endswith(f" ... [cut: {len(shards)} characters]")
    assert shards.startswith(params["data.train"].split(" ... [cut:")[0])
