"""MLflow tracking: one run per stage, only the main process talks to MLflow, nothing is dropped.

Where: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else the embedded store
``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlruns`` (browse with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``). Experiment: ``tracking.experiment`` or
the config's ``project``. Runs: ``teacher-<type>``, ``cache``, ``kt``, ``da``, ``eval-<dataset>``
(``tracking.run_name`` overrides), tagged with stage, degradation, ablation flags, config hash,
git commit, package version (and ``vgg_weights=random`` when phi is untrained). The resolved
config is logged flattened as params and whole as ``config.yaml``. Metric names:
``train/<loss>``, ``val/<dataset>/<metric>``, ``eval/<dataset>/<metric>``.

When the server cannot be reached (at the start or mid-run) training goes on: a warning names a
local spool file (``<run_dir>/mlflow-spool.jsonl``) that receives every call in order, and each
later call and ``finish()`` try to replay it, creating the run first if it never was. Retries
back off: ``retry_s`` after the loss, then twice as long after each failed retry, up to
``max_retry_s`` (10 min), because a server that does not answer costs each try the HTTP timeout,
paid by whichever thread sends. A spool left behind by a crash is replayed by the next tracker for the
same run directory (``--resume``), or by ``replay_spool(path)``; an eval's, by ``uniremoval eval
replay FOLDER`` (the command its warning gives: ``Tracker(replay_hint=...)``).

A call the server answers with a refusal (HTTP 400: a metric or tag name MLflow does not accept, a
value too long) is not an outage: retrying cannot help, and spooled it would block every later call.
The refused names are left out with one warning each; the rest of the call and of the run is sent.

A trainer's tracker sends in the background (``background=True``): each call is queued and a single
worker thread sends (or spools) the calls in order, so a slow, hung or unreachable server never
holds the training loop; ``finish()`` waits until every queued call is sent or spooled.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SPOOL_NAME = "mlflow-spool.jsonl"
SPOOL_FILES = "mlflow-spool-files"
STAGING_NAME = ".mlflow-staging"  # in a background tracker's spool folder: artifacts queued to send
# MLflow's HTTP client retries a dead server for minutes by default; training cannot wait that long.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


PARAM_MAX_CHARS = 6000  # the longest param value MLflow stores (2.x and 3.x)

URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


SQLITE_HEADER = b"SQLite format 3\x00"


def uri_problem(uri: str) -> str | None:
    """Why MLflow cannot open `uri` (an unknown scheme, or an sqlite:/// path that is not an SQLite
    database file), or None; a local folder has no scheme."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else "file"  # postgresql+psycopg2://
    if scheme not in URI_SCHEMES:
        return f"unknown tracking URI scheme {scheme!r}; use one of {', '.join(URI_SCHEMES)}"
    if scheme == "file" and "://" not in uri and re.fullmatch(r"[\w.-]+:\d+(/\S*)?", uri):
        # host:port, taken for a folder store of that name (and MLFLOW_ALLOW_FILE_STORE would make one)
        return f"a server's address without its scheme? give http://{uri} (or https://)"
    if scheme == "file" and "://" not in uri and Path(uri).is_file():
        # a path to the database itself: MLflow would take it for a folder store
        return (f"{uri} is a file, and a path without a scheme names a folder store: for an SQLite database "
                f"give sqlite:///{uri}")
    if scheme == "file" and not _file_store_allowed():
        import mlflow

        return (f"a folder store, which MLflow {mlflow.__version__} no longer opens: use a database file "
                f"(e.g. sqlite:///mlflow.db), or set MLFLOW_ALLOW_FILE_STORE=true to keep the folder")
    return _sqlite_problem(uri) if scheme == "sqlite" else None


def _file_store_allowed() -> bool:
    """MLflow 3 refuses folder stores unless MLFLOW_ALLOW_FILE_STORE is set; older versions open them.
    Asked only for a folder URI (importing mlflow takes a second)."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:
        return True
    return bool(MLFLOW_ALLOW_FILE_STORE.get())


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///PATH`` URI (None for other URIs and in-memory databases)."""
    if uri[:10].lower() != "sqlite:///":
        return None
    rest = uri[10:].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def _sqlite_problem(uri: str) -> str | None:
    """A folder, or a file that is not an SQLite database, where the store's file should be: MLflow's
    SQLAlchemy store fails on it with a traceback. An empty file is a valid (new) database."""
    path = sqlite_path(uri)
    if path is None:
        return None
    if path.is_dir():
        return f"{path} is a folder, not an SQLite database file; name a file in it (e.g. sqlite:///{path / 'mlflow.db'})"
    if path.is_file():
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError:
            return None  # unreadable: MLflow's own error names the cause
        if head and head != SQLITE_HEADER:
            return (f"{path} exists but is not an SQLite database; choose another path for the MLflow store, "
                    "or delete that file if it is not needed")
        return None
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, so the database {path} cannot be created; choose another path"
            break
    return None


