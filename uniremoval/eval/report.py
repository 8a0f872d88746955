"""Paper-style tables and image grids from the MLflow eval runs of one experiment.

Every `uniremoval eval` run (tag stage=eval) holds `eval/<dataset>/<metric>` and tags naming the
model it scored and its row label (`uniremoval.label`). A report row is one model: one weights file
(tag `checkpoint_sha256`), so `best` and `last` of one training run (its id stays in
`uniremoval.train_run_id`) are two rows; "input" for `--checkpoint none`; runs without the sha256
are keyed by `uniremoval.model` (older runs: the training run id). A column is one dataset x
metric; when a model was evaluated on a dataset more than once, its latest FINISHED run counts (an
eval stopped while logging is KILLED or FAILED, or RUNNING after a kill -9, its images partly
uploaded: never used).

Labels are per dataset: a row shows, in each table, the label of its runs on that table's datasets
(the input row is "Hazy" in the haze table and "Rainy" in the rain table; distinct labels within one
table are joined with " / "). Runs of one model on one dataset with different labels: the latest
counts, with a warning. Rows that would show the same label get their checkpoint's name added
("kt (best)", "kt (last)"). A mean that left out images where the metric is undefined (eval's
`eval_undefined/<dataset>/<metric>`) is warned about; an infinite PSNR (MLflow stores it as the
largest float) is shown as inf. Warnings go to stderr as `warning:` lines. Tables:

- NR-IQA (the paper's Tables I-III): BRISQUE/PIQE/NIQE columns, one table per degradation (the
  eval runs' `degradation` tag), all models;
- Synthetic ablation (Table IV): PSNR/SSIM columns, models with full-reference scores, with one
  check-mark column per ablation flag its rows carry (`ablation.*` tags copied from the training
  run); datasets whose eval runs carry `domain: real` (real paired sets such as SPA, RealBlur-J) go
  to a table of their own, "Real paired sets: PSNR/SSIM" (eval runs older than that tag: the domain
  their --data shards' manifest counts, where it is still readable);
- Real ablation (Table V): NR-IQA columns, models that carry ablation flags.

Headers carry the better direction (down arrow: lower is better); the best value of each column is
bold (md: `**x**`, html: `<b>`; csv has full-precision numbers and no markup). Image grids: for each
dataset, the same images (first `n_images` names common to every model that saved images with
`--save-images`) side by side, one column per model.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniremoval.errors import UniremovalError
from uniremoval.eval.metrics import METRICS

FORMATS = ("md", "csv", "html")
CHECK, CROSS = "\u2713", "\u2717"
UP, DOWN = "\u2191", "\u2193"
GRID_GLOB = "grid-*.png"  # the image grids a report writes in --out-dir: grid-<dataset>.png


@dataclass
class ModelRow:
    key: str  # checkpoint sha256, "input", or (older runs) uniremoval.model
    label: str  # the latest run's label; tables show `labels` of their datasets
    ablation: dict[str, str] = field(default_factory=dict)
    scores: dict[tuple[str, str], float] = field(default_factory=dict)  # (dataset, metric) -> value
    runs: dict[str, str] = field(default_factory=dict)  # dataset -> eval run id (latest)
    # dataset -> every eval run of these weights on it, oldest first: an image grid takes the latest
    # that saved images (a later eval without --save-images does not lose the grid)
    all_runs: dict[str, list[str]] = field(default_factory=dict)
    degradation: dict[str, str] = field(default_factory=dict)  # dataset -> degradation tag
    domain: dict[str, str] = field(default_factory=dict)  # dataset -> domain tag (synthetic, real)
    labels: dict[str, str] = field(default_factory=dict)  # dataset -> label of the run counted there
    train_run: str | None = None  # the training run of the weights (uniremoval.train_run_id)
    checkpoint: str | None = None  # the checkpoint path or runs:/ URI last evaluated

    def label_for(self, datasets: list[str]) -> str:
        """The label shown over `datasets`: their runs' labels, distinct ones joined with " / "."""
        found = list(dict.fromkeys(self.labels[d] for d in datasets if d in self.labels))
        return " / ".join(found) if found else self.label


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str]]  # (dataset, metric)
    rows: list[ModelRow]
    flags: list[str] = field(default_factory=list)  # ablation flag columns, before the scores


