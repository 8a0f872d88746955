"""docker/compose.yaml and docker/Dockerfile say what docker/README.md says they do (no Docker engine
here: the files are read, not built)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_services_mounts_and_settings_match_the_readme():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "mlflow", "trainer"}
    assert services["db"]["image"].startswith("postgres:16")
    server = services["mlflow"]["command"]
    assert server[:2] == ["mlflow", "server"] and "--artifacts-destination" in server
    assert server[server.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert services["mlflow"]["ports"] == ["${MLFLOW_PORT:-5000}:5000"]
    trainer = services["trainer"]
    assert trainer["working_dir"] == "/opt/uniremoval"
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert trainer["environment"]["HOME"] == "/tmp" and trainer["shm_size"] == "16gb"
    mounts = dict(reversed(v.rsplit(":", 1)) for v in trainer["volumes"])  # container path -> host
    for container, env, default in (("/opt/uniremoval/shards", "SHARDS_DIR", "../shards"),
                                    ("/opt/uniremoval/cache", "CACHE_DIR", "../cache"),
                                    ("/opt/uniremoval/outputs", "OUTPUTS_DIR", "../outputs"),
                                    ("/opt/torch-home", "TORCH_HOME_DIR", "../torch-home")):
        assert mounts[container] == f"${{{env}:-{default}}}"
    assert mounts["/opt/torch-extensions"] == "torch-extensions"
    assert set(compose["volumes"]) == {"mlflow-db", "mlflow-artifacts", "torch-extensions"}


def test_dockerfile_sets_the_paths_the_readme_names():
    text = (REPO / "docker" / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s+(\w+)=(\S+)", text, re.MULTILINE))
    assert env["TORCH_HOME"] == "/opt/torch-home"
    assert env["UNIREMOVAL_IQA_DIR"] == "/opt/torch-home/uniremoval-iqa"
    assert env["TORCH_EXTENSIONS_DIR"] == "/opt/torch-extensions"
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-devel$", text, re.MULTILINE)
    assert "WORKDIR /opt/uniremoval" in text and 'pip install -e "${spec}"' in text
    # every folder the image needs (package, configs, launch files, suite, benchmarks) is copied
    for folder in ("uniremoval", "configs", "launch", "tests", "bench"):
        assert f"COPY {folder} ./{folder}" in text
