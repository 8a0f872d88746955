"""The paper presets and the ablation rows (Tables IV and V).

Each training row runs a few steps through the CLI (`uniremoval train kt|da`) on tiny generated
data and must log to MLflow exactly the loss terms of its row; the presets must hold the paper's
hyperparameters as ../shared/DESIGN.md lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_kt_common import (
    REPO,
    build_workspace,
    da_overrides,
    kt_overrides,
    loss_terms,
    mlflow_history,
    run_id_of,
)

from uniremoval.config import DAStage, EvalStage, KTStage, ablation_flags, load_config

ABLATION = REPO / "configs" / "ablation"
G = {"total"}
D = {"d_real", "d_fake", "d_total"}
ROWS = {
    # Table IV
    "kt_bkt.yaml": ({"pixel", "total"}, {"use_icl": False, "use_fcl": False}),
    "kt_icl.yaml": ({"pixel", "ig", "total"}, {"use_icl": True, "use_fcl": False}),
    "kt_icl_fcl.yaml": ({"pixel", "ig", "fg", "total"}, {"use_icl": True, "use_fcl": True}),
    # Table V (the "KT" row is an evaluation of the KT student: see test_table_v_kt_row_evaluates_the_kt_student)
    "da_bda.yaml": ({"gan", "idt"} | G | D, {"use_gan": True, "use_idt": True, "use_eicl": False, "use_efcl": False}),
    "da_bda_eicl.yaml": ({"gan", "idt", "eig"} | G | D,
                         {"use_gan": True, "use_idt": True, "use_eicl": True, "use_efcl": False}),
    "da_bda_eicl_efcl.yaml": ({"gan", "idt", "eig", "efg"} | G | D,
                              {"use_gan": True, "use_idt": True, "use_eicl": True, "use_efcl": True}),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    return build_workspace(tmp_path_factory.mktemp("ablation"))


def test_every_ablation_file_is_covered():
    assert {p.name for p in ABLATION.glob("*.yaml")} == set(ROWS) | {"da_kt.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_ablation_row_runs_and_logs_exactly_its_terms(ws, row):
    from uniremoval.cli import main

    terms, flags = ROWS[row]
    stage = "kt" if row.startswith("kt") else "da"
    name = f"abl-{Path(row).stem}"
    over = kt_overrides(ws, name) if stage == "kt" else da_overrides(ws, name)
    over += ["train.max_steps=2", "data.val=[]"]
    cfg = load_config(ABLATION / row, over)
    assert ablation_flags(cfg) == flags
    assert main(["train", stage, "--config", str(ABLATION / row), *over]) == 0
    run_dir = Path(cfg.run_dir)
    hist = mlflow_history(f"sqlite:///{ws['root']}/mlflow.db", run_id_of(run_dir))
    assert loss_terms(hist) == terms
    for t in terms:
        assert [s for s, _ in hist[f"train/{t}"]] == [1, 2]
    # the decayed weight is logged only when its term is on
    assert ("train/weight_a1" in hist) == (stage == "kt" and flags["use_fcl"])
    assert ("train/weight_l1" in hist) == (stage == "da" and flags["use_efcl"])
    assert (run_dir / "last.safetensors").is_file()
    assert (run_dir / "discriminator-last.safetensors").is_file() == (stage == "da")


def test_table_v_kt_row_evaluates_the_kt_student():
    kt_full = load_config(ABLATION / "kt_icl_fcl.yaml")
    kt_weights = str(Path(kt_full.run_dir) / "last.safetensors")
    row = load_config(ABLATION / "da_kt.yaml")
    assert isinstance(row, EvalStage)
    assert row.eval.checkpoint == kt_weights
    paper_da = load_config(REPO / "configs" / "paper" / "da.yaml")
    assert [d.name for d in row.eval.data] == [d.name for d in paper_da.data.val]
    for f in ("da_bda.yaml", "da_bda_eicl.yaml", "da_bda_eicl_efcl.yaml"):
        cfg = load_config(ABLATION / f)
        assert cfg.model.init == kt_weights  # every DA row adapts the same full KT student
        assert cfg.loss.gan == "lsgan"


def test_ablation_rows_differ_from_the_paper_preset_only_in_their_switches():
    for row in ROWS:
        base = load_config(REPO / "configs" / "paper" / ("kt.yaml" if row.startswith("kt") else "da.yaml"))
        cfg = load_config(ABLATION / row)
        a, b = cfg.model_dump(), base.model_dump()
        for d in (a, b):
            d.pop("name")
            d["model"].pop("init")
            for k in ("use_icl", "use_fcl", "use_gan", "use_idt", "use_eicl", "use_efcl"):
                d["loss"].pop(k, None)
        assert a == b, row


def test_paper_presets_hold_the_papers_values():
    kt = load_config(REPO / "configs" / "paper" / "kt.yaml")
    da = load_config(REPO / "configs" / "paper" / "da.yaml")
    assert isinstance(kt, KTStage) and isinstance(da, DAStage)
    for cfg in (kt, da):
        assert cfg.data.batch_size == 16 and cfg.data.crop_size == 128
        assert cfg.data.degradations == ["haze", "rain", "blur"]
        assert cfg.optim.name == "adam" and cfg.schedule.name == "constant"
        assert cfg.loss.tau == 1e-6
        assert cfg.model.input_range == "minus_one_one"  # crops scaled to [-1, 1]
    assert kt.optim.lr == 2e-5 and tuple(kt.optim.betas) == (0.9, 0.999) and kt.train.epochs == 400
    assert (kt.loss.a1, kt.loss.a1_decay, kt.loss.a2) == (0.5, 0.99, 0.1)
    assert kt.loss.use_icl and kt.loss.use_fcl and kt.teachers.mode == "cached"
    assert [s.name for s in kt.data.train] == ["ots", "rain1400", "gopro"]
    assert [s.degradation for s in kt.data.train] == ["haze", "rain", "blur"]
    assert [s.name for s in kt.data.val] == ["sots_outdoor", "rain1400_test", "gopro_test"]
    assert da.optim.lr == 5e-6 and tuple(da.optim.betas) == (0.5, 0.999) and da.train.epochs == 40
    assert da.optim_d.lr == 5e-6 and tuple(da.optim_d.betas) == (0.5, 0.999)
    assert (da.loss.l1, da.loss.l1_decay, da.loss.l2, da.loss.l3) == (0.5, 0.99, 0.1, 0.1)
    assert [s.name for s in da.data.train] == ["urhi", "spa", "realblur_j"]
    assert [s.degradation for s in da.data.train] == ["haze", "rain", "blur"]
    assert da.data.clear and da.loss.gan == "lsgan"
    assert da.model.init == str(Path(kt.run_dir) / "last.safetensors")  # DA starts from the paper KT student
    assert "piqe" in da.val_iqa.metrics
