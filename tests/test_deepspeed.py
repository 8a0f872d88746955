"""Launch configs, and the KT stage under DeepSpeed ZeRO-2 and ZeRO-3 (the teacher stage under ZeRO-3)
on two real CPU processes.

On CPU, DeepSpeed runs through accelerate only without `cpu=True` and with the gloo backend, under
`accelerate launch --multi_gpu --num_processes 2` (../shared/STACK.md). ZeRO-2 gets the environment
variables `accelerate launch --config_file launch/deepspeed_zero2.yaml` sets. ZeRO-3 gets a
DeepSpeed JSON (what an accelerate config's `deepspeed_config_file` points at) with
stage3_param_persistence_threshold 0: DeepSpeed keeps every parameter under that many elements
whole on each rank (default 1e5), and the tiny preset's largest has 5184, so with the default
nothing at all would be sharded and the gather-on-export path would go untested. The first run
JIT-builds a small DeepSpeed extension (cached in TORCH_EXTENSIONS_DIR).
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

from dist_kt_common import (
    REPO,
    _sources,
    build_workspace,
    common_overrides,
    kt_overrides,
    loss_terms,
    mlflow_history,
    subprocess_env,
)

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


def write_zero3_config(path: Path) -> Path:
    """A DeepSpeed ZeRO-3 JSON that shards every parameter of the tiny student.

    stage3_max_reuse_distance 0: with DeepSpeed's default (1e9 elements) the first step that
    replays its recorded module trace walks the rest of the trace after each of the tiny MPRNet's
    ~1000 module calls, a one-off stall of ~60 s on two CPU processes (measured with the default
    persistence threshold: 6 steps took 155 s, 57 s with 0). The tiny model has no weight worth
    keeping gathered, so 0 costs nothing here.
    """
    config = {
        "train_micro_batch_size_per_gpu": "auto",  # the trainer fills in data.batch_size
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_max_reuse_distance": 0,
                              "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_kt_under_deepspeed_on_two_cpu_processes(tmp_path, zero):
    """ZeRO-2 and ZeRO-3: trains, identical parameters on both ranks, exported weights (ZeRO-3:
    gathered from shards of every parameter, MPRNet's shared PReLU kept as one tensor) load without
    DeepSpeed."""
    torch.set_num_threads(1)
    ws = build_workspace(tmp_path)
    env = subprocess_env()
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts (SIGABRT at exit, seen once) dumps its threads' stacks
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    if zero == 2:  # what launch/deepspeed_zero2.yaml sets
        env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = "2"
    else:
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(write_zero3_config(tmp_path / "zero3.json"))
    out = tmp_path / "ds.json"
    name = f"ds{zero}"
    # model.compile (configs/kt.yaml's default) is switched off under DeepSpeed with a warning.
    phase = {"config": str(REPO / "configs" / "kt.yaml"),
             "overrides": kt_overrides(ws, name) + ["train.max_steps=3", "model.compile=true"]}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "dist_kt_worker.py"), str(out), json.dumps(phase)]
    r = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stderr.count("model.compile is ignored under DeepSpeed") == 1  # once, by the main process
    (rec,) = json.loads(out.read_text())
    assert rec["distributed_type"].endswith("DEEPSPEED") and rec["zero_stage"] == zero
    assert rec["world_size"] == 2 and rec["step"] == 3 and rec["status"] == "finished"
    n_sharded, n_params = rec["sharded_params"]["student"]
    assert n_sharded == (n_params if zero == 3 else 0) and n_params > 100  # ZeRO-3: every one sharded
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
    if zero == 2:
        # DeepSpeed loads its optimiser state only under the stage that wrote it: resuming this run under
        # ZeRO-3 is refused on both ranks, naming the stages and the way to go on from the weights.
        del env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(write_zero3_config(tmp_path / "zero3.json"))
        phase = {**phase, "overrides": [*phase["overrides"], "train.max_steps=4"], "resume": "auto"}
        r = subprocess.run([*cmd[:-2], str(tmp_path / "ds3.json"), json.dumps(phase)], check=False, env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode != 0 and not (tmp_path / "ds3.json").exists(), r.stderr[-3000:]
        said = r.stderr.count("written under DeepSpeed with ZeRO stage 2, this run 3")
        assert said == 2 and "model.init=" in r.stderr, r.stderr[-3000:]  # each rank refuses


@pytest.mark.slow
def test_teacher_under_zero3_validates_with_the_gathered_weights(tmp_path):
    """A teacher under ZeRO-3 (parameters sharded): validation forwards through the engine on both
    ranks in lockstep, and its PSNR/SSIM are those of the exported weights scored in one process."""
    torch.set_num_threads(1)
    ws = build_workspace(tmp_path, cache=False)
    env = subprocess_env()
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts (SIGABRT at exit, seen once) dumps its threads' stacks
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(write_zero3_config(tmp_path / "zero3.json"))
    overrides = [o for o in common_overrides(ws, "t3") if not o.startswith("features.")] + [
        _sources("data.train", {"haze": ws["syn"]["haze"]}, "syn"),
        _sources("data.val", {"haze": ws["val"]["haze"]}, "val"), "train.max_steps=2",
        "schedule.warmup_steps=1"]  # the recipe's 1500-step warmup is longer than this 4-step run
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "uniremoval",
           "train", "teacher", "--config", str(REPO / "configs" / "teacher" / "haze.yaml"), *overrides]
    r = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    from mlflow.tracking import MlflowClient

    from uniremoval.models.checkpoint import load_checkpoint
    from uniremoval.stages.validation import validate_paired

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.stage = 'teacher'")
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
    model, meta = load_checkpoint(tmp_path / "out" / "t3" / "last.safetensors")
    assert meta["step"] == 2
    from types import SimpleNamespace

    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    src = SimpleNamespace(name="val_haze", shards=str(ws["val"]["haze"]), max_samples=None)
    alone = validate_paired(ctx, model.eval(), meta.get("input_range", "minus_one_one"), [src], lockstep=False)
    assert logged.keys() == alone.keys() and "val/val_haze/ssim" in logged
    for k, value in alone.items():
        assert logged[k] == pytest.approx(value, abs=1e-3), k


def test_deepspeed_launch_configs_leave_accumulation_to_the_stage_config(monkeypatch):
    """accelerate turns a launch config's deepspeed_config.gradient_accumulation_steps into
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which overrides the Accelerator's argument: with the
    old hard-coded 1, train.grad_accum=2 silently stepped the optimiser after every micro-batch.
    The launch files carry none; a launch value that differs is refused before anything starts."""
    from uniremoval.config import ConfigError, load_config
    from uniremoval.stages.trainer import build_accelerator

    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        raw = yaml.safe_load((LAUNCH / name).read_text())
        assert "gradient_accumulation_steps" not in raw["deepspeed_config"], name
    cfg = load_config(REPO / "configs" / "kt.yaml", ["train.grad_accum=2", "train.cpu=true"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=1.*train\.grad_accum=2"):
        build_accelerator(cfg)


@pytest.mark.slow
def test_zero2_launch_config_matches_ddp_with_accumulation_and_bf16(tmp_path):
    """The same KT run (train.grad_accum=2, train.mixed_precision=bf16) through
    launch/multi_gpu.yaml and launch/deepspeed_zero2.yaml, two CPU processes each: ZeRO-2 takes the
    same two updates as DDP (it took four: the launch file's accumulation overrode the stage's), and
    runs bf16 as autocast over fp32 weights (DeepSpeed's bf16 engine cast the student to bf16 and
    failed on its fp32 inputs)."""
    torch.set_num_threads(1)
    ws = build_workspace(tmp_path)
    env = subprocess_env()
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts (SIGABRT at exit, seen once) dumps its threads' stacks
    accelerate = str(Path(sys.executable).parent / "accelerate")
    records = {}
    for launch in ("multi_gpu", "deepspeed_zero2"):
        out = tmp_path / f"{launch}.json"
        phase = {"config": str(REPO / "configs" / "kt.yaml"),
                 "overrides": kt_overrides(ws, launch) + ["train.max_steps=2", "train.grad_accum=2",
                                                          "train.mixed_precision=bf16", "tracking.enabled=false"]}
        cmd = [accelerate, "launch", "--config_file", str(LAUNCH / f"{launch}.yaml"), "--num_processes", "2",
               str(REPO / "tests" / "dist_kt_worker.py"), str(out), json.dumps(phase)]
        r = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, launch + ":\n" + r.stdout[-3000:] + r.stderr[-6000:]
        (records[launch],) = json.loads(out.read_text())
    ddp, ds = records["multi_gpu"], records["deepspeed_zero2"]
    assert ds["distributed_type"].endswith("DEEPSPEED") and not ddp["distributed_type"].endswith("DEEPSPEED")
    assert ddp["step"] == ds["step"] == 2 and ddp["status"] == ds["status"] == "finished"
    initial = np.array(ddp["initial"])
    moved_ddp = np.array(ddp["fingerprints"]["student"][0]) - initial
    moved_ds = np.array(ds["fingerprints"]["student"][0]) - initial
    assert np.all(np.abs(moved_ddp) > 0)
    # bf16 autocast differs in detail (accelerate also casts DDP's outputs to fp32); two extra
    # updates would roughly double the distance moved
    np.testing.assert_allclose(moved_ds, moved_ddp, rtol=0.1)


def test_deepspeed_config_batch_and_clipping_follow_the_stage_config():
    """The stage config decides the per-process batch and clipping under DeepSpeed as under DDP: "auto"
    (or no value) is filled in from data.batch_size / train.clip_grad_norm, a different value is refused
    by name. A DeepSpeed JSON's gradient_clipping: 1.0 replaced train.clip_grad_norm silently (a KT run
    with the default, no clipping, was clipped at 1.0), and its train_micro_batch_size_per_gpu was
    ignored by the loaders."""
    from types import SimpleNamespace

    from uniremoval.config import ConfigError, load_config
    from uniremoval.stages.trainer import Trainer

    cfg = load_config(REPO / "configs" / "kt.yaml", ["data.batch_size=3", "train.grad_accum=2"])
    assert cfg.train.clip_grad_norm is None

    def check(ds: dict, cfg=cfg, processes: int = 2) -> dict:
        plugin = SimpleNamespace(deepspeed_config=ds)
        fake = SimpleNamespace(deepspeed=True, cfg=cfg, stage=SimpleNamespace(trainable=("student",), run_name="kt"),
                               accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin),
                                                           num_processes=processes))
        Trainer._check_deepspeed(fake)
        return ds

    filled = check({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "train_batch_size": "auto"})
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_clipping"] == 0.0
    assert filled["gradient_accumulation_steps"] == 2
    assert check({"gradient_clipping": 0, "train_micro_batch_size_per_gpu": 3, "train_batch_size": 12})
    clipped = cfg.model_copy(update={"train": cfg.train.model_copy(update={"clip_grad_norm": 0.5})})
    assert check({"gradient_clipping": 0.5}, clipped)["gradient_clipping"] == 0.5
    assert check({}, clipped)["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError, match=r"gradient_clipping=1\.0, the stage config train\.clip_grad_norm=None"):
        check({"gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match=r"gradient_clipping=1\.0, the stage config train\.clip_grad_norm=0\.5"):
        check({"gradient_clipping": 1.0}, clipped)
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8, the stage config data\.batch_size=3"):
        check({"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(ConfigError, match=r"train_batch_size=16, .* = 3 x 2 x 2 = 12"):
        check({"train_batch_size": 16})