def collect(experiment: str, tracking_uri: str | None = None) -> list[ModelRow]:
    """One ModelRow per model evaluated in `experiment`: inputs first, then in order of first evaluation."""
    from mlflow.exceptions import MlflowException

    from uniremoval.tracking import (
        LABEL_TAG,
        MODEL_TAG,
        TRAIN_RUN_TAG,
        mlflow_client,
        resolve_uri,
        sqlite_path,
        tagged_ablation,
    )

    store = sqlite_path(resolve_uri(tracking_uri))
    # MLflow would create a store to read it (also in an empty file: a store's file a full disk
    # truncated, or a `touch`): the report only reads.
    if store is not None and (not store.exists() or (store.is_file() and store.stat().st_size == 0)):
        state = "is an empty file" if store.exists() else "does not exist"
        raise UniremovalError(
            f"no MLflow store at {store} (it {state}: nothing was logged there; left as it is); point --tracking-uri (or "
            "$MLFLOW_TRACKING_URI) at the store that holds the eval runs, or run the report where they were logged"
        )
    client = mlflow_client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UniremovalError(
            f"cannot read MLflow at {resolve_uri(tracking_uri)} ({first}); start that server or point "
            "--tracking-uri (or $MLFLOW_TRACKING_URI) at the store that holds the eval runs"
        ) from exc
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UniremovalError(
            f"no MLflow experiment {experiment!r} at {resolve_uri(tracking_uri)}; "
            f"experiments there: {names or 'none'}"
        )
    runs: list[Any] = []
    token = None
    while True:  # every page: past one page's runs the newest, which win each cell, were cut off
        page = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.stage = 'eval' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            max_results=SEARCH_PAGE,
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    models: dict[str, ModelRow] = {}
    seen_labels: dict[tuple[str, str], list[str]] = {}  # (model, dataset) -> labels of its runs, in order
    undefined: dict[tuple[str, str], dict[str, int]] = {}  # (model, dataset) -> metric -> images left out
    scored: dict[str, dict[tuple[str, ...], str]] = {}  # dataset -> the --data its runs read (last 2 parts)
    had: dict[tuple[str, str], dict[str, None]] = {}  # (model, dataset) -> every metric its runs logged
    domains_read: dict[str, str | None] = {}  # --data -> the domain its manifests record (older runs)
    tagged: dict[tuple[str, str], dict[str, None]] = {}  # (dataset, tag) -> its values over the runs, in order
    for run in runs:
        tags = run.data.tags
        dataset = tags.get("dataset") or (run.info.run_name or "").removeprefix("eval-")
        # The weights are the model (best and last of one training run are two); runs without the
        # sha256 (--checkpoint none: "input") are keyed as they were logged.
        key = tags.get("checkpoint_sha256") or tags.get(MODEL_TAG) or run.info.run_id
        label = tags.get(LABEL_TAG) or run.info.run_name or key[:8]
        row = models.setdefault(key, ModelRow(key, label))
        row.label = label  # the latest run names the row where no dataset's label applies
        row.train_run = tags.get(TRAIN_RUN_TAG) or row.train_run
        row.checkpoint = tags.get("checkpoint") or row.checkpoint
        row.ablation.update(tagged_ablation(tags))
        prefix = f"eval/{dataset}/"
        got = {k[len(prefix) :]: _from_mlflow(v) for k, v in run.data.metrics.items() if k.startswith(prefix)}
        if not got:
            uprefix = f"eval_undefined/{dataset}/"
            if every := sorted(k[len(uprefix):] for k in run.data.metrics if k.startswith(uprefix)):
                # An eval whose every mean was undefined (NaN is not logged) is still the latest: the
                # model's older scores on the dataset are not shown as its.
                for metric in [m for (d, m) in row.scores if d == dataset]:
                    del row.scores[(dataset, metric)]
                had.pop((key, dataset), None)  # said here: not also "rerun with --metrics" below
                _warn(f"{label} on {dataset}: its latest eval run ({run.info.run_id}) has no defined score "
                      f"({', '.join(every)} undefined for every image); its cells are blank")
            continue
        for metric in [m for (d, m) in row.scores if d == dataset]:
            del row.scores[(dataset, metric)]  # a later run of the same model and dataset replaces it
        had.setdefault((key, dataset), {}).update(dict.fromkeys(got))
        row.scores.update({(dataset, m): v for m, v in got.items()})
        row.runs[dataset] = run.info.run_id
        row.all_runs.setdefault(dataset, []).append(run.info.run_id)
        row.labels[dataset] = label  # the latest run on this dataset names the row in its tables
        seen_labels.setdefault((key, dataset), []).append(label)
        uprefix = f"eval_undefined/{dataset}/"
        undefined[(key, dataset)] = {k[len(uprefix):]: int(v) for k, v in run.data.metrics.items()
                                     if k.startswith(uprefix) and v > 0}
        # An eval older than the domain tag: its shards' manifest says it, where still readable here
        run_tags = {"degradation": tags.get("degradation"),
                    "domain": tags.get("domain") or _recorded_domain(run.data.params.get("data"), domains_read)}
        for tag, value in run_tags.items():
            if value:
                getattr(row, tag)[dataset] = value
                seen_values = tagged.setdefault((dataset, tag), {})
                seen_values.pop(value, None)  # re-inserted: the last is the latest run's
                seen_values[value] = None
        if data := run.data.params.get("data"):  # by its last two parts: one folder seen from two cwds is one
            scored.setdefault(dataset, {})[Path(os.path.normpath(data)).parts[-2:]] = data
    for (key, dataset), labels in seen_labels.items():
        if len(set(labels)) > 1:
            distinct = ", ".join(repr(x) for x in dict.fromkeys(labels))
            _warn(f"model {_model_name(models[key])} on {dataset}: its eval runs carry different labels ({distinct}); "
                  f"the latest, {labels[-1]!r}, is shown (rerun that eval with --label to choose)")
    for (key, dataset), metrics in had.items():
        # ...the metrics it did not compute included: say so, or their cells go blank with no word
        if missing := [m for m in metrics if (dataset, m) not in models[key].scores]:
            _warn(f"{models[key].labels.get(dataset, key)} on {dataset}: its latest eval run has no "
                  f"{', '.join(missing)}, which an earlier run had; the report shows the latest run only "
                  f"(rerun that eval with --metrics {','.join(metrics)})")
    for (dataset, tag), values in tagged.items():
        # One dataset evaluated under two types (or domains): each row kept its own, and the tables took
        # whichever row came last, moving every model's cells with no word. The latest run's tag files it.
        if len(values) > 1:
            latest = list(values)[-1]
            for row in models.values():
                if dataset in getattr(row, tag):
                    getattr(row, tag)[dataset] = latest
            flag = "--degradation" if tag == "degradation" else "--domain"
            _warn(f"dataset {dataset!r}: its eval runs are tagged {tag} {', '.join(map(repr, values))}; the report "
                  f"files it under the latest run's, {latest!r} (rerun the others with {flag} {latest}, or give "
                  f"them another --name)")
    for dataset, datas in scored.items():
        # eval names a folder dataset after its last part: raw/snow/test and raw/haze/test are both
        # "test", and one column held whichever each model scored last, with no word.
        if len(datas) > 1:
            _warn(f"dataset {dataset!r} names eval runs on different --data ({', '.join(datas.values())}): its "
                  f"column shows each model's latest of them; rerun those evals with --name to tell them apart")
    for (key, dataset), counts in undefined.items():
        for metric, n in counts.items():
            _warn(f"{models[key].labels.get(dataset, key)} on {dataset}: {metric} was undefined for {n} image(s) "
                  "(e.g. flat images); the mean shown is over the other images")
    # The unrestored inputs first (the paper's "Hazy/Rainy/Blurry" row), then by first evaluation.
    return sorted(models.values(), key=lambda r: r.key != "input")


