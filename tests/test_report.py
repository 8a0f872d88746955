"""`uniremoval report`: tables from an MLflow store with several runs equal the logged numbers, best
values are bold in the right direction, ablation tables carry the flags, grids put models side by side."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import one_torch_thread

from uniremoval.cli import main
from uniremoval.eval.evaluate import EvalOptions, run_eval
from uniremoval.eval.report import ModelRow, build_tables, collect, render

# model key -> (label, ablation tags, {dataset: {metric: value}}); degradations per dataset.
RUNS = {
    "input": ("Hazy", {}, {"RTTS": {"brisque": 37.12345, "piqe": 41.5}, "SOTS": {"psnr": 12.3, "ssim": 0.61234}}),
    "run-a": ("kt", {"ablation.use_icl": "true", "ablation.use_fcl": "false"},
              {"RTTS": {"brisque": 25.5, "piqe": 44.25}, "SOTS": {"psnr": 24.75, "ssim": 0.8512}}),
    "run-b": ("da", {"ablation.use_icl": "true", "ablation.use_fcl": "true"},
              {"RTTS": {"brisque": 26.0, "piqe": 30.875}, "SOTS": {"psnr": 25.125, "ssim": 0.84}}),
    "run-c": ("uni", {}, {"SPA": {"brisque": 20.5, "piqe": 35.0}}),
}
DEGRADATION = {"RTTS": "haze", "SOTS": "haze", "SPA": "rain"}


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # 2 threads on 2 shared cores: 10x+ slower


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("proj", artifact_location=str(tmp_path / "art"))
    t = 1_700_000_000_000
    # An older evaluation of run-b on RTTS, replaced by the later one below.
    stale = client.create_run(exp, run_name="eval-RTTS", start_time=t, tags={
        "stage": "eval", "dataset": "RTTS", "uniremoval.model": "run-b", "uniremoval.label": "da-old",
        "degradation": "haze"})
    client.log_metric(stale.info.run_id, "eval/RTTS/brisque", 99.0)
    client.set_terminated(stale.info.run_id)
    for key, (label, ablation, per_ds) in RUNS.items():
        for ds, metrics in per_ds.items():
            t += 1000
            run = client.create_run(exp, run_name=f"eval-{ds}", start_time=t, tags={
                "stage": "eval", "dataset": ds, "uniremoval.model": key, "uniremoval.label": label,
                "degradation": DEGRADATION[ds], **ablation})
            for m, v in metrics.items():
                client.log_metric(run.info.run_id, f"eval/{ds}/{m}", v)
            client.set_terminated(run.info.run_id)
    # A training run in the same experiment is not a table row.
    train = client.create_run(exp, run_name="kt", tags={"stage": "kt"})
    client.log_metric(train.info.run_id, "eval/RTTS/brisque", 1.0)
    return uri


def _md_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            out[title] = ([], [])
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not out[title][0]:
                out[title][0].extend(cells)
            elif not set(line) <= set("|-"):
                out[title][1].append(cells)
    return out


def test_markdown_tables_equal_logged_numbers(store, capsys, tmp_path):
    assert main(["report", "--experiment", "proj", "--tracking-uri", store]) == 0
    tables = _md_tables(capsys.readouterr().out)
    # --out-dir without saved images: the tables, and a note saying why there is no grid.
    assert main(["report", "--experiment", "proj", "--tracking-uri", store, "--out-dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "no image grid" in err and "--save-images" in err and (tmp_path / "r" / "report.md").is_file()
    assert list(tables) == ["NR-IQA (Tables I-III): haze", "NR-IQA (Tables I-III): rain",
                            "Synthetic ablation: PSNR/SSIM (Table IV)", "Real ablation: NR-IQA (Table V)"]
    label_to_key = {v[0]: k for k, v in RUNS.items()}
    seen = 0
    for title, (head, rows) in tables.items():
        for row in rows:
            key = label_to_key[row[0]]
            for h, cell in zip(head, row):
                m = re.fullmatch(r"(\S+) (BRISQUE|PIQE|PSNR|SSIM) ([\u2191\u2193])", h)
                if not m:
                    continue
                ds, metric = m.group(1), m.group(2).lower()
                logged = RUNS[key][2].get(ds, {}).get(metric)
                value = cell.strip("*")
                if logged is None:
                    assert value == ""
                    continue
                assert value == (f"{logged:.4f}" if metric == "ssim" else f"{logged:.2f}"), (title, h, row)
                assert m.group(3) == ("\u2193" if metric in ("brisque", "piqe") else "\u2191")
                # Bold exactly where the logged value is the column's best.
                column = [RUNS[label_to_key[r[0]]][2].get(ds, {}).get(metric) for r in rows]
                column = [v for v in column if v is not None]
                best = min(column) if metric in ("brisque", "piqe") else max(column)
                assert cell.startswith("**") == (logged == best), (title, h, row)
                seen += 1
    assert seen == 6 + 2 + 6 + 4  # haze, rain, Table IV, Table V (RTTS only: SPA has no ablated row)
    # The later evaluation of run-b replaced the earlier one (99.0 is nowhere), and its label is the latest.
    haze_rows = {r[0] for r in tables["NR-IQA (Tables I-III): haze"][1]}
    assert haze_rows == {"Hazy", "kt", "da"}
    # Ablation tables: flags as check marks, only models with flags in Table V.
    head, rows = tables["Real ablation: NR-IQA (Table V)"]
    assert head[:3] == ["Method", "use_fcl", "use_icl"]
    # Rows: inputs first, then models by first evaluation (run-b's stale run came first).
    assert [r[:3] for r in rows] == [["da", "\u2713", "\u2713"], ["kt", "\u2717", "\u2713"]]
    assert [r[0] for r in tables["Synthetic ablation: PSNR/SSIM (Table IV)"][1]] == ["Hazy", "da", "kt"]


def test_csv_is_full_precision_and_html_bolds_best(store):
    rows = collect("proj", store)
    tables = build_tables(rows)
    text = render(tables, "csv")
    block = text.split("# NR-IQA (Tables I-III): haze")[1].split("\n\n")[0]
    recs = list(csv.reader(io.StringIO(block.strip("\n,"))))
    head = recs[0]
    for r in recs[1:]:
        key = {v[0]: k for k, v in RUNS.items()}[r[0]]
        for h, cell in zip(head[1:], r[1:]):
            ds, metric = h.split()[0], h.split()[1].lower()
            assert float(cell) == RUNS[key][2][ds][metric]  # exactly the logged float
    # Every table in the csv: the same columns and rows as the markdown, each logged value exactly once
    # (a dropped column or row would go unnoticed by the loop above).
    blocks = {b.split("\n", 1)[0][2:].rstrip(","): list(csv.reader(io.StringIO(b.split("\n", 1)[1])))
              for b in text.strip().split("\n\n") if b.startswith("# ")}
    md = {t.title: t for t in tables}
    assert list(blocks) == list(md) and len(blocks) == 4
    cells = 0
    for title, recs in blocks.items():
        t = md[title]
        head = recs[0]
        assert head[0] == "method" and head[1:1 + len(t.flags)] == t.flags
        metric_head = head[1 + len(t.flags):]
        assert len(metric_head) == len(t.columns) == len(set(metric_head))
        assert [r[0] for r in recs[1:]] == [row.label for row in t.rows]
        for r in recs[1:]:
            key = {v[0]: k for k, v in RUNS.items()}[r[0]]
            assert len(r) == len(head)
            for h, cell in zip(metric_head, r[1 + len(t.flags):]):
                ds, metric = h.split()[0], h.split()[1].lower()
                logged = RUNS[key][2].get(ds, {}).get(metric)
                assert (cell == "") if logged is None else (float(cell) == logged), (title, h, r)
                cells += logged is not None
    assert cells == 6 + 2 + 6 + 4  # as in the markdown test
    assert [h.split()[:2] for h in blocks["NR-IQA (Tables I-III): haze"][0][1:]] == [
        ["RTTS", "BRISQUE"], ["RTTS", "PIQE"]]
    page = render(tables, "html")
    # html: every logged value of every table appears, formatted, bold or not
    for key, (_, _, per_ds) in RUNS.items():
        for ds, metrics in per_ds.items():
            for m, v in metrics.items():
                s = f"{v:.4f}" if m == "ssim" else f"{v:.2f}"
                assert f"<td>{s}</td>" in page or f"<td><b>{s}</b></td>" in page, (key, ds, m)
    assert "<b>25.50</b>" in page and "<b>30.88</b>" in page and "<b>25.1250</b>" not in page
    assert "<b>0.8512</b>" in page and "<b>25.12</b>" in page  # 25.125 is exact in binary: rounds to even
    assert page.count("<table>") == 4 and "BRISQUE \u2193" in page and "PSNR \u2191" in page
    with pytest.raises(Exception, match="no MLflow experiment 'nope'"):
        collect("nope", store)


def test_markdown_escapes_a_pipe_in_names():
    from uniremoval.eval.report import ModelRow, Table

    row = ModelRow("k", "kt|lr=1e-4", scores={("a|b", "piqe"): 30.0})
    text = render([Table("t", [("a|b", "piqe")], [row])], "md")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| Method | a\\|b PIQE") and lines[2].startswith("| kt\\|lr=1e-4 |")
    # Unescaped pipes split cells: every row keeps the header's cell count.
    assert len({len(line.replace("\\|", "").split("|")) for line in lines}) == 1


def inverted_pairs(data: Path, n: int) -> Path:
    """A folder dataset of `n` random 24x32 targets (target/im<i>.png) and their negatives as inputs."""
    (data / "target").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        clean = (torch.rand(3, 24, 32, generator=g) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(clean).save(data / "target" / f"im{i}.png")
        Image.fromarray(255 - clean).save(data / f"im{i}.png")
    return data


def test_report_from_real_eval_runs_with_image_grid(tmp_path, capfd, monkeypatch):
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    data = inverted_pairs(tmp_path / "data", 3)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ckpt = save_checkpoint(tmp_path / "student", build_model("mprnet", "tiny"), {})
    results = {}
    for checkpoint, label in (("none", None), (str(ckpt), "student")):
        results[label or "input"] = run_eval(EvalOptions(
            checkpoint, str(data), metrics=["psnr", "ssim"], name="pairs", device="cpu", tracking_uri=uri,
            experiment="grid", label=label, save_images=str(tmp_path / f"out-{label}")))
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file: never uploaded")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    capfd.readouterr()
    assert main(["report", "--experiment", "grid", "--tracking-uri", uri, "--out-dir", str(out), "--images", "2",
                 "--format", "csv", "--log"]) == 0
    printed = capfd.readouterr()
    # MLflow's per-download progress bars stay off (the demo printed 18 lines of them per dataset)
    assert "Downloading artifacts" not in printed.err
    assert printed.out == (out / "report.csv").read_text()  # stdout is the CSV alone: `> r.csv` works
    assert "image grid: " in printed.err and "MLflow run: " in printed.err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # put back as it was
    text = (out / "report.csv").read_text()
    recs = {r[0]: r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")}
    assert recs["method"][1:] == ["pairs PSNR \u2191", "pairs SSIM \u2191"]
    for label, res in results.items():
        assert [float(v) for v in recs[label][1:]] == [res.mean["psnr"], res.mean["ssim"]]
    grid = Image.open(out / "grid-pairs.png")
    assert grid.height == 18 + 2 * (192 + 4) + 4  # label strip + 2 images
    assert grid.width == 2 * 256 + 3 * 4  # two models, 24x32 images scaled to height 192
    # The first row's cells are the two models' own outputs for im0, one per column.
    saved = {}
    for label, folder in (("input", "out-None"), ("student", "out-student")):
        (src,) = (tmp_path / folder).rglob("im0.png")
        saved[label] = np.asarray(Image.open(src).convert("RGB").resize((256, 192)), dtype=np.float64)
    assert np.abs(saved["input"] - saved["student"]).mean() > 10  # tells the two apart
    pixels = np.asarray(grid.convert("RGB"), dtype=np.float64)
    cells = [pixels[18:18 + 192, 4 + j * 260:4 + j * 260 + 256] for j in range(2)]
    nearest = [min(saved, key=lambda k, c=c: np.abs(c - saved[k]).mean()) for c in cells]
    assert sorted(nearest) == ["input", "student"], nearest
    assert all(np.abs(c - saved[k]).mean() < 1 for c, k in zip(cells, nearest))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("grid")
    report_runs = client.search_runs([exp.experiment_id], "tags.stage = 'report'")
    assert {a.path for a in client.list_artifacts(report_runs[0].info.run_id, "report")} == {
        "report/report.csv", "report/grid-pairs.png"}
    # it says which code and settings made it, as every other run does
    from uniremoval import __version__
    from uniremoval.tracking import git_commit

    logged = report_runs[0].data
    assert logged.tags["uniremoval_version"] == __version__ and logged.tags["git_commit"] == git_commit()
    assert logged.params == {"format": "csv", "images": "2", "decimals": "None"}


def test_rerun_into_the_same_out_dir_keeps_only_this_reports_grids(tmp_path, capsys):
    """A rerun of `report --out-dir` leaves exactly the grids of the report it wrote: a grid of a
    dataset no longer in the report, or a grid or report.<fmt> temporary a killed report left, is removed; every file
    outside the grid-<dataset>.png pattern stays."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("g", artifact_location=(tmp_path / "art").as_uri())
    runs = {}
    for ds in ("A", "B"):
        for i, model in enumerate(("input", "m1")):
            run = client.create_run(exp, run_name=f"eval-{ds}", tags={"stage": "eval", "dataset": ds,
                                                                      "uniremoval.model": model})
            img = tmp_path / "img" / f"{ds}{model}" / "im0.png"
            img.parent.mkdir(parents=True)
            Image.new("RGB", (8, 6), (40 * i, 0, 0)).save(img)
            client.log_artifact(run.info.run_id, str(img), f"images/{ds}")
            client.log_metric(run.info.run_id, f"eval/{ds}/psnr", 20.0 + i)
            client.set_terminated(run.info.run_id)
            runs.setdefault(ds, []).append(run.info.run_id)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("grid-Old.png", ".grid-A.png.k2x9.tmp", ".report.html.q7w1.tmp", "grid.png", "grid-A.jpg",
                 "notes.txt", ".report.txt.a1.tmp"):
        (out / name).write_bytes(b"earlier")
    others = {"grid.png", "grid-A.jpg", "notes.txt", ".report.txt.a1.tmp"}  # not the report's: never touched

    def report(*extra: str) -> set[str]:
        assert main(["report", "--experiment", "g", "--tracking-uri", uri, "--out-dir", str(out), *extra]) == 0
        capsys.readouterr()
        assert all((out / n).read_bytes() == b"earlier" for n in others)
        return {p.name for p in out.iterdir()} - others

    assert report("--images", "1") == {"report.md", "grid-A.png", "grid-B.png"}
    # A later eval of m1 on A without --save-images: the grid takes m1's earlier images of the same
    # weights (the grid of A vanished, and --out-dir removed the old one, with no word)
    later = client.create_run(exp, run_name="eval-A", tags={"stage": "eval", "dataset": "A", "uniremoval.model": "m1"})
    client.log_metric(later.info.run_id, "eval/A/psnr", 21.5)
    client.set_terminated(later.info.run_id)
    assert report("--images", "1") == {"report.md", "grid-A.png", "grid-B.png"}
    for run_id in runs["B"]:
        client.delete_run(run_id)  # dataset B is no longer in the report
    assert report("--images", "1") == {"report.md", "grid-A.png"}
    assert report("--images", "0") == {"report.md"}


