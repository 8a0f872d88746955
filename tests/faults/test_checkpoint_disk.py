"""Unsafe or damaged checkpoints, and a disk that fills up while one is written.

- A pickle with code in it (its __reduce__ would create a marker file), as an official `.pth`, as a
  teacher in a cache config, and as a resume checkpoint's `state.pt`/RNG file: refused with an
  `error:` line naming the file, and the marker never appears (nothing executed).
- Truncated files (exported weights, official `.pth`, a resume checkpoint's `state.pt` or weights):
  refused with an `error:` line naming the file.
- ENOSPC while a checkpoint or exported weights are written (injected into the atomic write path,
  and for real on a small tmpfs when this machine lets us mount one): the write fails, the
  previous checkpoint is intact and loadable, and `--resume auto` continues from it.

tests/test_models.py pins load_checkpoint's refusals (function level); here: through the CLI and the
trainer's resume path."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from uniremoval.cli import main
from uniremoval.errors import CheckpointError

from ._faults import png, tiny_teacher_cfg, write_shards, write_yaml


class Payload:
    """Unpickling this calls open(marker, 'w'): code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def teacher_cfg(root: Path, **over) -> dict:
    return tiny_teacher_cfg(root, project="faults", steps=4, keep_last=3, mlflow=False, **over)


