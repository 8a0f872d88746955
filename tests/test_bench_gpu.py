"""bench/gpu.py (the GPU performance check of the KT step) runs its CPU smoke preset end to end.

The GPU run is made once, on a lent machine, with no chance to fix the script there: this keeps it
working as the loaders and losses it calls change. No speed is asserted (CPU bf16 is slower than
fp32); what is asserted is that every section ran, the JSON is whole, and the fast path computes
the naive path's loss values within the tolerance the GPU run reports against.

The smoke run takes the branches a GPU run takes where CPU allows: fused Adam (``--cpu-fused``) and
the compiled step in its child process under a deadline (``--compile-backend aot_eager``: dynamo and
AOT autograd trace the real step, no code is generated). The deadline and a SIGTERM from an outer
``timeout`` are checked on that child too: each must leave a JSON and no child behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_kt_common import REPO, subprocess_env

LOSS_TOLERANCE = 3e-2  # bf16 autocast vs fp32: relative difference of each KT loss term
GPU_PY = str(REPO / "bench" / "gpu.py")
# The compiled step alone, traced on CPU (the other sections are covered by the smoke run).
COMPILED_ONLY = ["--preset", "tiny", "--quick", "--device", "cpu", "--compile", "--compile-backend", "aot_eager",
                 "--skip", "matmul,naive,ours,cache,loader"]


def test_gpu_bench_cpu_smoke_run_is_complete_and_numerically_equal(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, GPU_PY, "--preset", "tiny", "--quick", "--device", "cpu", "--cpu-fused",
                        "--compile", "--compile-backend", "aot_eager", "--compile-cache", str(tmp_path / "cc"),
                        "--profile", "2", "--inductor", "conv_1x1_as_mm=True", "--cudnn-benchmark-limit", "0",
                        "--out", str(out)],
                       env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["complete"] is True
    for section in ("matmul_peak", "naive", "ours", "trainer", "cache_build", "eval", "upsample", "loader",
                    "ours_batch6", "ours_compiled", "cache_compiled"):
        assert "error" not in printed[section], (section, printed[section].get("error"))
    naive, ours, compiled = printed["naive"], printed["ours"], printed["ours_compiled"]
    assert "fused Adam" in ours["what"]  # the optimiser a GPU run uses (under the FLOP counter too)
    # The compiled step ran in its child process and computed the eager fast path's terms.
    assert compiled["img_s"] > 0 and compiled["compile_s"] >= 0 and compiled["process_s"] > 0
    assert "backend=aot_eager" in compiled["what"] and compiled["timeout_s"] > 0
    # ... timed with the trainer's own bookkeeping: the fused Adam's device-side non-finite check
    assert "the trainer's device-side non-finite check" in compiled["what"]
    # The project's Trainer itself ran the KT stage's step on those batches (with the device check)
    assert printed["trainer"]["img_s"] > 0 and printed["trainer"]["steps"] == printed["trainer"]["steps_timed"] + 2 + \
        printed["settings"]["warmup"]
    assert "device-side non-finite check" in printed["trainer"]["what"]
    assert compiled["loss_terms"] == pytest.approx(ours["loss_terms"], rel=1e-4)
    # --inductor reaches both compiled children, as their inductor reads it back
    assert printed["settings"]["inductor"] == {"conv_1x1_as_mm": True}
    assert "inductor conv_1x1_as_mm=True" in compiled["what"]
    assert "inductor conv_1x1_as_mm=True" in printed["cache_compiled"]["what"]
    assert "inductor" not in ours["what"]
    # --cudnn-benchmark-limit: our paths only; the naive baseline keeps torch's default, as the official code
    assert printed["settings"]["cudnn_benchmark_limit"] == {"ours": 0, "naive": torch.backends.cudnn.benchmark_limit}
    for what in (ours["what"], compiled["what"], printed["cache_build"]["ours"]["what"]):
        assert "cudnn.benchmark (benchmark_limit=0: all algorithms)" in what, what
    assert "benchmark_limit" not in naive["what"]
    assert set(naive["loss_terms"]) == set(ours["loss_terms"]) == {"pixel", "ig", "fg", "total"}
    diffs = ours["loss_rel_diff_vs_naive"]
    assert all(0 <= d < LOSS_TOLERANCE for d in diffs.values()), diffs
    for key in diffs:  # the reported difference is the one between the reported values
        a, b = naive["loss_terms"][key], ours["loss_terms"][key]
        assert abs(a - b) / abs(a) == pytest.approx(diffs[key], rel=0.05, abs=1e-6)
    s = printed["summary"]
    assert s["ratio"] == pytest.approx(s["ours_img_s"] / s["naive_img_s"], abs=0.011) and s["goal_ratio"] == 5.0
    assert naive["flops_per_step"] > 0 and ours["flops_per_step"] > 0
    for r in (naive, ours):  # the split by kind adds up; the networks' convolutions are nearly all of it
        assert sum(r["flops_by_kind"].values()) == pytest.approx(r["flops_per_step"])
        assert r["flops_by_kind"]["convolution"] > 0.9 * r["flops_per_step"]
    assert s["tflops_needed_for_goal"] == pytest.approx(
        5 * s["naive_img_s"] * ours["flops_per_step"] / printed["settings"]["batch"] / 1e12, rel=1e-3)
    cache = printed["cache_build"]
    assert cache["stored_image_max_level_diff"] <= 8 and cache["feature_rel_err"] < LOSS_TOLERANCE
    assert cache["ours"]["batch"] == 4 and cache["fp32_eager"]["batch"] == 1  # configs/cache.yaml vs official
    # The cache's teacher compiled, in its own child: the same stored values within the bf16 tolerance.
    cc = printed["cache_compiled"]
    assert "backend=aot_eager" in cc["what"] and cc["batch"] == 4 and cc["process_s"] > 0 and cc["timeout_s"] > 0
    assert cc["frames_s"] > 0 and cc["compile_s"] >= 0 and cc["first_call_s"] > 0
    assert cc["stored_image_max_level_diff"] <= 8 and cc["feature_rel_err"] < LOSS_TOLERANCE
    assert cc["ratio_vs_fp32"] == pytest.approx(cc["frames_s"] / cache["fp32_eager"]["frames_s"], abs=0.011)
    faster = cc["frames_s"] > cache["ours"]["frames_s"]
    assert s["cache_build_path"] == ("cache_compiled" if faster else "cache_build.ours")
    assert s["cache_build_ratio"] == (cc["ratio_vs_fp32"] if faster else cache["ratio"])
    stage = cache["stage"]  # the cache stage end to end: threads write the serial run's bytes
    assert stage["same_bytes"] is True and stage["serial_frames_s"] > 0 and stage["threads_frames_s"] > 0
    assert stage["repeats"] == 2  # after an untimed warm-up run of each side, two alternating timed runs
    assert ours["student_fwd_bwd_ms"] > 0 and s["student_share_of_step"] > 0
    # The eager step at twice the batch (the quick CPU default of --scale-batches), timed alone
    scaled = printed["ours_batch6"]
    assert printed["settings"]["scale_batches"] == [6] and scaled["batch"] == 6 and ours["batch"] == 3
    assert scaled["img_s"] == pytest.approx(6 / (scaled["step_ms"] / 1e3), rel=0.01)
    assert "flops_per_step" not in scaled and "student_fwd_bwd_ms" not in scaled and "profile" not in scaled
    assert s["eager_img_s_by_batch"] == {"3": ours["img_s"], "6": scaled["img_s"]}
    assert s["eager_batch_speedup"] == {"6": round(scaled["img_s"] / ours["img_s"], 2)}
    assert s["eager_ratio_vs_naive_by_batch"]["6"] == round(scaled["img_s"] / naive["img_s"], 2)
    assert s["cache_stage_over_teacher"] > 0 and s["eval_score_over_restore"] == printed["eval"]["score_over_restore"]
    ev = printed["eval"]
    assert ev["restore_frames_s"] > 0 and ev["score_images_s"] > 0 and ev["metric"] == "piqe"
    assert ev["score_over_restore"] == pytest.approx(ev["score_images_s"] / ev["restore_frames_s"], rel=0.02)
    # MPRNet up-samples 10 times per forward: 2 in stage 1's decoder (on the 2N halves), 2 in stage
    # 2's and 6 in the ORSNet (on the N whole images).
    ups = printed["upsample"]
    assert ups["calls_per_forward"] == 10 == sum(ups["shapes"].values())
    by_batch = {}
    for k, v in ups["shapes"].items():
        by_batch[int(k.split("x")[0])] = by_batch.get(int(k.split("x")[0]), 0) + v
    assert by_batch == {6: 2, 3: 8}  # batch 3
    for path in ("eager_native", "eager_stencil", "compiled_native", "compiled_stencil"):
        assert ups[f"{path}_ms_per_step"] > 0, path
    loader = printed["loader"]
    assert loader["samples_s"] > 0 and loader["fields"] == ["degradation", "feature", "input", "teacher"]
    # The profile of the eager fast step: CPU ops here (kernels on a GPU), split by kind.
    prof = ours["profile"]
    assert compiled["profile"]["steps"] == 2 and compiled["profile"]["busy_ms_per_step"] > 0  # in the child
    assert prof["steps"] == 2 and 0 < prof["busy_ms_per_step"] and prof["launches_per_step"] > 0
    assert prof["by_kind_ms"]["convolution"] > 0 and len(prof["top"]) == 30
    assert prof["tflops_by_kind"]["convolution"] == pytest.approx(
        ours["flops_by_kind"]["convolution"] / prof["by_kind_ms"]["convolution"] / 1e9, rel=1e-3)
    assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["busy_ms_per_step"], rel=0.01)


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_summary_takes_the_fastest_compile_mode() -> None:
    import argparse

    gpu = _gpu_module()
    # Kernel names as CUDA 13 / cuDNN 9 spell them on Hopper: a GEMM is not a convolution.
    assert gpu.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert gpu.kernel_kind("sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16") == "convolution"
    assert gpu.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert gpu.kernel_kind("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>") == "layout transpose"
    assert gpu.kernel_kind("triton_per_fused_add_mean_mul_sigmoid_0") == "triton (fused)"
    assert gpu.kernel_kind("void at::native::vectorized_elementwise_kernel<4, prelu>") == "elementwise"
    assert gpu.kernel_kind("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float4>") == "copy"
    assert gpu.kernel_kind("void at::native::reduce_kernel<512, 1, scatter_gather>") == "reduction"
    assert gpu.parse_modes("default, reduce-overhead,default") == ["default", "reduce-overhead"]
    with pytest.raises(argparse.ArgumentTypeError, match="fast"):
        gpu.parse_modes("default,fast")
    assert gpu.compiled_key("default") == "ours_compiled"
    assert gpu.compiled_key("reduce-overhead") == "ours_compiled_reduce_overhead"
    terms = {"total": 1.0}
    results = {
        "naive": {"img_s": 50.0, "step_ms": 320.0, "loss_terms": terms},
        "ours": {"img_s": 100.0, "step_ms": 160.0, "loss_terms": {"total": 1.01}, "flops_per_step": 16e12,
                 "flops_by_kind": {"convolution": 15.2e12, "matmul": 0.8e12}},
        "ours_compiled": {"img_s": 125.0, "step_ms": 128.0, "compile_s": 32.0, "loss_terms": terms},
        "ours_compiled_reduce_overhead": {"img_s": 160.0, "step_ms": 100.0, "compile_s": 60.0, "loss_terms": terms,
                                          "profile": {"by_kind_ms": {"convolution": 76.0, "matmul": 2.0,
                                                                     "triton (fused)": 15.0}}},
        "matmul_peak": {"tflops": 787.0},
    }
    results["cache_build"] = {"fp32_eager": {"frames_s": 5.0}, "ours": {"frames_s": 9.0}, "ratio": 1.8}
    results["cache_compiled"] = {"frames_s": 10.0, "compile_s": 50.0}
    gpu.summarise(results, argparse.Namespace(batch=16))
    s = results["summary"]
    assert s["cache_build_path"] == "cache_compiled" and s["cache_build_ratio"] == 2.0
    assert results["cache_compiled"]["breakeven_frames"] == 4500  # 50 s / (1/9 - 1/10) s per frame
    assert s["ours_path"] == "ours_compiled_reduce_overhead" and s["ours_img_s"] == 160.0 and s["ratio"] == 3.2
    assert results["ours_compiled"]["breakeven_steps"] == 1000  # 32 s / (160 - 128) ms
    assert results["ours_compiled_reduce_overhead"]["breakeven_steps"] == 1000  # 60 s / 60 ms
    assert results["ours_compiled_reduce_overhead"]["ratio_vs_naive"] == 3.2
    assert results["ours"]["loss_rel_diff_vs_naive"]["total"] == pytest.approx(0.01)
    # What the goal asks and what the convolutions allow: 1 TFLOP an image, 5 x 50 img/s -> 250 TFLOP/s;
    # the convolutions' 15.2 TFLOP in 76 ms of kernels -> 200 TFLOP/s -> 210.5 img/s at most.
    assert results["ours_compiled_reduce_overhead"]["profile"]["tflops_by_kind"] == {"convolution": 200.0,
                                                                                       "matmul": 400.0}
    assert results["ours_compiled_reduce_overhead"]["achieved_tflops"] == 160.0
    assert s["tflops_needed_for_goal"] == 250.0 and s["needed_frac_of_bf16_matmul_peak"] == 0.318
    assert s["conv_tflops"] == 200.0 and s["conv_bound_img_s"] == 210.5 and s["conv_bound_ratio"] == 4.21


def test_gpu_bench_compile_pays_back_against_the_eager_step_with_the_same_check() -> None:
    """The compiled step carries the trainer's non-finite check: its break-even is counted against the
    eager step with that check (slower than bare `ours`), not against bare `ours`."""
    import argparse

    gpu = _gpu_module()
    results = {
        "naive": {"img_s": 50.0, "step_ms": 320.0},
        "ours": {"img_s": 100.0, "step_ms": 160.0},
        "ours_trainer_device_check": {"img_s": 80.0, "step_ms": 200.0},
        "ours_compiled": {"img_s": 125.0, "step_ms": 128.0, "compile_s": 36.0, "trainer_check": "device"},
        "ours_compiled_reduce_overhead": {"img_s": 160.0, "step_ms": 100.0, "compile_s": 60.0,
                                          "trainer_check": "host"},  # no eager host-check section ran
    }
    gpu.summarise(results, argparse.Namespace(batch=16))
    assert results["ours_compiled"]["breakeven_vs"] == "ours_trainer_device_check"
    assert results["ours_compiled"]["breakeven_steps"] == 500  # 36 s / (200 - 128) ms, not 36 s / 32 ms
    assert results["ours_compiled_reduce_overhead"]["breakeven_vs"] == "ours"
    assert results["ours_compiled_reduce_overhead"]["breakeven_steps"] == 1000  # 60 s / (160 - 100) ms


def test_gpu_bench_scale_batches_default_to_twice_and_four_times_the_batch_on_a_gpu() -> None:
    import argparse

    gpu = _gpu_module()
    assert gpu.parse_batches("32, 64") == [32, 64] and gpu.parse_batches("none") == []
    for bad in ("0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive batch sizes"):
            gpu.parse_batches(bad)
    args = gpu.parse_args(["--device", "cpu", "--batch", "8"])
    assert args.scale_batches == [16]  # 2x off a GPU
    args = gpu.parse_args(["--device", "cpu", "--batch", "8", "--scale-batches", "8,16,16"])
    assert args.scale_batches == [16]  # --batch itself is the eager step; repeats once
    assert gpu.parse_args(["--device", "cuda:0", "--batch", "16"]).scale_batches == [32, 64]  # parsed, not run


def test_gpu_bench_inductor_options_are_checked_against_torch() -> None:
    import argparse

    gpu = _gpu_module()
    assert gpu.parse_inductor_option("conv_1x1_as_mm=True") == ("conv_1x1_as_mm", True)
    assert gpu.parse_inductor_option(" max_autotune_gemm_backends = ATEN,TRITON") == (
        "max_autotune_gemm_backends", "ATEN,TRITON")  # not a literal: kept as the string
    with pytest.raises(argparse.ArgumentTypeError, match="has no option 'conv_1x1_as_matmul'"):
        gpu.parse_inductor_option("conv_1x1_as_matmul=True")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        gpu.parse_inductor_option("conv_1x1_as_mm")


def test_gpu_bench_cudnn_benchmark_limit_is_set_for_our_paths_only() -> None:
    import argparse

    gpu = _gpu_module()
    default = torch.backends.cudnn.benchmark_limit
    args = gpu.parse_args(["--device", "cpu", "--cudnn-benchmark-limit", "0"])
    with gpu.ours_flags(args):
        assert torch.backends.cudnn.benchmark_limit == 0 and torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark_limit == default  # restored: the naive path runs with torch's
    with gpu.ours_flags(gpu.parse_args(["--device", "cpu"])):
        assert torch.backends.cudnn.benchmark_limit == default
    assert gpu.benchmark_what(args) == "cudnn.benchmark (benchmark_limit=0: all algorithms)"
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 0, got -1"):
        gpu.non_negative_int("-1")


def test_gpu_bench_skips_a_compile_the_budget_cannot_hold() -> None:
    gpu = _gpu_module()
    assert gpu.skip_reason(200.0, 400, None, "default") is None  # the first mode: as long as a minute is left
    assert gpu.skip_reason(45.0, 400, None, "default") == "not run: 60 s left of --budget-s 400"
    # another mode of the same step, with less left than the first one's child took
    assert gpu.skip_reason(100.0, 400, 130.0, "default") == ("not run: 100 s left of --budget-s 400, the default "
                                                             "mode's child took 130 s")
    assert gpu.skip_reason(140.0, 400, 130.0, "default") is None


def test_gpu_bench_up_sampling_compiles_only_while_the_budget_holds_the_compiled_steps() -> None:
    """Its compiles run in the main process, outside the compiled steps' deadlines."""
    base = ["--preset", "tiny", "--quick", "--device", "cpu", "--compile", "--compile-backend", "aot_eager",
            "--only", "upsample"]
    short = subprocess.run([sys.executable, GPU_PY, *base, "--budget-s", "200"], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300, check=False)
    assert short.returncode == 0, short.stderr[-2000:]
    ups = json.loads(short.stdout)["upsample"]
    assert ups["compiled_paths"] == "not run: under 240 s of --budget-s left for the compiled steps"
    assert ups["eager_stencil_ms_per_step"] > 0 and "compiled_stencil_ms_per_step" not in ups
    ample = subprocess.run([sys.executable, GPU_PY, *base, "--budget-s", "400"], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300, check=False)
    assert ample.returncode == 0, ample.stderr[-2000:]
    ups = json.loads(ample.stdout)["upsample"]
    assert "compiled_paths" not in ups and ups["compiled_stencil_ms_per_step"] > 0


