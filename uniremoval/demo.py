"""`uniremoval demo`: the whole method end to end on CPU, on photos that ship inside installed packages.

The demo is an orchestration of the same commands a user runs (it calls the CLI in-process, with
the same arguments it prints), in the order of the data flow:

    images  -> shards (synthetic pairs, real-like degraded, clear) -> teacher x k -> cache
            -> kt -> da -> eval (inputs, KT student, adapted student) -> report + image grid

Everything lands in one work directory (default `demo_workspace/`): tiles, shards, resolved
configs, checkpoints, caches, evaluation JSON, the MLflow store (`mlflow.db` + `mlruns/`), the
report (`report.md`) and the image grid (`grid.png`). A second run reuses every step whose outputs
exist and still match (same command, same config hash, same teacher weights); `--clean` starts over.
Stage settings live in `configs/demo/` (demo.yaml says what each step does); `--quick` shrinks the
run for the test suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uniremoval.data.manifest import MANIFEST_NAME
from uniremoval.errors import ConfigError, DataError, UniremovalError

MARKER = ".uniremoval-demo"  # marks a directory the demo created (the only kind --clean deletes)
DEFAULT_WORKDIR = "demo_workspace"
SKLEARN_PREFIX = "sklearn:"


# ------------------------------------------------------------------------------------------ plan


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagesPlan(_Strict):
    train: list[str] = Field(min_length=1)
    test: list[str] = Field(min_length=1)
    short_side: int = Field(256, ge=32, le=4096)
    tile: int = Field(128, ge=32, le=4096)


class SynthPlan(_Strict):
    seed: int = 0
    # `shards synth --params`: a built-in preset name or a ranges file (relative to the config dir)
    params: str = "default"
    params_real: str = "real-like"
    per_image: int = Field(3, ge=1)
    per_image_real: int = Field(2, ge=1)
    per_image_test: int = Field(1, ge=1)


class EvalPlan(_Strict):
    metrics: list[str] = Field(default_factory=lambda: ["piqe", "psnr", "ssim"])
    grid_images: int = Field(2, ge=1)


class StageFiles(_Strict):
    teacher: str = "teacher_{degradation}.yaml"
    cache: str = "cache.yaml"
    kt: str = "kt.yaml"
    da: str = "da.yaml"


class DemoPlan(_Strict):
    project: str = "uniremoval-demo"
    degradations: list[str] = Field(default_factory=lambda: ["haze", "rain", "blur"], min_length=1)
    images: ImagesPlan
    synth: SynthPlan = Field(default_factory=SynthPlan)
    eval: EvalPlan = Field(default_factory=EvalPlan)
    stages: StageFiles = Field(default_factory=StageFiles)
    # per stage ("teacher", "cache", "kt", "da"): dotted overrides applied to its config
    overrides: dict[str, list[str]] = Field(default_factory=dict)


def default_config_dir() -> Path:
    """configs/demo of the source tree this package runs from, else ./configs/demo."""
    here = Path(__file__).resolve().parent.parent / "configs" / "demo"
    return here if (here / "demo.yaml").is_file() else Path("configs/demo")


def load_plan(config_dir: Path, quick: bool) -> DemoPlan:
    path = config_dir / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"demo plan not found: {path}; run from the repository root or pass --config-dir")
    raw = yaml.safe_load(path.read_text()) or {}
    quick_part = raw.pop("quick", None) or {}
    if quick:
        from uniremoval.config import deep_merge

        raw = deep_merge(raw, quick_part)
    try:
        return DemoPlan.model_validate(raw)
    except ValidationError as exc:
        from uniremoval.config import file_errors

        raise ConfigError(file_errors(exc, DemoPlan, path)) from None


# ------------------------------------------------------------------------------------------ images


def bundled_images() -> dict[str, Path]:
    """Photos inside installed wheels, by name: scikit-image's data folder ('astronaut', ...) and
    scikit-learn's sample images ('sklearn:china', ...). Files only; nothing is downloaded."""
    import importlib.util

    found: dict[str, Path] = {}
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.origin:
        data = Path(spec.origin).parent / "data"
        for p in sorted(data.glob("*")):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                found[p.stem] = p
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        for p in sorted((Path(spec.origin).parent / "datasets" / "images").glob("*.jpg")):
            found[SKLEARN_PREFIX + p.stem] = p
    return found