def check_uri(uri: str, where: str) -> str:
    """`uri` if MLflow can open it; `where` names the option or variable in the error. Found here, a
    typo stops the job at once instead of spooling every metric for the whole run as if the server
    were down, and a path that is not a database stops it before any work instead of at the end."""
    from uniremoval.errors import ConfigError

    problem = uri_problem(uri)
    if problem:
        example = " (e.g. http://host:5000 or sqlite:///mlflow.db)" if problem.startswith("unknown") else ""
        raise ConfigError(f"{where} {uri}: {problem}{example}")
    return uri


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else the embedded sqlite store."""
    if uri:
        return check_uri(uri, "tracking URI")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return check_uri(env, "MLFLOW_TRACKING_URI")
    return check_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}", "the default tracking store")


def set_terminated(client: Any, run_id: str, status: str | None = None) -> None:
    """client.set_terminated, with the "View run ... at" links MLflow prints for a tracking server sent
    to stderr: it writes them to stdout, which `eval --json -` and `report --format csv > r.csv` keep
    for their data alone. (A trainer's background worker calls this only while the main thread waits
    in finish(), so the swap of sys.stdout moves no other output.)"""
    with contextlib.redirect_stdout(sys.stderr):
        client.set_terminated(run_id, status)


def mlflow_client(uri: str | None = None):
    """An MlflowClient for `uri` (see resolve_uri) that gives up on an unreachable server within
    seconds: MLflow's own HTTP defaults retry for minutes (set the MLFLOW_HTTP_* variables to change)."""
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient

    resolved = resolve_uri(uri)
    try:
        return MlflowClient(tracking_uri=resolved)  # a local store is opened here; a server is not contacted
    except Exception as exc:  # MLflow and SQLAlchemy raise many kinds for a store they cannot open
        if not _is_local(resolved):
            raise
        from uniremoval.errors import UniremovalError

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UniremovalError(f"cannot open the MLflow store {resolved} ({first}); point the tracking URI "
                              "(tracking.uri, --tracking-uri or $MLFLOW_TRACKING_URI) at another path") from exc


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty(source: str | os.PathLike | None = None) -> bool | None:
    """Whether the tracked files of the package's source (`source`, default this package's folder)
    differ from the commit `git_commit` names: a run tagged with a commit may have run other code.
    None outside a git checkout."""
    where = Path(source) if source is not None else Path(__file__).resolve().parent
    try:
        # --no-optional-locks: a status refreshes the index under .git/index.lock, which would make
        # the user's own concurrent `git commit` in this checkout fail
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "--", "."],
                             cwd=where, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """`git_commit` and `git_dirty` ("true" when the package's tracked source has uncommitted edits)."""
    commit = git_commit()
    if not commit:
        return {}
    dirty = git_dirty()
    return {"git_commit": commit, **({} if dirty is None else {"git_dirty": str(dirty).lower()})}


def flatten(d: dict) -> dict[str, str]:
    """{'optim': {'lr': 1e-4}} -> {'optim.lr': '0.0001'}: MLflow params. A list of mappings (data.train's
    sources) goes by index, as dotted overrides name its entries (data.train.0.weight), so each is a param
    to filter and compare on; other lists as JSON."""
    from uniremoval.config import flatten_keys

    out: dict[str, str] = {}
    for k, v in (flatten_keys(d) if d else {}).items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(item, dict) and item for item in v):
            for i, item in enumerate(v):
                out.update(flatten({f"{k}.{i}": item}))
        else:
            out[k] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return out


# Validation metrics: val/<set>/<metric> per set, and val/mean/<metric> over the sets.
VAL_MEAN = "mean"


def val_metric(dataset: str, metric: str) -> str:
    """The MLflow key of a validation score: `val/<dataset>/<metric>` (dataset VAL_MEAN: the sets' mean)."""
    return f"val/{dataset}/{metric}"


# Tags an eval run carries for `report`: the row's label, the weights it scored (their sha256, or
# "input"), and the training run that made them; `ablation.<switch>` tags give the loss switches.
LABEL_TAG = "uniremoval.label"
MODEL_TAG = "uniremoval.model"
TRAIN_RUN_TAG = "uniremoval.train_run_id"
ABLATION_TAG_PREFIX = "ablation."


def ablation_tags(flags: dict[str, Any]) -> dict[str, str]:
    """{ablation.<switch>: 'true'|'false'} of the loss switches `flags`."""
    return {f"{ABLATION_TAG_PREFIX}{k}": str(v).lower() for k, v in flags.items()}


def tagged_ablation(tags: dict[str, str]) -> dict[str, str]:
    """The ablation tags among a run's `tags`, keyed by switch (the prefix removed)."""
    return {k.removeprefix(ABLATION_TAG_PREFIX): v for k, v in tags.items() if k.startswith(ABLATION_TAG_PREFIX)}


