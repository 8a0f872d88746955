"""`uniremoval demo`: the plan and configs, the bundled images, and the whole pipeline at --quick size.

The end-to-end test runs every stage for real (shards, three teachers, cache, KT, DA, eval,
report) on a few 48-px tiles, then checks the MLflow store and the files, and that a second run
reuses everything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from uniremoval.demo import (
    MARKER,
    Demo,
    ImagesPlan,
    bundled_images,
    clean_workdir,
    default_config_dir,
    demo_table,
    load_plan,
    prepare_images,
    run_demo,
)
from uniremoval.errors import UniremovalError

STAGES = ("teacher", "cache", "kt", "da")


def test_plan_and_stage_configs_load() -> None:
    from uniremoval.config import load_config

    cdir = default_config_dir()
    for quick in (False, True):
        plan = load_plan(cdir, quick)
        assert plan.degradations == ["haze", "rain", "blur"]
        for stage in STAGES:
            files = ([getattr(plan.stages, stage).format(degradation=d) for d in plan.degradations]
                     if stage == "teacher" else [getattr(plan.stages, stage)])
            for f in files:
                cfg = load_config(cdir / f, plan.overrides.get(stage, []), stage=stage)
                assert cfg.project == plan.project
                assert cfg.train.cpu is True
                assert cfg.model.preset == "tiny"
    full, quick = load_plan(cdir, False), load_plan(cdir, True)
    assert quick.images.tile < full.images.tile and len(quick.images.train) < len(full.images.train)
    # the demo's KT feature grid must equal the cache's, or KT refuses the cache
    kt = load_config(cdir / full.stages.kt, stage="kt")
    cache = load_config(cdir / full.stages.cache, stage="cache")
    assert kt.data.feature_cell == cache.data.feature_cell
    assert set(kt.teachers.checkpoints) == set(full.degradations) == set(cache.teachers.checkpoints)


def test_bundled_images_are_files_and_tile(tmp_path: Path) -> None:
    found = bundled_images()
    plan = load_plan(default_config_dir(), quick=False)
    for name in plan.images.train + plan.images.test:
        if not name.startswith("sklearn:"):
            assert found[name].is_file(), name  # inside the installed wheel, no download
    listing = prepare_images(ImagesPlan(train=["astronaut"], test=["chelsea"], short_side=96, tile=48), tmp_path)
    # astronaut 512x512 -> 96x96 -> 2x2 tiles; chelsea 451x300 -> 144x96 -> 3x2 tiles
    assert len(listing["train"]) == 4 and len(listing["test"]) == 6
    from PIL import Image

    for rel in listing["train"] + listing["test"]:
        with Image.open(tmp_path / rel) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
    assert json.loads((tmp_path / "images.json").read_text())["train"] == listing["train"]
    with pytest.raises(UniremovalError, match="not in the installed scikit-image"):
        prepare_images(ImagesPlan(train=["no_such_photo"], test=["chelsea"]), tmp_path / "x")


def test_clean_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(UniremovalError, match="not created by `uniremoval demo`"):
        clean_workdir(mine)
    assert (mine / "precious.txt").exists()
    # nor does a run make the user's folder its own (it replaced and deleted files there, and then
    # --clean deleted the whole folder): refused before anything is written
    (mine / "images").mkdir()
    (mine / "images" / "holiday.jpg").write_text("photo")
    with pytest.raises(UniremovalError, match=r"--workdir .*mine holds files that `uniremoval demo` did not create"):
        Demo(mine, quick=True, log=lambda _m: None).run()
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "images", "images/holiday.jpg", "precious.txt"]
    (mine / MARKER).write_text("")
    clean_workdir(mine)
    assert not mine.exists()


def test_a_workdir_that_is_a_file_and_a_bad_plan_key_are_named(tmp_path: Path) -> None:
    """--workdir naming a file said 'File exists' (run) or 'Not a directory' (--clean); an unknown key in a
    --config-dir's demo.yaml printed pydantic's raw text. Each is one line naming the path or key."""
    import shutil

    from uniremoval.errors import ConfigError

    afile = tmp_path / "afile"
    afile.write_text("mine")
    for workdir in (afile, afile / "sub"):
        with pytest.raises(UniremovalError) as caught:
            Demo(workdir, quick=True, log=lambda _m: None).run()
        assert str(caught.value) == (f"--workdir {workdir}: {afile} is a file, not a folder; give a new or empty "
                                     "folder, e.g. --workdir demo_workspace")
    with pytest.raises(UniremovalError, match=r"--clean: --workdir .*afile is a file, not a folder the demo created"):
        clean_workdir(afile)
    assert afile.read_text() == "mine"
    cdir = tmp_path / "configs"
    shutil.copytree(default_config_dir(), cdir)
    with open(cdir / "demo.yaml", "a") as f:
        f.write("bogus: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_plan(cdir, quick=False)
    assert str(caught.value) == (f"invalid config:\n  {cdir / 'demo.yaml'}: unknown key 'bogus'; allowed keys here: "
                                 "degradations, eval, images, overrides, project, stages, synth")


def test_commands_are_printed_and_their_output_kept_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With the default logger (print) each step shows its `$ uniremoval ...` line on the console, and a
    captured command output (the eval summary, the report text) holds nothing of the demo's own log."""
    import io

    import numpy as np
    from PIL import Image

    data = tmp_path / "d"
    for sub in ("input", "target"):
        (data / sub).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(data / sub / "a.png")
    demo = Demo(tmp_path / "work", quick=True)
    base = tmp_path / "work" / "eval" / "d" / "input"
    argv = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "psnr",
            "--json", str(base / "scores.json"), "--no-mlflow"]
    assert demo._eval(argv, base, "d", "input") == "psnr=inf"
    out = capsys.readouterr().out
    assert "$ uniremoval eval --checkpoint none" in out and "d: 1 images" not in out
    buf = io.StringIO()
    demo.cli(["config", "show", str(default_config_dir() / "kt.yaml")], capture=buf)
    assert "$ uniremoval config show" in capsys.readouterr().out
    assert "$ uniremoval" not in buf.getvalue() and "stage: kt" in buf.getvalue()


