"""Bad configs and bad command-line values, through the real CLI entry point: each one exits with
status 2 and a single `error: ...` line that names the file/key/value (no traceback), and nothing is
started (no run directory, no MLflow store).

Message wording per config error is pinned in tests/test_config.py (load_config level); here the
fault angle: the CLI turns each into one clean line and creates nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniremoval.cli import main

from ._faults import write_yaml

TEACHER = {
    "stage": "teacher", "project": "faults", "name": "t", "degradation": "haze", "model": {"preset": "tiny"},
    "data": {"degradations": ["haze"], "train": [{"name": "syn", "shards": "shards/syn", "degradation": "haze"}]},
    "tracking": {"enabled": False},
}


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a value before any handler runs
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def _cfg(tmp_path: Path, **over) -> Path:
    cfg = {**TEACHER, "output_dir": str(tmp_path / "out"), **over}
    return write_yaml(tmp_path / "teacher.yaml", cfg)


CONFIG_CASES = {
    # case: (config changes or raw YAML text, extra argv, [fragments the message must contain])
    "unknown key": ({"optim": {"lrr": 1e-3}}, [], ["unknown key 'optim.lrr'", "allowed keys here", "lr"]),
    "wrong type": ({"train": {"epochs": "many"}}, [], ["key 'train.epochs'", "'many'"]),
    "out of range": ({"data": {**TEACHER["data"], "batch_size": 0}}, [],
                     ["key 'data.batch_size'", "bad value 0", "greater than or equal to 1"]),
    "cross-field rule": ({"data": {**TEACHER["data"], "crop_size": 36}}, [], ["must be a multiple of 8 for model.arch=mprnet"]),
    "bad enum": ({"train": {"nonfinite": "ignore"}}, [], ["key 'train.nonfinite'", "'ignore'", "'skip' or 'stop'"]),
    "malformed yaml": ("stage: teacher\noptim: {lr: [1e-3\n", [], ["malformed YAML at line"]),
    "not a mapping": ("- just\n- a list\n", [], ["the top level must be a mapping"]),
    "missing required": ({"degradation": None}, [], ["key 'degradation'"]),
    "wrong stage": ({"stage": "kt"}, [], ["this is a 'kt' config, but the command needs a 'teacher' config"]),
    "missing base": ({"extends": "nope.yaml"}, [], ["key 'extends': base file not found", "nope.yaml"]),
    "override syntax": ({}, ["optim.lr"], ["override 'optim.lr' must look like key.sub=value"]),
    "override unknown key": ({}, ["optim.lrr=1"], ["override 'optim.lrr=1'", "unknown key 'optim.lrr'"]),
    "override bad value": ({}, ["optim.lr=-1"], ["override 'optim.lr=-1'", "key 'optim.lr'", "greater than 0"]),
    "override list index": ({}, ["data.train.5.weight=2"], ["'data.train.5' needs a list index in 0..0"]),
    "teacher without its data": ({"degradation": "rain"}, [],
                                 ["teacher for 'rain'", "data.train has no source of that degradation"]),
    "fp16 on cpu": ({"train": {"mixed_precision": "fp16", "cpu": True}}, [], ["fp16 needs a GPU"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_one_clean_error_and_nothing_started(case, tmp_path, capsys, monkeypatch):
    change, extra, fragments = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking on: the store would be ./mlflow.db
    if isinstance(change, str):
        path = tmp_path / "teacher.yaml"
        path.write_text(change)
    else:
        cfg = {**TEACHER, "output_dir": str(tmp_path / "out"), "tracking": {"enabled": True}, **change}
        path = write_yaml(tmp_path / "teacher.yaml", {k: v for k, v in cfg.items() if v is not None})
    code, err = _run(capsys, ["train", "teacher", "--config", str(path), *extra])
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, ["train", "kt", "--config", str(tmp_path / "absent.yaml")])
    assert code == 2 and err.startswith("error: config file not found") and "absent.yaml" in err


CLI_CASES = {
    # argparse-level refusals (exit 2, usage line) and handler-level ones (error: line)
    "train without --config": (["train", "teacher"], ["the following arguments are required: --config"]),
    "unknown stage": (["train", "student"], ["invalid choice: 'student'"]),
    "shards unknown format": (["shards", "build", "--format", "imagenet", "--root", "."], ["invalid choice: 'imagenet'"]),
    "eval batch size not an int": (["eval", "--checkpoint", "none", "--data", ".", "--batch-size", "eight"],
                                   ["argument --batch-size: invalid int value: 'eight'"]),
    "eval batch size zero": (["eval", "--checkpoint", "none", "--data", "{data}", "--batch-size", "0",
                              "--metrics", "piqe", "--no-mlflow"], ["error: --batch-size must be >= 1, got 0"]),
    "eval unknown metric": (["eval", "--checkpoint", "none", "--data", "{data}", "--metrics", "psnr,mse"],
                            ["error: unknown metric(s) ['mse']", "available:"]),
    "eval no checkpoint": (["eval", "--data", "{data}"], ["error: eval needs --checkpoint FILE|none"]),
    "eval checkpoint missing": (["eval", "--checkpoint", "{tmp}/nope.safetensors", "--data", "{data}",
                                 "--metrics", "piqe", "--no-mlflow"], ["error: checkpoint", "nope.safetensors",
                                                                       "not found"]),
    "eval data missing": (["eval", "--checkpoint", "none", "--data", "{tmp}/nodata", "--metrics", "piqe",
                           "--no-mlflow"], ["error: --data", "nodata"]),
    "eval device choice": (["eval", "--checkpoint", "none", "--data", ".", "--device", "tpu"],
                           ["argument --device: invalid choice: 'tpu'"]),
    "restore missing checkpoint": (["restore", "--checkpoint", "{tmp}/nope.pth", "--input", "{data}",
                                    "--output", "{tmp}/o"], ["error:", "nope.pth"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_cli_value(case, tmp_path, capsys, monkeypatch):
    argv, fragments = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "imgs"
    data.mkdir()
    import numpy as np

    from ._faults import png

    (data / "a.png").write_bytes(png(np.full((32, 32, 3), 128, np.uint8)))
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o").exists()


def test_resume_path_without_state(tmp_path, capsys, monkeypatch):
    """--resume naming a folder that is not a checkpoint: refused before any step, named."""
    monkeypatch.chdir(tmp_path)
    from ._faults import write_shards

    write_shards(tmp_path / "shards" / "syn", "syn", 1, 2)
    path = _cfg(tmp_path)
    (tmp_path / "notackpt").mkdir()
    code, err = _run(capsys, ["train", "teacher", "--config", str(path), "--resume", str(tmp_path / "notackpt")])
    assert code == 2, err
    assert f"resume checkpoint {tmp_path / 'notackpt'} has no state.pt" in err
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_resume_path_that_does_not_exist_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    """--resume naming a path that is not there left an empty run folder holding a lock behind."""
    monkeypatch.chdir(tmp_path)
    from ._faults import write_shards

    write_shards(tmp_path / "shards" / "syn", "syn", 1, 2)
    path = _cfg(tmp_path)
    code, err = _run(capsys, ["train", "teacher", "--config", str(path), "--resume", str(tmp_path / "typo")])
    assert code == 2, err
    assert f"error: resume checkpoint {tmp_path / 'typo'} does not exist" in err
    assert not (tmp_path / "out").exists()
