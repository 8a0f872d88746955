"""How long MLflow logging holds a training loop: synchronous tracker vs the trainer's background one.

A real `mlflow server` on loopback, reached directly or through a proxy that delays every chunk
(a remote server) or forwards nothing for a while (a hung or overloaded server). A simulated loop
of --steps steps (--step-ms each, the time a GPU step leaves the CPU waiting) logs the trainer's
metric payload every --log-every steps and an image grid every --image-every steps. Prints JSON:
per case and mode the loop's wall time, the time spent inside tracker calls, and the ratios.

    .venv/bin/python bench/tracking.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from uniremoval.tracking import Tracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _fixtures import (  # tests/ is on the path only from here
    GatedProxy,
    free_port,
    start_mlflow_server,
    stop_server,
)


def loop(uri: str, background: bool, args: argparse.Namespace, spool: Path, hang: GatedProxy | None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Tracker(uri, "bench-tracking", f"{'bg' if background else 'sync'}", {"stage": "bench"},
                     spool_dir=spool, background=background)
        tr.log_params({f"p{i}": i for i in range(60)})  # the flattened config
        grid = [torch.rand(4, 3, 128, 128) * 2 - 1] * 3
        inside = 0.0
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            if hang is not None and step == args.steps // 4:
                hang.gate.clear()
                threading.Timer(args.hang_s, hang.gate.set).start()
            time.sleep(args.step_ms / 1000)
            t0 = time.perf_counter()
            if step % args.log_every == 0:
                tr.log_metrics({f"train/loss{i}": 1.0 / step for i in range(8)} | {"train/lr": 1e-4}, step=step)
            if step % args.image_every == 0:
                tr.log_image_grid("train", grid, step=step)
            inside += time.perf_counter() - t0
        loop_s = time.perf_counter() - start
        t0 = time.perf_counter()
        tr.finish()
        finish_s = time.perf_counter() - t0
    return {"loop_s": round(loop_s, 3), "inside_tracker_s": round(inside, 3), "finish_s": round(finish_s, 3),
            "offline_at_end": tr.offline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--step-ms", type=float, default=50.0, help="one training step (about 16 img at 300 img/s)")
    ap.add_argument("--log-every", type=int, default=20, help="configs/kt.yaml train.log_every")
    ap.add_argument("--image-every", type=int, default=100)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="per chunk, each way: a remote server")
    ap.add_argument("--hang-s", type=float, default=5.0, help="how long the hung server forwards nothing")
    args = ap.parse_args()
    for name in ("steps", "log_every", "image_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("step_ms", "delay_ms", "hang_s"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must not be negative")

    root = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    port = free_port()
    out: dict = {"args": vars(args), "ideal_loop_s": args.steps * args.step_ms / 1000}
    # MLflow prints "View run ..." lines on stdout when a run ends: keep stdout the JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        try:
            proc = start_mlflow_server(root, port)
            try:
                run_cases(args, root, port, out)
            finally:
                stop_server(proc)  # the server and its workers (own session)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # its store, artifacts and spools (was left in /tmp)
    print(json.dumps(out, indent=2))


def run_cases(args: argparse.Namespace, root: Path, port: int, out: dict) -> None:
    """Each case, sync then background, into `out`. First an untimed short loop of each mode on
    loopback: the first run of a process pays MLflow's one-off costs (imports, the server's first
    requests, the client's connection pool), which would otherwise be charged to whichever case
    and mode ran first."""
    warm = argparse.Namespace(**{**vars(args), "steps": args.image_every, "step_ms": 0.0})
    for background in (False, True):
        loop(f"http://127.0.0.1:{port}", background, warm, root / f"warm-{background}", None)
    for case, delay, hang in (("loopback", 0.0, False), ("remote", args.delay_ms / 1000, False),
                              ("hung", 0.0, True)):
        res = {}
        for background in (False, True):
            proxy = GatedProxy(port, delay_s=delay) if (delay or hang) else None
            uri = f"http://127.0.0.1:{proxy.port if proxy else port}"
            res["background" if background else "sync"] = loop(uri, background, args,
                                                               root / f"{case}-{background}",
                                                               proxy if hang else None)
            if proxy:
                proxy.close()
        s, b = res["sync"], res["background"]
        res["inside_ratio_sync_over_background"] = round(s["inside_tracker_s"] / max(b["inside_tracker_s"], 1e-6), 1)
        res["loop_ratio_sync_over_background"] = round(s["loop_s"] / max(b["loop_s"], 1e-9), 3)
        out[case] = res
        print(f"{case}: loop {s['loop_s']:.2f} s sync vs {b['loop_s']:.2f} s background "
              f"(ideal {out['ideal_loop_s']:.2f} s); inside tracker {s['inside_tracker_s']:.3f} s vs "
              f"{b['inside_tracker_s']:.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
