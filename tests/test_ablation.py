"""The ablation rows (configs/ablation/, README "Reproducing the ablations"): what identifies a row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uniremoval.config import config_to_dict, load_config
from uniremoval.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("row", "change"), [
    ("kt_icl.yaml", "loss.use_fcl=true"),
    ("kt_bkt.yaml", "loss.use_icl=true"),
    ("da_bda.yaml", "loss.use_eicl=true"),
    ("da_bda_eicl_efcl.yaml", "loss.use_efcl=false"),
    ("da_bda.yaml", "loss.use_idt=false"),
])
def test_resume_refuses_another_ablation_row(tmp_path, row, change):
    """`--resume auto` of the +ICL row with loss.use_fcl=true went on (a warning only) in the same MLflow
    run, still tagged ablation.use_fcl=false, logging train/fg and exporting weights that eval then
    copied the false tag onto: Table IV showed a model partly trained with L_fg as the row without it.
    A loss switch is now fixed on resume, as the architecture is."""
    from uniremoval.stages.trainer import Stage, Trainer

    base = ["model.init=k.safetensors", "train.cpu=true", "train.mixed_precision=no", f"output_dir={tmp_path}"]
    saved = load_config(REPO / "configs" / "ablation" / row, base)
    cfg = load_config(REPO / "configs" / "ablation" / row, [*base, change])
    stage = Stage(cfg)
    stage.trainable = ("student",)
    state = {"config_hash": "other", "config": json.dumps(config_to_dict(saved))}
    with pytest.raises(CheckpointError, match=rf"trained with another {change.split('=')[0]}: .*ablation row"):
        Trainer(cfg, stage)._check_resumed_config(tmp_path, state)
    # what a resume may still change: the length, e.g. more epochs of the same row
    longer = load_config(REPO / "configs" / "ablation" / row, [*base, "train.epochs=7"])
    spe = saved.train.steps_per_epoch
    with pytest.warns(RuntimeWarning, match="train.epochs") as caught:
        Trainer(longer, stage)._check_resumed_config(tmp_path, state)
    assert "a1/l1 decay" not in str(caught[0].message)
    # another epoch length moves the decay's epoch at once: said, with the epochs before and after
    regrouped = load_config(REPO / "configs" / "ablation" / row, [*base, f"train.steps_per_epoch={2 * spe}"])
    with pytest.warns(RuntimeWarning, match=rf"train.steps_per_epoch counts the epochs that clock the a1/l1 decay .* "
                                            rf"at step {10 * spe} the run is now in epoch 5, not 10"):
        Trainer(regrouped, stage)._check_resumed_config(tmp_path, {**state, "step": 10 * spe})


def test_table_v_holds_the_real_sets_only():
    """Table V ('on the real sets') took the NR columns of every set the ablated rows were scored on,
    synthetic test sets included (eval tags each run's domain); those stay in Tables I-III only."""
    from uniremoval.eval.report import ModelRow, build_tables

    scores = {("rtts", "piqe"): 30.0, ("sots", "piqe"): 25.0, ("photos", "piqe"): 40.0}
    domain = {"rtts": "real", "sots": "synthetic"}  # photos: a folder, no tag
    rows = [ModelRow(k, k, ablation={"use_gan": v}, scores=scores, domain=domain)
            for k, v in (("a", "true"), ("b", "false"))]
    tables = {t.title: t for t in build_tables(rows)}
    assert tables["Real ablation: NR-IQA (Table V)"].columns == [("photos", "piqe"), ("rtts", "piqe")]
    assert tables["NR-IQA (Tables I-III)"].columns == [("photos", "piqe"), ("rtts", "piqe"), ("sots", "piqe")]
    synthetic_only = [ModelRow("a", "a", ablation={"use_gan": "true"}, scores={("sots", "piqe"): 1.0},
                               domain={"sots": "synthetic"})]
    assert "Real ablation: NR-IQA (Table V)" not in {t.title for t in build_tables(synthetic_only)}


def test_report_flag_columns_are_those_of_the_tables_rows():
    """Every ablation table had a column for every flag of the experiment: Table IV (the three KT rows)
    showed DA's use_gan, use_idt, use_eicl and use_efcl as four empty columns beside use_icl/use_fcl.
    A table's flag columns are now those its rows carry; Table V (the KT row and the DA rows) keeps both."""
    from uniremoval.eval.report import ModelRow, build_tables, render

    kt_flags = {"use_icl": "true", "use_fcl": "false"}
    da_flags = {"use_gan": "true", "use_idt": "true", "use_eicl": "false", "use_efcl": "false"}
    kt = ModelRow("k", "kt-icl", ablation=kt_flags, scores={("sots", "psnr"): 20.0, ("rtts", "piqe"): 30.0})
    da = ModelRow("d", "da-bda", ablation=da_flags, scores={("rtts", "piqe"): 28.0})
    tables = {t.title: t for t in build_tables([kt, da])}
    assert tables["Synthetic ablation: PSNR/SSIM (Table IV)"].flags == ["use_fcl", "use_icl"]
    assert tables["Real ablation: NR-IQA (Table V)"].flags == sorted({*kt_flags, *da_flags})
    text = render(list(tables.values()), "md")
    table_iv = text.split("### Synthetic ablation")[1].split("###")[0]
    assert "use_gan" not in table_iv and "| kt-icl | \u2717 | \u2713 | **20.00** |" in table_iv


@pytest.mark.parametrize(("row", "tagged"), [("kt_bkt.yaml", False), ("kt_icl.yaml", True),
                                             ("da_bda.yaml", False), ("da_bda_eicl.yaml", True)])
def test_vgg_weights_tag_only_on_rows_that_use_vgg(row, tagged):
    """features.weights=random tagged every KT and DA run vgg_weights=random, the BKT and BDA rows too,
    which never build VGG-19 (no image-level term): a filter on the tag to leave out runs measured in an
    untrained feature space left those rows out. Only rows with L_ig / L_eig carry it now."""
    from uniremoval.tracking import run_tags

    cfg = load_config(REPO / "configs" / "ablation" / row, ["model.init=k.safetensors", "features.weights=random"])
    tags = run_tags(cfg, cfg.stage)
    assert (tags.get("vgg_weights") == "random") is tagged
    assert tags[f"ablation.{'use_icl' if row.startswith('kt') else 'use_eicl'}"] == str(tagged).lower()


@pytest.mark.parametrize(("config", "override"), [
    ("kt_bkt.yaml", "data.train.0.max_samples=1"),
    ("da_bda.yaml", "data.clear.0.max_samples=1"),
    ("da_kt.yaml", "eval.data.0.max_samples=2"),
])
def test_max_samples_outside_validation_is_refused(config, override):
    """max_samples is read by validation only: a tiny run of an ablation row with
    data.train.0.max_samples=1 trained on every sample, and `eval --config` of a set with max_samples: 2
    scored all of it; the setting was accepted and silently ignored. Refused now, naming the source."""
    from uniremoval.errors import ConfigError

    with pytest.raises(ConfigError, match=r"source\(s\) \['\w+'\] set max_samples, which only data.val reads"):
        load_config(REPO / "configs" / "ablation" / config, ["model.init=k.safetensors", override])
    cfg = load_config(REPO / "configs" / "ablation" / "da_bda.yaml", ["data.val.0.max_samples=3"])
    assert cfg.data.val[0].max_samples == 3  # a validation set's cap stays


def test_validation_cap_is_the_same_count_on_any_process_count(tmp_path):
    """A validation set's max_samples was split as ceil(cap / world) per rank: max_samples 3 scored 3
    images on one process and 4 on two (56 for the paper's 50 on 8 GPUs), so rows of one table launched
    on different process counts were validated on different numbers of images. The parts now add up,
    and they are the same images: the set's first 3 (each rank's first of its own shards were not)."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    shards = write_pairs(tmp_path, "val_haze", "haze", 6, n_shards=2, split="test")
    src = SimpleNamespace(name="val_haze", shards=str(shards), max_samples=3)
    model = MPRNet("tiny").eval()
    psnr_sums = {}
    for world in (1, 2, 4):
        counted = []

        def all_sum(sums, counted=counted):
            counted.append(sums)
            return dict(sums)

        for rank in range(world):
            ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"), all_sum=all_sum)
            with torch.no_grad():
                validate_paired(ctx, model, "minus_one_one", [src], lockstep=False)
        assert sum(c["n"] for c in counted) == 3, (world, counted)
        psnr_sums[world] = sum(c["psnr_input"] for c in counted)
    assert psnr_sums[2] == pytest.approx(psnr_sums[1], rel=1e-9) and psnr_sums[4] == pytest.approx(psnr_sums[1], rel=1e-9)


def test_validation_progress_total_is_rank_zeros_share_of_the_capped_set(tmp_path, monkeypatch):
    """The validation bar's total was rank 0's share of max_samples even when the set holds fewer: 9
    images under max_samples 100 ended at 9/100 on one process, 5/50 on two. Its total is now what rank 0
    scores, the cap's share or the whole set's."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    bars: list[dict] = []

    class Bar:
        def __init__(self, total, desc, unit, disable=False, **kwargs):
            self.record = {"total": total, "n": 0}
            if not disable:
                bars.append(self.record)

        def update(self, n=1):
            self.record["n"] += n

        def close(self):
            pass

    monkeypatch.setattr("uniremoval.progress.progress_bar", Bar)
    shards = write_pairs(tmp_path, "val_haze", "haze", 9, n_shards=3, split="test")
    model = MPRNet("tiny").eval()
    for cap, world, expected in ((100, 1, 9), (100, 2, 5), (9, 2, 5), (4, 2, 2), (1, 2, 1), (7, 1, 7)):
        bars.clear()
        for rank in range(world):
            ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"), all_sum=dict)
            src = SimpleNamespace(name="val_haze", shards=str(shards), max_samples=cap)
            with torch.no_grad():
                validate_paired(ctx, model, "minus_one_one", [src], lockstep=False)
        assert bars == [{"total": expected, "n": expected}], (cap, world)


def test_validation_lists_a_capped_set_once_on_every_rank(tmp_path, capsys):
    """The progress bar's total (rank 0 only) listed the set a second time: a dataset URL's manifest was
    fetched again by rank 0 alone at every validation, and a fetch that failed there (a server busy for a
    moment) raised on rank 0 while the other ranks went on into the collective. Every rank now lists
    the set once, for the stream and the bar alike."""
    import functools
    import http.server
    import sys
    import threading
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    write_pairs(tmp_path, "val_haze", "haze", 6, n_shards=2, split="test")
    fetches: list[str] = []

    class OneManifest(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith("manifest.json"):
                fetches.append(self.path)
                if len(fetches) > 1:  # the server fails every listing after the first
                    self.send_error(503)
                    return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(OneManifest, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = SimpleNamespace(name="val_haze", shards=f"http://127.0.0.1:{server.server_address[1]}/val_haze/",
                              max_samples=3)
        ctx = SimpleNamespace(rank=0, world_size=2, device=torch.device("cpu"), all_sum=dict)
        with torch.no_grad():
            out = validate_paired(ctx, MPRNet("tiny").eval(), "minus_one_one", [src], lockstep=False)
    finally:
        server.shutdown()
        server.server_close()
    assert len(fetches) == 1 and "val/val_haze/psnr" in out, fetches
    # the bar is rank 0's share (2 of the 3 capped images), named so: "2 img" of a set of 3 read as one missed
    assert "val val_haze (rank 0's share; 2 processes score theirs): 2/2 img" in capsys.readouterr().err


def test_da_validation_cap_is_the_same_count_on_any_process_count(tmp_path):
    """DA's val_iqa.max_images had the same ceil split: max_images 3 scored 4 images on two processes."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures import write_shards

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import da

    write_shards(tmp_path / "val", "val", 2, 3, domain="real", paired=False)
    cfg = load_config(REPO / "configs" / "da.yaml", [
        "model.preset=tiny", f"data.val=[{{name: v, shards: {tmp_path / 'val'}, degradation: haze}}]",
        "val_iqa.metrics=[piqe]", "val_iqa.max_images=3"])
    model = MPRNet("tiny").eval()

    class Scorer:
        def score(self, batch):  # a score that tells the images apart
            return {"piqe": [float(batch.mean())]}

    piqe_input = {}
    for world in (1, 2, 4):
        counted = []
        for rank in range(world):
            stage = da.DomainAdaptation(cfg)
            stage._iqa = Scorer()
            ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"),
                                  unwrap=lambda name: model, all_sum=lambda s, c=counted: c.append(s) or dict(s))
            with torch.no_grad():
                stage.validate(ctx)
        assert sum(c["n"] for c in counted) == 3, (world, counted)
        piqe_input[world] = sum(c["piqe_input"] for c in counted)  # the same 3 images (of 2 shards)
    assert piqe_input[2] == pytest.approx(piqe_input[1], rel=1e-9) and piqe_input[4] == pytest.approx(piqe_input[1], rel=1e-9)


@pytest.mark.parametrize(("row", "extra", "name"), [
    ("kt_bkt.yaml", [], "ablation-kt-bkt"),
    ("da_bda.yaml", [], "ablation-da-bda"),
    ("kt_icl.yaml", ["tracking.run_name=icl-try2"], "icl-try2"),
])
def test_a_training_run_is_named_after_its_config(tmp_path, row, extra, name):
    """Every KT row's MLflow run was named `kt` and every DA row's `da` (the stage), so the runs of one
    table looked alike in MLflow and eval labelled every row's weights `kt` or `da`. A training run is
    named after the config's `name`, its folder under output_dir (tracking.run_name overrides), and
    the checkpoint's meta, from which eval labels weights whose run it cannot find, says the same."""
    from mlflow.tracking import MlflowClient

    from uniremoval.stages.trainer import Stage, Trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "ablation" / row, [
        "model.init=k.safetensors", "train.cpu=true", "train.mixed_precision=no", f"output_dir={tmp_path}",
        f"tracking.uri={uri}", "tracking.experiment=abl", *extra])
    stage = Stage(cfg)
    stage.stage, stage.trainable = cfg.stage, ("student",)
    trainer = Trainer(cfg, stage)
    trainer.start_tracking()
    trainer.tracker.finish()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("abl").experiment_id])
    assert run.info.run_name == name and run.data.tags["stage"] == cfg.stage
    trainer.ctx = type("Ctx", (), {"epoch": 0})()
    meta = trainer.checkpoint_meta()
    assert meta["run_name"] == name
    # The ablation row travels with the weights too (eval against another store tags it from there).
    assert {f"ablation.{k}": str(v).lower() for k, v in meta["ablation"].items()} == {
        k: v for k, v in run.data.tags.items() if k.startswith("ablation.")} != {}