def run_tags(cfg: Any, stage: str, degradation: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    from uniremoval import __version__
    from uniremoval.config import ablation_flags, config_hash

    tags = {"stage": stage, "config_hash": config_hash(cfg), "uniremoval_version": __version__}
    if degradation:
        tags["degradation"] = degradation
    tags.update(ablation_tags(ablation_flags(cfg)))
    features = getattr(cfg, "features", None)
    # phi (VGG-19) is built only for the image-level term: a row without it (BKT, BDA) never used the
    # random weights its config names, and is not marked as measured in an untrained feature space.
    loss = getattr(cfg, "loss", None)
    uses_phi = bool(getattr(loss, "use_icl", False) or getattr(loss, "use_eicl", False))
    if features is not None and uses_phi and getattr(features, "weights", None) == "random":
        tags["vgg_weights"] = "random"  # contrastive terms measured in an untrained feature space
    tags.update(git_tags())
    tags.update(getattr(cfg.tracking, "tags", {}) or {})
    tags.update(extra or {})
    return tags


class Tracker:
    """One MLflow run. All methods swallow connection errors into the spool (see module doc)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str],
                 run_id: str | None = None, spool_dir: str | os.PathLike | None = None,
                 retry_s: float = 30.0, max_retry_s: float = 600.0, background: bool = False,
                 replay_hint: str | None = None, new_run_if_missing: bool = False,
                 start_ms: int | None = None) -> None:
        self.uri = uri
        # When the job started: a run created later (the server came up mid-run, or a spool's replay)
        # starts then, not at its creation, or its duration and start column were wrong.
        self.start_ms = start_ms if start_ms is not None else int(time.time() * 1000)
        # How the user sends the spool later, when the job ends offline (default: --resume or replay_spool)
        self.replay_hint = replay_hint
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags)
        self.run_id = run_id
        # A run continued by id that this store does not hold: a new one here (a resume), or, when not
        # asked (a spool's replay), the calls fail as before.
        self._run_found = run_id is None or not new_run_if_missing
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.failed_retries = 0  # since the server was last reached: doubles the wait before the next
        self.client = mlflow_client(uri)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        spool_root = Path(spool_dir) if spool_dir is not None else Path(tempfile.gettempdir())
        self.spool_path = spool_root / SPOOL_NAME
        self.spool_files = spool_root / SPOOL_FILES
        self.offline = False
        self._warned = False
        self._refused: set[tuple[str, str]] = set()  # (call, name) the server refused: never sent again
        self._last_try = 0.0
        self.new_run = False
        self._queue: queue.Queue | None = None  # background mode: calls waiting for the worker
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._staging: Path | None = None  # background mode: copies of artifacts waiting in the queue
        if self.spool_path.exists():
            self.offline = True  # a previous process left calls behind: replay them first
            if start_ms is None and run_id is None:  # ...and the run they belong to started with that process
                self.start_ms = int((_spool_head(self.spool_path) or {}).get("start_ms") or self.start_ms)
        try:  # in the caller's thread: the run id is known when the constructor returns (checkpoints keep it)
            self._ensure_run()
            if self.offline:
                self.flush()
        # Any client error means: tracking is unavailable (a wrong address is refused at the job's start,
        # refuse_non_mlflow_server: here it spools, as a proxy's 404 while the server restarts would)
        except Exception as exc:  # noqa: BLE001
            self._went_offline(exc)
        if background:
            self._start_worker()

    # ------------------------------------------------------------------ public API
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._call({"op": "metrics", "metrics": clean, "step": int(step), "ts": int(time.time() * 1000)})

    def log_params(self, params: dict[str, Any]) -> None:
        values = {k: str(v) for k, v in params.items()}
        if long := [k for k, v in values.items() if len(v) > PARAM_MAX_CHARS]:
            # MLflow refuses a longer value: cut, and marked as cut (a list of shard paths cut short read as
            # valid JSON until it failed to parse); the whole value is in the run's config.yaml
            for k in long:
                note = f" ... [cut: {len(values[k])} characters]"
                values[k] = values[k][:PARAM_MAX_CHARS - len(note)] + note
            warnings.warn(f"MLflow param(s) {', '.join(long)} over its {PARAM_MAX_CHARS} characters: logged cut "
                          "short (marked '[cut: ...]'); a run's config.yaml artifact holds the whole config",
                          RuntimeWarning, stacklevel=2)
        self._call({"op": "params", "params": values})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call({"op": "text", "text": text, "file": artifact_file})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_config(self, cfg: Any) -> None:
        from uniremoval.config import config_to_dict, config_to_yaml

        self.log_params(flatten(config_to_dict(cfg)))
        self.log_text(config_to_yaml(cfg), "config.yaml")

    def log_image_grid(self, tag: str, images: Sequence[Any], step: int) -> None:
        """Save an (input | output | target) grid of [-1, 1] NCHW tensors as images/<tag>-step<N>.png."""
        png = image_grid_png(images)
        tmp = Path(tempfile.mkdtemp(prefix="uniremoval-grid-"))
        try:
            file = tmp / f"{tag}-step{step:08d}.png"
            file.write_bytes(png)
            self.log_artifact(file, "images")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def flush(self) -> bool:
        """Replay the spool; True when nothing is left in it."""
        self._last_try = time.time()
        if not self.spool_path.exists():
            self.offline = False
            return True
        lines = self.spool_path.read_text().splitlines()
        ops = []
        for line in lines:
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: lost, never replayed half
                continue
        done = 0
        try:
            self._ensure_run()
            for op in ops:
                self._apply_or_leave_out(op)
                done += 1
        except Exception as exc:  # noqa: BLE001
            self._rewrite_spool(ops[done:])
            self._went_offline(exc)
            return False
        self.spool_path.unlink(missing_ok=True)
        shutil.rmtree(self.spool_files, ignore_errors=True)
        self.failed_retries = 0
        if self.offline and self._warned:
            print(f"MLflow at {self.uri} is reachable again: {done} spooled call(s) sent", file=sys.stderr)
        self.offline = False
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the run; in background mode, first wait until every call is sent or spooled."""
        self._call({"op": "terminate", "status": status}, force_retry=True)
        self.close()
        if self.offline:
            how = (f"send them with `{self.replay_hint}` once it is reachable" if self.replay_hint else
                   f"they are sent on --resume, or with uniremoval.tracking.replay_spool('{self.spool_path}')")
            warnings.warn(f"MLflow at {self.uri} is unreachable: this run's metrics stay in {self.spool_path}; {how}",
                          RuntimeWarning, stacklevel=2)

    def wait(self) -> None:
        """Block until every call made so far is sent to MLflow or spooled (no-op when synchronous)."""
        if self._queue is not None:
            self._queue.join()
        self._raise_worker_error()

    def close(self) -> None:
        """Send what is queued, then stop the background worker (also run at interpreter exit)."""
        q, worker = self._queue, self._worker
        if q is None or worker is None:
            return
        q.put(None)
        worker.join()
        self._queue = self._worker = None
        atexit.unregister(self.close)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._raise_worker_error()

    # ------------------------------------------------------------------ internals
    def _start_worker(self) -> None:
        self._queue = queue.Queue(maxsize=10_000)  # a full queue makes the caller wait rather than grow memory
        # With a spool folder (a trainer's run folder, one job at a time) the staging folder is a fixed
        # one inside it, emptied here: a job killed with artifacts queued (kill -9, a node lost) left a
        # /tmp/uniremoval-mlflow-* folder per kill, with copies of the images and weights it was sending;
        # its resume now removes them. Without a spool folder: a fresh temporary, as before.
        # (A spool folder that cannot be written: a temporary too; the spool's own error is the worker's.)
        self._staging = None
        if self.spool_dir is not None:
            staging = self.spool_dir / STAGING_NAME
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.mkdir(parents=True)
                self._staging = staging
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="uniremoval-mlflow-"))
        self._worker = threading.Thread(target=self._work, name="uniremoval-mlflow", daemon=True)
        self._worker.start()
        atexit.register(self.close)  # a process that ends without finish() still sends what it queued

    def _work(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                op, force_retry, staged = item
                try:
                    self._send(op, force_retry)
                except BaseException as exc:  # noqa: BLE001 (e.g. the disk is full while spooling: raised to the caller)
                    self._worker_error = self._worker_error or exc
                finally:
                    if staged is not None:
                        shutil.rmtree(staged, ignore_errors=True)
            finally:
                q.task_done()

    def _raise_worker_error(self) -> None:
        exc, self._worker_error = self._worker_error, None
        if exc is not None:
            raise RuntimeError(f"MLflow tracking failed in the background (spool {self.spool_path}): {exc}") from exc

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            if not self._run_found:
                self._find_run()
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(self.experiment, artifact_location=_artifact_root(self.uri))
            except Exception:
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, start_time=self.start_ms, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self.new_run = True
        self._run_found = True

    def _find_run(self) -> None:
        """The run a resume continues must be in this store. A checkpoint trained against another one
        (another server, or the default sqlite:///mlflow.db read from another folder) had every call
        answered 'not found', taken for an outage: spooled for ever, its replay failing the same way.
        The store answered: the job continues as a new run here, tagged resumed_from_run. So does a run
        deleted in the UI (the store refuses every call to it as not active: all would be dropped)."""
        try:
            deleted = self.client.get_run(self.run_id).info.lifecycle_stage == "deleted"
        except Exception as exc:
            if not _not_found(exc):
                raise  # an outage: the caller spools, and the run is looked up again at the next try
            deleted = None
        if deleted is False:
            self._run_found = True
            return
        old, self.run_id = self.run_id, None
        self.tags = {**self.tags, "resumed_from_run": str(old)}
        self._ensure_run()
        why = ("was deleted from " if deleted else "is not in ") + str(self.uri)
        warnings.warn(f"MLflow run {old} (the run this checkpoint was logged to) {why}, the tracking store used now"
                      + ("" if deleted else " (trained against another tracking.uri, or the default "
                         "sqlite:///mlflow.db of another working folder?)")
                      + f"; this job logs to a new run {self.run_id} there, tagged resumed_from_run={old}",
                      RuntimeWarning, stacklevel=3)

    def _call(self, op: dict[str, Any], force_retry: bool = False) -> None:
        if self._queue is None:
            self._send(op, force_retry)
            return
        self._raise_worker_error()
        staged = None
        if op["op"] == "artifact":  # the caller may delete the file as soon as this returns
            assert self._staging is not None
            src = Path(op["path"])
            staged = self._staging / uuid.uuid4().hex[:12]
            staged.mkdir()
            shutil.copy2(src, staged / src.name)
            op = {**op, "path": str(staged / src.name)}
        self._queue.put((op, force_retry, staged))

    def _send(self, op: dict[str, Any], force_retry: bool = False) -> None:
        if self.offline:
            self._spool(op)
            if force_retry or time.time() - self._last_try >= self.retry_wait():
                self.flush()
            return
        try:
            self._ensure_run()
            self._apply_or_leave_out(op)
        except Exception as exc:  # noqa: BLE001
            self._went_offline(exc)
            self._spool(op)

    def _apply_or_leave_out(self, op: dict[str, Any]) -> None:
        """Apply `op`; what the server refuses is left out with a warning (see the module doc). A
        refused batch of metrics, params or tags is sent again one name at a time, so that only the
        refused names are lost. Any other error propagates: the caller spools."""
        field = op["op"] if op["op"] in _NAMED_OPS else None
        if field is not None and self._refused:  # a name refused once (each validation's) is not tried again
            op = {**op, field: {k: v for k, v in op[field].items() if (op["op"], k) not in self._refused}}
            if not op[field]:
                return
        try:
            self._apply(op)
            return
        except Exception as exc:
            if not _refused(exc):
                raise
            whole_refusal = exc
        if field is None:  # one text, artifact or status: nothing to split
            self._warn_refused(op["op"], op.get("file") or op.get("path") or op["op"], whole_refusal)
            return
        for name, value in op[field].items():
            try:
                self._apply({**op, field: {name: value}})
            except Exception as exc:
                if not _refused(exc):
                    raise
                self._warn_refused(op["op"], name, exc)

    def _warn_refused(self, kind: str, name: str, exc: BaseException) -> None:
        if (kind, name) in self._refused:
            return
        self._refused.add((kind, name))
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = {"metrics": "metric", "params": "param", "tags": "tag"}.get(kind, kind)
        warnings.warn(f"MLflow at {self.uri} refused the {what} {name!r} ({why[:300]}); it is left out, the rest "
                      f"of the run is logged", RuntimeWarning, stacklevel=4)

    def retry_wait(self) -> float:
        """Seconds between the last try and the next replay: retry_s, doubled per failed retry, capped."""
        return min(self.retry_s * 2.0 ** self.failed_retries, max(self.retry_s, self.max_retry_s))

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        kind, run_id = op["op"], self.run_id
        assert run_id is not None
        if kind == "metrics":
            ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(ms), 1000):
                self.client.log_batch(run_id, metrics=ms[i:i + 1000])
        elif kind == "params":
            existing = self.client.get_run(run_id).data.params
            ps = [Param(k, v[:PARAM_MAX_CHARS]) for k, v in op["params"].items() if k not in existing]
            for i in range(0, len(ps), 100):
                self.client.log_batch(run_id, params=ps[i:i + 100])
        elif kind == "tags":
            for k, v in op["tags"].items():
                self.client.set_tag(run_id, k, v)
        elif kind == "text":
            self.client.log_text(run_id, op["text"], op["file"])
        elif kind == "artifact":
            self.client.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "running":
            self.client.update_run(run_id, status="RUNNING")
        elif kind == "terminate":
            set_terminated(self.client, run_id, op["status"])
        elif kind == "run":
            pass  # the identity of a run that did not exist yet: _ensure_run created it
        else:
            raise ValueError(f"unknown spooled MLflow call {kind!r}")

    def _spool(self, op: dict[str, Any]) -> None:
        if op["op"] == "artifact":  # keep a copy: the original is often a temporary file
            src = Path(op["path"])
            dst = self.spool_files / uuid.uuid4().hex[:8] / src.name  # the artifact keeps its name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            op = {**op, "path": str(dst)}
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a") as fh:
            if fh.tell() and not _ends_with_newline(self.spool_path):
                # a line a kill -9 cut short: this op starts a line of its own, or both would be lost
                fh.write("\n")
            if self.run_id is None and fh.tell() == 0:
                # No run yet: record what to create, so replay_spool can send the calls on its own.
                head = {"op": "run", "experiment": self.experiment, "run_name": self.run_name, "tags": self.tags,
                        "start_ms": self.start_ms}
                fh.write(json.dumps({**head, "run_id": None, "uri": self.uri}) + "\n")
            # the server is recorded too: replay_spool sends to it, not to wherever the shell points
            fh.write(json.dumps({**op, "run_id": self.run_id, "uri": self.uri}) + "\n")
            fh.flush()

    def _rewrite_spool(self, ops: list[dict[str, Any]]) -> None:
        from uniremoval.io import atomic_write_text

        # Stamp the run created meanwhile (if any), so a later replay does not create a second one.
        atomic_write_text(self.spool_path, "".join(json.dumps({**o, "run_id": o.get("run_id") or self.run_id}) + "\n"
                                                   for o in ops))

    def _went_offline(self, exc: BaseException) -> None:
        was_offline, self.offline = self.offline, True
        self._last_try = time.time()
        if was_offline:
            self.failed_retries += 1
        if not was_offline or not self._warned:  # warn at each loss of the server, not per call
            self._warned = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            later = f"`{self.replay_hint}` sends them later" if self.replay_hint else "sent when the server is back"
            warnings.warn(f"MLflow at {self.uri} is unreachable ({first[:200]}); the job continues and "
                          f"metrics are spooled to {self.spool_path}, {later}",
                          RuntimeWarning, stacklevel=3)


