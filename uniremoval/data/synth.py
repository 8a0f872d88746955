"""Synthetic degraded/clean pairs from clean images: haze, rain, blur.

- haze: the atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d), with a depth proxy d
  in [near, 1] mixing a vertical ramp (higher in the frame = farther, true of most photos) with the
  smoothed minimum channel (bright, colourless regions such as sky and walls read as far, the same
  cue the dark channel prior uses), smoothed to be piecewise-soft like real depth.
- rain: one or more streak layers. Sparse random seeds convolved with an anti-aliased line kernel
  (length, angle, width) make streaks; layers are screen-blended, I = 1 - (1 - J)(1 - a S).
- blur: a camera-shake trajectory (a random walk with inertia, random jerks and a pull back to the
  start, after Boracchi & Foi's model) rasterised into a kernel, centred on its centroid so the
  blurred image stays aligned with its target, and convolved per channel.

Parameters are drawn uniformly inside the ranges of a `SynthRanges` preset ("default", or
"real-like": a shifted domain with coloured, uneven haze, veiled rain, larger kernels with defocus,
sensor noise and JPEG), from a generator seeded per sample, and recorded in the sample's json.
Outputs are encoded once (PNG, or JPEG at the drawn quality) and those bytes are what is stored.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from uniremoval.data.readers import Issue, Item, assign_keys, scan_images
from uniremoval.errors import ConfigError, DataError

DEGRADATIONS = ("haze", "rain", "blur")
Range = tuple[float, float]


class _Ranges(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _ordered(self):
        for name, value in self:
            if isinstance(value, tuple) and len(value) == 2 and value[0] > value[1]:
                raise ValueError(f"{name}: low {value[0]} > high {value[1]}")
        return self


class HazeRanges(_Ranges):
    beta: Range = (0.6, 1.8)  # scattering coefficient for depth in [0, 1] (ITS uses 0.6-1.8)
    airlight: Range = (0.7, 1.0)  # grey level of A
    airlight_tint: Range = (0.0, 0.03)  # per-channel deviation of A from grey
    near: Range = (0.0, 0.3)  # depth of the nearest point
    vertical_weight: Range = (0.3, 0.8)  # ramp vs. brightness cue in the depth proxy
    beta_variation: Range = (0.0, 0.0)  # amplitude of low-frequency unevenness of beta


class RainRanges(_Ranges):
    layers: tuple[int, int] = (1, 2)
    density: Range = (0.0005, 0.004)  # fraction of pixels seeding a streak
    length: Range = (0.04, 0.12)  # streak length as a fraction of the short side
    angle: Range = (-25.0, 25.0)  # degrees from vertical (shared by layers, +-5 jitter)
    width: Range = (0.4, 1.2)  # gaussian sigma across the streak, pixels
    intensity: Range = (0.25, 0.6)  # peak streak opacity
    veil: Range = (0.0, 0.0)  # uniform brightening from distant rain (accumulation)


class BlurRanges(_Ranges):
    kernel_size: tuple[PositiveInt, PositiveInt] = (9, 25)  # odd sizes in this range, pixels
    length: Range = (0.5, 1.0)  # trajectory extent as a fraction of the kernel size
    anxiety: Range = (0.0, 0.15)  # strength of random jerks in the camera path
    defocus_sigma: Range = (0.0, 0.0)  # extra gaussian blur, pixels


class NoiseRanges(_Ranges):
    sigma: Range = (0.0, 0.0)  # gaussian sensor noise, in [0, 1] intensity units
    jpeg_quality: tuple[int, int] | None = None  # None: lossless PNG


class SynthRanges(_Ranges):
    haze: HazeRanges = Field(default_factory=HazeRanges)
    rain: RainRanges = Field(default_factory=RainRanges)
    blur: BlurRanges = Field(default_factory=BlurRanges)
    noise: NoiseRanges = Field(default_factory=NoiseRanges)


PRESETS: dict[str, SynthRanges] = {
    "default": SynthRanges(),
    # A shifted domain for the demo's "real" images: what synthetic training does not cover.
    "real-like": SynthRanges(
        haze=HazeRanges(
            beta=(1.0, 2.5),
            airlight=(0.6, 0.95),
            airlight_tint=(0.03, 0.1),
            near=(0.1, 0.4),
            beta_variation=(0.2, 0.5),
        ),
        rain=RainRanges(
            layers=(2, 3),
            density=(0.001, 0.005),
            length=(0.08, 0.25),
            angle=(-40.0, 40.0),
            width=(0.8, 1.8),
            intensity=(0.2, 0.5),
            veil=(0.03, 0.12),
        ),
        blur=BlurRanges(
            kernel_size=(15, 35), length=(0.6, 1.0), anxiety=(0.05, 0.3), defocus_sigma=(0.3, 1.5)
        ),
        noise=NoiseRanges(sigma=(0.005, 0.03), jpeg_quality=(55, 90)),
    ),
}


def get_preset(name: str) -> SynthRanges:
    """A preset by name, or a JSON/YAML file of ranges (missing fields take the defaults)."""
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith((".json", ".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--params {name}: no such file")
        import yaml
        from pydantic import ValidationError

        try:
            return SynthRanges.model_validate(yaml.safe_load(path.read_text()) or {})
        except ValidationError as exc:  # one line per bad key, without pydantic's links
            bad = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"--params {name}: not valid synthesis ranges: {bad}") from None
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"--params {name}: not valid synthesis ranges: {exc}") from exc
    raise ConfigError(
        f"--params {name!r}: choose one of {', '.join(PRESETS)}, or a .json/.yaml file of ranges"
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _i(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma, mode="reflect") if sigma > 0 else x


def _norm01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _fftconvolve(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """2-D convolution by FFT, 'same' (zero borders) or 'valid' (numpy only: scipy.signal imports slowly)."""
    h, w = x.shape
    ky, kx = kernel.shape
    shape = (h + ky - 1, w + kx - 1)
    full = np.fft.irfft2(np.fft.rfft2(x, shape) * np.fft.rfft2(kernel, shape), shape)
    if mode == "valid":
        return full[ky - 1 : h, kx - 1 : w]
    return full[ky // 2 : ky // 2 + h, kx // 2 : kx // 2 + w]


def _convolve_rgb(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'same' convolution with reflected borders (no dark frame around blurred images)."""
    ky, kx = kernel.shape
    py, px = ky // 2, kx // 2
    padded = np.pad(img, ((py, ky - 1 - py), (px, kx - 1 - px), (0, 0)), mode="reflect")
    return np.stack([_fftconvolve(padded[..., c], kernel, "valid") for c in range(img.shape[2])], -1)