def test_unreachable_server_is_a_named_error(capsys):
    """A report against a server that is down: one `error:` line naming the URI and what to do, within
    seconds (not MLflow's minutes of retries, nor a traceback)."""
    from _fixtures import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["report", "--experiment", "x", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read MLflow at {uri}") and "--tracking-uri" in err


def test_a_store_that_does_not_exist_is_named_not_created(tmp_path, capsys, monkeypatch):
    """MLflow creates an empty database to read from a missing sqlite path, so a report run in the wrong
    folder said 'no experiment' and left an empty mlflow.db there; it now names the path, creating nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for argv in ([], ["--tracking-uri", f"sqlite:///{tmp_path / 'elsewhere' / 'm.db'}"]):
        assert main(["report", "--experiment", "x", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no MLflow store at ") and "--tracking-uri" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    # an empty file (`touch mlflow.db`, or a store a full disk truncated) was made into a new store
    empty = tmp_path / "mlflow.db"
    empty.touch()
    assert main(["report", "--experiment", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no MLflow store at {empty} (it is an empty file: nothing was "
                                              "logged there; left as it is)")
    assert empty.stat().st_size == 0 and list(tmp_path.iterdir()) == [empty]


def test_images_zero_means_no_grids_and_negative_is_refused(store, tmp_path, capsys):
    """--images 0 used to print 'no image grid: ... run eval with --save-images' (as if images were
    missing) and a negative count silently dropped images from the end; 0 now means no grids, quietly,
    and a negative count is one error line before anything is read or written."""
    from uniremoval.errors import UniremovalError
    from uniremoval.eval.report import make_report

    out = tmp_path / "r"
    for n in ("-1", "-5"):
        assert main(["report", "--experiment", "proj", "--tracking-uri", store, "--out-dir", str(out),
                     "--images", n]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --images must be >= 0 (images per grid; 0 for no image grids), got {n}\n"
    assert not out.exists()
    with pytest.raises(UniremovalError, match="images per grid must be >= 0"):
        make_report("proj", tracking_uri=store, out_dir=str(out), n_images=-1)
    assert main(["report", "--experiment", "proj", "--tracking-uri", store, "--out-dir", str(out), "--images", "0"]) == 0
    captured = capsys.readouterr()
    assert "### " in captured.out and "image grid" not in captured.out + captured.err
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert main(["report", "--experiment", "proj", "--tracking-uri", store, "--out-dir", str(out)]) == 0
    assert "no image grid: a grid needs the restored images" in capsys.readouterr().err  # the store has none


def test_each_weights_file_is_its_own_row_with_its_training_run(tmp_path, capsys):
    """`best` and `last` of one training run (and a modified copy keeping its mlflow_run_id) were one
    row keyed by the training run id, the later eval replacing the earlier's scores. A row is now one
    weights file (sha256); the training run stays with the row, the checkpoint name tells rows with
    the training run's label apart; old runs without the sha256 are still read by uniremoval.model."""
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ck", artifact_location=str(tmp_path / "art"))
    train = client.create_run(exp, run_name="kt", tags={"stage": "kt"}).info.run_id
    data = inverted_pairs(tmp_path / "data", 2)
    torch.manual_seed(0)
    model = build_model("mprnet", "tiny")
    means = {}
    for name in ("best", "last"):
        if name == "last":
            with torch.no_grad():
                next(model.parameters()).add_(0.5)  # other weights, same training run
        ckpt = save_checkpoint(tmp_path / "kt" / name, model, {"mlflow_run_id": train})
        means[name] = run_eval(EvalOptions(str(ckpt), str(data), metrics=["psnr"], name="pairs", device="cpu",
                                           tracking_uri=uri, experiment="ck")).mean["psnr"]
    assert means["best"] != means["last"]
    # An eval logged before this change: keyed by uniremoval.model (no checkpoint_sha256 tag).
    old = client.create_run(exp, run_name="eval-pairs", tags={"stage": "eval", "dataset": "pairs",
                                                              "uniremoval.model": "old-run", "uniremoval.label": "old"})
    client.log_metric(old.info.run_id, "eval/pairs/psnr", 7.5)
    client.set_terminated(old.info.run_id)
    assert main(["report", "--experiment", "ck", "--tracking-uri", uri, "--format", "csv"]) == 0
    out = capsys.readouterr()
    recs = {r[0]: r[1:] for r in csv.reader(io.StringIO(out.out)) if r and not r[0].startswith("#")}
    assert recs == {"method": ["pairs PSNR \u2191"], "kt (best)": [repr(means["best"])],
                    "kt (last)": [repr(means["last"])], "old": ["7.5"]}
    assert "warning:" not in out.err
    rows = collect("ck", uri)
    assert [(r.label, r.train_run, r.scores) for r in rows] == [
        ("kt", train, {("pairs", "psnr"): means["best"]}), ("kt", train, {("pairs", "psnr"): means["last"]}),
        ("old", None, {("pairs", "psnr"): 7.5})]
    assert len({r.key for r in rows}) == 3 and all(len(r.key) == 64 for r in rows[:2])


def test_rows_take_each_datasets_label_and_conflicting_labels_warn(tmp_path, capsys):
    """`eval --checkpoint none --label Hazy` on a haze set and `--label Rainy` on a rain set: the haze
    table said "Rainy" (the latest run named the row). Each table now shows the label of the runs on
    its datasets; one model's runs on one dataset with different labels: the latest, and a warning."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("lab", artifact_location=str(tmp_path / "art"))
    t = 1_700_000_000_000
    for i, (ds, deg, label, value) in enumerate((("RTTS", "haze", "Hazy input", 40.0), ("SPA", "rain", "Rainy", 30.0),
                                                  ("RTTS", "haze", "Hazy", 41.0), ("SOTS", "haze", "Hazy", 42.0),
                                                  ("SPA", "rain", "Uni", 20.0))):
        model = "sha-uni" if label == "Uni" else "input"
        run = client.create_run(exp, run_name=f"eval-{ds}", start_time=t + i, tags={
            "stage": "eval", "dataset": ds, "degradation": deg, "uniremoval.model": model, "uniremoval.label": label})
        client.log_metric(run.info.run_id, f"eval/{ds}/piqe", value)
        client.set_terminated(run.info.run_id)
    assert main(["report", "--experiment", "lab", "--tracking-uri", uri]) == 0
    out = capsys.readouterr()
    tables = _md_tables(out.out)
    assert tables["NR-IQA (Tables I-III): haze"][1] == [["Hazy", "**41.00**", "**42.00**"]]
    assert tables["NR-IQA (Tables I-III): rain"][1] == [["Rainy", "30.00"], ["Uni", "**20.00**"]]
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: model input on RTTS: its eval runs carry different labels ('Hazy input', 'Hazy'); "
                         "the latest, 'Hazy', is shown (rerun that eval with --label to choose)")]
    # A table over several degradations shows each distinct label once.
    from uniremoval.eval.report import ModelRow, display_labels

    row = ModelRow("input", "Rainy", labels={"RTTS": "Hazy", "SOTS": "Hazy", "SPA": "Rainy"})
    assert display_labels([row], ["RTTS", "SOTS", "SPA"]) == ["Hazy / Rainy"]


def test_one_dataset_name_over_different_data_warns(tmp_path, capsys):
    """eval names a folder dataset after its last part: raw/snow/test and raw/haze/test are both "test",
    and the report's one column showed only each model's latest, silently. The same folder given from
    another working directory (shards/rtts, /data/shards/rtts) is one dataset: no warning."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("names", artifact_location=str(tmp_path / "art"))
    for i, (ds, data) in enumerate((("test", "raw/snow/test"), ("test", "raw/haze/test/"),
                                    ("rtts", "shards/rtts"), ("rtts", "/data/shards/rtts"))):
        run = client.create_run(exp, run_name=f"eval-{ds}", start_time=1_700_000_000_000 + i, tags={
            "stage": "eval", "dataset": ds, "uniremoval.model": "input", "uniremoval.label": "input"})
        client.log_param(run.info.run_id, "data", data)
        client.log_metric(run.info.run_id, f"eval/{ds}/piqe", 30.0 + i)
        client.set_terminated(run.info.run_id)
    assert main(["report", "--experiment", "names", "--tracking-uri", uri]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: dataset 'test' names eval runs on different --data (raw/snow/test, raw/haze/test/): "
                         "its column shows each model's latest of them; rerun those evals with --name to tell them apart")]


