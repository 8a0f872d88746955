"""Image quality metrics: no-reference IQA through pyiqa, PSNR/SSIM with the field's conventions.

No-reference (lower is better; the paper's Tables I-III and V):

- `brisque`: BRISQUE as MATLAB's `brisque()` computes it (pyiqa `brisque_matlab`): the paper's numbers.
- `piqe`: PIQE as MATLAB's `piqe()` (pyiqa `piqe`, matches MATLAB within 0.0001; needs no file).
- `niqe`: NIQE as MATLAB's `niqe()` (pyiqa `niqe_matlab`). Inputs must be at least 96x96.
- `brisque_live`, `niqe_live`: the original LIVE models (pyiqa `brisque`, `niqe`); their parameters can
  be rebuilt offline from registry packages (see `iqa_params`).

Full-reference (higher is better; Table IV), computed here, not by pyiqa, so the conventions are explicit:

- images are scored as the 8-bit images that would be saved (values rounded to k/255);
- `psnr`: 10*log10(255^2 / MSE) on [0, 255], over RGB or, with `y_channel`, over the Y of MATLAB's
  `rgb2ycbcr` (BT.601: Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1]), rounded to
  integers as MATLAB does for uint8 images; identical images give +inf;
- `ssim`: Wang et al. 2004, Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255,
  'valid' filtering (no padding), no downsampling; RGB = mean of the per-channel SSIMs;
- `crop_border` removes N pixels on every side before both (super-resolution/deblurring habit).

All scorers take batches (N, 3, H, W) in [0, 1] and return one float per image.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uniremoval.errors import UniremovalError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MetricInfo:
    name: str
    kind: str  # "nr" (no-reference) or "fr" (needs a target)
    lower_better: bool
    pyiqa_name: str | None
    min_size: int = 0  # smallest height/width the metric accepts
    label: str = ""  # column header in reports


METRICS: dict[str, MetricInfo] = {
    # BRISQUE's second scale is a MATLAB-style half-size resize whose reflect padding fails (an
    # IndexError, an AssertionError at 1x1) on a side under 7 px.
    "brisque": MetricInfo("brisque", "nr", True, "brisque_matlab", min_size=7, label="BRISQUE"),
    "piqe": MetricInfo("piqe", "nr", True, "piqe", min_size=16, label="PIQE"),
    "niqe": MetricInfo("niqe", "nr", True, "niqe_matlab", min_size=96, label="NIQE"),
    "brisque_live": MetricInfo("brisque_live", "nr", True, "brisque", min_size=7, label="BRISQUE (LIVE)"),
    "niqe_live": MetricInfo("niqe_live", "nr", True, "niqe", min_size=96, label="NIQE (LIVE)"),
    "psnr": MetricInfo("psnr", "fr", False, None, label="PSNR"),
    "ssim": MetricInfo("ssim", "fr", False, None, min_size=11, label="SSIM"),  # its 11x11 window
}


def parse_metrics(spec: str | list[str]) -> list[str]:
    """`"brisque,piqe"` -> ["brisque", "piqe"], refusing unknown names; a name given twice is kept once."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UniremovalError(f"unknown metric(s) {unknown}; available: {', '.join(METRICS)}")
    if not names:
        raise UniremovalError("no metric given; e.g. --metrics brisque,piqe")
    return list(dict.fromkeys(names))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid, so scores are those of the PNG that `--save-images` writes."""
    return (x.clamp(0, 1) * 255).round() / 255


# ---------------------------------------------------------------- full-reference: PSNR / SSIM


def rgb_to_y255(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 1, H, W) Y in [16, 235], as MATLAB's rgb2ycbcr on uint8 (rounded)."""
    import torch

    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (16.0 + (x * w).sum(dim=1, keepdim=True)).round()


