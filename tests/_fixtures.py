"""Helpers shared by several test modules (not a test module itself): a one-thread torch setting,
tiny haze-like webdataset shards, and a real `mlflow server` to start and stop.

Test modules import it as `from _fixtures import ...`; tests/ is on sys.path (each importer puts it
there, as pytest also does for this layout)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

H, W = 40, 48  # not multiples of 8 (MPRNet pads) nor of the 16 px feature cell (partial cells dropped)
MLFLOW = Path(sys.executable).parent / "mlflow"


def one_torch_thread() -> Iterator[None]:
    """Body of an autouse fixture: one torch thread for the test, the previous count restored after.

    On a shared 2-core machine torch's default thread pool oversubscribes: tiny convolutions ran
    10-100x slower with 2 OpenMP threads per process. Register it in a module with
    `one_thread = pytest.fixture(autouse=True)(one_torch_thread)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # lossless at any level; 1 is fastest
    return buf.getvalue()


def write_shards(folder: Path, prefix: str, n_shards: int, per_shard: int, *, degradation: str = "haze",
                 domain: str = "synthetic", split: str = "train", seed: int = 0, paired: bool = True) -> list[str]:
    """Haze-like pairs (input = 0.5 * clean + 0.35; in [-1, 1] terms input = 0.5 * target + 0.2) of
    H x W, in webdataset shards with a manifest beside them. Returns the keys in order."""
    import webdataset as wds

    from uniremoval.io import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, entries = [], []
    for s in range(n_shards):
        name = f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as tw:
            for i in range(per_shard):
                base = rng.uniform(0.1, 0.9, size=(1, 1, 3))
                clean = np.clip(base + 0.25 * rng.standard_normal((H, W, 3)).cumsum(1) / 6, 0, 1)
                hazy = clean * 0.5 + 0.35
                key = f"{prefix}_{s}_{i}"
                keys.append(key)
                sample: dict[str, Any] = {
                    "__key__": key, "input.png": png((hazy * 255).round().astype(np.uint8)),
                    "json": {"degradation": degradation, "domain": domain, "source": "test", "split": split,
                             "height": H, "width": W}}
                if paired:
                    sample["target.png"] = png((clean * 255).round().astype(np.uint8))
                tw.write(sample)
        entries.append({"name": name, "samples": per_shard, "bytes": (folder / name).stat().st_size,
                        "sha256": sha256_file(folder / name)})
    n = n_shards * per_shard
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "dataset": prefix, "shards": entries,
        "counts": {"total": n, "degradation": {degradation: n}, "domain": {domain: n}, "split": {split: n}}}))
    return keys


def run_with_logged_weights(root: Path, name: str, meta: dict[str, Any]) -> tuple[Path, str, str]:
    """A tiny MPRNet saved as `root/run/<name>` and logged as a training run logs it (weights/<name>
    .safetensors + .json) to a sqlite store under `root`: (local weights file, store URI, run id)."""
    import torch
    from mlflow.tracking import MlflowClient

    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    torch.manual_seed(0)
    local = save_checkpoint(root / "run" / name, MPRNet("tiny").eval(), meta)
    uri = f"sqlite:///{root / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("logged-weights", artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(exp).info.run_id
    for f in (local, local.with_suffix(".json")):
        client.log_artifact(run_id, str(f), "weights")
    return local, uri, run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (sqlite store and artifacts under `root`) on 127.0.0.1:`port`, in its own
    session; returns once /health answers, or fails the test with the end of root/server.log."""
    with open(root / "server.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 240  # ~9 s on an idle machine; far longer under load
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    stop_server(proc, signal.SIGKILL)
    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Send `sig` to the server's process group (its own session: the server and its worker) and
    reap it; SIGKILL if it is still there after `grace` seconds."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        proc.wait()  # already gone: just reap it
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class GatedProxy:
    """A TCP forwarder to 127.0.0.1:`upstream` that holds every byte while its gate is closed, as a
    hung or congested MLflow server would, and delays each chunk by `delay_s` (a remote server).
    `held` counts chunks that arrived while closed. Also used by bench/tracking.py."""

    def __init__(self, upstream: int, port: int = 0, delay_s: float = 0.0) -> None:
        import threading

        self.upstream, self.delay_s = upstream, delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.held = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                if not self.gate.is_set():
                    with self._lock:
                        self.held += 1
                    self.gate.wait()
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.gate.set()
        self._listener.close()
        for s in self._conns:
            s.close()