def _splat(kernel: np.ndarray, ys: np.ndarray, xs: np.ndarray, weight: float = 1.0) -> None:
    """Add points with bilinear weights (anti-aliased rasterisation of a path)."""
    h, w = kernel.shape
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, dx, wt in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        np.add.at(kernel, (yy[ok], xx[ok]), weight * wt[ok])


# ---------------------------------------------------------------------------------------------
# degradations (float images in [0, 1], HWC)


def add_haze(img: np.ndarray, rng: np.random.Generator, r: HazeRanges) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    beta, grey = _u(rng, r.beta), _u(rng, r.airlight)
    tint = _u(rng, r.airlight_tint)
    airlight = np.clip(grey + rng.uniform(-tint, tint, 3), 0.0, 1.0)
    near, vw = _u(rng, r.near), _u(rng, r.vertical_weight)
    ramp = np.repeat(np.linspace(1.0, 0.0, h)[:, None], w, axis=1)
    bright = _norm01(_smooth(img.min(axis=2), 0.03 * min(h, w)))
    depth = _norm01(_smooth(vw * ramp + (1 - vw) * bright, 0.02 * min(h, w)))
    depth = near + (1 - near) * depth
    variation = _u(rng, r.beta_variation)
    beta_map = beta * np.ones((h, w))
    if variation > 0:
        field = _norm01(_smooth(rng.standard_normal((h, w)), 0.15 * min(h, w))) * 2 - 1
        beta_map = beta * (1 + variation * field)
    t = np.exp(-beta_map * depth)[..., None]
    out = img * t + airlight[None, None, :] * (1 - t)
    params = {
        "beta": beta,
        "airlight": airlight.tolist(),
        "near": near,
        "vertical_weight": vw,
        "beta_variation": variation,
        "transmission_mean": float(t.mean()),
        "transmission_min": float(t.min()),
    }
    return out, params