def _prepare(x: torch.Tensor, y: torch.Tensor, y_channel: bool, crop_border: int):
    if x.shape != y.shape:
        raise UniremovalError(f"output {tuple(x.shape)} and target {tuple(y.shape)} differ in size")
    x, y = quantize(x.double()), quantize(y.double())
    if y_channel:
        x, y = rgb_to_y255(x), rgb_to_y255(y)
    else:
        x, y = x * 255.0, y * 255.0
    if crop_border:
        c = crop_border
        if x.shape[-1] <= 2 * c or x.shape[-2] <= 2 * c:
            raise UniremovalError(f"--crop-border {c} leaves nothing of a {x.shape[-1]}x{x.shape[-2]} image")
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image of two (N, 3, H, W) batches in [0, 1]: inf for identical images, NaN
    when either holds a NaN (a model whose output went NaN must not score a perfect inf)."""
    import torch

    x, y = _prepare(x, y, y_channel, crop_border)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10 * torch.log10(255.0**2 / mse.clamp_min(1e-300)))


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=None, device=None) -> torch.Tensor:
    import torch

    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w = torch.outer(g, g)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """SSIM per image (Gaussian 11/1.5 on [0, 255], valid filtering; RGB = channel mean)."""
    import torch.nn.functional as F

    x, y = _prepare(x, y, y_channel, crop_border)
    _, c, h, w = x.shape
    if h < 11 or w < 11:
        cropped = f" after --crop-border {crop_border} (from {w + 2 * crop_border}x{h + 2 * crop_border})" \
            if crop_border else ""
        raise UniremovalError(f"SSIM needs images of at least 11x11 pixels, got {w}x{h}{cropped}")
    win = _gaussian_window(dtype=x.dtype, device=x.device).expand(c, 1, 11, 11)

    def filt(t):
        return F.conv2d(t, win, groups=c)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return smap.mean(dim=(2, 3)).mean(dim=1)


# ---------------------------------------------------------------- the scorer


class Scorer:
    """Scores batches with a fixed set of metrics; pyiqa metrics are built once, offline."""

    def __init__(
        self,
        names: list[str],
        device: str = "cpu",
        iqa_dir: str | None = None,
        y_channel: bool = False,
        crop_border: int = 0,
    ) -> None:
        self.names = parse_metrics(names)
        self.device = device
        self.y_channel = y_channel
        self.crop_border = crop_border
        self._nr = {}
        nr = [n for n in self.names if METRICS[n].kind == "nr"]
        if nr:
            self._nr = _build_pyiqa(nr, device, iqa_dir)

    @property
    def needs_target(self) -> list[str]:
        return [n for n in self.names if METRICS[n].kind == "fr"]

    def check_size(self, height: int, width: int, name: str) -> None:
        """Refuse an image too small for a metric before it is scored, naming it; PSNR/SSIM see it
        after --crop-border, so the message says when the crop is what makes it too small."""
        for m in self.names:
            need = METRICS[m].min_size
            crop = self.crop_border if METRICS[m].kind == "fr" else 0
            least = max(need, 1)  # PSNR needs a pixel left after the crop
            if min(height, width) - 2 * crop >= least:
                continue
            if crop and min(height, width) >= least:
                left = "nothing" if min(height, width) <= 2 * crop else f"{width - 2 * crop}x{height - 2 * crop}"
                raise UniremovalError(
                    f"image '{name}' is {width}x{height}; --crop-border {crop} leaves {left} of it, but {m} needs "
                    f"at least {least}x{least}: lower --crop-border to {(min(height, width) - least) // 2} or less, "
                    f"or drop {m} from --metrics")
            raise UniremovalError(
                f"image '{name}' is {width}x{height}, but {m} needs at least {need}x{need}; "
                f"drop {m} from --metrics for this dataset"
            )

    def score(self, out: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, list[float]]:
        """Scores of a batch (N, 3, H, W) in [0, 1]; FR metrics need `target` of the same shape."""
        import torch

        out = quantize(out.float()).to(self.device)
        res: dict[str, list[float]] = {}
        with torch.no_grad():
            for name, metric in self._nr.items():
                res[name] = _nr_scores(metric, out)
            fr = self.needs_target
            if fr:
                if target is None:
                    raise UniremovalError(f"{', '.join(fr)} need targets, and this batch has none")
                target = target.to(self.device)
                if "psnr" in fr:
                    res["psnr"] = psnr(out, target, self.y_channel, self.crop_border).cpu().tolist()
                if "ssim" in fr:
                    res["ssim"] = ssim(out, target, self.y_channel, self.crop_border).cpu().tolist()
        return {n: res[n] for n in self.names}


def _nr_scores(metric, batch: torch.Tensor) -> list[float]:
    """One pyiqa score per image; NaN where the metric is undefined for the image. pyiqa's NIQE
    fails the whole batch on a flat (constant) image (its feature covariance is NaN, so the SVD in
    pinv does not converge), where BRISQUE returns NaN: a failing batch is scored image by image and
    only the images that fail get NaN (the caller names them)."""
    import torch

    try:
        return metric(batch).reshape(-1).double().cpu().tolist()
    except torch.linalg.LinAlgError:
        if len(batch) == 1:
            return [math.nan]
        return [v for i in range(len(batch)) for v in _nr_scores(metric, batch[i : i + 1])]


def _build_pyiqa(names: list[str], device: str, iqa_dir: str | None) -> dict:
    """Create pyiqa metrics without letting pyiqa download anything."""
    from uniremoval.eval import iqa_params

    # Resolve every file first, so the missing ones are reported (all in one error) before the slow pyiqa import.
    paths = iqa_params.find_param_files([n for n in names if iqa_params.needs_params(n)], iqa_dir)
    import pyiqa

    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:  # pyiqa loads converted files in create_metric
        for n in names:
            kwargs = {}
            if n in paths:
                kwargs["pretrained_model_path"] = iqa_params.pyiqa_model_path(n, paths[n], tmp)
            metrics[n] = pyiqa.create_metric(METRICS[n].pyiqa_name, device=device, **kwargs).eval()
    return metrics