def test_a_later_eval_without_an_earlier_runs_metrics_warns(tmp_path, capsys):
    """Re-scoring a set with `--metrics piqe` after `--metrics piqe,psnr,ssim` blanked that model's
    PSNR/SSIM cells (the latest run counts), with no word: a warning now names them."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("drop", artifact_location=str(tmp_path / "art"))
    for i, metrics in enumerate(({"piqe": 30.0, "psnr": 20.0, "ssim": 0.5}, {"piqe": 31.0}, {"piqe": 32.0})):
        run = client.create_run(exp, run_name="eval-SOTS", start_time=1_700_000_000_000 + i, tags={
            "stage": "eval", "dataset": "SOTS", "degradation": "haze", "uniremoval.model": "sha-kt",
            "uniremoval.label": "kt"})
        for m, v in metrics.items():
            client.log_metric(run.info.run_id, f"eval/SOTS/{m}", v)
        client.set_terminated(run.info.run_id)
    assert main(["report", "--experiment", "drop", "--tracking-uri", uri]) == 0
    out = capsys.readouterr()
    assert _md_tables(out.out)["NR-IQA (Tables I-III): haze"][1] == [["kt", "**32.00**"]]
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: kt on SOTS: its latest eval run has no psnr, ssim, which an earlier run had; the "
                         "report shows the latest run only (rerun that eval with --metrics piqe,psnr,ssim)")]


def test_real_paired_sets_get_their_own_psnr_table():
    """Table IV is the synthetic ablation: a real paired set (eval's `domain: real`, as SPA or
    RealBlur-J shards say in their json) gets a table of its own; a set without the tag (a folder)
    stays in Table IV."""

    kt = ModelRow("k", "kt", scores={("SOTS", "psnr"): 24.0, ("RealBlurJ", "psnr"): 27.5, ("folder", "psnr"): 20.0},
                  domain={"SOTS": "synthetic", "RealBlurJ": "real"})
    inp = ModelRow("input", "input", scores={("RealBlurJ", "psnr"): 26.0}, domain={"RealBlurJ": "real"})
    tables = {t.title: t for t in build_tables([kt, inp])}
    assert list(tables) == ["Synthetic ablation: PSNR/SSIM (Table IV)", "Real paired sets: PSNR/SSIM"]
    assert tables["Synthetic ablation: PSNR/SSIM (Table IV)"].columns == [("SOTS", "psnr"), ("folder", "psnr")]
    assert [r.key for r in tables["Synthetic ablation: PSNR/SSIM (Table IV)"].rows] == ["k"]
    assert tables["Real paired sets: PSNR/SSIM"].columns == [("RealBlurJ", "psnr")]
    assert [r.key for r in tables["Real paired sets: PSNR/SSIM"].rows] == ["k", "input"]


def test_eval_runs_older_than_the_domain_tag_take_the_domain_their_shards_manifest_counts(tmp_path, capsys):
    """An eval run written before eval tagged the samples' domain (no `domain` tag) of a real paired set
    was filed in Table IV as if synthetic: the report now reads the domain from the manifest of the
    run's --data where it is still readable (shard folder, or a tar in one); an image folder, a path
    not here, or a URL stays in Table IV, as before."""
    import json

    shards = {"SPA": ("real", "spa"), "SOTS": ("synthetic", "sots"), "photos": (None, "photos"),
              "gone": ("real", "gone")}
    for name, (domain, folder) in shards.items():
        (tmp_path / folder).mkdir()
        if domain:
            (tmp_path / folder / "manifest.json").write_text(json.dumps(
                {"dataset": name, "counts": {"domain": {domain: 3}, "total": 3}, "shards": []}))
    (tmp_path / "gone" / "manifest.json").unlink()
    (tmp_path / "gone").rmdir()
    data = {"SPA": str(tmp_path / "spa" / "spa-000000.tar"), "SOTS": str(tmp_path / "sots"),
            "photos": str(tmp_path / "photos"), "gone": str(tmp_path / "gone")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("old", artifact_location=str(tmp_path / "art"))
    for ds in shards:
        run = client.create_run(exp, run_name=f"eval-{ds}", tags={   # no domain tag: an older eval's run
            "stage": "eval", "dataset": ds, "degradation": "rain", "uniremoval.model": "sha-kt",
            "uniremoval.label": "kt"})
        client.log_param(run.info.run_id, "data", data[ds])
        client.log_metric(run.info.run_id, f"eval/{ds}/psnr", 20.0)
        client.set_terminated(run.info.run_id)
    tables = {t.title: t for t in build_tables(collect("old", uri))}
    assert tables["Real paired sets: PSNR/SSIM"].columns == [("SPA", "psnr")]
    assert tables["Synthetic ablation: PSNR/SSIM (Table IV)"].columns == [
        ("SOTS", "psnr"), ("gone", "psnr"), ("photos", "psnr")]


def test_models_trained_against_another_store_keep_their_run_names(tmp_path, capsys):
    """Students trained against a local mlflow.db and evaluated on another store: each eval was
    labelled by its file's stem, 'last' for every model, and the report showed
    'last (last) (32953b25)'; the training run's name the checkpoint records labels them now."""
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / "a.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for seed, name in enumerate(("kt", "da")):
        torch.manual_seed(seed)
        ckpt = save_checkpoint(tmp_path / name / "last", MPRNet("tiny").eval(),
                               {"run_name": name, "mlflow_run_id": f"{seed}" * 32})  # a run this store lacks
        run_eval(EvalOptions(str(ckpt), str(data), metrics=["piqe"], device="cpu", tracking_uri=uri,
                             experiment="proj", degradation="rain"))
    table = render(build_tables(collect("proj", uri)), "csv")
    assert [row[0] for row in csv.reader(io.StringIO(table)) if row][2:] == ["kt", "da"], table


