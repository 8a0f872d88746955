"""Several nodes: what a job needs of them and how it fails when they differ. Two real processes play
two nodes (tests/dist_output_folder.py); the lost-peer line is checked on the error gloo gives; two
simulated nodes were also run by hand (README: "Several nodes")."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dist_kt_common import subprocess_env


def test_the_ranks_agree_on_their_output_folder_or_all_stop_at_the_start(tmp_path):
    """Two real processes (tests/dist_output_folder.py). Two nodes without a shared file system (each rank
    in a folder of its own, so the config's relative output_dir names two folders): before, the run
    trained until its first checkpoint, where rank 1 failed with a RuntimeError traceback ("Parent
    directory .../checkpoints/.step-00000002.tmp does not exist") and the job died hours in; now both
    ranks stop at the start with one line naming the blind rank and rank 0's host, and rank 0 leaves no
    marker. In a shared folder the same launch trains. A full disk on rank 0 when it writes its marker or
    takes the folder's lock raised on rank 0 alone while rank 1 waited in a collective (a hang): now
    every rank stops with rank 0's error. An error every rank's listing holds alike (eval's wrong
    --degradation, refused from the manifest) was raised unmarked after a collective, and a rank aborted
    (SIGABRT) instead of exiting 2: every rank exits 2 with it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from faults._faults import ROOT, env, tiny_teacher_cfg, write_shards, write_yaml

    write_shards(tmp_path / "shards" / "syn", "syn", 2, 2)
    # A relative output_dir: each rank's working folder decides where it points.
    cfg = write_yaml(tmp_path / "teacher.yaml", tiny_teacher_cfg(tmp_path, project="multinode", steps=2, keep_last=1,
                                                                 mlflow=False, output_dir="outputs"))
    accelerate = Path(sys.executable).parent / "accelerate"
    # No timed assertion: a rank left waiting in a collective waits out its 30-min timeout, far past 300 s.
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                        str(ROOT / "tests" / "dist_output_folder.py"), str(cfg), str(tmp_path / "w"), str(tmp_path),
                        str(tmp_path / "shards" / "syn")],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    codes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert codes == [{"blind": 2, "shared": 0, "marker_full": 2, "lock_full": 2, "resume_one_node": 2,
                      "eval_wrong_type": 2}] * 2, (codes, p.stderr[-3000:])
    # Counted in the whole text, not by line: two ranks writing one pipe may interleave their lines.
    err = p.stderr
    assert err.count("error: ") == 10, err[-3000:]  # one line per rank for each of the five refusals
    said = {"blind": "does not see outputs/teacher-haze, where rank 0 on ",
            "marker": "rank 0 cannot write in ", "lock": "rank 0 cannot take the run 'teacher-haze' in ",
            "resume": "rank 1 and rank 0 see different resume checkpoints: ckpt on rank 0, none on the other",
            "wrong type": f"error: --degradation rain: the samples of --data {tmp_path / 'shards' / 'syn'} are ['haze']"}
    for case, text in said.items():
        assert err.count(text) == 2, (case, err[-3000:])
    assert err.count("rank 1 on ") == 2 and err.count("same output paths") == 2, err[-3000:]
    assert err.count("No space left on device") == 4, err[-3000:]
    outputs = {case: tmp_path / "w" / case / "outputs" / "teacher-haze" for case in
               ("node0", "node1", "shared", "marker_full", "lock_full")}
    assert [p.name for p in outputs["node0"].iterdir()] == [".lock"]  # no marker left, nothing trained
    assert not outputs["node1"].exists() or not any(outputs["node1"].iterdir())
    assert (outputs["shared"] / "last.safetensors").exists() and not list(outputs["shared"].glob(".rank-check-*"))
    for case in ("marker_full", "lock_full"):
        assert not list(outputs[case].glob("**/*.safetensors")), case
    assert not (tmp_path / "w" / "resume_one_node").exists()  # refused before the run folder is made


GLOO_LOST = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
             "[127.0.0.1]:23186. This is typically caused by a remote worker crashing. Check the logs of the "
             "remote worker before reporting an error. GLHF!")