def _gone(pid: int) -> bool:
    """No such process any more (or only a zombie waiting for whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _child_pid(line: str) -> int | None:
    marker = "ours_compiled: child process "
    return int(line.split(marker, 1)[1].split(",")[0]) if marker in line else None


def test_gpu_bench_compiled_step_past_its_deadline_is_stopped_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, GPU_PY, *COMPILED_ONLY, "--compile-timeout", "2", "--out", str(out)],
                       env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout)
    assert printed == json.loads(out.read_text()) and printed["complete"] is True
    compiled = printed["ours_compiled"]
    assert "did not finish within 2 s" in compiled["error"] and compiled["timeout_s"] == 2
    pids = [pid for pid in map(_child_pid, p.stderr.splitlines()) if pid]
    assert len(pids) == 1 and _gone(pids[0])


def test_gpu_bench_sigterm_while_the_compiled_step_runs_writes_the_json_and_stops_the_child(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    scratch = tmp_path / "tmp"  # where the bench makes its temporary folders
    scratch.mkdir()
    env = {**subprocess_env(), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, GPU_PY, *COMPILED_ONLY, "--out", str(out)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = None
        for line in proc.stderr:  # the parent logs its child's pid once the child is started
            pid = _child_pid(line)
            if pid:
                break
        assert pid, "the compiled step's child was never started"
        proc.send_signal(signal.SIGTERM)  # what `timeout` sends
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    written = json.loads(out.read_text())
    assert json.loads(stdout) == written and written["complete"] is False
    assert "SIGTERM" in written["interrupted"] and "'ours_compiled'" in written["interrupted"]
    assert written["ours_compiled"]["error"] == "stopped by SIGTERM"
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"the compiled step's child {pid} outlived its parent"
    # the child's results folder went with it (os._exit skips TemporaryDirectory's own clean-up)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("gpu_bench_")]


def test_gpu_run_script_runs_the_bench_into_its_out_folder(tmp_path: Path) -> None:
    """bench/gpu_run.sh, the one device call: here with no wheel folder (the venv has the packages)."""
    import os

    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its python3: this one
    env["WHEELS"] = str(tmp_path / "no-wheels")
    env["EPOCH_START_ARGS"] = "--workers 1 --steps 3 --step-ms 20 --repeats 1 --n 12 --size 64 --crop 32 --batch 3"
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), str(out), "--preset", "tiny", "--quick",
                        "--device", "cpu", "--skip", "loader,cache"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert result["complete"] is True and result["settings"]["budget_s"] == 400
    assert result["ours"]["profile"]["steps"] == 3  # the script asks for the profile
    assert "naive done" in (out / "gpu.log").read_text()
    epochs = json.loads((out / "epoch_start.json").read_text())  # the epoch-start bench, after it
    assert epochs["workers"] == 1 and epochs["steps_per_epoch"] == 3
    assert epochs["ahead"]["first_batch_wait_s"] >= 0 and epochs["speedup"] > 0