def test_models_trained_against_another_store_keep_their_ablation_flags(tmp_path):
    """Eval copied a model's ablation.* tags only from its training run; weights trained against a
    local mlflow.db and evaluated on the team's store lost their flags, and Table V left them out.
    The checkpoint's JSON records the row (the trainer writes it) and eval tags it from there."""
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / "a.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = {"bda": {"use_gan": True, "use_idt": True, "use_eicl": False, "use_efcl": False},
            "da": {"use_gan": True, "use_idt": True, "use_eicl": True, "use_efcl": True}}
    for seed, (name, flags) in enumerate(rows.items()):
        torch.manual_seed(seed)
        ckpt = save_checkpoint(tmp_path / name / "last", MPRNet("tiny").eval(),
                               {"run_name": name, "mlflow_run_id": f"{seed}" * 32, "ablation": flags})
        run_eval(EvalOptions(str(ckpt), str(data), metrics=["piqe"], device="cpu", tracking_uri=uri,
                             experiment="proj", degradation="rain"))
    (table,) = [t for t in build_tables(collect("proj", uri)) if t.title == "Real ablation: NR-IQA (Table V)"]
    assert table.flags == ["use_efcl", "use_eicl", "use_gan", "use_idt"]
    assert {r.label: r.ablation for r in table.rows} == {
        name: {k: str(v).lower() for k, v in flags.items()} for name, flags in rows.items()}


