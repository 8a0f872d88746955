"""Damaged shard data: a truncated tar, a corrupt image inside a shard, a shard listed in the manifest
but missing, and checksum mismatches (tar header checksum, image payload checksum, manifest sha256).

Each is detected, reported by name (shard file, and key where one sample is bad) and handled by the
configured policy: `data.bad_samples: skip` goes on and counts (training logs `train/bad_samples`
and warns with the shard/key), `fail` stops with a DataError naming it. Evaluation always fails
(a score over a silently smaller test set would be wrong); `shards verify` lists each problem.

Loader-level skip/fail on truncated shards and corrupt images is also pinned in
tests/test_pipelines.py; here every fault kind goes through verify, the eval CLI, the training
loader and the teacher trainer."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest

from uniremoval.cli import main
from uniremoval.errors import DataError

from ._faults import write_shards, write_yaml

FAULTS = ("truncated", "corrupt_image", "missing", "header_checksum", "payload_checksum")


def _rewrite(path: Path, change) -> None:
    """Rewrite a tar member by member; `change(name, data) -> data`."""
    members = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            members.append((m, tf.extractfile(m).read() if m.isfile() else None))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in members:
            if data is not None:
                data = change(m.name, data)
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def inject(folder: Path, fault: str, index: int = 1) -> tuple[str, str | None]:
    """Damage shard `index` of the dataset in `folder`; return (shard name, bad key or None)."""
    shard = folder / f"syn-{index:06d}.tar"
    if fault == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: int(len(data) * 0.6)])
        return shard.name, None
    if fault == "missing":
        shard.unlink()
        return shard.name, None
    if fault == "header_checksum":
        data = bytearray(shard.read_bytes())
        with tarfile.open(shard) as tf:
            off = tf.getmembers()[1].offset  # the second member's header: its name field
        data[off + 5] ^= 0x01
        shard.write_bytes(bytes(data))
        return shard.name, None
    key = f"syn_{index}_1"
    if fault == "corrupt_image":
        _rewrite(shard, lambda n, d: b"\x89PNG\r\n\x1a\n" + b"not an image" * 10 if n == f"{key}.input.png" else d)
    else:  # payload_checksum: one byte of the compressed pixels flipped (PNG CRC/zlib check fails)
        def flip(n: str, d: bytes) -> bytes:
            if n != f"{key}.input.png":
                return d
            b = bytearray(d)
            b[d.find(b"IDAT") + 40] ^= 0xFF
            return bytes(b)

        _rewrite(shard, flip)
    return shard.name, key


@pytest.fixture
def damaged(tmp_path, request):
    fault = request.param
    folder = tmp_path / "syn"
    keys = write_shards(folder, "syn", 3, 3)
    name, key = inject(folder, fault)
    return {"fault": fault, "folder": folder, "shard": name, "key": key, "keys": keys, "root": tmp_path}


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("damaged", FAULTS, indirect=True)
def test_verify_names_the_shard(damaged, capsys):
    code, text = _run(capsys, ["shards", "verify", str(damaged["folder"])])
    assert code == 1, text
    assert damaged["shard"] in text
    if damaged["fault"] == "missing":
        assert f"{damaged['shard']}: missing" in text
    else:
        assert f"{damaged['shard']}: sha256 differs from the manifest" in text
    if damaged["key"]:
        assert f"{damaged['shard']}:{damaged['key']}" in text  # the bad sample by key
    # the undamaged shards are not blamed
    assert "syn-000000.tar" not in text and "syn-000002.tar" not in text


@pytest.mark.parametrize("damaged", FAULTS, indirect=True)
def test_eval_stream_skip_counts_fail_names(damaged):
    from uniremoval.data.pipelines import eval_samples

    items = list(eval_samples(str(damaged["folder"]), require=("target",), bad_samples="skip"))
    good = [i["key"] for i in items if "error" not in i]
    bad = [i for i in items if "error" in i]
    assert len(bad) == 1, bad  # one record per fault, naming where
    assert damaged["shard"] in json.dumps(bad[0], default=str)
    # every sample outside the damaged shard, each exactly once
    others = [k for k in damaged["keys"] if not k.startswith("syn_1_")]
    assert sorted(k for k in good if not k.startswith("syn_1_")) == sorted(others)
    assert len(good) == len(set(good))
    with pytest.raises(DataError) as err:
        list(eval_samples(str(damaged["folder"]), require=("target",), bad_samples="fail"))
    assert damaged["shard"] in str(err.value)
    if damaged["key"]:
        assert damaged["key"] in str(err.value)


@pytest.mark.parametrize("damaged", FAULTS, indirect=True)
def test_training_loader_skip_counts_fail_names(damaged):
    from uniremoval.data.pipelines import kt_loader

    def loader(policy: str):
        return kt_loader([("syn", str(damaged["folder"]), "haze", 1.0)], ["haze"], batch_size=2, crop_size=32,
                         steps_per_epoch=6, num_workers=0, seed=0, rank=0, world_size=1, cell=16,
                         bad_samples=policy, require=("target",), shuffle_buffer=2)

    batches = list(loader("skip"))
    assert len(batches) == 6  # the epoch is complete despite the fault
    assert sum(int(b["bad_samples"]) for b in batches) >= 1
    assert all("syn_1_1" != k for b in batches for k in b["key"]) if damaged["key"] else True
    with pytest.raises(DataError) as err:
        list(loader("fail"))
    assert damaged["shard"] in str(err.value)
    if damaged["key"]:
        assert damaged["key"] in str(err.value)


@pytest.mark.parametrize("damaged", ["truncated", "missing", "corrupt_image"], indirect=True)
def test_eval_cli_fails_naming_the_shard(damaged, capsys, monkeypatch):
    monkeypatch.chdir(damaged["root"])
    code, text = _run(capsys, ["eval", "--checkpoint", "none", "--data", str(damaged["folder"]),
                               "--metrics", "psnr", "--no-mlflow", "--json", str(damaged["root"] / "scores.json")])
    assert code == 2, text
    assert text.count("error:") == 1 and damaged["shard"] in text and "Traceback" not in text
    assert not (damaged["root"] / "scores.json").exists()  # no score over a silently smaller set


def _teacher_cfg(root: Path, folder: Path, policy: str) -> Path:
    return write_yaml(root / f"teacher-{policy}.yaml", {
        "stage": "teacher", "project": "faults", "name": f"t-{policy}", "output_dir": str(root / "outputs"),
        "degradation": "haze", "model": {"preset": "tiny"},
        "data": {"degradations": ["haze"], "batch_size": 2, "crop_size": 32, "num_workers": 0, "shuffle_buffer": 2,
                 "pin_memory": False, "bad_samples": policy,
                 "train": [{"name": "syn", "shards": str(folder), "degradation": "haze"}]},
        "train": {"epochs": 1, "steps_per_epoch": 6, "log_every": 3, "val_every": 100, "cpu": True},
        "checkpoint": {"every_steps": 100}, "tracking": {"enabled": False}})


def test_teacher_training_all_faults_skip_reports_fail_stops(tmp_path):
    """All five faults in one dataset: skip trains to the end, logs the count and names each shard;
    fail stops at the first with its name."""
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    folder = tmp_path / "syn"
    write_shards(folder, "syn", 7, 3)
    damaged = {fault: inject(folder, fault, i) for i, fault in enumerate(FAULTS, start=1)}  # shards 1-5

    cfg = load_config(_teacher_cfg(tmp_path, folder, "skip"), stage="teacher")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Trainer(cfg, TeacherTraining(cfg)).fit()
    assert res.status == "finished" and res.step == 6
    assert res.metrics["train/bad_samples"] >= len(FAULTS)
    said = "\n".join(str(w.message) for w in caught)
    for fault, (shard, key) in damaged.items():
        assert shard in said, (fault, said[-2000:])

    cfg = load_config(_teacher_cfg(tmp_path, folder, "fail"), stage="teacher")
    with pytest.raises(DataError) as err:
        Trainer(cfg, TeacherTraining(cfg)).fit()
    assert any(shard in str(err.value) for shard, _ in damaged.values())
    assert "set data.bad_samples=skip" in str(err.value)


def test_bad_sample_count_survives_a_resume(tmp_path):
    """`train/bad_samples` is the whole run's count: stopping at step 3 and resuming to step 6 logs
    what one uninterrupted run logs (it is stored in state.pt, not restarted at 0)."""
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    folder = tmp_path / "syn"
    write_shards(folder, "syn", 7, 3)
    for i, fault in enumerate(FAULTS, start=1):
        inject(folder, fault, i)

    def fit(name: str, *overrides: str, resume: str | None = None) -> float:
        cfg = load_config(_teacher_cfg(tmp_path, folder, "skip"), [f"name={name}", "checkpoint.every_steps=3",
                                                                   *overrides], stage="teacher")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = Trainer(cfg, TeacherTraining(cfg)).fit(resume=resume)
        assert res.step == 6 or "train.max_steps=3" in overrides
        return res.metrics["train/bad_samples"]

    whole = fit("whole")
    assert whole >= len(FAULTS)
    first = fit("split", "train.max_steps=3")
    assert 0 < first < whole  # some faults lie in the second half, so a restart at 0 would be seen
    assert fit("split", resume="auto") == whole


def test_teacher_training_on_images_smaller_than_the_crop_warns_once(tmp_path):
    """40x48 images and 64-px crops: the run trains on padded crops (nothing is skipped) and says so
    once, over two epochs, naming a sample, its size and the crop."""
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    folder = tmp_path / "syn"
    write_shards(folder, "syn", 2, 3)
    cfg = load_config(_teacher_cfg(tmp_path, folder, "skip"),
                      ["data.crop_size=64", "train.epochs=2", "train.steps_per_epoch=3"], stage="teacher")
    stage = TeacherTraining(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Trainer(cfg, stage).fit()
    assert res.status == "finished" and res.step == 6 and res.metrics["train/bad_samples"] == 0
    said = [str(w.message) for w in caught if "mirror-padded" in str(w.message)]
    assert len(said) == 1, said
    assert "training crop 64x64 (data.crop_size=64) is larger than sample syn_" in said[0]
    assert "(48x40 px, shard " in said[0] and "to 40 or less for this image" in said[0]
    assert stage.crop_padding.samples == 6 * 2  # every sample of 6 batches of 2
    assert res.metrics["train/padded_samples"] == 6 * 2  # what the trainer logs, all ranks, the whole run


def test_one_ranks_bad_sample_ends_a_two_process_run_at_once(tmp_path):
    """DDP: with data.bad_samples=fail, the rank that meets the bad sample stops with its error line,
    and the launcher ends the other rank (waiting in a collective) instead of the job hanging until a
    collective timeout; nothing is checkpointed or exported."""
    import re
    import subprocess
    import sys

    from ._faults import env

    folder = tmp_path / "syn"
    write_shards(folder, "syn", 4, 3)
    shard, key = inject(folder, "corrupt_image", 1)  # shards 0, 2 go to rank 0 and 1, 3 to rank 1
    cfg = _teacher_cfg(tmp_path, folder, "fail")
    accelerate = Path(sys.executable).parent / "accelerate"
    # No timed assertion: a rank left in a collective waits out its 30-min timeout, far past timeout=240.
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                        "-m", "uniremoval", "train", "teacher", "--config", str(cfg)],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode != 0, p.stderr[-3000:]
    # one error line, from the rank that met the sample (counted in the whole text: the other rank's
    # traceback may share a line of stderr with it)
    assert p.stderr.count(f"error: bad sample in shard {folder / shard}, key {key}") == 1, p.stderr[-3000:]
    assert re.search(r"exitcode\W+2\b", p.stderr), p.stderr[-3000:]  # torchrun's root cause: our status 2
    run = tmp_path / "outputs" / "t-fail"
    assert not list(run.glob("checkpoints/step-*")) and not list(run.glob("*.safetensors"))


def test_ranks_that_see_different_shards_or_configs_are_refused(tmp_path):
    """Two processes that disagree on their inputs (a node whose mount lags, another copy of a
    config): each rank splits its own shard list by rank index, so eval scored some images twice and
    others never (a mean over 9 of 12 images, exit 0), the cache never completed (`rerun`, forever),
    and training averaged the gradients of replicas with another lr. Every rank now stops before any
    work with one error line that names the difference."""
    import subprocess
    import sys

    import torch

    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    from ._faults import ROOT, env, tiny_teacher_cfg

    folder = tmp_path / "syn"
    write_shards(folder, "syn", 4, 3)
    eval_args = ["eval", "--checkpoint", "none", "--data", str(folder), "--metrics", "psnr", "--device", "cpu",
                 "--json", str(tmp_path / "scores.json"), "--no-mlflow"]
    teacher = tiny_teacher_cfg(tmp_path, project="faults", steps=2, keep_last=1, mlflow=False)
    teacher["data"]["train"][0]["shards"] = str(folder)
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "teacher", build_model("mprnet", "tiny"), {
        "stage": "teacher", "degradation": "haze", "preset": "tiny", "input_range": "minus_one_one"})
    cache = write_yaml(tmp_path / "cache.yaml", {
        "stage": "cache", "project": "faults", "model": {"preset": "tiny"},
        "teachers": {"checkpoints": {"haze": str(weights)}},
        "data": {"degradations": ["haze"], "train": [{"name": "syn", "shards": str(folder), "degradation": "haze"}]},
        "cache": {"out": str(tmp_path / "cache"), "workers": 0}, "tracking": {"enabled": False}})
    accelerate = Path(sys.executable).parent / "accelerate"
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                        str(ROOT / "tests" / "dist_ranks_disagree.py"), str(tmp_path), "syn-000003.tar",
                        "optim.lr=0.5", json.dumps(eval_args), str(cache),
                        str(write_yaml(tmp_path / "teacher.yaml", teacher))],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    codes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert codes == [{"eval": 2, "cache": 2, "train": 2, "train_shards": 2, "eval_unlisted": 2}] * 2, p.stderr[-3000:]
    # each rank's error line, for each command (the two ranks' lines may share a line of stderr)
    only0 = f"only rank 0 sees {folder / 'syn-000003.tar'}; only the other sees none"
    assert p.stderr.count(f"error: rank 1 and rank 0 see different files in --data {folder}: 4 vs 3 file(s); "
                          f"{only0}") == 2, p.stderr[-3000:]
    assert p.stderr.count("error: rank 1 and rank 0 see different source shards: 4 vs 3 file(s); "
                          f"only rank 0 sees syn: {folder / 'syn-000003.tar'}") == 2, p.stderr[-3000:]
    assert p.stderr.count("error: rank 1 and rank 0 see different configs: optim.lr=0.002 on rank 0, "
                          "0.5 on the other") == 2, p.stderr[-3000:]
    assert p.stderr.count("error: rank 1 and rank 0 see different shard files: 4 vs 3 file(s); only rank 0 sees "
                          f"data.train.0: {folder / 'syn-000003.tar'}; only the other sees none") == 2, p.stderr[-3000:]
    assert p.stderr.count(f"error: rank 1 and rank 0 see different files in --data {folder}: 4 vs 1 file(s); only "
                          f"rank 0 sees {folder / 'syn-000000.tar'}") == 2, p.stderr[-3000:]
    assert f"only the other sees (cannot be listed: {folder} is not mounted here)" in p.stderr
    assert not (tmp_path / "scores.json").exists() and not list(tmp_path.glob("cache/syn/*.tar"))
    assert not (tmp_path / "outputs" / "teacher-haze").exists()
