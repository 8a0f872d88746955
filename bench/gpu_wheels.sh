#!/usr/bin/env bash
# Fetch the wheels bench/gpu.py needs on a lent GPU machine that has torch, numpy, Pillow, PyYAML
# and accelerate but not pydantic or webdataset (a bare CUDA image with PyTorch). They land in
# .whl/ (git-ignored); a device call carries `.whl` and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
# Versions follow this machine's .venv when it exists, so the GPU run uses what the tests passed on.
# GPU_PYTHON_VERSION (default 3.12) names the GPU machine's Python, for pydantic_core's binary wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
# pyiqa (pure Python) for the eval section: the image has its dependencies that PIQE imports.
NAMES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand pyiqa)

pins=()
for name in "${NAMES[@]}"; do
    version=""
    if [[ -x .venv/bin/python ]]; then
        version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    fi
    pins+=("${name}${version:+==$version}")
done

rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
