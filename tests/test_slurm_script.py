"""launch/slurm_paper.sh run by bash with stub srun/scontrol/scancel/accelerate/uniremoval: the
stage order and paths, one `accelerate launch` per node with its machine rank, the rendezvous and
signal settings the launcher sees, a failed stage stopping the job, and the rerun skipping
finished stages. No Slurm and no training: the stubs record their arguments and environment."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SRUN = """#!/bin/bash
echo "srun $*" >> "$REC"
nodes=1
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
rc=0
for ((i=0; i<nodes; i++)); do SLURM_NODEID=$i "$@" || rc=$?; done
exit $rc
"""
ACCELERATE = """#!/bin/bash
echo "accelerate $* | $MASTER_ADDR $MASTER_PORT $PET_SIGNALS_TO_HANDLE" >> "$REC"
[[ -n ${FAIL_ON:-} && "$*" == *"$FAIL_ON"* ]] && exit 3
exit 0
"""


def _run(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"srun": SRUN, "accelerate": ACCELERATE,
             "scontrol": '#!/bin/bash\n[[ $1 == show ]] && printf "gpu-a\\ngpu-b\\n"\n',
             "scancel": "#!/bin/bash\n", "uniremoval": '#!/bin/bash\necho "uniremoval $*" >> "$REC"\n'}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    rec = tmp_path / "rec.txt"
    rec.write_text("")
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "REC": str(rec), "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_PER_NODE": "a100:8",
            "SLURM_CPUS_PER_TASK": "64", **env}
    r = subprocess.run(["bash", str(REPO / "launch" / "slurm_paper.sh")], cwd=tmp_path, env=full, check=False,
                       capture_output=True, text=True, timeout=60)
    return r, rec.read_text().splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_stages_ranks_failure_and_rerun(tmp_path):
    r, rec = _run(tmp_path, FAIL_ON="--data shards/spa_test")
    assert r.returncode == 3, r.stdout + r.stderr  # the failed stage's exit status ends the job
    launches = [line for line in rec if line.startswith("accelerate")]
    srun = [line for line in rec if line.startswith("srun")]
    assert all("--cpus-per-task=64" in line and "--nodes=2" in line for line in srun)
    expected = ["train teacher --config configs/teacher/haze.yaml --resume auto",
                "train teacher --config configs/teacher/rain.yaml --resume auto",
                "train teacher --config configs/teacher/blur.yaml --resume auto",
                "cache --config configs/cache.yaml", "train kt --config configs/paper/kt.yaml --resume auto",
                "train da --config configs/paper/da.yaml --resume auto",
                ("eval --checkpoint outputs/paper-da/last.safetensors --data shards/rtts --name rtts "
                "--experiment uniremoval --metrics brisque,piqe --label Uni-Removal"),
                ("eval --checkpoint none --data shards/rtts --name rtts --experiment uniremoval "
                "--metrics brisque,piqe --label input"),
                ("eval --checkpoint outputs/paper-da/last.safetensors --data shards/spa_test --name spa_test "
                "--experiment uniremoval --metrics brisque,piqe,psnr,ssim --label Uni-Removal")]
    assert len(launches) == 2 * len(expected)  # one per node and stage, up to the failure
    for i, stage in enumerate(expected):
        for node in (0, 1):
            line = launches[2 * i + node]
            assert f"-m uniremoval {stage}" in line, line
            assert f"--machine_rank {node} " in line and "--num_machines 2 --num_processes 16" in line
            assert "--main_process_ip gpu-a --main_process_port 24242" in line
            assert line.endswith("| gpu-a 24242 SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    state = tmp_path / "outputs" / "slurm-state"
    assert sorted(p.stem for p in state.glob("*.done")) == sorted(
        ["teacher-haze", "teacher-rain", "teacher-blur", "cache", "kt", "da", "eval-rtts", "eval-rtts-input"])
    # resubmitted: finished stages are skipped, the rest run, report on one process
    r, rec = _run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    launches = [line for line in rec if line.startswith("accelerate")]
    assert [(line.split("--data ")[1].split()[0], line.split("--label ")[1].split()[0]) for line in launches] == [
        (f"shards/{s}", label) for s in ("spa_test", "realblur_j_test") for label in ("Uni-Removal", "input")
        for _node in (0, 1)]
    assert rec[-1] == "uniremoval report --experiment uniremoval --format md"
    assert "all stages done" in r.stdout
