"""Launch configs, and the KT stage under DeepSpeed ZeRO-2 on two real CPU processes.

On CPU, DeepSpeed runs through accelerate only without `cpu=True` and with the gloo backend, under
`accelerate launch --multi_gpu --num_processes 2` (../shared/STACK.md); the environment variables
set here are the ones `accelerate launch --config_file launch/deepspeed_zero2.yaml` sets. The first
run JIT-builds a small DeepSpeed extension (cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_kt_common import REPO, build_workspace, kt_overrides, loss_terms, mlflow_history, subprocess_env

LAUNCH = REPO / "launch"


def test_launch_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {
        "single_gpu.yaml": ("NO", 1, 1, None),
        "multi_gpu.yaml": ("MULTI_GPU", 8, 1, None),
        "multi_node.yaml": ("MULTI_GPU", 16, 2, None),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1, 2),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1, 3),
    }
    assert {p.name for p in LAUNCH.glob("*.yaml")} == set(expect)
    for name, (kind, procs, machines, zero) in expect.items():
        raw = yaml.safe_load((LAUNCH / name).read_text())
        cfg = load_config_from_file(str(LAUNCH / name))  # accelerate's own parser accepts it
        assert str(cfg.distributed_type).split(".")[-1] == kind, name
        assert cfg.num_processes == procs and cfg.num_machines == machines, name
        assert raw.get("use_cpu") is False
        if zero is not None:
            assert cfg.deepspeed_config["zero_stage"] == zero
            assert cfg.deepspeed_config["offload_optimizer_device"] == "none"
    node = yaml.safe_load((LAUNCH / "multi_node.yaml").read_text())
    assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(node)
    text = (LAUNCH / "multi_node.yaml").read_text()
    assert "<address of the rank-0 node>" in text and "<this node's rank" in text


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_kt_under_deepspeed_on_two_cpu_processes(tmp_path, zero):
    """ZeRO-2 and ZeRO-3: trains, identical parameters on both ranks, exported weights (ZeRO-3:
    gathered from the shards, MPRNet's shared PReLU kept as one tensor) load without DeepSpeed."""
    torch.set_num_threads(1)
    ws = build_workspace(tmp_path)
    env = subprocess_env()
    # what launch/deepspeed_zero{2,3}.yaml set, less zero3_save_16bit_model (exports do not need it)
    env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(zero))
    out = tmp_path / "ds.json"
    name = f"ds{zero}"
    phase = {"config": str(REPO / "configs" / "kt.yaml"), "overrides": kt_overrides(ws, name) + ["train.max_steps=3"]}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "dist_kt_worker.py"), str(out), json.dumps(phase)]
    r = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    (rec,) = json.loads(out.read_text())
    assert rec["distributed_type"].endswith("DEEPSPEED") and rec["zero_stage"] == zero
    assert rec["world_size"] == 2 and rec["step"] == 3 and rec["status"] == "finished"
    per_rank = rec["fingerprints"]["student"]
    np.testing.assert_array_equal(per_rank[0], per_rank[1])  # identical parameters on both ranks
    assert per_rank[0] != rec["initial"]  # and they trained
    # the exported weights are the trained ones
    from dist_kt_worker import fingerprint

    from uniremoval.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "out" / name / "last.safetensors")
    np.testing.assert_allclose(fingerprint(model).tolist(), per_rank[0], rtol=1e-12)
    assert meta["step"] == 3
    hist = mlflow_history(f"sqlite:///{tmp_path}/mlflow.db", rec["run_id"])
    assert loss_terms(hist) == {"pixel", "ig", "fg", "total"}
    assert [s for s, _ in hist["train/total"]] == [1, 2, 3]