def _cli_raising(monkeypatch, exc: Exception, command: str = "train"):
    import argparse

    from uniremoval import cli

    def build():
        parser = argparse.ArgumentParser()
        parser.set_defaults(command=command, func=lambda args: (_ for _ in ()).throw(exc))
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    return cli


@pytest.mark.parametrize(("command", "rerun"), [("train", "--resume auto"), ("eval", "rerun the same command on")])
def test_a_node_that_died_is_one_error_line_on_the_others(monkeypatch, capsys, command, rerun):
    # Measured on two simulated nodes (kill -9 of machine_rank 1 mid-KT): rank 0's next collective
    # failed with this gloo RuntimeError as a 60-line traceback, saying nothing of what to do.
    cli = _cli_raising(monkeypatch, RuntimeError(GLOO_LOST), command)
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: this process lost contact with another process of the job")
    assert "Connection closed by peer" in err and rerun in err and "on every node" in err
    assert len(err.strip().splitlines()) == 1


def test_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    cli = _cli_raising(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main([])
    # the command (cli.entry) shows it as Python would and ends with status 1, through exit_process
    # (a rank of a distributed job then leaves without finalization, where it could abort)
    monkeypatch.setattr(sys, "argv", ["uniremoval"])
    with pytest.raises(SystemExit) as end:
        cli.entry()
    err = capsys.readouterr().err
    assert end.value.code == 1 and err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")


EXIT_SCRIPT = r"""
import atexit, os, sys, tempfile
import torch
import torch.distributed as dist
from uniremoval.launch import exit_process, leave_process_group_at_exit

out = sys.argv[1]
atexit.register(lambda: open(out, "a").write(f"handler initialized={dist.is_initialized()}\n"))
if sys.argv[2] == "dist":
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    leave_process_group_at_exit()
sys.stdout.write("unflushed output")  # no newline: still in the buffer when the process leaves
exit_process(int(sys.argv[3]))
"""


@pytest.mark.parametrize("mode", ["dist", "plain"])
def test_a_rank_ends_with_its_status_after_the_exit_handlers(tmp_path, mode):
    """A rank that finished could abort at interpreter finalization (gloo threads torn down after the
    interpreter: SIGABRT, and the launcher failed the whole job), so the command ends a rank of a
    distributed job with os._exit once the exit handlers ran. They must still run (MLflow's last sends,
    the process group's barrier and destroy, in their order), buffered output must still come out, and
    the status must be the command's; outside a distributed job it is a plain SystemExit."""
    out = tmp_path / "handlers.txt"
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(out), mode, "3"], capture_output=True, text=True,
                       timeout=120, check=False, env=subprocess_env())
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout == "unflushed output"
    # the destroy handler (registered after this one) ran first: the group was let go before it
    assert out.read_text() == "handler initialized=False\n"


def test_the_commands_own_warnings_are_one_warning_line():
    """README promises a `warning:` line; the trainer's and tracking's warnings printed Python's format:
    the file path and line number, then a line of the source code. The command's own are one line;
    another library's keep Python's format (where they come from is the information)."""
    script = ("import warnings, uniremoval.cli as cli\n"
              "def main():\n"
              "    warnings.warn_explicit('resuming x with 1 changed setting(s)', RuntimeWarning, cli.__file__, 1)\n"
              "    warnings.warn_explicit('some library speaks', UserWarning, '/elsewhere/lib.py', 7)\n"
              "    return 0\n"
              "cli.main = main\n"
              "cli.entry()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                       env=subprocess_env())
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "warning: resuming x with 1 changed setting(s)" in lines
    assert "/elsewhere/lib.py:7: UserWarning: some library speaks" in lines