# What MLflow refuses in a metric, param or tag name, besides letters and digits (mlflow.utils.validation).
MLFLOW_NAME_UNSAFE = re.compile(r"[^\w\-. :/]")
# A dataset eval scores also names files and folders (-<name>.json, <save-images>/<name>/): no '/'.
_FILE_NAME_UNSAFE = re.compile(r"[^\w\-. :]")


def dataset_name_problem(name: str, slash: bool = True) -> str | None:
    """Why `name` cannot name a dataset in metric names `<prefix>/<name>/<metric>` (MLflow refuses other
    characters, and '.', '..' or empty parts between '/'s), or, without `slash`, in a file name too;
    None when it can. `dataset_name_fix` says what to use instead."""
    unsafe = MLFLOW_NAME_UNSAFE if slash else _FILE_NAME_UNSAFE
    if not name.strip():
        return "cannot be empty"
    if bad := sorted(set(unsafe.findall(name))):
        return f"cannot hold {' '.join(bad)}"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "cannot be '.' or '..', nor hold such or empty parts between '/'s"
    return None


def dataset_name_fix(name: str, slash: bool = True) -> str:
    """What to use instead (for messages): the characters allowed, and `name` with the others as '_'."""
    unsafe = MLFLOW_NAME_UNSAFE if slash else _FILE_NAME_UNSAFE
    parts = [p.lstrip(".") or "_" for p in unsafe.sub("_", name).split("/")] if name.strip() else ["dataset"]
    allowed = "letters, digits, spaces and _ - . :" + (" /" if slash else "")
    return f"use {allowed}, e.g. {'/'.join(parts)!r}"

