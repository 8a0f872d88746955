"""bench/gpu.py (the GPU performance check of the KT step) runs its CPU smoke preset end to end.

The GPU run is made once, on a lent machine, with no chance to fix the script there: this keeps it
working as the loaders and losses it calls change. No speed is asserted (CPU bf16 is slower than
fp32); what is asserted is that every section ran, the JSON is whole, and the fast path computes
the naive path's loss values within the tolerance the GPU run reports against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_kt_common import REPO, subprocess_env

LOSS_TOLERANCE = 3e-2  # bf16 autocast vs fp32: relative difference of each KT loss term


def test_gpu_bench_cpu_smoke_run_is_complete_and_numerically_equal(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--preset", "tiny", "--quick", "--no-compile",
                        "--device", "cpu", "--out", str(out)],
                       env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["complete"] is True
    for section in ("matmul_peak", "naive", "ours", "cache_build", "loader"):
        assert "error" not in printed[section], (section, printed[section].get("error"))
    naive, ours = printed["naive"], printed["ours"]
    assert set(naive["loss_terms"]) == set(ours["loss_terms"]) == {"pixel", "ig", "fg", "total"}
    diffs = ours["loss_rel_diff_vs_naive"]
    assert all(0 <= d < LOSS_TOLERANCE for d in diffs.values()), diffs
    for key in diffs:  # the reported difference is the one between the reported values
        a, b = naive["loss_terms"][key], ours["loss_terms"][key]
        assert abs(a - b) / abs(a) == pytest.approx(diffs[key], rel=0.05, abs=1e-6)
    s = printed["summary"]
    assert s["ratio"] == pytest.approx(s["ours_img_s"] / s["naive_img_s"], abs=0.011) and s["goal_ratio"] == 5.0
    assert naive["flops_per_step"] > 0 and ours["flops_per_step"] > 0
    cache = printed["cache_build"]
    assert cache["stored_image_max_level_diff"] <= 8 and cache["feature_rel_err"] < LOSS_TOLERANCE
    loader = printed["loader"]
    assert loader["samples_s"] > 0 and loader["fields"] == ["degradation", "feature", "input", "teacher"]