def test_a_shards_step_that_cannot_be_reused_builds_its_folder_anew(tmp_path: Path) -> None:
    """A demo plan edited between runs (synth.per_image, or a --params file at another path after the
    clone moved) reran `shards synth` over the demo's folder of the old options, which `shards`
    refuses ("holds dataset ... with another per_image"): the demo stopped. Its own folder is rebuilt."""
    import numpy as np
    from PIL import Image

    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(clean / f"{i}.png")
    demo = Demo(tmp_path / "work", quick=True, log=lambda _m: None)
    out = tmp_path / "work" / "shards" / "s"

    def synth(per: int) -> str:
        return demo._shards(["shards", "synth", "--clean", str(clean), "--degradation", "haze", "--per-image",
                             str(per), "--seed", "1", "--out", str(out), "--workers", "1", "--no-progress"])

    assert synth(1) == "2 samples in 1 shard(s)"
    assert synth(2) == "4 samples in 1 shard(s)"
    assert json.loads((out / "manifest.json").read_text())["source"]["per_image"] == 2


def test_table_layout() -> None:
    evals = {"synth_haze_test|input": {"psnr": 14.0}, "synth_haze_test|kt": {"psnr": 19.5}}
    table = demo_table(evals, ["haze"], ["psnr"])
    lines = table.splitlines()
    assert lines[0] == "| row | syn haze psnr↑ | real-like haze psnr↑ |"
    assert lines[2] == "| degraded input | 14.00 | - |"
    assert lines[3] == "| KT student | 19.50 | - |"