def test_validation_leaves_out_images_too_small_for_ssim_and_says_so(tmp_path):
    """A val image under SSIM's 11x11 window raised at the first validation and ended the training
    run (every step since the last checkpoint lost). It is left out of the set's PSNR and SSIM with a
    warning naming the set and a sample; the other sets score as before."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    tiny = SimpleNamespace(name="tiny", shards=str(write_pairs(tmp_path, "tiny", "haze", 3, n_shards=1, size=(9, 10),
                                                                split="test")), max_samples=None)
    fine = SimpleNamespace(name="fine", shards=str(write_pairs(tmp_path, "fine", "haze", 3, n_shards=1, split="test")),
                           max_samples=None)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    model = MPRNet("tiny").eval()
    with torch.no_grad(), pytest.warns(RuntimeWarning) as caught:
        out = validate_paired(ctx, model, "minus_one_one", [tiny, fine], lockstep=False)
    said = [str(w.message) for w in caught]
    assert any(m.startswith(f"validation set tiny ({tiny.shards}): 3 image(s) smaller than 11x11 pixels (SSIM's "
                            "window) left out of its PSNR and SSIM, e.g. tiny-00000") for m in said), said
    assert not any(k.startswith("val/tiny/") for k in out) and not any("no usable pairs" in m for m in said)
    with torch.no_grad():
        alone = validate_paired(ctx, model, "minus_one_one", [fine], lockstep=False)
    assert out == alone and out["val/mean/psnr"] == out["val/fine/psnr"]


def test_validation_says_how_many_samples_it_left_out(tmp_path):
    """Samples that cannot be scored (here: no target) were left out of a set's PSNR/SSIM, and out of
    the choice of best.safetensors, without a word unless none was left. The count is said now."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    paired = write_pairs(tmp_path, "paired", "haze", 3, n_shards=1, split="test")
    unpaired = write_pairs(tmp_path, "unpaired", "haze", 2, n_shards=1, split="test", paired=False)
    shards = sorted(str(p) for p in [*paired.glob("*.tar"), *unpaired.glob("*.tar")])
    src = SimpleNamespace(name="mixed", shards=shards, max_samples=None)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    model = MPRNet("tiny").eval()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"validation set mixed \(.*\): 2 sample\(s\) left out of "
                                                              r"its scores, e\.g\. unpaired-00000: .*; it is scored on "
                                                              r"the other 3$"):
        out = validate_paired(ctx, model, "minus_one_one", [src], lockstep=False)
    alone = SimpleNamespace(name="mixed", shards=str(paired), max_samples=None)
    with torch.no_grad():
        assert out == validate_paired(ctx, model, "minus_one_one", [alone], lockstep=False)