def _line_kernel(length: float, angle_deg: float, width: float) -> np.ndarray:
    size = math.ceil(length) | 1
    size += 2 * math.ceil(2 * width)
    kernel = np.zeros((size, size))
    theta = math.radians(angle_deg)
    steps = np.linspace(-length / 2, length / 2, max(2, int(length * 3)))
    c = (size - 1) / 2
    # angle from vertical: positive leans the streak's top to the right.
    _splat(kernel, c + steps * math.cos(theta), c - steps * math.sin(theta))
    kernel = _smooth(kernel, width)
    return kernel / kernel.max()


def add_rain(img: np.ndarray, rng: np.random.Generator, r: RainRanges) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    base_angle = _u(rng, r.angle)
    out = img.copy()
    layers = []
    for _ in range(_i(rng, r.layers)):
        density, length = _u(rng, r.density), _u(rng, r.length) * min(h, w)
        angle = base_angle + float(rng.uniform(-5, 5))
        width, intensity = _u(rng, r.width), _u(rng, r.intensity)
        seeds = (rng.random((h, w)) < density) * rng.uniform(0.5, 1.0, (h, w))
        streaks = np.clip(_fftconvolve(seeds, _line_kernel(length, angle, width), "same"), 0.0, 1.0)
        out = 1 - (1 - out) * (1 - intensity * streaks[..., None])
        layers.append(
            {
                "density": density,
                "length_px": length,
                "angle": angle,
                "width": width,
                "intensity": intensity,
                "coverage": float((streaks > 0.1).mean()),
            }
        )
    veil = _u(rng, r.veil)
    if veil > 0:
        out = out * (1 - veil) + veil * 0.9
    return out, {"layers": layers, "veil": veil}


def shake_kernel(rng: np.random.Generator, size: int, length: float, anxiety: float) -> np.ndarray:
    """A camera-shake path rasterised into a `size`x`size` kernel that sums to 1."""
    steps = 128
    velocity = complex(math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a))
    pos = [0j]
    for _ in range(steps - 1):
        jerk = anxiety * complex(rng.standard_normal(), rng.standard_normal())
        # inertia + jerks, a weak pull back to the start (hands return), occasional sharp turns
        velocity += jerk - 0.05 * pos[-1] / (abs(pos[-1]) + 1e-6) * abs(velocity)
        if rng.random() < anxiety * 0.2:
            velocity *= complex(math.cos(b := rng.uniform(-1, 1)), math.sin(b))
        velocity /= abs(velocity) + 1e-12
        pos.append(pos[-1] + velocity / steps)
    path = np.array(pos)
    path -= path.mean()
    extent = max(np.ptp(path.real), np.ptp(path.imag), 1e-6)
    path *= length * (size - 1) / extent
    path -= path.mean()  # centroid at the kernel centre: the blurred image stays aligned
    c = (size - 1) / 2
    kernel = np.zeros((size, size))
    _splat(kernel, np.clip(c + path.imag, 0, size - 1.001), np.clip(c + path.real, 0, size - 1.001))
    return kernel / kernel.sum()


def add_blur(img: np.ndarray, rng: np.random.Generator, r: BlurRanges) -> tuple[np.ndarray, dict]:
    lo, hi = r.kernel_size
    size = _i(rng, (lo, hi)) | 1
    length, anxiety, defocus = _u(rng, r.length), _u(rng, r.anxiety), _u(rng, r.defocus_sigma)
    kernel = shake_kernel(rng, size, length, anxiety)
    if defocus > 0:
        kernel = _smooth(kernel, defocus)
        kernel /= kernel.sum()
    out = _convolve_rgb(img, kernel)
    ys, xs = np.nonzero(kernel > kernel.max() * 0.05)
    extent = int(max(np.ptp(ys), np.ptp(xs))) + 1 if len(ys) else 1
    return out, {
        "kernel_size": size,
        "length": length,
        "anxiety": anxiety,
        "defocus_sigma": defocus,
        "kernel_extent_px": extent,
    }