@pytest.mark.slow
def test_quick_demo_end_to_end_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    work = tmp_path / "demo"
    lines: list[str] = []
    # The demo keeps its runs in its own store whatever the shell points at (the report reads them
    # there), and says so: every other command follows $MLFLOW_TRACKING_URI. Nothing listens here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = run_demo(work, quick=True, log=lines.append)
    assert any(f"the demo keeps its runs in its own store sqlite:///{work.resolve() / 'mlflow.db'}, not "
               "$MLFLOW_TRACKING_URI=http://127.0.0.1:9" in line for line in lines)
    ran = {s.name for s in result.steps if s.status == "ran"}
    for step in ("images", "shards synth_haze_train", "shards real_blur_test", "shards clear_train",
                 "teacher-haze", "teacher-rain", "teacher-blur", "cache", "kt", "da",
                 "eval synth_rain_test kt", "eval real_haze_test da", "report"):
        assert step in ran, step
    assert any(line.startswith("[demo ") and "kt: done in" in line for line in lines)  # per-stage timing

    # files
    for rel in ("report.md", "grid.png", "mlflow.db", "images/images.json", "configs/kt.yaml",
                "outputs/teacher-haze/last.safetensors", "outputs/kt/last.safetensors",
                "outputs/da/last.safetensors", "cache/synth_blur_train/manifest.json",
                "shards/real_rain_train/manifest.json", "eval/real_blur_test/da/scores.json"):
        assert (work / rel).is_file(), rel
    report = (work / "report.md").read_text()
    for row in ("degraded input", "KT student", "KT + DA student"):
        assert row in report
    scores = json.loads((work / "eval/synth_haze_test/input/scores.json").read_text())
    assert set(scores["mean"]) >= {"piqe", "psnr", "ssim"} and len(scores["images"]) == 6
    from PIL import Image

    with Image.open(work / "grid.png") as grid:
        assert grid.width == 4 * 48  # input | KT | KT+DA | target

    # the MLflow store: a run per stage, with metrics
    assert result.tracking_uri == f"sqlite:///{work / 'mlflow.db'}"
    assert any(f"mlflow ui --backend-store-uri {result.tracking_uri}" in line for line in lines)
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("uniremoval-demo")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    for name in ("teacher-haze", "teacher-rain", "teacher-blur", "cache", "kt", "da"):
        assert len(by_name.get(name, [])) == 1, (name, sorted(by_name))
        assert by_name[name][0].info.status == "FINISHED"
    assert any(k.startswith("train/") for k in by_name["teacher-rain"][0].data.metrics)
    assert any(k.startswith("val/synth_rain_test/") for k in by_name["teacher-rain"][0].data.metrics)
    kt_metrics = by_name["kt"][0].data.metrics
    assert {"train/pixel", "train/ig", "train/fg"} <= set(kt_metrics), sorted(kt_metrics)
    assert any(k.startswith("train/") for k in by_name["da"][0].data.metrics)
    assert any(k.startswith("cache/") for k in by_name["cache"][0].data.metrics)
    evals = [r for r in runs if r.data.tags.get("stage") == "eval"]
    assert len(evals) == 18  # 6 test sets x (input, KT, DA)
    keys = {k for r in evals for k in r.data.metrics}
    for ds in ("synth_haze_test", "real_blur_test"):
        for metric in ("psnr", "ssim", "piqe"):
            assert f"eval/{ds}/{metric}" in keys
    # Lineage: each run that reads weights names the run that trained them, and each training run the
    # sha256 of what it exported, which the readers' hash tags repeat (a search finds both ends).
    tags = {name: by_name[name][0].data.tags for name in by_name if len(by_name[name]) == 1}
    ids = {name: by_name[name][0].info.run_id for name in tags}
    for deg in ("haze", "rain", "blur"):
        assert tags["cache"][f"teacher_run_id.{deg}"] == tags["kt"][f"teacher_run_id.{deg}"] == ids[f"teacher-{deg}"]
        assert tags["cache"][f"teacher_sha256.{deg}"] == tags["kt"][f"teacher_sha256.{deg}"] in {
            tags[f"teacher-{deg}"]["weights_sha256.best"], tags[f"teacher-{deg}"]["weights_sha256.last"]}
    # the cache folders KT read, by the hash of their manifest.json, as the cache run that wrote them tags it
    cached = {k: v for k, v in tags["kt"].items() if k.startswith("cache_sha256.")}
    assert set(cached) == {f"cache_sha256.synth_{deg}_train" for deg in ("haze", "rain", "blur")}
    assert cached == {k: v for k, v in tags["cache"].items() if k.startswith("cache_sha256.")}
    assert cached["cache_sha256.synth_haze_train"] == hashlib.sha256(
        (work / "cache" / "synth_haze_train" / "manifest.json").read_bytes()).hexdigest()
    assert tags["da"]["init_run_id"] == ids["kt"]
    assert tags["da"]["init_sha256"] in {tags["kt"]["weights_sha256.best"], tags["kt"]["weights_sha256.last"]}
    assert {"weights_sha256.last", "weights_sha256.discriminator-last"} <= set(tags["da"])
    kt_eval = next(r for r in evals if r.info.run_name == "eval-synth_haze_test" and r.data.tags.get("uniremoval.label") == "kt")
    assert kt_eval.data.tags["checkpoint_sha256"] in {tags["kt"]["weights_sha256.best"], tags["kt"]["weights_sha256.last"]}
    assert kt_eval.data.metrics["eval/synth_haze_test/psnr"] == pytest.approx(
        result.evals["synth_haze_test|kt"]["psnr"], abs=1e-6)

    # a second run reuses every step (only the report is redrawn) and trains nothing new
    again = Demo(work, quick=True, log=lambda _m: None).run()
    ran_again = [s.name for s in again.steps if s.status == "ran"]
    assert ran_again == ["report"], ran_again
    runs2 = client.search_runs([exp.experiment_id], max_results=500)
    assert sorted(r.info.run_id for r in runs2 if r.data.tags.get("stage") != "report") == \
        sorted(r.info.run_id for r in runs if r.data.tags.get("stage") != "report")
    assert again.evals == result.evals


