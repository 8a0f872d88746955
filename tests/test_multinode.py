"""Several nodes: what a job needs of them and how it fails when they differ. The collectives are
stubbed (one process plays one rank of two); two simulated nodes were run
by hand (README: "Several nodes")."""

from __future__ import annotations

import types

import pytest

from uniremoval import launch
from uniremoval.errors import UniremovalError


def _rank(monkeypatch, main: bool, views_of_others: list, marker: str = ".rank-check-x") -> dict:
    """Play one rank of two: rank 0 (main) or rank 1. `views_of_others` is what the other rank
    reports (seen, host); the collectives hand out the marker's name and gather the views."""
    import accelerate.utils
    import torch.distributed

    got = {}

    def broadcast(box, from_process=0):
        got["marker"] = box[0] if main else marker
        box[0] = got["marker"]
        return box

    def gather(obj):
        got["mine"] = obj[0]
        return [obj[0], *views_of_others] if main else [*views_of_others, obj[0]]

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda box, src=0: box)  # the lock's refusal
    monkeypatch.setattr(launch, "SEE_WAIT_S", 0.2)
    return got


def test_a_rank_that_does_not_see_the_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # Two nodes without a shared file system: rank 1's output folder is another (empty) one. Before,
    # the run trained until its first checkpoint, where rank 1 failed with a RuntimeError traceback
    # ("Parent directory .../checkpoints/.step-00000002.tmp does not exist") and the job died hours in.
    got = _rank(monkeypatch, main=False, views_of_others=[(True, "node-a")])
    acc = types.SimpleNamespace(is_main_process=False, num_processes=2)
    with pytest.raises(UniremovalError, match=r"rank 1 on .* does not see .*run, where rank 0 on node-a writes the run 'kt'") as exc:
        launch.lock_on_main_process(acc, tmp_path / "run", "the run 'kt'")
    assert exc.value.on_every_rank  # every rank raises together (cli.main leaves the process group)
    assert "same output paths" in str(exc.value)
    assert got["mine"][0] is False


def test_the_main_rank_names_the_rank_that_is_blind_and_leaves_no_marker(tmp_path, monkeypatch):
    got = _rank(monkeypatch, main=True, views_of_others=[(False, "node-b")])
    acc = types.SimpleNamespace(is_main_process=True, num_processes=2)
    with pytest.raises(UniremovalError, match=r"rank 1 on node-b does not see"):
        launch.lock_on_main_process(acc, tmp_path / "run", "the run 'kt'")
    assert got["mine"][0] is True  # rank 0 sees its own marker...
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # ...and removes it


def test_a_shared_output_folder_passes(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".rank-check-x").write_text("node-a")  # rank 0's marker, seen through the shared folder
    got = _rank(monkeypatch, main=False, views_of_others=[(True, "node-a")])
    acc = types.SimpleNamespace(is_main_process=False, num_processes=2)
    launch.lock_on_main_process(acc, tmp_path / "run", "the run 'kt'").close()
    assert got["mine"][0] is True


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


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    cli = _cli_raising(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main([])


def test_an_error_every_rank_lists_alike_is_raised_on_every_rank_together(monkeypatch):
    """agreed_listing raised the error every rank's listing held (eval's wrong --degradation, refused
    from the manifest) unmarked, after a collective: cli.main then left the process group unclean
    and a rank aborted (SIGABRT) instead of exiting 2. Marked on_every_rank, as the other refusals."""
    import accelerate.utils

    from uniremoval.errors import DataError

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: [obj[0], obj[0]])  # rank 1 agrees

    def make():
        raise DataError("--degradation snow: the samples of --data x are ['rain']")

    with pytest.raises(DataError, match="--degradation snow") as exc:
        launch.agreed_listing(2, make, list, "files in --data x", launch.SAME_FILES_FIX)
    assert getattr(exc.value, "on_every_rank", False)