_APPLY = {"haze": add_haze, "rain": add_rain, "blur": add_blur}


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def synthesize(
    clean: np.ndarray, degradation: str, rng: np.random.Generator, ranges: SynthRanges | None = None
) -> tuple[np.ndarray, dict]:
    """Degrade a uint8 HxWx3 image; return (uint8 HxWx3, parameters drawn).

    Noise is applied here; JPEG (when the preset has a quality range) is not: its drawn quality is
    in params["jpeg_quality"] and `encode_image` applies it, so the stored bytes are encoded once.
    """
    if degradation not in _APPLY:
        raise ConfigError(f"--degradation {degradation!r}: synthesis knows {', '.join(DEGRADATIONS)}")
    if clean.dtype != np.uint8 or clean.ndim != 3 or clean.shape[2] != 3:
        raise ValueError(f"synthesize needs a uint8 HxWx3 image, got {clean.dtype} {clean.shape}")
    ranges = ranges or PRESETS["default"]
    img = clean.astype(np.float64) / 255.0
    out, params = _APPLY[degradation](img, rng, getattr(ranges, degradation))
    sigma = _u(rng, ranges.noise.sigma)
    if sigma > 0:
        out = out + rng.standard_normal(out.shape) * sigma
    params["noise_sigma"] = sigma
    q = ranges.noise.jpeg_quality
    params["jpeg_quality"] = _i(rng, q) if q else None
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), _rounded(params)


def encode_image(img: np.ndarray, params: dict) -> tuple[bytes, str]:
    """PNG (at the bulk zlib level), or JPEG at params['jpeg_quality']; returns (bytes, extension)."""
    from PIL import Image

    from uniremoval.data.transforms import encode_png

    buf = io.BytesIO()
    if params.get("jpeg_quality"):
        Image.fromarray(img).save(buf, "JPEG", quality=int(params["jpeg_quality"]))
        return buf.getvalue(), "jpg"
    return encode_png(img), "png"


