"""Per-sample transforms: decode, paired crop, dihedral augmentation, scaling to [-1, 1].

Everything here works on numpy arrays (HWC images, CHW feature grids) so that one random window
and one random flip/rotation can be applied to the input, target, teacher output and cached
feature grid together. Crop and augment before converting to float: it is cheaper to scale a
128x128 window than a whole photo.

Feature grids (cache samples) hold the teacher's feature average-pooled over `cell` x `cell`
pixel cells anchored at the top-left, partial border cells dropped. A crop whose offset and
size are multiples of `cell` therefore maps exactly onto a sub-grid, and a flip or 90-degree
rotation of the crop is the same flip or rotation of that sub-grid.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from uniremoval.errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff", "ppm", "pgm", "pbm")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



# Pillow's decompression-bomb guard is a module global (a warning over MAX_IMAGE_PIXELS, an error over
# twice it, ~89 and ~179 Mpixel): every reader here lifts it under this one lock (two locks around
# the same global could interleave and leave it off for good).
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_limit_lifted() -> Iterator[None]:
    """Pillow without its pixel limit for the block: a panorama or a stitched scan is a user's real
    photo, not a bomb from the web; each caller checks the size it can take (the loaders' 2^30
    pixels, restore's free memory)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved

def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to an RGB HWC array (uint8, or uint16 for 16-bit PNGs).

    OpenCV when available (25-35% faster than PIL on PNG and JPEG here), with EXIF orientation
    ignored so pixels match what PIL returns; PIL for anything OpenCV cannot read. Raises
    ValueError (or a decoder error) when the bytes are not an image; callers turn that into a
    bad-sample count or a DataError naming the shard and key.
    """
    # PIL silently drops 16-bit RGB PNGs to 8 bits; keep their precision (the cache stage may
    # store the teacher output as a 16-bit PNG). IHDR bit depth is byte 24.
    if data[:8] == _PNG_MAGIC and len(data) > 25 and data[24] == 16:
        return _decode_png16(data)
    if problem := unsupported_tiff(data):
        raise ValueError(problem)
    cv2 = _cv2()
    if cv2 is not None:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is not None and arr.ndim == 3 and arr.shape[2] == 3:
            # OpenCV decodes BGR. A reversed view, not a copy: only the crop gets copied later.
            return arr[:, :, ::-1]
    from PIL import Image

    with pil_limit_lifted(), Image.open(io.BytesIO(data)) as img:  # (OpenCV's 2^30 limit holds above)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded image has shape {arr.shape}, expected HxWx3")
    return arr


def decode_problem(exc: BaseException, data: bytes) -> tuple[str, str]:
    """(kind, reason) for image bytes that did not decode, in words a user can act on.

    kind is "truncated" (the file is cut short) or "unreadable"; the reason names an empty file,
    and for bytes in no image format shows how they start (an HTML error page or a Git LFS pointer
    saved under an image name reads as such), never a Python object's repr. Shared by the shard
    builders' report (`manifest.image_size`) and `restore`/`eval` (`eval.restore.read_image`).
    """
    if len(data) == 0:
        return "unreadable", "empty file (0 bytes)"
    text = str(exc)
    if "truncat" in text.lower():
        return "truncated", f"{type(exc).__name__}: {text}"
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "unreadable", f"not an image file: no image format recognised ({len(data)} bytes, starting {data[:24]!r})"
    return "unreadable", f"{type(exc).__name__}: {text}"


# EXIF orientation (tag 274): how the stored pixels are turned for display, as every viewer does.
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {1: "upright", 2: "mirrored", 3: "rotated 180 degrees", 4: "flipped upside down",
                5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
                8: "rotated 90 degrees counter-clockwise"}


def exif_orientation(img) -> int:
    """The EXIF orientation (1-8) of an open PIL image; 1 (as stored) when absent or invalid."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: show the pixels as stored
        return 1
    return value if isinstance(value, int) and value in ORIENTATIONS else 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored HWC pixels by an EXIF orientation so they stand as displayed (PIL's
    ``ImageOps.exif_transpose``, on any dtype: 16-bit pixels keep their precision). A view."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def inverse_orientation(orientation: int) -> int:
    """The orientation that turns displayed pixels back to stored: the quarter turns swap, the
    mirrors, the half turn and the transposes undo themselves."""
    return {6: 8, 8: 6}.get(orientation, orientation)


def upright_size(hw: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(height, width) as displayed, from the stored size: orientations 5-8 swap the axes."""
    return (hw[1], hw[0]) if orientation >= 5 else (hw[0], hw[1])


def pair_alignment(hw: tuple[int, int], turn: int, target_hw: tuple[int, int], target_turn: int) -> str:
    """How a pair whose EXIF orientations differ lines up, told by its stored sizes (H, W):
    "displayed" (only the sizes as displayed match: e.g. an upright target written by a tool that
    applies the input's tag), "stored" (only the stored sizes match: a tool that ignored the tag), or
    "unknown" (both or neither match: square images, or tags that keep the size)."""
    shown = upright_size(hw, turn) == upright_size(target_hw, target_turn)
    stored = tuple(hw) == tuple(target_hw)
    return "displayed" if shown and not stored else "stored" if stored and not shown else "unknown"


# Why a pair with different EXIF orientations is refused, and what to do, by `pair_alignment`'s answer
# (aligned as displayed is refused by the shard builders only: a sample's json holds one orientation).
_MISMATCH = {
    "displayed": ("their sizes say they are aligned as displayed, not as stored",
                  "save the input upright without the tag (PIL's ImageOps.exif_transpose), as its target is displayed"),
    "stored": ("their sizes say they are aligned as stored, not as displayed",
               "give the target the input's tag, or save both upright without it"),
    "unknown": ("their sizes cannot tell whether they are aligned as displayed or as stored",
                "check which, then save both upright without the tag (PIL's ImageOps.exif_transpose)"),
}


def orientation_mismatch(turn: int, target_turn: int, alignment: str) -> str:
    """Why a pair with different EXIF orientations is refused (`pair_alignment`'s answer), and the fix."""
    why, fix = _MISMATCH[alignment]
    return (f"input has EXIF orientation {turn} ({ORIENTATIONS[turn]} for display) but target has {target_turn} "
            f"({ORIENTATIONS[target_turn]}): {why}; {fix}")


# Shard samples whose input/target files carry an EXIF orientation record it in json (the original
# bytes are kept); these fields are turned upright when decoded. Fields made from upright pixels
# (the cache's teacher image and feature grid) are stored upright and never turned.
ORIENTED_FIELDS = ("input", "target")


def meta_orientation(meta: dict) -> int:
    """A sample's json `orientation` (1, as stored, when absent: shards of untagged files, or built
    before it was recorded). Raises ValueError for a value that is not an EXIF orientation."""
    value = meta.get("orientation", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value not in ORIENTATIONS:
        raise ValueError(f"json orientation {value!r} is not an EXIF orientation (an integer 1-8)")
    return value


def _cv2():
    try:
        import cv2
    except ImportError:  # OpenCV is optional: PIL decodes everything, a little slower
        return None
    return cv2


def unsupported_png(data: bytes) -> str | None:
    """Why no decoder here gives a PNG's stored values, or None: grey + alpha at 16 bits (IHDR bit
    depth at byte 24, colour type at 25), which OpenCV (5.0 here) returns with swapped bytes (3 reads
    as 768) and PIL cuts to 8 bits. The shard builders refuse it up front, the decoders too."""
    if data[:8] == _PNG_MAGIC and len(data) > 25 and data[24] == 16 and data[25] == 4:
        return "16-bit grey+alpha PNG (colour type 4) is not supported: save it as 16-bit grey or RGB"
    return None


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def _tiff_samples(data: bytes) -> tuple[int, int] | None:
    """(bits per sample, sample format: 1 unsigned, 2 signed, 3 float) of a TIFF's first image, from
    its header's tags 258 and 339 (no pixel decoded); None when not readable so (BigTIFF, a cut file)."""
    import struct

    order = "<" if data[:2] == b"II" else ">"
    try:
        if struct.unpack_from(order + "H", data, 2)[0] != 42:
            return None
        ifd = struct.unpack_from(order + "I", data, 4)[0]
        found = {258: 1, 339: 1}  # the TIFF defaults
        for i in range(struct.unpack_from(order + "H", data, ifd)[0]):
            tag, kind, count, value = struct.unpack_from(order + "HHI4s", data, ifd + 2 + 12 * i)
            if tag in found and kind == 3:  # SHORTs: two fit in the entry, more lie at its offset
                at = (value, 0) if count <= 2 else (data, struct.unpack_from(order + "I", value)[0])
                found[tag] = struct.unpack_from(order + "H", *at)[0]  # the first sample's (all alike)
    except struct.error:
        return None
    return found[258], found[339]


def unsupported_tiff(data: bytes) -> str | None:
    """Why a TIFF's samples cannot be stored as an 8- or 16-bit image, or None: float, signed or
    32-bit integer samples (HDR, scientific data), read from its header. OpenCV's colour decode turns
    floats in [0, 1] into 0 and 1 out of 255, a black image, unsaid; PIL reads float grey but not
    float RGB ("no image format recognised"). The shard builders refuse them up front, the decoders
    too; `restore` and `eval` read float grey TIFFs as values in [0, 1] themselves."""
    if data[:4] not in _TIFF_MAGIC or (samples := _tiff_samples(data)) is None:
        return None
    bits, kind = samples
    if kind == 3:
        what = f"{bits}-bit float"
    elif kind == 2:
        what = f"signed {bits}-bit integer"
    elif bits > 16:
        what = f"{bits}-bit integer"
    else:
        return None
    return (f"TIFF of {what} samples is not supported (unsigned 8- and 16-bit only): save it as a 16-bit TIFF "
            "or PNG (values in [0, 1] scaled to 0..65535)")


def _decode_png16(data: bytes) -> np.ndarray:
    problem = unsupported_png(data)
    if problem:
        raise ValueError(problem)
    cv2 = _cv2()
    if cv2 is None:
        raise DataError("a 16-bit PNG needs OpenCV to decode: pip install opencv-python-headless")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode the 16-bit PNG")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr[:, :, ::-1])  # OpenCV decodes BGR


# zlib level of the PNGs written in bulk (synthetic inputs, the cache's teacher images). Lossless at
# every level; on 720p photos level 1 encodes in ~70 ms against ~330 ms at PIL's default 6, for ~17%
# more bytes, and decodes as fast (bench/cache_pipeline.py --png-level).
BULK_PNG_LEVEL = 1


def encode_png(arr: np.ndarray, level: int = BULK_PNG_LEVEL) -> bytes:
    """uint8 HxWx3 (or HxW) array -> PNG bytes at zlib `level` (0-9)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def decode_feature(data: bytes) -> np.ndarray:
    """Decode a `feature.npy` payload (float16 (C, H//cell, W//cell)) without allowing pickles."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3:
        raise ValueError(f"feature grid has shape {arr.shape}, expected (C, H//cell, W//cell)")
    return arr


def to_tensor(img: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """HWC uint8/uint16 -> CHW float32 in [-1, 1] (0 -> -1, max -> +1), into `out` if given."""
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    chw = img.transpose(2, 0, 1)
    # Older torch cannot wrap uint16 arrays: widen those (rare: 16-bit teacher PNGs) to int32.
    src = torch.from_numpy(chw.astype(np.int32) if img.dtype == np.uint16 else np.ascontiguousarray(chw))
    t = out.copy_(src) if out is not None else src.float()
    return t.mul_(2.0 / scale).sub_(1.0)


@dataclass(frozen=True)
class Aug:
    """One draw of the dihedral augmentation: the 8 symmetries of the square."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False  # transpose-like quarter turn; with both flips this covers all 8

    @staticmethod
    def allowed(augment: Aug | bool) -> Aug:
        """Which symmetries a stream may draw: True = all three, False = none, an Aug = its own."""
        if isinstance(augment, Aug):
            return augment
        return Aug(True, True, True) if augment else Aug()

    def any(self) -> bool:
        return self.hflip or self.vflip or self.rot90

    @staticmethod
    def draw(rng: np.random.Generator, allowed: Aug | None = None) -> Aug:
        """A random symmetry among those `allowed` (all when None). Three bits are drawn whichever
        are allowed, so turning one off leaves every later draw (the next crops) as it was."""
        bits = rng.integers(0, 2, size=3)
        a = allowed or Aug(True, True, True)
        return Aug(bool(bits[0]) and a.hflip, bool(bits[1]) and a.vflip, bool(bits[2]) and a.rot90)


def apply_aug(arr: np.ndarray, aug: Aug, channels_first: bool) -> np.ndarray:
    """Apply `aug` to an HWC image or a CHW grid. The same Aug gives the same geometric map."""
    h_ax, w_ax = (1, 2) if channels_first else (0, 1)
    if aug.hflip:
        arr = np.flip(arr, axis=w_ax)
    if aug.vflip:
        arr = np.flip(arr, axis=h_ax)
    if aug.rot90:
        arr = np.rot90(arr, k=1, axes=(h_ax, w_ax))
    return arr


def _pad_bottom_right(arr: np.ndarray, h: int, w: int, channels_first: bool) -> np.ndarray:
    """Mirror-pad (edge included, numpy 'symmetric') at the bottom/right up to at least h x w.

    'symmetric' rather than 'reflect' so that padding a cell-aligned image by whole cells equals
    padding its pooled grid by whole cells: a mirrored cell has the same average.
    """
    ah, aw = (arr.shape[1], arr.shape[2]) if channels_first else (arr.shape[0], arr.shape[1])
    ph, pw = max(0, h - ah), max(0, w - aw)
    if ph == 0 and pw == 0:
        return arr
    pads = [(0, 0), (0, ph), (0, pw)] if channels_first else [(0, ph), (0, pw), (0, 0)]
    return np.pad(arr, pads, mode="symmetric")


def paired_crop(
    images: dict[str, np.ndarray],
    feature: np.ndarray | None,
    crop: int | None,
    cell: int,
    rng: np.random.Generator,
    augment: Aug | bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple[int, int, Aug]]:
    """Cut one random window (and draw one augmentation) shared by every image and the grid.

    `images` must all have the same height and width (checked by the caller). Images smaller
    than the crop are mirror-padded at the bottom/right (documented choice: keeps every sample,
    and the padded border is a plausible image; the training streams count such samples and warn
    once, see `pipelines.CropPadding`). With a feature grid the image is first trimmed
    to the grid's cell-aligned area and the window offset is a multiple of `cell`.
    `augment`: the symmetries that may be drawn (True: all, False: none, or an Aug of them).
    `crop=None` keeps the full image (no augmentation either). Returns the crops, the grid crop
    and (y0, x0, aug) for tests and debugging.
    """
    first = next(iter(images.values()))
    h, w = first.shape[:2]
    if crop is None:
        return images, feature, (0, 0, Aug())
    if feature is not None:
        if crop % cell:
            raise DataError(f"crop size {crop} must be a multiple of the feature cell {cell}")
        gh, gw = feature.shape[1], feature.shape[2]
        h, w = gh * cell, gw * cell
        images = {k: v[:h, :w] for k, v in images.items()}
        if h < crop or w < crop:
            images = {k: _pad_bottom_right(v, crop, crop, False) for k, v in images.items()}
            feature = _pad_bottom_right(feature, crop // cell, crop // cell, True)
            h, w = max(h, crop), max(w, crop)
        y0 = int(rng.integers(0, (h - crop) // cell + 1)) * cell
        x0 = int(rng.integers(0, (w - crop) // cell + 1)) * cell
        feature = feature[:, y0 // cell : (y0 + crop) // cell, x0 // cell : (x0 + crop) // cell]
    else:
        if h < crop or w < crop:
            images = {k: _pad_bottom_right(v, crop, crop, False) for k, v in images.items()}
            h, w = max(h, crop), max(w, crop)
        y0 = int(rng.integers(0, h - crop + 1))
        x0 = int(rng.integers(0, w - crop + 1))
    out = {k: v[y0 : y0 + crop, x0 : x0 + crop] for k, v in images.items()}
    allowed = Aug.allowed(augment)
    aug = Aug.draw(rng, allowed) if allowed.any() else Aug()
    out = {k: apply_aug(v, aug, channels_first=False) for k, v in out.items()}
    if feature is not None:
        feature = apply_aug(feature, aug, channels_first=True)
    return out, feature, (y0, x0, aug)