def fit(cfg_path: Path, max_steps: int, resume: str | None = None):
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    cfg = load_config(cfg_path, [f"train.max_steps={max_steps}"], stage="teacher")
    return Trainer(cfg, TeacherTraining(cfg)).fit(resume=resume)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher run stopped at step 2: checkpoints/step-00000002 and last.safetensors."""
    root = tmp_path_factory.mktemp("ckpt")
    write_shards(root / "shards" / "syn", "syn", 2, 2)
    cfg_path = write_yaml(root / "teacher.yaml", teacher_cfg(root))
    res = fit(cfg_path, 2)
    assert res.step == 2
    return root


def _copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(trained / "outputs", tmp_path / "outputs")
    cfg_path = write_yaml(tmp_path / "teacher.yaml", teacher_cfg(tmp_path, data={
        **teacher_cfg(tmp_path)["data"], "train": [{"name": "syn", "shards": str(trained / "shards" / "syn"),
                                                    "degradation": "haze"}]}))
    return cfg_path, tmp_path / "outputs" / "teacher-haze"


def _images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    (d / "a.png").write_bytes(png(np.full((32, 32, 3), 100, np.uint8)))
    return d


# ------------------------------------------------------------------------------ code in a pickle


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_refused_everywhere(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe))).close()  # the payload does run code when unpickled
    assert probe.exists()
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"weight": Payload(marker)}}, evil)

    # 1. eval --checkpoint evil.pth
    code, err = _run(capsys, ["eval", "--checkpoint", str(evil), "--data", str(_images(tmp_path)),
                              "--metrics", "piqe", "--no-mlflow"])
    assert code == 2 and "evil.pth: refused to load" in err and "Traceback" not in err, err
    # 2. restore --checkpoint evil.pth
    code, err = _run(capsys, ["restore", "--checkpoint", str(evil), "--input", str(_images(tmp_path)),
                              "--output", str(tmp_path / "restored")])
    assert code == 2 and "evil.pth: refused to load" in err, err
    assert not list((tmp_path / "restored").glob("*.png")) if (tmp_path / "restored").exists() else True
    # 3. a teacher of the cache stage
    cache_cfg = {"stage": "cache", "project": "faults", "name": "cache", "output_dir": str(tmp_path / "outputs"),
                 "model": {"preset": "tiny"}, "teachers": {"checkpoints": {"haze": str(evil)}},
                 "data": {"degradations": ["haze"], "num_workers": 0,
                          "train": [{"name": "syn", "shards": str(trained / "shards" / "syn"), "degradation": "haze"}]},
                 "train": {"cpu": True}, "cache": {"out": str(tmp_path / "cache")}, "tracking": {"enabled": False}}
    code, err = _run(capsys, ["cache", "--config", str(write_yaml(tmp_path / "cache.yaml", cache_cfg))])
    assert code == 2 and "evil.pth: refused to load" in err, err
    assert not list((tmp_path / "cache").rglob("*.tar")) if (tmp_path / "cache").exists() else True
    # 4. a resume checkpoint whose state.pt (or RNG file) carries code
    cfg_path, run = _copy_run(trained, tmp_path)
    ck = run / "checkpoints" / "step-00000002"
    for victim in ("state.pt", "rng-rank0.pt"):
        saved = (ck / victim).read_bytes()
        torch.save({"step": 2, "x": Payload(marker)}, ck / victim)
        code, err = _run(capsys, ["train", "teacher", "--config", str(cfg_path), "--resume", "auto"])
        assert code == 2, err
        assert victim in err and "Traceback" not in err, err
        (ck / victim).write_bytes(saved)
    assert not marker.exists()


# ------------------------------------------------------------------------------ truncated files


def test_truncated_checkpoints_refused_with_name(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_path, run = _copy_run(trained, tmp_path)
    imgs = _images(tmp_path)

    def cut(path: Path, keep: float = 0.5) -> bytes:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return data

    # exported weights read by eval and restore
    whole = cut(run / "last.safetensors")
    for argv in (["eval", "--checkpoint", str(run / "last.safetensors"), "--data", str(imgs), "--metrics", "piqe",
                  "--no-mlflow"],
                 ["restore", "--checkpoint", str(run / "last.safetensors"), "--input", str(imgs), "--output",
                  str(tmp_path / "r")]):
        code, err = _run(capsys, argv)
        assert code == 2 and "last.safetensors: truncated or corrupt" in err, err
    (run / "last.safetensors").write_bytes(whole)

    # an official-style .pth cut in half
    pth = tmp_path / "official.pth"
    from uniremoval.models import build_model

    torch.save({"state_dict": build_model("mprnet", "tiny").state_dict()}, pth)
    cut(pth)
    code, err = _run(capsys, ["eval", "--checkpoint", str(pth), "--data", str(imgs), "--metrics", "piqe",
                              "--no-mlflow"])
    assert code == 2 and "official.pth: truncated or corrupt" in err, err

    # the parts of a resume checkpoint
    ck = run / "checkpoints" / "step-00000002"
    for victim in ("state.pt", "teacher.safetensors", "rng-rank0.pt"):
        whole = cut(ck / victim)
        code, err = _run(capsys, ["train", "teacher", "--config", str(cfg_path), "--resume", "auto"])
        assert code == 2, err
        assert f"{victim}" in err and "Traceback" not in err, err
        (ck / victim).write_bytes(whole)


# ------------------------------------------------------------------------------ full disk


class _FullDiskFile:
    """A file whose writes fail with ENOSPC once `budget` bytes are written (a disk filling up)."""

    def __init__(self, fh, budget: int) -> None:
        self._fh, self._left = fh, budget

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def fill_disk_after(monkeypatch, budget: int = 4096, files: int = 0) -> None:
    """Files written through uniremoval.io.atomic_writer: the first `files` complete, every later one
    gets `budget` bytes, then ENOSPC (the disk is full)."""
    import uniremoval.io as uio

    opened = {"n": 0}

    def fdopen(fd, mode="r", *a, **k):
        fh = os.fdopen(fd, mode, *a, **k)
        opened["n"] += 1
        return fh if opened["n"] <= files else _FullDiskFile(fh, budget)

    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.fdopen = fdopen
    monkeypatch.setattr(uio, "os", fake_os)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_intact_then_resume(cfg_path: Path, run: Path) -> None:
    from uniremoval.models.checkpoint import load_checkpoint
    from uniremoval.stages.run_folder import list_checkpoints

    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    load_checkpoint(run / "checkpoints" / "step-00000002" / "teacher.safetensors")  # loads, sha matches its json
    load_checkpoint(run / "last.safetensors")
    res = fit(cfg_path, 4, resume="auto")
    assert res.status == "finished" and res.step == 4
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no temporary left behind


def _assert_says_disk_full(message: str, run: Path) -> None:
    assert "the disk is full" in message and "--resume auto" in message, message
    assert str(run / "checkpoints" / "step-00000002") in message, message  # the checkpoint that is intact


def test_enospc_during_checkpoint_keeps_previous(trained, tmp_path, monkeypatch):
    cfg_path, run = _copy_run(trained, tmp_path)
    before = {k: v.clone() for k, v in _weights(run / "checkpoints" / "step-00000002" / "teacher.safetensors").items()}
    last_before = (run / "last.safetensors").read_bytes()
    with monkeypatch.context() as m:
        fill_disk_after(m)
        with pytest.raises(CheckpointError) as err:
            fit(cfg_path, 4, resume="auto")
    _assert_says_disk_full(str(err.value), run)
    assert err.value.__cause__.errno == errno.ENOSPC
    assert not (run / "checkpoints" / "step-00000004").exists()
    got = _weights(run / "checkpoints" / "step-00000002" / "teacher.safetensors")
    assert all(torch.equal(before[k], got[k]) for k in before)
    assert (run / "last.safetensors").read_bytes() == last_before
    _assert_intact_then_resume(cfg_path, run)


def test_enospc_during_weight_export_keeps_previous(tmp_path, monkeypatch):
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    a, b = build_model("mprnet", "tiny"), build_model("mprnet", "tiny")
    save_checkpoint(tmp_path / "last", a, {"step": 1})
    with monkeypatch.context() as m:
        fill_disk_after(m, budget=1000)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path / "last", b, {"step": 2})
    model, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 1
    ref = a.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs (a real disk that fills up); skipped where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the injected-ENOSPC tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_real_full_disk_during_checkpoint(trained, tmpfs, tmp_path):
    shutil.copytree(trained / "outputs", tmpfs / "outputs")
    cfg = teacher_cfg(tmpfs)
    cfg["data"]["train"][0]["shards"] = str(trained / "shards" / "syn")
    cfg_path = write_yaml(tmp_path / "teacher.yaml", cfg)
    run = tmpfs / "outputs" / "teacher-haze"
    filler = _fill(tmpfs)
    # torch.save reports ENOSPC as a RuntimeError from its zip writer, safetensors/json as OSError:
    # either way the user reads one message that says the disk is full and what to do
    with pytest.raises(CheckpointError) as err:
        fit(cfg_path, 4, resume="auto")
    _assert_says_disk_full(str(err.value), run)
    assert not (run / "checkpoints" / "step-00000004").exists()
    filler.unlink()  # the operator frees space, then resumes
    _assert_intact_then_resume(cfg_path, run)


# ------------------------------------------------------------------------------ full disk, shards


def _build(capsys, imgs: Path, out: Path) -> tuple[int, str]:
    code = main(["shards", "build", "--format", "folder", "--root", str(imgs), "--degradation", "haze", "--out",
                 str(out), "--max-samples-per-shard", "1", "--workers", "1", "--no-progress"])
    o = capsys.readouterr()
    return code, o.out + o.err


def test_enospc_during_shard_build(tmp_path, capsys, monkeypatch):
    from uniremoval.data.manifest import verify_shards

    from ._faults import dataset_keys, tar_keys

    imgs = tmp_path / "raw"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (imgs / f"img{i}.png").write_bytes(png(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))

    # 1. the disk fills mid-build: the shards written before are complete and readable
    out = tmp_path / "a"
    with monkeypatch.context() as m:
        fill_disk_after(m, budget=2000, files=2)
        code, text = _build(capsys, imgs, out)  # one error line, no traceback (cli.main)
        assert code == 2 and "error: No space left on device" in text and "Traceback" not in text, text
        assert "rerun" in text.strip().splitlines()[-1]
    tars = sorted(p.name for p in out.glob("*.tar"))  # (the builder's state file is written between tars)
    assert 1 <= len(tars) < 6, tars
    assert [len(tar_keys(out / t)) for t in tars] == [1] * len(tars)  # each complete and readable
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    code, text = _build(capsys, imgs, out)  # space freed: the build completes
    assert code == 0, text
    assert len(set(dataset_keys(out))) == 6 and verify_shards(out) == []

    # 2. a rebuild (one input changed) on a full disk: the previous shard and manifest stay intact
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".tar", ".json")}
    (imgs / "img3.png").write_bytes(png(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))
    with monkeypatch.context() as m:
        fill_disk_after(m, budget=100)
        code, text = _build(capsys, imgs, out)
        assert code == 2 and "No space left on device" in text, text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".tar", ".json")} == before
    assert verify_shards(out) == []  # the old dataset is whole and consistent
    assert not list(out.glob(".*.tmp"))


def test_enospc_during_cache_names_the_shard_and_keeps_the_previous(tmp_path, capsys, monkeypatch):
    """A disk that fills while a cache shard is rewritten (new teacher weights): one error line that
    names the shard (a tar's own write error names no file), and the previous shard, its done-record
    and the manifest stay as they were; with space again the rerun completes the cache."""
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.stages.cache import check_cache

    write_shards(tmp_path / "shards" / "syn", "syn", 2, 1)
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(save_checkpoint(tmp_path / f"teacher{seed}", build_model("mprnet", "tiny"),
                                        {"stage": "teacher", "degradation": "haze", "preset": "tiny",
                                         "input_range": "minus_one_one"}))
    cfg = write_yaml(tmp_path / "cache.yaml", {
        "stage": "cache", "project": "faults", "model": {"preset": "tiny"},
        "teachers": {"checkpoints": {"haze": str(teachers[0])}},
        "data": {"degradations": ["haze"], "train": [{"name": "syn", "shards": str(tmp_path / "shards" / "syn"),
                                                      "degradation": "haze"}]},
        "cache": {"out": str(tmp_path / "cache"), "workers": 0}, "tracking": {"enabled": False}})
    assert _run(capsys, ["cache", "--config", str(cfg)])[0] == 0
    out = tmp_path / "cache" / "syn"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        fill_disk_after(m, budget=1000)
        code, text = _run(capsys, ["cache", "--config", str(cfg), f"teachers.checkpoints.haze={teachers[1]}"])
    error = [line for line in text.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(error) == 1 and "Traceback" not in text, text
    assert "No space left on device" in error[0] and str(out / "syn-000000.tar") in error[0], error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no temporary left
    check_cache(out, {"haze": str(teachers[0])})
    assert _run(capsys, ["cache", "--config", str(cfg), f"teachers.checkpoints.haze={teachers[1]}"])[0] == 0
    check_cache(out, {"haze": str(teachers[1])})


def test_a_full_disk_on_rank_0_alone_ends_a_two_process_run_at_once(tmp_path):
    """DDP: rank 0's disk fills up while it writes a checkpoint, rank 1 waits for it in a collective.
    Rank 0 gives its one error line (the disk is full, resume with --resume auto) and the launcher
    ends rank 1 at once rather than after a collective timeout; no half-written checkpoint is left."""
    import re
    import sys

    from ._faults import ROOT, env

    write_shards(tmp_path / "shards" / "syn", "syn", 4, 2)
    cfg = write_yaml(tmp_path / "teacher.yaml", teacher_cfg(tmp_path))
    accelerate = Path(sys.executable).parent / "accelerate"
    # No timed assertion: a rank left in a collective waits out its 30-min timeout, far past timeout=240.
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                        str(ROOT / "tests" / "dist_trainer_teacher.py"), "diskfull", str(cfg)],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode != 0, p.stderr[-3000:]
    # rank 1 may see rank 0 go first: its line says it lost contact (cli._lost_peer), not a traceback
    lost = [line for line in p.stderr.splitlines() if line.startswith("error: this process lost contact")]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ") and line not in lost]
    assert len(errors) == 1 and "checkpoint" in errors[0] and "the disk is full" in errors[0], p.stderr[-3000:]
    assert "--resume auto" in errors[0] and re.search(r"exitcode\W+2\b", p.stderr), p.stderr[-3000:]
    ckpts = tmp_path / "outputs" / "teacher-haze" / "checkpoints"
    assert not list(ckpts.glob("step-*")) and not list(ckpts.glob(".step-*.tmp"))


def test_atomic_writes_replace_plain_files_under_dev_and_keep_other_errors_as_they_are(tmp_path):
    """Only a descriptor link (/dev/stdout, /dev/fd/N) or a non-file is a stream: a plain file under
    /dev/shm (a common output_dir) is replaced as anywhere else, not appended to. And an OSError
    with no errno raised while writing (Pillow's "image file is truncated") keeps its text; only a
    write error gets the file named."""
    from uniremoval.io import atomic_write_json, atomic_writer, is_stream

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    target = Path(tempfile.mkdtemp(dir=shm)) / "weights.json"
    try:
        atomic_write_json(target, {"a": 1})
        atomic_write_json(target, {"a": 2})
        assert json.loads(target.read_text()) == {"a": 2} and not is_stream(target)
    finally:
        shutil.rmtree(target.parent)
    assert is_stream("/dev/stdout") and is_stream("/dev/fd/1") and is_stream("-")
    with pytest.raises(OSError) as err, atomic_writer(tmp_path / "x.tar") as fh:
        fh.write(b"x")
        raise OSError("image file is truncated")
    assert str(err.value) == "image file is truncated" and not list(tmp_path.iterdir())


def test_a_full_disk_at_the_output_folder_lock_is_the_os_error_itself_in_one_process(tmp_path):
    """With several processes, ENOSPC while rank 0 takes the folder's lock (or clears what a killed job left)
    becomes the refusal every rank raises (two real processes: tests/test_multinode.py); a single process
    has no one waiting and keeps the OSError itself."""
    from uniremoval import launch

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        launch.lock_on_main_process(types.SimpleNamespace(is_main_process=True, num_processes=1), tmp_path, "x",
                                    prepare=full)


def test_a_model_with_a_parameter_no_step_uses_is_named_on_two_processes(tmp_path):
    """An architecture of one's own with a layer some forward leaves out (README: Extending) trained on one
    process and failed on two with a raw traceback from every rank: DDP's 'Expected to have finished
    reduction in the prior iteration', whose advice (find_unused_parameters=True) no config reached. Now
    one error line per rank names train.find_unused_parameters, and that setting trains."""
    import sys

    from ._faults import ROOT, env

    write_shards(tmp_path / "shards" / "syn", "syn", 4, 2)
    cfg = write_yaml(tmp_path / "teacher.yaml", teacher_cfg(tmp_path))
    accelerate = Path(sys.executable).parent / "accelerate"

    def launch(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                               str(ROOT / "tests" / "dist_trainer_teacher.py"), "unused", str(cfg), *overrides],
                              cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240, check=False)

    p = launch()
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("set train.find_unused_parameters=true" in e for e in errors), p.stderr[-3000:]
    assert "RuntimeError: Expected to have finished reduction" not in p.stderr, p.stderr[-3000:]  # no rank's traceback
    p = launch("train.find_unused_parameters=true", "name=teacher-unused")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "outputs" / "teacher-unused" / "last.safetensors").is_file()
