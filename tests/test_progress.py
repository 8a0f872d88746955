"""Progress in a log (a batch job's stderr is a file): whole lines, never tqdm's carriage-return redraws."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from uniremoval.progress import LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_and_a_log_gets_lines():
    from tqdm import tqdm

    bar = progress_bar(10, "x", "img", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, "x", "img", file=io.StringIO()), LogLines)
    assert isinstance(progress_bar(10, "x", "img", file=io.StringIO(), disable=True), tqdm)  # disabled: silent


def test_log_lines_on_postfix_count_rate_eta_and_one_last_line(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("uniremoval.progress.time.monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = progress_bar(10, "kt", "step", initial=2, file=log, every_s=None, on_postfix=True)
    for _ in range(4):
        clock[0] += 0.5
        bar.update(1)
    assert log.getvalue() == ""  # only the postfix (the trainer's log step) writes
    bar.set_postfix({"total": "0.25", "pixel": "0.1"}, refresh=False)
    # 4 steps in 2 s since this run's start (the 2 resumed ones are not in the rate); 4 left at 2 step/s
    assert log.getvalue() == "kt: 6/10 step (60%), 2 step/s, eta 0:00:02 | total=0.25, pixel=0.1\n"
    bar.close()
    bar.close()
    assert log.getvalue().count("\n") == 1  # closed at a count already shown: no second line
    assert "\r" not in log.getvalue()


def test_log_lines_every_interval_and_at_the_end_without_a_total(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("uniremoval.progress.time.monotonic", lambda: clock[0])
    log = io.StringIO()
    with progress_bar(None, "cache (rank 0)", "img", file=log, every_s=60) as bar:
        bar.set_postfix_str("syn_haze/000000.tar", refresh=False)
        for _ in range(3):
            clock[0] += 30
            bar.update(10)
    lines = log.getvalue().splitlines()
    # 60 s in: one line; the last update (90 s) was not shown, so closing shows it
    assert lines == ["cache (rank 0): 20 img, 0.333 img/s | syn_haze/000000.tar",
                     "cache (rank 0): 30 img, 0.333 img/s | syn_haze/000000.tar"]


def test_training_in_a_log_writes_a_line_per_log_step(tmp_path, capsys):
    """The trainer's bar in a batch job's log wrote a carriage-return redraw up to ten times a second (one
    line of megabytes a day); it writes one line at each train.log_every step, with that window's losses."""
    from test_trainer import ToyStage, make_cfg

    from uniremoval.stages.trainer import Trainer

    stage = ToyStage(make_cfg(tmp_path))  # 10 steps, log_every 2
    capsys.readouterr()
    assert Trainer(stage.cfg, stage).fit().step == 10
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("toy: ")]
    assert [re.match(r"toy: (\d+)/10 step \((\d+)%\)", line).groups() for line in lines] == [
        (str(s), str(10 * s)) for s in (2, 4, 6, 8, 10)], err
    assert all(re.search(r" \| mse=[-0-9.e]+$", line) for line in lines), lines  # the window's loss
    assert all("eta " in line for line in lines[:-1]) and "eta" not in lines[-1]


@pytest.mark.parametrize("progress", [True, False])
def test_shards_build_in_a_log_writes_lines(tmp_path, capsys, progress):
    from PIL import Image

    from uniremoval.cli import main

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 12), (i, 2 * i, 3 * i)).save(tmp_path / "photos" / f"{i}.png")
    args = ["shards", "build", "--format", "folder", "--root", str(tmp_path / "photos"), "--degradation", "clear",
            "--out", str(tmp_path / "out")]
    assert main(args + ([] if progress else ["--no-progress"])) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    shown = [line for line in err.splitlines() if line.startswith("shards ")]
    assert (shown[-1].startswith("shards out: 3/3 img (100%)") if progress else shown == []), err


def test_restore_in_a_log_writes_lines(tmp_path, capsys):
    from PIL import Image

    from uniremoval.cli import main
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    ckpt = save_checkpoint(tmp_path / "m" / "last", MPRNet("tiny").eval(), {"run_name": "m"})
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(tmp_path / "in" / f"{i}.png")
    assert main(["restore", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "restore: 2/2 img (100%), " in err, err
