"""Synthetic data for the KT/DA tests and their multi-process workers.

Clean images are small piecewise-constant scenes (a colour gradient plus random rectangles and
discs), so every degradation is visible and measurable; the degradations are simple, known
stand-ins for the paper's types:

* haze: ``I = J t + A (1 - t)`` with a vertical transmission gradient t in [0.45, 0.75], A = 0.9;
* rain: 8-13 bright diagonal streaks added (+0.6), clipped;
* blur: a defocus blur, an isotropic gaussian of sigma 1.2 px (edge-replicated). Blur scenes also
  carry BLUR_SCENE_STRIPES striped patches (period 4-8 px), as the blur sets of the field (GoPro,
  RealBlur) are street scenes dense in edges: on flat-shaded scenes a blur changes only the few
  pixels along the shapes' borders, which leaves little to restore and little to learn from.
  ``blur="box"`` (an 11-px horizontal box, whose spectrum has zeros) and ``blur="gaussian"``
  (horizontal motion, sigma 2.5 px) remain for bench/kt_learning.py's comparisons.

Shards are written directly in the project's shard format (``input.png``, ``target.png``,
``json``, and a ``manifest.json``), not through ``uniremoval shards``: the tests need a few dozen
tiny images, and this keeps them independent of the dataset readers.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TYPES = ("haze", "rain", "blur")
BLURS = ("defocus", "gaussian", "box")
BLUR_SCENE_STRIPES = 6  # striped patches in each blur scene (see the module docstring)


def clean_image(rng: np.random.Generator, h: int, w: int, stripes: int = 0) -> np.ndarray:
    """A float32 HWC image in [0, 1]; `stripes` adds that many two-colour striped patches."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    t = (xs / max(w - 1, 1))[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(int(rng.integers(3, 7))):
        color = rng.uniform(0.0, 1.0, 3)
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            y1, x1 = y0 + rng.integers(4, h // 2 + 4), x0 + rng.integers(4, w // 2 + 4)
            img[y0:y1, x0:x1] = color
        else:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 3)
            img[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = color
    for _ in range(stripes):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        y1, x1 = y0 + rng.integers(8, h // 2 + 8), x0 + rng.integers(8, w // 2 + 8)
        period = int(rng.integers(4, 9))
        along = xs if rng.random() < 0.5 else ys
        on = (along[y0:y1, x0:x1] % period) < period / 2
        img[y0:y1, x0:x1] = np.where(on[..., None], rng.uniform(0, 1, 3), rng.uniform(0, 1, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator, blur: str = "defocus") -> np.ndarray:
    """blur="defocus": isotropic gaussian, sigma 1.2 px; "gaussian": horizontal gaussian motion blur,
    sigma 2.5 px (both invertible in principle); "box": the 11-px horizontal box (its spectrum has
    zeros: detail at those frequencies is gone)."""
    h, w = img.shape[:2]
    if kind == "haze":
        t = np.linspace(0.75, 0.45, h, dtype=np.float32)[:, None, None]
        out = img * t + 0.9 * (1 - t)
    elif kind == "rain":
        ys, xs = np.mgrid[0:h, 0:w]
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(8, 14))):
            c = rng.integers(-h, w)
            mask |= (np.abs(xs - ys * 0.5 - c) < 1.0) & (rng.random((h, w)) < 0.9)
        out = img + 0.6 * mask[..., None]
    elif kind == "blur" and blur == "defocus":
        from scipy.ndimage import gaussian_filter

        out = gaussian_filter(img, (1.2, 1.2, 0), mode="nearest")
    elif kind == "blur" and blur == "gaussian":
        from scipy.ndimage import gaussian_filter1d

        out = gaussian_filter1d(img, 2.5, axis=1, mode="nearest")
    elif kind == "blur" and blur == "box":
        pad = np.pad(img, ((0, 0), (5, 5), (0, 0)), mode="edge")
        out = sum(pad[:, i : i + w] for i in range(11)) / 11.0
    else:
        raise ValueError(f"degrade: unknown kind {kind!r} or blur {blur!r} (kinds: {TYPES}, blurs: {BLURS})")
    return np.clip(out, 0, 1).astype(np.float32)


def to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def png(img_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_u8).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_pairs(
    root: Path,
    name: str,
    kind: str,
    n: int,
    n_shards: int = 2,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    split: str = "train",
    paired: bool = True,
    domain: str = "synthetic",
    blur: str = "defocus",
    blur_stripes: int = BLUR_SCENE_STRIPES,
) -> Path:
    """Write `root/name/{name}-00000i.tar` + manifest.json; return the directory.

    kind: a degradation type, or "clear" (input = the clean image, no target).
    """
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    per = [list(range(s, n, n_shards)) for s in range(n_shards)]
    for s, idxs in enumerate(per):
        fname = f"{name}-{s:06d}.tar"
        with tarfile.open(out / fname, "w") as tar:
            for i in idxs:
                key = f"{name}-{i:05d}"
                clean = clean_image(rng, *size, blur_stripes if kind == "blur" else 0)
                if kind == "clear":
                    inp, tgt = clean, None
                else:
                    inp, tgt = degrade(clean, kind, rng, blur), (clean if paired else None)
                meta = {"degradation": kind, "domain": domain, "source": name, "split": split,
                        "height": size[0], "width": size[1]}
                _add(tar, f"{key}.input.png", png(to_u8(inp)))
                if tgt is not None:
                    _add(tar, f"{key}.target.png", png(to_u8(tgt)))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        entries.append({"name": fname, "samples": len(idxs)})
    (out / "manifest.json").write_text(json.dumps({"dataset": name, "shards": entries}))
    return out


def write_oracle_cache(
    src: Path, dst: Path, feature_fn, cell: int = 16
) -> Path:
    """A cache whose 'teacher' is the clean target itself (a perfect teacher, test-only proxy).

    teacher.png = target, feature.npy = feature_fn(target) pooled on the cell grid (float16), for
    the learning test, which must not spend minutes training teachers. Everything else (format,
    loader, crops on the grid) is the real cached path.
    """
    dst.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with tarfile.open(src / entry["name"]) as tin, tarfile.open(dst / entry["name"], "w") as tout:
            members = {m.name: tin.extractfile(m).read() for m in tin.getmembers()}
            for mname, data in members.items():
                _add(tout, mname, data)
                if mname.endswith(".target.png"):
                    key = mname[: -len(".target.png")]
                    _add(tout, f"{key}.teacher.png", data)
                    target = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32) / 255.0
                    feat = feature_fn(target, cell).astype(np.float16)
                    buf = io.BytesIO()
                    np.save(buf, feat)
                    _add(tout, f"{key}.feature.npy", buf.getvalue())
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