# The calls that carry several named values, each in the field of the call's own name.
_NAMED_OPS = ("metrics", "params", "tags")


def _not_found(exc: BaseException) -> bool:
    """The store answered that what was asked for (a run) does not exist (HTTP 404)."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(exc, MlflowException) and exc.get_http_status_code() == 404 and not _not_mlflow(exc)


def _not_mlflow(exc: BaseException) -> bool:
    """A server answered, but has no MLflow API at this address (HTTP 404 for the endpoint itself, not
    for a run or experiment): a wrong path, as behind a proxy that serves MLflow under a prefix."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(exc, MlflowException) and exc.error_code == "ENDPOINT_NOT_FOUND"


def not_mlflow_error(uri: str, exc: BaseException) -> Exception:
    """The error for `_not_mlflow`: spooling would keep every call of the run for a server that is not
    there (its replay fails the same way), so the job stops before it starts."""
    from uniremoval.errors import ConfigError

    endpoint = re.search(r"endpoint (\S+)", str(exc))
    at = f" ({endpoint.group(1)} answered 404 Not Found)" if endpoint else ""
    return ConfigError(f"tracking URI {uri}: a server answers there, but not MLflow's API{at}; check the address "
                       "and its path (e.g. http://host:5000, or the prefix a proxy serves MLflow under); "
                       "nothing was run")