def _recorded_domain(data: str | None, seen: dict[str, str | None]) -> str | None:
    """The one domain (synthetic, real) the manifests of an eval's --data count, for eval runs written
    before eval tagged it: local shard folders, manifest files and tars (their folder's manifest); None
    for image folders, URLs, paths not readable here, and mixed or uncounted domains."""
    if not data:
        return None
    if data not in seen:
        from uniremoval.data.manifest import existing_manifest, is_streamed, split_specs

        found: set[str] = set()
        for part in split_specs(data):
            if is_streamed(part):
                found.add("")
                continue
            path = Path(part)
            folder = path if path.is_dir() or path.suffix == ".json" else path.parent
            held = ((existing_manifest(folder) or {}).get("counts") or {}).get("domain")
            found.update(held if isinstance(held, dict) and held else [""])
        seen[data] = found.pop() if len(found) == 1 and "" not in found else None
    return seen[data]


def _from_mlflow(v: float) -> float:
    """MLflow stores +-inf as +-the largest float: back to inf (a PSNR of identical images)."""
    return math.copysign(math.inf, v) if abs(v) >= sys.float_info.max else v


def _model_name(row: ModelRow) -> str:
    return "input" if row.key == "input" else (f"{row.key[:12]} ({Path(row.checkpoint).name})" if row.checkpoint
                                               else row.key[:12])


