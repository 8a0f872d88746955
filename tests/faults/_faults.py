"""Shared helpers for the fault suite: tiny shards (from tests/_fixtures.py), configs, CLI subprocesses,
kill-at-marker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared with tests/test_teacher_cache.py; re-exported because the fault tests import them from here.
from _fixtures import png, write_shards  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
GATE = Path(__file__).resolve().parent / "gate.py"


def tiny_teacher_cfg(root: Path, *, project: str, steps: int, keep_last: int, mlflow: bool = True, **over) -> dict:
    """A haze teacher run on `root/shards/syn`: tiny MPRNet, 32 px crops, a checkpoint every 2 steps."""
    cfg = {
        "stage": "teacher", "project": project, "name": "teacher-haze", "output_dir": str(root / "outputs"),
        "degradation": "haze", "model": {"preset": "tiny"},
        "data": {"degradations": ["haze"], "batch_size": 2, "crop_size": 32, "num_workers": 0, "shuffle_buffer": 4,
                 "pin_memory": False,
                 "train": [{"name": "syn", "shards": str(root / "shards" / "syn"), "degradation": "haze"}]},
        "optim": {"lr": 2e-3},
        "train": {"epochs": 1, "steps_per_epoch": steps, "log_every": 2, "val_every": 100, "image_every": 100,
                  "seed": 5, "cpu": True},
        "checkpoint": {"every_steps": 2, "keep_last": keep_last},
    }
    if not mlflow:  # (not `tracking`: callers pass tracking={...} through **over)
        cfg["tracking"] = {"enabled": False}
    cfg.update(over)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("MLFLOW_TRACKING_URI", None)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MKL_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "default"
    e.update(extra)
    return e


def cli(args: list[str], cwd: Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m uniremoval ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "uniremoval", *args], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout, check=False)


class Job:
    """`python -m uniremoval ARGS` in its own process group, stderr to a file, for fault injection."""

    def __init__(self, args: list[str], cwd: Path, **extra_env: str) -> None:
        self.args, self.log = args, cwd / f".job-{os.getpid()}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "uniremoval", *args], cwd=cwd, env=env(**extra_env),
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return self.log.read_text()

    def until(self, ready: Callable[[], bool], timeout: float = 300) -> None:
        """Poll `ready()` (a file the job writes); fail if the job ends or stalls first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[:2]} exited ({self.proc.returncode}) before the marker:\n"
                                     f"{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.args[:2]}: no marker after {timeout} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.01)  # polling interval, not a wait for the job

    def kill(self) -> int:
        """SIGKILL the whole group (the job and its children, as a scheduler does)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args[:2]} still running after {timeout} s:\n{self.stderr()[-3000:]}")
        return rc, self.stderr()


def kill9_when(args: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 300,
               **extra_env: str) -> tuple[int, str]:
    """Run the job, SIGKILL its process group the moment `ready()` is true; (returncode, stderr)."""
    job = Job(args, cwd, **extra_env)
    try:
        job.until(ready, timeout)
    finally:
        rc = job.kill()
    return rc, job.stderr()


def pick(choices: list[int], what: str) -> int:
    """A random kill point, printed (pytest shows it on failure) so a failure can be replayed with
    UNIREMOVAL_FAULT_SEED."""
    seed = int(os.environ.get("UNIREMOVAL_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))
    value = random.Random(f"{seed}-{what}").choice(choices)
    print(f"fault seed {seed}: {what} killed at {value}")
    return value


def tar_keys(path: Path) -> list[str]:
    from uniremoval.data.shard_stream import iter_shard

    return [k for k, _ in iter_shard(str(path))]


def dataset_keys(folder: Path) -> list[str]:
    """Every sample key of a shard dataset, through its manifest (duplicates kept)."""
    m = json.loads((folder / "manifest.json").read_text())
    keys: list[str] = []
    for e in m["shards"]:
        got = tar_keys(folder / e["name"])
        assert len(got) == e["samples"], f"{e['name']}: {len(got)} samples, manifest says {e['samples']}"
        keys += got
    return keys