def test_da_validation_says_how_many_samples_it_left_out(tmp_path):
    """DA's validation dropped a sample that failed to decode with no word at all (unless every one did)."""
    import io
    import sys
    import tarfile
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _fixtures import write_shards

    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import da

    write_shards(tmp_path / "val", "val", 1, 3, domain="real", paired=False)
    (tar_path,) = (tmp_path / "val").glob("*.tar")
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    first_input = next(m.name for m, _ in members if ".input." in m.name)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            data = b"\x89PNG\r\n\x1a\n broken" if m.name == first_input else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    cfg = load_config(REPO / "configs" / "da.yaml", [
        "model.preset=tiny", f"data.val=[{{name: v, shards: {tmp_path / 'val'}, degradation: haze}}]",
        "val_iqa.metrics=[piqe]"])

    class Scorer:
        def score(self, batch):
            return {"piqe": [float(batch.mean())]}

    stage = da.DomainAdaptation(cfg)
    stage._iqa = Scorer()
    model = MPRNet("tiny").eval()
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), unwrap=lambda name: model, all_sum=dict)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"validation set v \(.*\): 1 sample\(s\) left out of its "
                                                              r"scores, e\.g\. .*; it is scored on the other 2$"):
        out = stage.validate(ctx)
    assert "val/v/piqe" in out