# --------------------------------------------------------------------------------------------- workspace

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # image side: one 32x32 crop = the whole image, a 2x2 feature grid at cell 16


def save_random_mprnet(path: Path, seed: int, preset: str = "tiny") -> Path:
    """A tiny MPRNet with seeded random weights, saved in our checkpoint format."""
    import torch

    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    return save_checkpoint(path, build_model("mprnet", preset), {"step": 0, "input_range": "minus_one_one"})


def workspace_paths(root: Path) -> dict:
    """Where build_workspace puts everything (reading an existing workspace writes nothing)."""
    root = Path(root)
    data = root / "data"
    return {
        "root": root, "data": data, "clear": data / "clear", "kt_init": root / "kt_student" / "last.safetensors",
        "syn": {k: data / f"syn_{k}" for k in TYPES}, "val": {k: data / f"val_{k}" for k in TYPES},
        "real": {k: data / f"real_{k}" for k in TYPES}, "cache": {k: root / "cache" / f"syn_{k}" for k in TYPES},
        "teachers": {k: root / "teachers" / f"teacher_{k}.safetensors" for k in TYPES},
    }


def build_workspace(root: Path, n_train: int = 6, n_val: int = 3, cache: bool = True) -> dict:
    """Synthetic train/val pairs per type, clear and 'real' unpaired sets, three tiny random teachers,
    and (cache=True) their teacher-output cache built by the real cache stage, in one process."""
    ws = workspace_paths(root)
    root, data = ws["root"], ws["data"]
    for i, k in enumerate(TYPES):
        write_pairs(data, f"syn_{k}", k, n_train, 2, (SIZE, SIZE), seed=10 + i)
        write_pairs(data, f"val_{k}", k, n_val, 1, (SIZE, SIZE), seed=20 + i, split="test")
        write_pairs(data, f"real_{k}", k, n_train, 2, (SIZE, SIZE), seed=30 + i, paired=False, domain="real")
        save_random_mprnet(root / "teachers" / f"teacher_{k}", seed=1 + i)
    write_pairs(data, "clear", "clear", n_train, 2, (SIZE, SIZE), seed=40)
    save_random_mprnet(root / "kt_student" / "last", seed=99)  # stands in for a KT student
    if cache:
        from uniremoval.config import load_config
        from uniremoval.stages import cache as cache_stage

        cfg = load_config(REPO / "configs" / "cache.yaml", [
            "model.preset=tiny", f"output_dir={root}/out", f"cache.out={root}/cache", "data.num_workers=0",
            "tracking.enabled=false", _teachers(ws), _sources("data.train", ws["syn"], "syn"),
            # fp32 teachers, so the cache equals the online teachers up to its 8-bit PNG (the bf16
            # default's own tolerance is tests/test_teacher_cache.py's)
            "train.mixed_precision=no",
        ])
        cache_stage.run(cfg)
    return ws