def _rgb8(arr: np.ndarray) -> np.ndarray:
    """A decoded image (`decode_image`: uint8, or uint16 for 16-bit PNGs) as the uint8 HxWx3 that
    `synthesize` takes: 16-bit values are scaled (65535 -> 255), never clipped at 255."""
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def sample_seed(seed: int, key: str) -> int:
    """Per-sample seed from the run seed and the key: the same pair whatever the worker or job."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------
# building synthetic shards


def synth_items(
    clean_dir: str | os.PathLike, degradation: str, per_image: int, split: str, preset: str
) -> tuple[list[Item], list[Issue]]:
    """`per_image` synthetic samples per clean image under clean_dir (recursive)."""
    if degradation not in DEGRADATIONS:
        raise ConfigError(f"--degradation {degradation!r}: synthesis knows {', '.join(DEGRADATIONS)}")
    if per_image < 1:
        raise ConfigError(f"--per-image must be >= 1 (got {per_image})")
    root = Path(clean_dir)
    if not root.is_dir():
        raise DataError(f"--clean {root} is not a folder of clean images")
    issues: list[Issue] = []
    files = scan_images(root, root, issues)
    if not files:
        raise DataError(f"--clean {root} holds no images (png, jpg, bmp, tif, webp)")
    source = f"synth-{preset}"
    clean = assign_keys(
        [Item(p.relative_to(root).as_posix(), None, "clear", "synthetic", source, split) for p in files]
    )
    items = []
    for c in clean:
        for k in range(per_image):
            items.append(
                Item(
                    c.input,
                    c.input,
                    degradation,
                    "synthetic",
                    source,
                    split,
                    {"variant": k},
                    key=f"{c.key}-{degradation}{k}",
                )
            )
    return items, issues


@dataclass(frozen=True)
class SynthSampleBuilder:
    """Makes a synthetic sample in a worker: decode the clean image, degrade, encode once."""

    root: str
    dataset: str
    preset: str  # the name recorded in each sample
    seed: int
    ranges: SynthRanges

    def fingerprint(self) -> str:
        # The ranges themselves are part of it: editing a preset invalidates resumed shards.
        return f"synth:{self.dataset}:{self.preset}:{self.seed}:{self.ranges.model_dump_json()}"

    def plan_info(self, item: Item) -> tuple[int, list]:
        from PIL import Image

        from uniremoval.data.transforms import pil_limit_lifted

        path = Path(self.root, item.input)
        try:
            st = path.stat()
            with pil_limit_lifted(), Image.open(path) as im:  # reads the header only (a panorama too)
                w, h = im.size
        except (OSError, ValueError):  # gone or not an image: reported when the sample is built
            return 2048, [None]
        per_pixel = 1.0 if self.ranges.noise.jpeg_quality else 2.0
        return st.st_size + int(h * w * per_pixel) + 2048, [st.st_size, st.st_mtime_ns]

    def _clean(self, rel: str, cache: dict):
        if ("clean", rel) not in cache:
            from uniremoval.data.manifest import image_probe
            from uniremoval.data.transforms import apply_orientation, decode_image

            try:
                data = Path(self.root, rel).read_bytes()
            except OSError as exc:
                cache[("clean", rel)] = (None, None, 1, Issue("unreadable", rel, f"cannot read file: {exc}"))
                return cache[("clean", rel)]
            try:
                # full decode: a truncated file must be reported, not half-used
                _, turn = image_probe(data)
            except ValueError as exc:
                kind, _, reason = str(exc).partition(": ")
                cache[("clean", rel)] = (None, None, 1, Issue(kind, rel, reason))
                return cache[("clean", rel)]
            try:
                # The loaders' decoder: the degraded input is made from exactly the pixels the
                # target decodes to in training and eval (grey, palette, CMYK, 16-bit alike),
                # upright as displayed, so that rain falls down and haze thickens upwards.
                arr = np.ascontiguousarray(apply_orientation(_rgb8(decode_image(data)), turn))
            except ValueError as exc:
                cache[("clean", rel)] = (None, None, 1, Issue("unreadable", rel, str(exc)))
                return cache[("clean", rel)]
            cache.clear()  # one clean image at a time: its per-image variants are consecutive
            cache[("clean", rel)] = (data, arr, turn, None)
        return cache[("clean", rel)]

    def build(self, item: Item, cache: dict) -> tuple[dict | None, list[Issue]]:
        from uniremoval.data.shardwriter import image_ext
        from uniremoval.data.transforms import apply_orientation, inverse_orientation

        data, arr, turn, issue = self._clean(item.input, cache)
        if issue:
            return None, [issue] if item.extra.get("variant", 0) == 0 else []
        s = sample_seed(self.seed, item.key)
        out, params = synthesize(arr, item.degradation, np.random.default_rng(s), self.ranges)
        # The target keeps its original (EXIF-tagged) bytes: the input is stored turned back the same
        # way, and json `orientation` turns both upright in the loaders.
        encoded, ext = encode_image(np.ascontiguousarray(apply_orientation(out, inverse_orientation(turn))), params)
        meta = {
            "degradation": item.degradation,
            "domain": "synthetic",
            "source": item.source,
            "dataset": self.dataset,
            "split": item.split,
            "height": int(arr.shape[0]),
            "width": int(arr.shape[1]),
            "input_name": item.input,  # the clean image it was made from; the input itself is generated
            "target_name": item.target,
            "synthesis": {
                "preset": self.preset,
                "seed": self.seed,
                "sample_seed": s,
                "variant": item.extra.get("variant", 0),
                **params,
            },
        }
        if turn != 1:
            meta["orientation"] = turn
        return {
            "__key__": item.key,
            f"input.{ext}": encoded,
            f"target.{image_ext(item.target)}": data,
            "json": meta,
        }, []