def test_a_type_named_all_has_its_own_table_apart_from_sets_of_no_type() -> None:
    """Sets of no type (folders eval'd without --degradation) were grouped under the key 'all': a set of a
    type named 'all' joined them in the untitled table, its type lost."""
    row = ModelRow("k", "kt", scores={("typed", "piqe"): 30.0, ("untyped", "piqe"): 40.0, ("hazy", "piqe"): 35.0},
                   degradation={"typed": "all", "hazy": "haze"})
    tables = {t.title: [c[0] for c in t.columns] for t in build_tables([row])}
    assert tables == {"NR-IQA (Tables I-III)": ["untyped"], "NR-IQA (Tables I-III): all": ["typed"],
                      "NR-IQA (Tables I-III): haze": ["hazy"]}


def _paired_folders(root: Path, *names: str) -> None:
    """root/<name>/{input,target}/a.png for each name: a one-pair image folder of random pixels."""
    rng = np.random.default_rng(0)
    for folder in names:
        for sub in ("input", "target"):
            (root / folder / sub).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / folder / sub / "a.png")


def test_eval_domain_files_a_folder_of_synthetic_pairs_out_of_table_v(tmp_path, capsys) -> None:
    """An image folder had no domain: a folder of synthetic test pairs landed in the real sets' Table V.
    `eval --domain synthetic` tags it (a real folder keeps its place with `--domain real`); shards carry
    their own domain, so --domain with shards is refused before anything is scored."""
    from uniremoval.cli import main
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    _paired_folders(tmp_path, "syn", "real")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = save_checkpoint(tmp_path / "da" / "last", MPRNet("tiny").eval(),
                           {"run_name": "da", "ablation": {"use_gan": True, "use_idt": True}})
    common = ["eval", "--checkpoint", str(ckpt), "--metrics", "piqe,psnr", "--device", "cpu", "--tracking-uri", uri,
              "--experiment", "proj", "--degradation", "rain"]
    assert main([*common, "--data", str(tmp_path / "syn"), "--domain", "synthetic"]) == 0
    assert main([*common, "--data", str(tmp_path / "real"), "--domain", "real"]) == 0
    tables = {t.title: [c[0] for c in t.columns] for t in build_tables(collect("proj", uri))}
    assert tables["Real ablation: NR-IQA (Table V)"] == ["real"], tables
    assert tables["Synthetic ablation: PSNR/SSIM (Table IV)"] == ["syn"], tables
    assert tables["Real paired sets: PSNR/SSIM"] == ["real"], tables

    shards = tmp_path / "shards"
    assert main(["shards", "build", "--format", "paired-folder", "--root", str(tmp_path / "syn"), "--degradation",
                 "rain", "--out", str(shards), "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*common, "--data", str(shards), "--domain", "real", "--name", "shards_real"]) == 2
    assert "whose samples carry their domain in their json" in capsys.readouterr().err
    assert "shards_real" not in {c[0] for t in build_tables(collect("proj", uri)) for c in t.columns}


def test_eval_config_with_domain_refuses_a_shards_source_before_scoring_any(tmp_path, capsys) -> None:
    """`eval --config` with --domain scored, wrote and logged the folder sources listed before a shards
    source, then refused the shards one naming a --data never given: refused up front, naming the key."""
    from uniremoval.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.png")
    assert main(["shards", "build", "--format", "folder", "--root", str(tmp_path / "photos"), "--degradation",
                 "rain", "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    cfg = tmp_path / "ev.yaml"
    cfg.write_text(f"stage: eval\ntracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\neval:\n  checkpoint: none\n"
                   f"  metrics: [piqe]\n  data:\n    - {{name: folder, shards: {tmp_path / 'photos'}}}\n"
                   f"    - {{name: sh, shards: {tmp_path / 'shards'}}}\n")
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--domain", "real", "--device", "cpu", "--json",
                 str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert "--domain real: eval.data.1 (sh) is shards, whose samples carry their domain" in err, err
    assert not list(tmp_path.glob("out*.json")) and not (tmp_path / "mlflow.db").exists()


def test_eval_config_sources_carry_their_own_domain(tmp_path, capsys) -> None:
    """A config's eval.data could not say which folder is real and which synthetic (only --domain, one for
    all): each source's `domain` files it, --domain overrides them all, and `domain` on shards is refused
    up front naming the key."""
    from uniremoval.cli import main
    from uniremoval.config import Domain
    from uniremoval.data.readers import DOMAINS

    assert typing.get_args(Domain) == DOMAINS
    _paired_folders(tmp_path, "syn", "real")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "ev.yaml"
    head = (f"stage: eval\ntracking: {{uri: '{uri}', experiment: proj}}\neval:\n  checkpoint: none\n"
            f"  metrics: [piqe, psnr]\n  data:\n")
    cfg.write_text(head + f"    - {{name: syn, shards: {tmp_path / 'syn'}, degradation: rain, domain: synthetic}}\n"
                          f"    - {{name: real, shards: {tmp_path / 'real'}, degradation: rain, domain: real}}\n")
    assert main(["eval", "--config", str(cfg), "--device", "cpu"]) == 0
    tables = {t.title: [c[0] for c in t.columns] for t in build_tables(collect("proj", uri))}
    assert tables["Synthetic ablation: PSNR/SSIM (Table IV)"] == ["syn"], tables
    assert tables["Real paired sets: PSNR/SSIM"] == ["real"], tables

    assert main(["eval", "--config", str(cfg), "--device", "cpu", "--domain", "real", "--experiment", "all_real"]) == 0
    tables = {t.title: [c[0] for c in t.columns] for t in build_tables(collect("all_real", uri))}
    assert tables["Real paired sets: PSNR/SSIM"] == ["real", "syn"], tables

    assert main(["shards", "build", "--format", "paired-folder", "--root", str(tmp_path / "syn"), "--degradation",
                 "rain", "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    cfg.write_text(head + f"    - {{name: real, shards: {tmp_path / 'real'}, domain: real}}\n"
                          f"    - {{name: sh, shards: {tmp_path / 'shards'}, domain: real}}\n")
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--device", "cpu", "--experiment", "refused"]) == 2
    err = capsys.readouterr().err
    assert "eval.data.1.domain real: eval.data.1 (sh) is shards, whose samples carry their domain" in err, err
    assert "eval.data.1.domain tags image folders: drop it" in err, err
    assert MlflowClient(uri).get_experiment_by_name("refused") is None  # refused before any run

    cfg.write_text(head + f"    - {{name: real, shards: {tmp_path / 'real'}, domain: outdoor}}\n")
    assert main(["eval", "--config", str(cfg), "--device", "cpu"]) == 2
    assert "eval.data.0.domain" in capsys.readouterr().err
    # --degradation and --name name --data's dataset: without --data they were dropped without a word
    cfg.write_text(head + f"    - {{name: real, shards: {tmp_path / 'real'}, domain: real}}\n")
    for flags, key in ((["--degradation", "rain"], "degradation"), (["--name", "x", "--degradation", "rain"], "name")):
        assert main(["eval", "--config", str(cfg), "--device", "cpu", *flags, "--experiment", "refused"]) == 2
        assert f"with --config and no --data the datasets are the config's eval.data, each with its own: set " \
               f"eval.data.N.{key}" in capsys.readouterr().err
    assert MlflowClient(uri).get_experiment_by_name("refused") is None


def test_a_dataset_evaluated_under_two_types_is_filed_by_the_latest_run_with_a_warning(tmp_path, capsys) -> None:
    """One dataset name evaluated as 'snow' (the inputs) and later as 'rain' (a model): the tables took
    whichever row came last and moved every model's cells, silently. The latest run's tag files it, said."""
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / "a.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = save_checkpoint(tmp_path / "m" / "last", MPRNet("tiny").eval(), {"run_name": "m"})
    common = {"metrics": ["piqe"], "device": "cpu", "tracking_uri": uri, "experiment": "proj", "name": "set"}
    run_eval(EvalOptions(str(ckpt), str(data), degradation="rain", **common))
    run_eval(EvalOptions("none", str(data), degradation="snow", **common))
    capsys.readouterr()
    tables = {t.title: [r.key for r in t.rows] for t in build_tables(collect("proj", uri))}
    err = capsys.readouterr().err
    assert "dataset 'set': its eval runs are tagged degradation 'rain', 'snow'; the report files it under the " \
           "latest run's, 'snow'" in err, err
    assert len(tables["NR-IQA (Tables I-III): snow"]) == 2 and "NR-IQA (Tables I-III): rain" not in tables, tables


def test_collect_reads_every_page_and_an_all_undefined_latest_run_blanks_the_cells(tmp_path, capsys, monkeypatch):
    """One search page was read (past it the newest runs, which win each cell, were cut off), and a latest
    eval whose every mean was undefined (nothing logged under eval/) was skipped, so the model's older
    scores stood as current."""
    from uniremoval.eval import report as report_mod

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pages", artifact_location=(tmp_path / "art").as_uri())

    def eval_run(model: str, dataset: str, metrics: dict[str, float]) -> None:
        run = client.create_run(exp, run_name=f"eval-{dataset}", tags={"stage": "eval", "dataset": dataset,
                                                                      "uniremoval.model": model})
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id)

    eval_run("m1", "A", {"eval/A/piqe": 30.0, "eval_undefined/A/piqe": 0})
    eval_run("m2", "A", {"eval/A/piqe": 25.0, "eval_undefined/A/piqe": 0})
    eval_run("m1", "B", {"eval/B/piqe": 20.0, "eval_undefined/B/piqe": 0})
    monkeypatch.setattr(report_mod, "SEARCH_PAGE", 1)
    rows = {r.key: r for r in collect("pages", uri)}
    assert rows["m1"].scores == {("A", "piqe"): 30.0, ("B", "piqe"): 20.0} and rows["m2"].scores == {("A", "piqe"): 25.0}
    eval_run("m1", "A", {"eval_undefined/A/piqe": 3})  # every image undefined: no mean logged
    rows = {r.key: r for r in collect("pages", uri)}
    assert rows["m1"].scores == {("B", "piqe"): 20.0}
    err = capsys.readouterr().err
    assert "eval-A on A: its latest eval run (" in err and "(piqe undefined for every image); its cells are blank" in err
    assert "which an earlier run had" not in err