SEARCH_PAGE = 50000  # runs per MLflow search request (its largest page)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def display_labels(rows: list[ModelRow], datasets: list[str]) -> list[str]:
    """The labels of `rows` over `datasets`; rows that would share one get their checkpoint's name
    (best, last), else the first 8 digits of their key, added so every row can be told apart."""
    labels = [r.label_for(datasets) for r in rows]
    for attempt in (lambda r: Path(r.checkpoint).stem if r.checkpoint and r.key != "input" else None,
                    lambda r: r.key[:8]):
        counts = Counter(labels)
        labels = [f"{lab} ({extra})" if counts[lab] > 1 and (extra := attempt(r)) and extra != lab else lab
                  for lab, r in zip(labels, rows)]
    return labels


def _kind(metric: str) -> str:
    info = METRICS.get(metric)
    return info.kind if info else ("fr" if metric.startswith(("psnr", "ssim")) else "nr")


def _columns(rows: list[ModelRow], kind: str, datasets: set[str] | None = None) -> list[tuple[str, str]]:
    order = list(METRICS)
    cols = {
        c for r in rows for c in r.scores if _kind(c[1]) == kind and (datasets is None or c[0] in datasets)
    }
    return sorted(cols, key=lambda c: (c[0], order.index(c[1]) if c[1] in order else len(order), c[1]))


def build_tables(rows: list[ModelRow]) -> list[Table]:
    tables: list[Table] = []
    degradation_of: dict[str, str] = {}
    for r in rows:
        degradation_of.update(r.degradation)
    nr_datasets = {d for r in rows for (d, m) in r.scores if _kind(m) == "nr"}
    groups: dict[str | None, set[str]] = {}  # None: sets of no type (folders eval'd without --degradation)
    for d in nr_datasets:
        groups.setdefault(degradation_of.get(d), set()).add(d)
    for deg in sorted(groups, key=lambda g: (g is not None, g or "")):
        cols = _columns(rows, "nr", groups[deg])
        title = "NR-IQA (Tables I-III)" + ("" if deg is None else f": {deg}")
        tables.append(Table(title, cols, [r for r in rows if any(c in r.scores for c in cols)]))
    # Table IV is on synthetic sets; a real paired set (SPA, RealBlur-J: eval's `domain` tag) has its own
    # table. Datasets without the tag (folders) stay in Table IV, as before the tag existed.
    domain_of: dict[str, str] = {}
    for r in rows:
        domain_of.update(r.domain)
    fr_all = {d for r in rows for (d, m) in r.scores if _kind(m) == "fr"}
    real_fr = {d for d in fr_all if domain_of.get(d) == "real"}
    for title, datasets in (("Synthetic ablation: PSNR/SSIM (Table IV)", fr_all - real_fr),
                            ("Real paired sets: PSNR/SSIM", real_fr)):
        fr_cols = _columns(rows, "fr", datasets)
        if fr_cols:
            fr_rows = [r for r in rows if any(c in r.scores for c in fr_cols)]
            tables.append(Table(title, fr_cols, fr_rows, _flags(fr_rows)))
    # Table V is on real sets: NR-IQA of synthetic ones (eval's `domain` tag) is left to Tables I-III;
    # datasets without the tag (folders of photos) stay, as in Table IV.
    ablated = [r for r in rows if r.ablation]
    nr_cols = _columns(ablated, "nr", {d for d in nr_datasets if domain_of.get(d) != "synthetic"})
    if ablated and nr_cols:
        nr_rows = [r for r in ablated if any(c in r.scores for c in nr_cols)]
        tables.append(Table("Real ablation: NR-IQA (Table V)", nr_cols, nr_rows, _flags(nr_rows)))
    return tables


def _flags(rows: list[ModelRow]) -> list[str]:
    """The ablation flag columns of a table: those its rows carry (KT's use_icl/use_fcl in Table IV,
    not DA's four switches, which no KT row has, as empty columns)."""
    return sorted({k for r in rows for k in r.ablation})


def _lower_better(metric: str) -> bool:
    info = METRICS.get(metric)
    return info.lower_better if info else True