def _teachers(ws: dict) -> str:
    return "teachers.checkpoints={" + ", ".join(f"{k}: {p}" for k, p in ws["teachers"].items()) + "}"


def _sources(key: str, dirs: dict, prefix: str) -> str:
    items = ", ".join(f"{{name: {prefix}_{k}, shards: {d}, degradation: {k}}}" for k, d in dirs.items())
    return f"{key}=[{items}]"


def common_overrides(ws: dict, name: str) -> list[str]:
    root = ws["root"]
    return [
        f"name={name}", f"output_dir={root}/out", "model.preset=tiny",
        "data.batch_size=3", f"data.crop_size={SIZE}", "data.num_workers=0", "data.shuffle_buffer=4",
        "data.pin_memory=false", "model.compile=false", "train.mixed_precision=no", "model.channels_last=true",
        "train.epochs=2", "train.steps_per_epoch=2", "train.log_every=1",
        "train.val_every=2", "train.image_every=100000", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
        "features.weights=random", "features.layers=[relu1_1, relu2_1]", "features.layer_weights=[0.5, 1.0]",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
    ]


def kt_overrides(ws: dict, name: str, mode: str = "cached") -> list[str]:
    train = ws["cache"] if mode == "cached" else ws["syn"]
    return common_overrides(ws, name) + [
        f"teachers.mode={mode}", _teachers(ws), _sources("data.train", train, "syn"),
        _sources("data.val", ws["val"], "val"),
    ]


def da_overrides(ws: dict, name: str, init: Path | None = None) -> list[str]:
    return common_overrides(ws, name) + [
        f"model.init={init or ws['kt_init']}", _sources("data.train", ws["real"], "real"),
        f"data.clear=[{{name: clear, shards: {ws['clear']}}}]",
        "data.val=[" + ", ".join(f"{{name: real_{k}, shards: {d}, degradation: {k}, max_samples: 2}}"
                                 for k, d in ws["real"].items()) + "]",
        "discriminator.base_channels=8", "discriminator.n_layers=2", "val_iqa.max_images=2",
    ]


def mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run: name -> [(step, value), ...] sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


BOOKKEEPING = ("train/lr", "train/nonfinite_skipped", "train/bad_samples", "train/padded_samples", "train/epoch", "train/weight_")


def loss_terms(history: dict) -> set[str]:
    """The train/<term> metrics that are loss terms (not LRs, counters or loss weights)."""
    return {k.split("/", 1)[1] for k in history if k.startswith("train/") and not k.startswith(BOOKKEEPING)}


def run_id_of(run_dir: Path, model: str = "last") -> str:
    return json.loads((Path(run_dir) / f"{model}.json").read_text())["mlflow_run_id"]