def refuse_non_mlflow_server(uri: str, retry_s: float = 3.0) -> None:
    """Ask a tracking server before any work (train, cache and eval call this on every rank at their
    start): one that answers without MLflow's API is refused (`not_mlflow_error`), once it does so twice
    `retry_s` apart (a proxy answers 404 while the server behind it restarts); one that does not answer
    is an outage, left to the spool. A run's Tracker, created later, spools in either case."""
    if _is_local(uri):
        return
    for attempt in range(2):
        try:
            mlflow_client(uri).search_experiments(max_results=1)
            return
        except Exception as exc:  # anything else: unreachable now, the run spools
            if not _not_mlflow(exc):
                return
            if attempt:
                raise not_mlflow_error(uri, exc) from exc
        time.sleep(retry_s)


def _refused(exc: BaseException) -> bool:
    """The server (or MLflow's own check before sending) refused the call as invalid (HTTP 400);
    an unreachable, failing or overloaded server is an outage instead (5xx, 429, connection errors)."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    # MLflow's own check of an artifact path ('a/../b') raises INTERNAL_ERROR (500), not a 400: a refusal too,
    # or the run was spooled as if the server were down and its replay failed the same way for ever.
    return isinstance(exc, MlflowException) and (exc.get_http_status_code() == 400
                                                 or str(exc.message).startswith("Invalid artifact path"))


def stopped_status(exc: BaseException) -> str:
    """The MLflow status of a run whose job stopped on `exc`: KILLED when interrupted (Ctrl-C, or a
    scheduler's signal as cli.main raises it), FAILED on an error."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def finishing(tracker: Tracker | None, done: str | None = "FINISHED") -> Iterator[Tracker | None]:
    """Finish `tracker`'s run when the block ends: `done` (None: leave it open), KILLED when
    interrupted (Ctrl-C, or SIGTERM as cli.main raises it), FAILED on an error; a stopped job never
    leaves it RUNNING."""
    try:
        yield tracker
    except BaseException as exc:
        if tracker is not None:
            if stopped_status(exc) == "FAILED":  # why, beside the status (it was only on the job's stderr)
                tracker.set_tags({ERROR_TAG: stop_reason(exc)})
            tracker.finish(stopped_status(exc))
        raise
    if tracker is not None and done is not None:
        tracker.finish(done)


ERROR_TAG = "error"  # a FAILED run's reason: the exception's type and first line


def stop_reason(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 500 characters) for a failed run's ERROR_TAG."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:500]


def _artifact_root(uri: str) -> str | None:
    # The embedded sqlite store keeps artifacts beside it in ./mlruns; servers choose their own.
    db = sqlite_path(uri)
    return (db.parent / "mlruns").resolve().as_uri() if db is not None else None


def _spool_run_id(spool_dir: Path) -> str | None:
    """The run id recorded in a spool left by a previous process, if any."""
    path = spool_dir / SPOOL_NAME
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            rid = json.loads(line).get("run_id")
        except json.JSONDecodeError:
            continue
        if rid:
            return rid
    return None


def start_run(cfg: Any, run_name: str, stage: str, degradation: str | None = None, run_id: str | None = None,
              extra_tags: dict[str, str] | None = None, run_dir: str | os.PathLike | None = None,
              enabled: bool = True, background: bool = False) -> Tracker | None:
    """Open (or, with run_id, continue) the MLflow run of a stage; None when tracking is disabled.

    A new run gets its tags, the flattened config as params and config.yaml. Call on the main
    process only. ``background=True`` sends from a worker thread (training loops; see module doc).
    """
    if not enabled or not cfg.tracking.enabled:
        return None
    from uniremoval.config import config_hash

    spool_dir = Path(run_dir) if run_dir is not None else Path(cfg.run_dir)
    run_id = run_id or _spool_run_id(spool_dir)
    uri = resolve_uri(cfg.tracking.uri)
    tracker = Tracker(uri, cfg.tracking.experiment or cfg.project, cfg.tracking.run_name or run_name,
                      run_tags(cfg, stage, degradation, extra_tags), run_id=run_id, spool_dir=spool_dir,
                      background=background, new_run_if_missing=True)
    with finishing(tracker, done=None):  # stopped while logging the config: not RUNNING forever
        if tracker.new_run or (tracker.run_id is None):
            tracker.log_config(cfg)
        elif run_id is not None:
            tracker._call({"op": "running"})  # a preempted run was marked KILLED; it lives on
            tracker.set_tags({"resumed": "true", "resumed_config_hash": config_hash(cfg)})
    return tracker


RUN_ARTIFACT_PREFIX = "runs:/"
RUNS_DIR_ENV = "UNIREMOVAL_RUNS_DIR"
DEFAULT_RUNS_DIR = "~/.cache/uniremoval/runs"


def is_run_artifact(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(RUN_ARTIFACT_PREFIX)


def fetch_run_checkpoint(spec: str, tracking_uri: str | None = None, refresh: bool = True) -> Path:
    """The local weights file of `runs:/<run id>/<artifact path>` (what a finished training run logs:
    runs:/<id>/weights/last), with its .json (an official .pth alone), kept in $UNIREMOVAL_RUNS_DIR
    (default ~/.cache/uniremoval/runs)/<run id>/. The store is `tracking_uri`, else
    $MLFLOW_TRACKING_URI, else ./mlflow.db.

    `refresh` (the entry points: eval, restore, a stage's check_inputs) compares the copy with what
    the run holds now (a resumed run logs new weights under the same name): the small .json, or an
    official file's size; the weights are downloaded again only when they differ. A store that cannot
    be reached leaves the copy in use, with a warning (a node without access to the server).
    Without `refresh` (every later load in the same job) the copy is used as it is. Processes fetching
    at once each download to a temporary name and rename it into place."""
    from uniremoval.errors import CheckpointError

    run_id, _, path = spec[len(RUN_ARTIFACT_PREFIX):].strip("/").partition("/")
    if not run_id or run_id in (".", "..") or not path or ".." in path.split("/"):
        raise CheckpointError(f"checkpoint {spec}: expected runs:/<run id>/<artifact path>, e.g. "
                              f"runs:/<run id>/weights/last")
    if path.endswith((".pth", ".pt")):
        files = [path]
    else:
        base = path.removesuffix(".safetensors").removesuffix(".json")
        files = [base + ".safetensors", base + ".json"]
    root = Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).expanduser() / run_id
    local = [root / f for f in files]
    have = all(p.is_file() for p in local)
    if have and not refresh:
        return local[0]
    uri = resolve_uri(tracking_uri)
    fetched: list[Path] = []
    failing = files[0]  # the file the error is about
    try:
        client = mlflow_client(uri)
        if have and _copy_is_current(client, run_id, files, local):
            return local[0]
        for file, dst in zip(files, local):
            failing = file
            _download_into(client, run_id, file, dst)
            fetched.append(dst)
    except Exception as exc:  # MLflow raises several kinds for a store, run or artifact it cannot reach
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if have:
            warnings.warn(f"checkpoint {spec}: cannot check it against {uri} ({first}); using the copy in {root}",
                          RuntimeWarning, stacklevel=2)
            return local[0]
        # Nothing of a failed first fetch is kept: a weights file without its .json, or the empty
        # <run id>/weights/ folders a mistyped run id left in the runs folder.
        for done in fetched:
            done.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in local} | {root}, key=lambda f: len(f.parts), reverse=True):
            for empty in (folder, *folder.parents):
                if empty == root.parent or not empty.is_dir() or any(empty.iterdir()):
                    break
                empty.rmdir()
        raise CheckpointError(f"checkpoint {spec}: cannot fetch {failing} of run {run_id} from {uri} ({first}); "
                              f"check the run id and that the run logged its weights (tracking.log_weights), "
                              f"or give a local path") from exc
    return local[0]