def best_values(table: Table) -> dict[tuple[str, str], float]:
    best = {}
    for c in table.columns:
        vals = [r.scores[c] for r in table.rows if c in r.scores and not math.isnan(r.scores[c])]
        if vals:
            best[c] = min(vals) if _lower_better(c[1]) else max(vals)
    return best


def _header(col: tuple[str, str]) -> str:
    dataset, metric = col
    info = METRICS.get(metric)
    return f"{dataset} {info.label if info else metric} {DOWN if _lower_better(metric) else UP}"


def _fmt(metric: str, v: float, decimals: int | None) -> str:
    if decimals is None:
        decimals = 4 if metric.startswith("ssim") else 2
    return f"{v:.{decimals}f}"


def _flag(value: str | None) -> str:
    if value is None:
        return ""
    return (
        CHECK
        if value.lower() in ("true", "1", "yes")
        else CROSS
        if value.lower() in ("false", "0", "no")
        else value
    )


def _md_cell(text: str) -> str:
    """A markdown table cell: a '|' in a run or dataset name would split the row."""
    return str(text).replace("|", "\\|")


def render(tables: list[Table], fmt: str = "md", decimals: int | None = None) -> str:
    if fmt not in FORMATS:
        raise UniremovalError(f"--format {fmt!r}: choose one of {FORMATS}")
    out = io.StringIO()
    if fmt == "html":
        out.write(
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>uniremoval report</title>'
            "<style>table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #999;"
            "padding:2px 8px;text-align:center}</style></head><body>\n"
        )
    for t in tables:
        best = best_values(t)
        labels = display_labels(t.rows, list(dict.fromkeys(d for d, _ in t.columns)))
        if fmt == "md":
            head = ["Method", *t.flags, *map(_header, t.columns)]
            out.write(f"### {t.title}\n\n| " + " | ".join(map(_md_cell, head)) + " |\n|" + "---|" * len(head) + "\n")
            for r, label in zip(t.rows, labels):
                cells = [_md_cell(label), *(_flag(r.ablation.get(f)) for f in t.flags)]
                for c in t.columns:
                    v = r.scores.get(c)
                    s = "" if v is None else _fmt(c[1], v, decimals)
                    cells.append(f"**{s}**" if v is not None and v == best.get(c) else s)
                out.write("| " + " | ".join(cells) + " |\n")
            out.write("\n")
        elif fmt == "csv":
            w = csv.writer(out, lineterminator="\n")
            w.writerow([f"# {t.title}"])
            w.writerow(["method", *t.flags, *map(_header, t.columns)])
            for r, label in zip(t.rows, labels):
                w.writerow(
                    [
                        label,
                        *(r.ablation.get(f, "") for f in t.flags),
                        *("" if r.scores.get(c) is None else repr(r.scores[c]) for c in t.columns),
                    ]
                )
            w.writerow([])
        else:
            out.write(f'<h3>{html.escape(t.title)}</h3>\n<table>\n<tr><th rowspan="2">Method</th>')
            for f in t.flags:
                out.write(f'<th rowspan="2">{html.escape(f)}</th>')
            datasets = list(dict.fromkeys(d for d, _ in t.columns))
            for d in datasets:
                out.write(f'<th colspan="{sum(1 for c in t.columns if c[0] == d)}">{html.escape(d)}</th>')
            out.write("</tr>\n<tr>")
            for d, m in t.columns:
                info = METRICS.get(m)
                out.write(
                    f"<th>{html.escape(info.label if info else m)} {DOWN if _lower_better(m) else UP}</th>"
                )
            out.write("</tr>\n")
            for r, label in zip(t.rows, labels):
                out.write(f"<tr><td>{html.escape(label)}</td>")
                for f in t.flags:
                    out.write(f"<td>{html.escape(_flag(r.ablation.get(f)))}</td>")
                for c in t.columns:
                    v = r.scores.get(c)
                    s = "" if v is None else _fmt(c[1], v, decimals)
                    out.write(
                        f"<td><b>{s}</b></td>" if v is not None and v == best.get(c) else f"<td>{s}</td>"
                    )
                out.write("</tr>\n")
            out.write("</table>\n")
    if fmt == "html":
        out.write("</body></html>\n")
    return out.getvalue()


# ---------------------------------------------------------------------------------- image grids


def image_grids(
    rows: list[ModelRow],
    out_dir: str | os.PathLike,
    tracking_uri: str | None = None,
    n_images: int = 4,
    cell_height: int = 192,
) -> list[Path]:
    """grid-<dataset>.png per dataset that two or more models saved images for."""
    from uniremoval.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    out_dir = Path(out_dir)
    datasets = sorted({d for r in rows for d in r.runs})
    # MLflow draws a progress bar per download (dozens of lines per report): the report says what it wrote
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return _grids(client, rows, datasets, out_dir, n_images, cell_height)
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