def subprocess_env() -> dict:
    """One thread per process (2 shared cores: more threads only contend), repo on the path."""
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        env.pop(k, None)
    return env


# --------------------------------------------------------------------------------------------- learning run


LEARN_BLUR_WEIGHT = 2  # the blur source's data.train weight in the learning run


def oracle_kt_class() -> type:
    """The KT stage for `learning_run_config`'s oracle caches: they hold the clean targets, written by
    no teacher and no `uniremoval cache`, so its preflight has no teacher identity to check."""
    from uniremoval.stages import kt

    class OracleKnowledgeTransfer(kt.KnowledgeTransfer):
        def preflight(self) -> None:
            pass

    return OracleKnowledgeTransfer


def learning_run_config(root: Path, steps: int, val_every: int | None = None, overrides: list[str] = (),
                        blur: str = "defocus", blur_stripes: int = BLUR_SCENE_STRIPES):
    """The KT learning run (tests/test_kt_da.py, bench/kt_learning.py): 24 train pairs of 48x48 per
    type with a perfect teacher (an oracle cache: teacher image = the clean target; teacher feature =
    a fixed, seeded tiny MPRNet's feature of it), 6 held-out pairs per type for validation, the tiny
    preset and the full L_kt. Returns (config, {type: val shard dir}).

    Blur, the type the student learns last, is sampled twice as often (LEARN_BLUR_WEIGHT, through
    the source's `weight`, as a user weights a hard type) and the lr follows a warm-up + cosine
    schedule, which ends the short run at a low lr instead of mid-jitter."""
    import torch

    from uniremoval.config import load_config
    from uniremoval.stages import kt
    from uniremoval.stages.teachers import pool_feature

    torch.manual_seed(0)
    feat_net = kt.build_student(load_config(REPO / "configs" / "kt.yaml", ["model.preset=tiny"])).eval()

    def feature_fn(target01: np.ndarray, cell: int) -> np.ndarray:
        x = torch.from_numpy(target01.transpose(2, 0, 1)).float()[None] * 2 - 1
        with torch.no_grad():
            return pool_feature(feat_net(x, return_feature=True)[1], cell)[0].numpy()

    data = root / "data"
    train, val = {}, {}
    for i, k in enumerate(TYPES):
        src = write_pairs(data, f"syn_{k}", k, 24, 2, (48, 48), seed=100 + i, blur=blur, blur_stripes=blur_stripes)
        train[k] = write_oracle_cache(src, root / "cache" / f"syn_{k}", feature_fn)
        val[k] = write_pairs(data, f"val_{k}", k, 6, 1, (48, 48), seed=200 + i, split="test", blur=blur,
                             blur_stripes=blur_stripes)
    src = ", ".join(f"{{name: syn_{k}, shards: {d}, degradation: {k}, weight: {LEARN_BLUR_WEIGHT if k == 'blur' else 1}}}"
                    for k, d in train.items())
    vsrc = ", ".join(f"{{name: val_{k}, shards: {d}, degradation: {k}}}" for k, d in val.items())
    cfg = load_config(REPO / "configs" / "kt.yaml", [
        "name=learn", f"output_dir={root}/out", "model.preset=tiny", f"data.train=[{src}]", f"data.val=[{vsrc}]",
        "data.batch_size=6", "data.crop_size=32", "data.num_workers=0", "data.shuffle_buffer=16",
        "data.pin_memory=false", "model.compile=false", "train.mixed_precision=no", "optim.lr=2e-3", "schedule.name=warmup_cosine", "schedule.warmup_steps=20",
        f"train.epochs={-(-steps // 20)}",
        "train.steps_per_epoch=20", f"train.max_steps={steps}", f"train.val_every={val_every or steps}",
        "train.log_every=20", f"checkpoint.every_steps={steps}", "loss.tau=0.1", "features.weights=random",
        "features.layers=[relu1_1, relu2_1]", "features.layer_weights=[0.5, 1.0]", "tracking.enabled=false",
        "teachers.checkpoints={}",  # oracle caches: no teacher checkpoint exists (nor is one read)
        *overrides,
    ])
    return cfg, val