def test_da_validation_leaves_out_real_photos_too_small_for_its_metric(tmp_path):
    """A real val photo smaller than a metric accepts (PIQE scores 16-px blocks) crashed DA at its first
    validation with pyiqa's 'maximum size for tensor at dimension 2 is 2 but size is 16', naming no
    image, and again at every validation after a resume; it is left out and named, as the paired
    validation leaves out images under SSIM's window."""
    import json as _json
    from types import SimpleNamespace

    import numpy as np
    import torch
    import webdataset as wds

    from uniremoval.data.transforms import encode_png
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages import da

    rng = np.random.default_rng(0)
    val = tmp_path / "val"
    val.mkdir()
    sizes = {"big_a": (48, 64), "tiny": (5, 7), "big_b": (40, 56)}
    with wds.TarWriter(str(val / "val-000000.tar")) as tw:
        for key, (h, w) in sizes.items():
            img = (rng.uniform(0, 1, (h, w, 3)) * 255).astype(np.uint8)
            tw.write({"__key__": key, "input.png": encode_png(img),
                      "json": _json.dumps({"degradation": "haze", "domain": "real", "height": h, "width": w})})
    cfg = load_config(REPO / "configs" / "da.yaml", [
        "model.preset=tiny", f"data.val=[{{name: v, shards: {val / 'val-000000.tar'}, degradation: haze}}]",
        "val_iqa.metrics=[piqe]", "val_iqa.max_images=3"])
    stage = da.DomainAdaptation(cfg)
    model = MPRNet("tiny").eval()
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), unwrap=lambda name: model, all_sum=dict)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"validation set v \(.*\): 1 image\(s\) smaller than "
                                                              r"16x16 pixels \(piqe's least\) left out of its scores, "
                                                              r"e\.g\. tiny"):
        out = stage.validate(ctx)
    assert {"val/v/piqe", "val/v/piqe_input"} <= set(out) and all(np.isfinite(v) for v in out.values())
    # the mean is over the two photos large enough, as if the small one were not in the set
    from uniremoval.eval.metrics import Scorer

    scorer = Scorer(["piqe"], device="cpu")
    from uniremoval.data.pipelines import eval_samples

    inputs = [item["input"] for item in eval_samples(str(val / "val-000000.tar")) if item["key"] != "tiny"]
    expect = np.mean([scorer.score(((x + 1) * 0.5).unsqueeze(0))["piqe"][0] for x in inputs])
    assert out["val/v/piqe_input"] == pytest.approx(expect, rel=1e-6)