def _copy_is_current(client: Any, run_id: str, files: list[str], local: list[Path]) -> bool:
    """Whether the local copy is what the run holds now: the same .json (it names the step and the
    run of the weights beside it), or for an official file alone, the same size."""
    meta = next((i for i, f in enumerate(files) if f.endswith(".json")), None)
    if meta is None:
        folder, _, name = files[0].rpartition("/")
        logged = {Path(i.path).name: i.file_size for i in client.list_artifacts(run_id, folder or None)}
        return logged.get(name) == local[0].stat().st_size
    with tempfile.TemporaryDirectory(dir=local[meta].parent, prefix=".fetch-") as tmp:
        return Path(client.download_artifacts(run_id, files[meta], tmp)).read_bytes() == local[meta].read_bytes()


def _download_into(client: Any, run_id: str, file: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fetch-") as tmp:
        os.replace(client.download_artifacts(run_id, file, tmp), dst)


def replay_spool(spool_path: str | os.PathLike, uri: str | None = None) -> bool:
    """Send a spool left behind to its run, on the server it was meant for (recorded in the spool;
    `uri` sends it elsewhere); True when it is empty afterwards."""
    return send_spool(spool_path, uri)[0]


def send_spool(spool_path: str | os.PathLike, uri: str | None = None,
               adopt: str | None = None, keep_experiment: bool = False) -> tuple[bool, Tracker]:
    """replay_spool, also returning the tracker that sent it (its run_id, client). `adopt`: a training
    run whose experiment (and parent) a run created only now takes when this store holds it (an eval
    that could not look the run up when it was spooled fell back to the default experiment);
    `keep_experiment` (an experiment the eval was given): the run stays in it, nested under `adopt`
    only when that run is in the same experiment."""
    path = Path(spool_path)
    if uri is None:
        uri = next((op["uri"] for op in _read_ops(path) if op.get("uri")), None)
    run_id = _spool_run_id(path.parent)
    if run_id is not None:
        tracker = Tracker(resolve_uri(uri), "unused", "unused", {}, run_id=run_id, spool_dir=path.parent)
        return tracker.flush(), tracker
    head = _spool_head(path)
    if head is None:
        raise ValueError(f"{path}: no run id recorded; resume the run instead (--resume auto)")
    # The run was never created (the server was down from the start): create it now, then replay.
    experiment, tags = head["experiment"], dict(head.get("tags") or {})
    if adopt:
        # not in this store, or unreachable (flush says so): as spooled
        with contextlib.suppress(Exception):
            client = mlflow_client(resolve_uri(uri))
            parent = client.get_run(adopt)
            theirs = client.get_experiment(parent.info.experiment_id).name
            if not keep_experiment or theirs == experiment:
                experiment = theirs
                tags["mlflow.parentRunId"] = adopt
    tracker = Tracker(resolve_uri(uri), experiment, head["run_name"], tags, spool_dir=path.parent,
                      start_ms=head.get("start_ms"))  # (spools of older versions: created now)
    return tracker.flush(), tracker


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _spool_head(path: Path) -> dict[str, Any] | None:
    """The spool's record of the run to create (written when the server was down from the start), or None."""
    return next((op for op in _read_ops(path) if op.get("op") == "run"), None)


def _read_ops(path: Path) -> list[dict[str, Any]]:
    ops = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return ops


def image_grid_png(images: Sequence[Any], max_rows: int = 4) -> bytes:
    """Rows = samples (up to max_rows), columns = the given tensors ([-1, 1], NCHW, same H, W)."""
    import torch

    from uniremoval.data.transforms import encode_png

    cols = []
    for t in images:
        t = t.detach().float().cpu()[:max_rows]
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        cols.append(t[:, :3])
    h = min(c.shape[2] for c in cols)
    w = min(c.shape[3] for c in cols)
    rows = [torch.cat([c[i, :, :h, :w] for c in cols], dim=2) for i in range(min(c.shape[0] for c in cols))]
    grid = torch.cat(rows, dim=1)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return encode_png(arr, level=6)  # a few small grids per run: PIL's default, the smaller file
