"""Suite-wide settings: one torch thread per test process; the MLflow weights cache in a temporary folder.

The suite runs on small CPUs beside other processes (multi-process launches, servers); tiny conv
models are 10x+ faster single-threaded there than with threads fighting for two cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _runs_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Weights fetched from MLflow runs (runs:/...) go to a per-test folder, never ~/.cache."""
    monkeypatch.setenv("UNIREMOVAL_RUNS_DIR", str(tmp_path_factory.mktemp("runs-cache")))
