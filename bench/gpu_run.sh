#!/usr/bin/env bash
# The whole GPU check in one device call:
#   bash bench/gpu_wheels.sh                       # here, once: pydantic/webdataset wheels into .whl/
#   bash bench/gpu_run.sh "$OUT"                   # there (carry .whl): JSON and log land in $OUT
# Installs the carried wheels into /tmp/site (the GPU image has torch but not pydantic or
# webdataset), then runs bench/gpu.py with every section, the compiles and the profile,
# inside the 8-minute budget (`--budget-s 400` under `timeout 420`), then bench/epoch_start.py
# (at most 45 s) into epoch_start.json: 465 s in all, inside a device call of 480 s.
# Extra arguments go to bench/gpu.py. WHEELS names another wheel folder; with none there the
# installed packages are used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_run.sh OUT_DIR [bench/gpu.py options]}
shift
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "gpu_run.sh: installing the wheels in $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
timeout 420 python3 bench/gpu.py --budget-s 400 --compile-timeout 200 --profile 3 --out "$OUT/gpu.json" "$@" \
    2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
# The trainer's wait at epoch starts with the node's cores as loader workers, the next epoch's loader
# started ahead vs at the epoch's start (CPU only: a 100 ms sleep stands in for the compiled step).
# EPOCH_START_ARGS replaces its options (the CPU test makes it small).
cores=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')
read -r -a es_args <<< "${EPOCH_START_ARGS:---workers $cores --step-ms 100 --steps 48 --epochs 2 --repeats 1}"
timeout 45 python3 bench/epoch_start.py --out "$OUT/epoch_start.json" "${es_args[@]}" > "$OUT/epoch_start.log" 2>&1 \
    || echo "gpu_run.sh: bench/epoch_start.py failed (see epoch_start.log)" >&2
exit "$rc"