def _grids(client: Any, rows: list[ModelRow], datasets: list[str], out_dir: Path, n_images: int,
           cell_height: int) -> list[Path]:
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in datasets:
            have: list[tuple[ModelRow, Path]] = []
            for r in rows:
                run_id = next((i for i in reversed(r.all_runs.get(d, [])) if client.list_artifacts(i, f"images/{d}")),
                              None)
                if run_id is None:
                    continue
                local = Path(client.download_artifacts(run_id, f"images/{d}", str(Path(tmp) / run_id)))
                have.append((r, local))
            if len(have) < 2:
                continue
            common = set.intersection(
                *({p.relative_to(loc).as_posix() for p in loc.rglob("*.png")} for _, loc in have)
            )
            names = sorted(common)[:n_images]
            if not names:
                continue
            path = out_dir / GRID_GLOB.replace("*", _safe(d))
            _write_grid(
                path, display_labels([r for r, _ in have], [d]), [[loc / n for _, loc in have] for n in names],
                cell_height
            )
            written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _write_grid(path: Path, labels: list[str], cells: list[list[Path]], cell_height: int) -> None:
    """Rows of images (one per name), columns per model, with the model labels on top."""
    from PIL import Image, ImageDraw

    from uniremoval.io import atomic_writer

    pad, head = 4, 18
    scaled: list[list[Any]] = []
    for row in cells:
        imgs = [Image.open(p).convert("RGB") for p in row]
        scaled.append(
            [im.resize((max(1, round(im.width * cell_height / im.height)), cell_height)) for im in imgs]
        )
    col_w = [max(r[j].width for r in scaled) for j in range(len(labels))]
    width = sum(col_w) + pad * (len(labels) + 1)
    height = head + len(scaled) * (cell_height + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for j, label in enumerate(labels):
        draw.text((x, 3), label[:40], fill="black")
        y = head
        for r in scaled:
            canvas.paste(r[j], (x, y))
            y += cell_height + pad
        x += col_w[j] + pad
    with atomic_writer(path) as fh:
        canvas.save(fh, format="PNG")


def make_report(
    experiment: str,
    fmt: str = "md",
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike | None = None,
    n_images: int = 4,
    decimals: int | None = None,
) -> tuple[str, list[Path]]:
    """(rendered tables, grid files). With `out_dir`, the tables are also written there, and image
    grids of `n_images` images each (0: none); the grid files there are then exactly this report's
    (`remove_other_grids`), and report.<fmt> is written last."""
    if n_images < 0:
        raise UniremovalError(f"images per grid must be >= 0 (0 for no image grids), got {n_images}")
    rows = collect(experiment, tracking_uri)
    tables = build_tables(rows)
    if not tables:
        raise UniremovalError(
            f"experiment {experiment!r} has no eval runs with scores; run `uniremoval eval` first"
        )
    text = render(tables, fmt, decimals)
    grids: list[Path] = []
    if out_dir is not None:
        from uniremoval.io import atomic_write_text

        if n_images > 0:
            grids = image_grids(rows, out_dir, tracking_uri, n_images)
        remove_other_grids(out_dir, grids)
        # Last: a report.<fmt> beside grids of an earlier report means this one did not complete.
        atomic_write_text(Path(out_dir) / f"report.{fmt}", text)
    return text, grids


def remove_other_grids(out_dir: str | os.PathLike, written: list[Path]) -> list[Path]:
    """Remove the grid files (GRID_GLOB) in `out_dir` that this report did not write: grids of
    datasets no longer in it, or of an earlier run with --images; and the temporaries of a grid or a
    report.<fmt> whose writing was killed. Any other file is left alone. Returns what was removed."""
    from uniremoval.io import TMP_SUFFIX

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    keep = {Path(p).name for p in written}
    stale = [p for p in out_dir.glob(GRID_GLOB) if p.name not in keep]
    stale += out_dir.glob(f".{GRID_GLOB}.*{TMP_SUFFIX}")  # atomic_writer's names for a grid being written
    for fmt in FORMATS:  # ... and for a report.<fmt> being written
        stale += out_dir.glob(f".report.{fmt}.*{TMP_SUFFIX}")
    removed = []
    for p in sorted(stale):
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