def _tiles(path: Path, short_side: int, tile: int):
    """Resize to `short_side` (Lanczos), cut a centred grid of tile x tile RGB crops."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.info.clear()  # no ICC profile etc. in the tiles (libpng warns about some bundled ones)
        w, h = im.size
        s = short_side / min(w, h)
        im = im.resize((max(tile, round(w * s)), max(tile, round(h * s))), Image.LANCZOS)
    w, h = im.size
    nx, ny = w // tile, h // tile
    x0, y0 = (w - nx * tile) // 2, (h - ny * tile) // 2
    return [im.crop((x0 + i * tile, y0 + j * tile, x0 + (i + 1) * tile, y0 + (j + 1) * tile))
            for j in range(ny) for i in range(nx)]


def prepare_images(plan: ImagesPlan, out: Path) -> dict[str, Any]:
    """Write train/ and test/ tiles under `out`; return the listing (also saved as images.json)."""
    from uniremoval.io import atomic_write_json

    available = bundled_images()
    listing: dict[str, Any] = {"plan": plan.model_dump(), "train": [], "test": [], "skipped": []}
    for split in ("train", "test"):
        for name in getattr(plan, split):
            if name not in available:
                if name.startswith(SKLEARN_PREFIX):
                    listing["skipped"].append(name)  # optional: scikit-learn is not a requirement
                    continue
                raise DataError(f"demo image {name!r} is not in the installed scikit-image data folder "
                                f"(found: {', '.join(sorted(available)) or 'none'}); edit configs/demo/demo.yaml")
            for k, t in enumerate(_tiles(available[name], plan.short_side, plan.tile)):
                rel = f"{split}/{name.replace(SKLEARN_PREFIX, 'sklearn-')}_{k:02d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                t.save(out / rel)
                listing[split].append(rel)
    for split in ("train", "test"):
        if not listing[split]:
            raise DataError(f"demo: no {split} tiles (images.{split} lists no available photo)")
    atomic_write_json(out / "images.json", listing)
    return listing


# ------------------------------------------------------------------------------------------ runner


@dataclass
class StepLog:
    name: str
    seconds: float
    status: str  # "ran" | "reused"
    detail: str = ""


@dataclass
class DemoResult:
    workdir: Path
    tracking_uri: str
    experiment: str
    steps: list[StepLog] = field(default_factory=list)
    report: Path | None = None
    grid: Path | None = None
    table: str = ""
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "<dataset>|<row>" -> means


def _fmt_cmd(argv: list[str], workdir: Path) -> str:
    def short(a: str) -> str:
        return a.replace(str(workdir) + os.sep, "").replace(str(workdir), ".")
    return "uniremoval " + " ".join(short(a) for a in argv)


class Demo:
    """One demo run in `workdir`. `run()` executes every step in order; see the module docstring."""

    def __init__(self, workdir: str | os.PathLike, quick: bool = False, config_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.quick = quick
        self.config_dir = Path(config_dir).resolve() if config_dir else default_config_dir().resolve()
        self.plan = load_plan(self.config_dir, quick)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.tracking_uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.result = DemoResult(self.workdir, self.tracking_uri, self.plan.project)
        self._t0 = time.perf_counter()
        self._brisque_noted = False

    # ---------------------------------------------------------------- helpers
    def path(self, rel: str) -> Path:
        return self.workdir / rel

    def _say(self, msg: str) -> None:
        self.log(f"[demo {time.perf_counter() - self._t0:6.1f}s] {msg}")

    def step(self, name: str, fn: Callable[[], str | None], reuse: Callable[[], str | None] | None = None) -> None:
        """Run `fn` unless `reuse()` says its outputs exist and validate (returns a note)."""
        start = time.perf_counter()
        note = reuse() if reuse else None
        if note is not None:
            self.result.steps.append(StepLog(name, time.perf_counter() - start, "reused", note))
            self._say(f"{name}: reused ({note})")
            return
        self._say(f"{name}: running")
        detail = fn() or ""
        took = time.perf_counter() - start
        self.result.steps.append(StepLog(name, took, "ran", detail))
        self._say(f"{name}: done in {took:.1f}s" + (f" ({detail})" if detail else ""))

    def cli(self, argv: list[str], capture: io.StringIO | None = None) -> None:
        """Run one `uniremoval ...` command in this process, exactly as a user would type it. With
        `capture`, the command's standard output goes there (the demo's own lines do not)."""
        from uniremoval.cli import build_parser

        self._say("  $ " + _fmt_cmd(argv, self.workdir))
        args = build_parser().parse_args(argv)
        with contextlib.redirect_stdout(capture) if capture is not None else contextlib.nullcontext():
            rc = int(args.func(args) or 0)
        if rc == 128 + signal.SIGINT:  # training stopped by Ctrl-C after writing a checkpoint
            raise KeyboardInterrupt
        if rc != 0:
            raise UniremovalError(f"demo: `{_fmt_cmd(argv, self.workdir)}` exited with status {rc}")

    # ---------------------------------------------------------------- configs
    def stage_config(self, stage: str, file_name: str, name: str) -> Path:
        """Load configs/demo/<file>, apply the plan's overrides, make its paths absolute under the
        work directory, point tracking at the demo store, and write it to <workdir>/configs/<name>.yaml."""
        from uniremoval.config import config_to_yaml, load_config
        from uniremoval.io import atomic_write_text

        cfg = load_config(self.config_dir / file_name, self.plan.overrides.get(stage, []), stage=stage)
        self._absolutize(cfg)
        cfg.tracking.uri = self.tracking_uri
        cfg.tracking.experiment = self.plan.project
        self._vgg(cfg)
        out = self.path(f"configs/{name}.yaml")
        header = (f"# Written by `uniremoval demo` from {file_name} (paths resolved under the work directory).\n"
                  f"# Rerun this stage by hand: uniremoval {'train ' if stage in ('teacher', 'kt', 'da') else ''}"
                  f"{stage} --config {out}\n")
        atomic_write_text(out, header + config_to_yaml(cfg))
        return out

    def _abs(self, p: str | None) -> str | None:
        if p is None or "://" in p or p.startswith("pipe:") or Path(p).is_absolute():
            return p
        return str(self.workdir / p)

    def _absolutize(self, cfg: Any) -> None:
        cfg.output_dir = self._abs(cfg.output_dir)
        for group in ("train", "val", "clear"):
            for src in getattr(cfg.data, group):
                src.shards = [self._abs(s) for s in src.shards]
        if cfg.model.init:
            cfg.model.init = self._abs(cfg.model.init)
        teachers = getattr(cfg, "teachers", None)
        if teachers is not None:
            teachers.checkpoints = {k: self._abs(v) for k, v in teachers.checkpoints.items()}
        if getattr(cfg, "cache", None) is not None:
            cfg.cache.out = self._abs(cfg.cache.out)

    def _vgg(self, cfg: Any) -> None:
        """phi = VGG-19: ImageNet weights when a local copy exists (torch hub cache or features.path),
        else random weights (offline; the run is tagged vgg_weights=random and the demo says so)."""
        feats = getattr(cfg, "features", None)
        if feats is None or feats.weights != "imagenet" or feats.path:
            return
        from uniremoval.models.vgg_arch import default_weights_path

        if not default_weights_path().is_file():
            feats.weights = "random"
            self._say(f"{cfg.name}: no VGG-19 ImageNet weights at {default_weights_path()}: phi uses fixed random "
                      "weights (demo only; the run is tagged vgg_weights=random)")

    # ---------------------------------------------------------------- steps
    def run(self) -> DemoResult:
        # The demo replaces and deletes files of its own under the work directory (images/, configs/,
        # report.md ...) and --clean deletes the folder: only a new or empty folder becomes its own.
        for folder in (self.workdir, *self.workdir.parents):
            if folder.exists() and not folder.is_dir():
                raise UniremovalError(f"--workdir {self.workdir}: {folder} is a file, not a folder; give a new or "
                                      "empty folder, e.g. --workdir demo_workspace")
        if self.workdir.is_dir() and not (self.workdir / MARKER).is_file() and any(self.workdir.iterdir()):
            raise UniremovalError(f"--workdir {self.workdir} holds files that `uniremoval demo` did not create (no "
                                  f"{MARKER} file); give a new or empty folder, e.g. --workdir demo_workspace")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / MARKER).write_text("created by `uniremoval demo`; `uniremoval demo --clean` deletes this folder\n")
        p = self.plan
        self._say(f"work directory {self.workdir} ({'quick' if self.quick else 'full'} plan, "
                  f"degradations: {', '.join(p.degradations)})")
        if os.environ.get("MLFLOW_TRACKING_URI"):  # every other command follows it: say why this one does not
            self._say(f"MLflow: the demo keeps its runs in its own store {self.tracking_uri}, not "
                      f"$MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']} (the stages' configs in "
                      f"{self.workdir / 'configs'} name it; set their tracking.uri to log a rerun elsewhere)")
        self.step("images", self._images, self._images_reuse)
        for deg in p.degradations:
            for kind in ("synth", "real"):
                for split in ("train", "test"):
                    self._synth_step(deg, kind, split)
        self._clear_step()
        teacher_cfgs = {}
        for deg in p.degradations:
            cfg_path = self.stage_config("teacher", p.stages.teacher.format(degradation=deg), f"teacher_{deg}")
            teacher_cfgs[deg] = cfg_path
            self._train_step(f"teacher-{deg}", "teacher", cfg_path)
        cache_cfg = self.stage_config("cache", p.stages.cache, "cache")
        self.step("cache", lambda: self._run_cache(cache_cfg), lambda: self._cache_reuse(cache_cfg))
        kt_cfg = self.stage_config("kt", p.stages.kt, "kt")
        self._train_step("kt", "kt", kt_cfg)
        da_cfg = self.stage_config("da", p.stages.da, "da")
        self._train_step("da", "da", da_cfg)
        self._eval_steps(kt_cfg, da_cfg)
        self.step("report", self._report)
        self._finish()
        return self.result

    # images
    def _images(self) -> str:
        shutil.rmtree(self.path("images"), ignore_errors=True)
        listing = prepare_images(self.plan.images, self.path("images"))
        skipped = f"; not installed, skipped: {', '.join(listing['skipped'])}" if listing["skipped"] else ""
        return f"{len(listing['train'])} train and {len(listing['test'])} test tiles{skipped}"

    def _images_reuse(self) -> str | None:
        f = self.path("images/images.json")
        if not f.is_file():
            return None
        listing = json.loads(f.read_text())
        if listing.get("plan") != self.plan.images.model_dump():
            return None
        if not all(self.path(f"images/{rel}").is_file() for s in ("train", "test") for rel in listing[s]):
            return None
        return f"{len(listing['train'])} train and {len(listing['test'])} test tiles"

    # shards
    def _synth_step(self, deg: str, kind: str, split: str) -> None:
        s = self.plan.synth
        name = f"{kind}_{deg}_{split}"
        per = s.per_image_test if split == "test" else (s.per_image if kind == "synth" else s.per_image_real)
        # a distinct seed per (domain, split, type): no two sets share their degradations
        seed = s.seed * 1000 + (0 if kind == "synth" else 500) + (0 if split == "train" else 250) \
            + self.plan.degradations.index(deg)
        argv = ["shards", "synth", "--clean", str(self.path(f"images/{split}")), "--degradation", deg,
                "--per-image", str(per), "--seed", str(seed), "--params", self._params(s.params if kind == "synth" else s.params_real),
                "--split", split, "--name", name, "--out", str(self.path(f"shards/{name}")),
                "--workers", "1", "--no-progress"]
        self.step(f"shards {name}", lambda: self._shards(argv), lambda: self._shards_reuse(name, argv))

    def _params(self, name: str) -> str:
        """A ranges file named in demo.yaml resolves against the config dir; presets pass through."""
        if name.endswith((".yaml", ".yml", ".json")) and not Path(name).is_absolute():
            return str(self.config_dir / name)
        return name

    def _clear_step(self) -> None:
        # X_C, the "real clear photos" of adaptation: the clean train tiles, drawn unpaired
        argv = ["shards", "build", "--format", "folder", "--root", str(self.path("images/train")),
                "--degradation", "clear", "--split", "train", "--name", "clear_train",
                "--out", str(self.path("shards/clear_train")), "--workers", "1", "--no-progress"]
        self.step("shards clear_train", lambda: self._shards(argv), lambda: self._shards_reuse("clear_train", argv))

    def _shards(self, argv: list[str]) -> str:
        # Not reusable (another command, images rebuilt): the demo's own folder is built anew. Built
        # over, `shards` refuses a folder of other options (a demo.yaml edited, a moved --params file)
        # and keeps shards it finished from images since replaced.
        out = Path(argv[argv.index("--out") + 1])
        shutil.rmtree(out, ignore_errors=True)
        self.cli(argv, capture=io.StringIO())  # the builder's summary: condensed into the step line
        m = json.loads((out / MANIFEST_NAME).read_text())
        return f"{m['counts']['total']} samples in {len(m['shards'])} shard(s)"

    def _shards_reuse(self, name: str, argv: list[str]) -> str | None:
        """Same command as the one that built them, and every shard present with its size."""
        f = self.path(f"shards/{name}/{MANIFEST_NAME}")
        if not f.is_file() or self.images_rebuilt():
            return None
        m = json.loads(f.read_text())
        if not m.get("complete") or not _same_command(m.get("created_by", {}).get("command", [])[1:], argv):
            return None
        if "--params" in argv:  # a ranges file edited since: same command, other samples
            params = Path(argv[argv.index("--params") + 1])
            if params.is_file() and params.stat().st_mtime > f.stat().st_mtime:
                return None
        for s in m["shards"]:
            p = self.path(f"shards/{name}/{s['name']}")
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                return None
        return f"{m['counts']['total']} samples"

    def images_rebuilt(self) -> bool:
        return any(s.name == "images" and s.status == "ran" for s in self.result.steps)

    def _upstream_ran(self) -> bool:
        """True when a step before this one ran (so this one's inputs changed)."""
        return any(s.status == "ran" for s in self.result.steps)

    # training stages
    def _train_step(self, label: str, stage: str, cfg_path: Path) -> None:
        from uniremoval.config import load_config

        cfg = load_config(cfg_path, stage=stage)
        run_dir = Path(cfg.run_dir)

        def reuse() -> str | None:
            if self._upstream_ran():
                return None
            meta = _last_meta(run_dir)
            if meta is None:
                return None
            from uniremoval.config import config_hash

            if meta.get("config_hash") not in (None, config_hash(cfg)):
                return None
            return f"{run_dir / 'last.safetensors'}, step {meta.get('step', '?')}"

        def run() -> str:
            meta = _last_meta(run_dir)
            from uniremoval.config import config_hash

            stale = meta is not None and meta.get("config_hash") not in (None, config_hash(cfg))
            if stale or self._upstream_ran():
                # its inputs or settings changed: a fresh run, not a resume of the old one
                shutil.rmtree(run_dir, ignore_errors=True)
            argv = ["train", stage, "--config", str(cfg_path), "--resume", "auto"]
            self.cli(argv)
            meta = _last_meta(run_dir) or {}
            return f"step {meta.get('step', '?')}, weights {run_dir / 'last.safetensors'}"

        self.step(label, run, reuse)

    def _run_cache(self, cfg_path: Path) -> str:
        from uniremoval.config import load_config

        cfg = load_config(cfg_path, stage="cache")
        if self._upstream_ran():
            shutil.rmtree(cfg.cache.out, ignore_errors=True)
        self.cli(["cache", "--config", str(cfg_path)])
        total = sum(json.loads((Path(cfg.cache.out) / s.name / MANIFEST_NAME).read_text())["counts"]["total"]
                    for s in cfg.data.train)
        return f"{total} samples cached in {cfg.cache.out}"

    def _cache_reuse(self, cfg_path: Path) -> str | None:
        if self._upstream_ran():
            return None
        from uniremoval.config import load_config
        from uniremoval.stages.cache import check_cache

        cfg = load_config(cfg_path, stage="cache")
        total = 0
        for src in cfg.data.train:
            try:
                m = check_cache(Path(cfg.cache.out) / src.name, cfg.teachers.checkpoints, src.shards,
                                cfg.data.feature_cell)
            except UniremovalError:
                return None
            total += m["counts"]["total"]
        return f"{total} samples, teachers match"

    # evaluation
    def eval_rows(self, kt_cfg: Path, da_cfg: Path) -> list[tuple[str, str]]:
        """(label, checkpoint) rows: the degraded inputs, the KT student, the adapted student."""
        from uniremoval.config import load_config

        kt_dir = load_config(kt_cfg, stage="kt").run_dir
        da_dir = load_config(da_cfg, stage="da").run_dir
        return [("input", "none"), ("kt", str(kt_dir / "last.safetensors")), ("da", str(da_dir / "last.safetensors"))]

    def _eval_steps(self, kt_cfg: Path, da_cfg: Path) -> None:
        rows = self.eval_rows(kt_cfg, da_cfg)
        metrics = ",".join(self.eval_metrics())
        for kind in ("synth", "real"):
            for deg in self.plan.degradations:
                ds = f"{kind}_{deg}_test"
                for label, ckpt in rows:
                    base = self.path(f"eval/{ds}/{label}")
                    argv = ["eval", "--checkpoint", ckpt, "--data", str(self.path(f"shards/{ds}")),
                            "--name", ds, "--metrics", metrics, "--json", str(base / "scores.json"),
                            "--save-images", str(base / "images"), "--device", "cpu", "--label", label,
                            "--degradation", deg, "--tracking-uri", self.tracking_uri,
                            "--experiment", self.plan.project]
                    self.step(f"eval {ds} {label}", lambda a=argv, b=base, d=ds, lab=label: self._eval(a, b, d, lab),
                              lambda b=base, c=ckpt, d=ds, lab=label: self._eval_reuse(b, c, d, lab))

    def eval_metrics(self) -> list[str]:
        """The plan's metrics, plus BRISQUE (the paper's) when its parameter file is available
        offline; otherwise say so once (PIQE needs no file)."""
        from uniremoval.eval.iqa_params import MissingIQAParams, find_param_file, iqa_dir

        metrics = list(self.plan.eval.metrics)
        if "brisque" not in metrics:
            try:
                find_param_file("brisque")
                metrics.insert(0, "brisque")
            except MissingIQAParams:
                if not self._brisque_noted:
                    self._brisque_noted = True
                    self._say(f"BRISQUE skipped: its parameter file is not in {iqa_dir()} (offline); "
                              "`uniremoval eval params` says where it goes. PIQE needs none.")
        return metrics

    def _eval(self, argv: list[str], base: Path, ds: str, label: str) -> str:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        self.cli(argv, capture=io.StringIO())
        return self._record_eval(base, ds, label)

    def _record_eval(self, base: Path, ds: str, label: str) -> str:
        # eval's JSON writes an undefined mean as null and an infinite one as "inf" (float() reads it)
        mean = {k: math.nan if v is None else float(v)
                for k, v in json.loads((base / "scores.json").read_text())["mean"].items()}
        self.result.evals[f"{ds}|{label}"] = mean
        return "  ".join(f"{k}={v:.3f}" for k, v in mean.items())

    def _eval_reuse(self, base: Path, ckpt: str, ds: str, label: str) -> str | None:
        f = base / "scores.json"
        if not f.is_file() or self._upstream_ran():
            return None
        if ckpt != "none" and (not Path(ckpt).is_file() or Path(ckpt).stat().st_mtime > f.stat().st_mtime):
            return None
        return self._record_eval(base, ds, label)

    # report
    def _report(self) -> str:
        """`uniremoval report` over the demo's MLflow experiment (paper-style tables, per-dataset
        grids, logged as a 'report' run), plus the demo's own summary table and overview grid."""
        from uniremoval.io import atomic_write_text

        out_dir = self.path("report")
        argv = ["report", "--experiment", self.plan.project, "--format", "md", "--tracking-uri", self.tracking_uri,
                "--out-dir", str(out_dir), "--images", str(self.plan.eval.grid_images), "--log"]
        buf = io.StringIO()
        self.cli(argv, capture=buf)
        table = demo_table(self.result.evals, self.plan.degradations, self.eval_metrics())
        self.result.table = table
        report = self.path("report.md")
        atomic_write_text(report, "# uniremoval demo\n\nMeans over the held-out test tiles "
                          "(syn = synthetic domain, real-like = the shifted domain of adaptation).\n\n"
                          + table + "\n\n## `uniremoval report` (from MLflow)\n\n" + buf.getvalue())
        self.result.report = report
        grid = self.path("grid.png")
        make_grid(self.workdir, self.plan.degradations, self.plan.eval.grid_images, grid)
        self.result.grid = grid
        return f"{report.name}, {grid.name}, {out_dir.name}/"

    def _finish(self) -> None:
        took = time.perf_counter() - self._t0
        ran = sum(1 for s in self.result.steps if s.status == "ran")
        self.log("")
        self.log(self.result.table)
        self.log("")
        self.log(f"demo finished in {took:.0f}s ({ran} steps ran, {len(self.result.steps) - ran} reused)")
        self.log(f"  report:     {self.result.report} (tables and per-dataset grids: {self.workdir / 'report'})")
        self.log(f"  image grid: {self.result.grid} (input | KT | KT+DA | target)")
        self.log(f"  configs:    {self.workdir / 'configs'} (rerun any stage with them)")
        self.log("  browse the runs (teachers, cache, kt, da, eval) in MLflow:")
        self.log(f"    mlflow ui --backend-store-uri {self.tracking_uri} "
                 f"--default-artifact-root {(self.workdir / 'mlruns').as_uri()}")


# ------------------------------------------------------------------------------------------ outputs


def _same_command(recorded: list[str], argv: list[str]) -> bool:
    """Do two `uniremoval ...` argument lists parse to the same options (order, defaults aside)?"""
    import contextlib
    import io

    from uniremoval.cli import build_parser

    parser = build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            a, b = vars(parser.parse_args(recorded)), vars(parser.parse_args(argv))
    except SystemExit:  # an unparsable record (another version's options): rebuild
        return False
    a.pop("func", None)
    b.pop("func", None)
    return a == b


def _last_meta(run_dir: Path) -> dict[str, Any] | None:
    """The JSON beside last.safetensors (step, config hash), or None when the run has not finished."""
    w, j = run_dir / "last.safetensors", run_dir / "last.json"
    if not (w.is_file() and j.is_file()):
        return None
    try:
        return json.loads(j.read_text())
    except (OSError, json.JSONDecodeError):
        return None


ROW_NAMES = {"input": "degraded input", "kt": "KT student", "da": "KT + DA student"}
BETTER = {"psnr": "↑", "ssim": "↑", "piqe": "↓", "brisque": "↓", "niqe": "↓"}


def demo_table(evals: dict[str, dict[str, float]], degradations: list[str], metrics: list[str]) -> str:
    """Markdown: rows = input / KT / DA, columns = (domain, type) x metric."""
    cols = [(kind, deg) for kind in ("synth", "real") for deg in degradations]
    head = ["row"] + [f"{'syn' if k == 'synth' else 'real-like'} {d} {m}{BETTER.get(m, '')}"
                      for k, d in cols for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, title in ROW_NAMES.items():
        cells = [title]
        for k, d in cols:
            mean = evals.get(f"{k}_{d}_test|{row}", {})
            cells += [f"{mean[m]:.2f}" if m in mean else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_grid(workdir: Path, degradations: list[str], per_type: int, out: Path) -> Path:
    """One row per test image (first `per_type` of each type and domain): input | KT | DA | target."""
    from PIL import Image, ImageDraw

    from uniremoval.data.manifest import iter_tar_samples
    from uniremoval.data.shard_stream import resolve_shards
    from uniremoval.io import atomic_write_bytes

    rows: list[list[Image.Image]] = []
    for kind in ("synth", "real"):
        for deg in degradations:
            ds = f"{kind}_{deg}_test"
            targets: dict[str, bytes] = {}
            for shard in resolve_shards(workdir / "shards" / ds):
                for key, fields in iter_tar_samples(shard):
                    t = next((v for n, v in fields.items() if n.startswith("target.")), None)
                    if t is not None:
                        targets[key] = t
            names = sorted(p.name for p in (workdir / "eval" / ds / "input" / "images").glob("*.png"))
            names = names[:: max(1, len(names) // per_type)][:per_type]  # spread over the test photos
            for name in names:
                row = [Image.open(workdir / "eval" / ds / lab / "images" / name).convert("RGB")
                       for lab in ("input", "kt", "da") if (workdir / "eval" / ds / lab / "images" / name).is_file()]
                key = Path(name).stem
                if key in targets:
                    import io

                    row.append(Image.open(io.BytesIO(targets[key])).convert("RGB"))
                rows.append(row)
    if not rows:
        raise DataError(f"no restored images under {workdir / 'eval'} to draw a grid from")
    w = max(sum(im.width for im in r) for r in rows)
    h = sum(max(im.height for im in r) for r in rows)
    header = 14
    grid = Image.new("RGB", (w, h + header), "white")
    draw = ImageDraw.Draw(grid)
    x = 0
    for title in ("input", "KT", "KT+DA", "target"):
        draw.text((x + 2, 1), title, fill="black")
        x += rows[0][0].width
    y = header
    for r in rows:
        x = 0
        for im in r:
            grid.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in r)
    import io

    buf = io.BytesIO()
    grid.save(buf, "PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------ entry


def clean_workdir(workdir: Path) -> None:
    """Delete a previous demo's work directory; refuse anything the demo did not create."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise UniremovalError(f"--clean: --workdir {workdir} is a file, not a folder the demo created; refusing to "
                              "delete it. Choose another --workdir")
    if not (workdir / MARKER).is_file() and any(workdir.iterdir()):
        raise UniremovalError(f"--clean: {workdir} was not created by `uniremoval demo` (no {MARKER} file); "
                              f"refusing to delete it. Remove it yourself or choose another --workdir")
    shutil.rmtree(workdir)


def run_demo(workdir: str | os.PathLike = DEFAULT_WORKDIR, clean: bool = False, quick: bool = False,
             config_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or continue) the demo in `workdir`; see the module docstring."""
    path = Path(workdir).resolve()
    if clean:
        clean_workdir(path)
    return Demo(path, quick=quick, config_dir=config_dir, log=log).run()