def test_same_command_ignores_order_and_defaults() -> None:
    from uniremoval.demo import _same_command

    recorded = ["shards", "synth", "--clean", "/w/images/train", "--degradation", "haze", "--per-image", "1",
                "--seed", "0", "--params", "/p.yaml", "--out", "/w/shards/s", "--name", "s", "--split", "train",
                "--shard-size-mb", "256.0", "--workers", "1", "--no-progress"]
    argv = ["shards", "synth", "--out", "/w/shards/s", "--clean", "/w/images/train", "--degradation", "haze",
            "--per-image", "1", "--seed", "0", "--params", "/p.yaml", "--split", "train", "--name", "s",
            "--workers", "1", "--no-progress"]
    assert _same_command(recorded, argv)
    assert not _same_command(recorded, [*argv[:-2], "2", "--no-progress"])  # other --workers value
    assert not _same_command(recorded, [*argv, "--seed", "1"])  # the last --seed wins: another seed
    assert not _same_command(recorded, [a if a != "haze" else "rain" for a in argv])  # another type
    assert not _same_command(["shards", "synth", "--bogus"], argv)


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_below_one_are_refused_by_the_parser(tmp_path: Path, threads: str, capsys) -> None:
    """--threads 0 silently meant every core and -1 ended in torch's traceback (exit 1)."""
    from uniremoval.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--workdir", str(tmp_path / "w"), "--quick", "--threads", threads])
    assert exc.value.code == 2
    assert "--threads: must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_extending_recipe_runs_a_new_architecture_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README, Extending: one ARCH_SPECS entry and the demo's configs set to it run every stage (teachers,
    cache, KT, DA, eval, report) with an architecture that is not MPRNet: no step may assume MPRNet (its
    presets, crop multiple, three outputs, feature width or official loader)."""
    import shutil

    from mlflow.tracking import MlflowClient

    from uniremoval import models
    from uniremoval.models.checkpoint import load_checkpoint

    monkeypatch.setitem(models.ARCH_SPECS, "toy", models.ArchSpec("_toy_arch", "ToyNet", ("small",), "small"))
    mine = tmp_path / "my" / "demo"
    shutil.copytree(default_config_dir(), mine)
    shutil.copy(default_config_dir().parent / "base.yaml", mine.parent / "base.yaml")
    for name in ("teacher.yaml", "cache.yaml", "kt.yaml", "da.yaml"):
        text = (mine / name).read_text()
        (mine / name).write_text(text + "\nmodel: {arch: toy, preset: small}\n" if "\nmodel:" not in text else
                                 text.replace("model: {preset: tiny}", "model: {arch: toy, preset: small}")
                                 .replace("model:\n  preset: tiny", "model:\n  arch: toy\n  preset: small"))
    work = tmp_path / "work"
    result = run_demo(work, quick=True, config_dir=mine, log=lambda _m: None)
    assert {"teacher-haze", "cache", "kt", "da", "report"} <= {s.name for s in result.steps if s.status == "ran"}
    for run in ("teacher-haze", "kt", "da"):
        model, meta = load_checkpoint(work / "outputs" / run / "last.safetensors")
        assert type(model).__name__ == "ToyNet" and (meta["arch"], meta["preset"]) == ("toy", "small"), run
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(result.experiment)
    kt = client.search_runs([exp.experiment_id], "attributes.run_name = 'kt'")[0]
    assert kt.data.params["model.arch"] == "toy" and kt.data.metrics["train/fg"] >= 0
    assert (work / "report.md").is_file()
