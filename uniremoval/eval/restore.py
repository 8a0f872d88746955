"""Inference: image I/O and (optionally tiled) restoration with any restoration model.

Images here are float tensors in [0, 1]; the model's own range (``input_range`` in its checkpoint
metadata: "minus_one_one" for ours, "zero_one" for official MPRNet files) is converted to and from
inside `restore_tensor`.

Tiling: the image is cut into ``tile`` x ``tile`` windows overlapping by ``tile_overlap`` px, each
window is restored, and overlaps are blended: on a side shared with a neighbour the outer quarter
of the overlap is ignored (weight 0: the window's own border effects live there) and the weight
then ramps linearly to 1, normalised by the summed weights. For a model whose receptive-field
radius is at most a quarter of the overlap the result equals untiled inference to float precision
(tested). MPRNet is not such a model: its channel attention pools over the whole input and its stages 1-2
split the input into patches, so a window sees other global statistics than the whole image and
tiled output differs. Stated tolerance, measured on the tiny preset with random weights (4 seeds,
smooth 48x56 and 96x96 images, tile 40/overlap 16 and tile 64/overlap 32): mean |tiled - untiled|
0.008-0.017 and max 0.10-0.26 on the [0, 1] scale, i.e. ~15-20% of what the random network
changes; the test pins mean < 0.03 and max < 0.3. No trained weights were available to measure a
trained model. Use the largest tile that fits in memory; without --tile nothing is approximated.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from uniremoval.data.readers import OTHER_IMAGE_EXTS, walk_images
from uniremoval.errors import DataError, UniremovalError
from uniremoval.io import atomic_writer
from uniremoval.models.ranges import INPUT_RANGES, model_range_to_unit, unit_to_model_range

# What restore holds per pixel of an image: the decoded file, the float32 input and output, the
# 8-bit copy written. An image needing more than the free memory is refused by name before decoding.
BYTES_PER_PIXEL = 32
# The PNG text chunk that marks restore's outputs: a rerun may replace them, nothing else.
WRITTEN_BY = ("Software", "uniremoval restore")
# px shared by neighbouring tiles: `restore --tile-overlap`'s default and `eval --tile`'s fixed value
TILE_OVERLAP = 32
MIN_TILE = 8
# Images held while waiting for same-size partners (in batches' worth); beyond this the fullest group goes.
MAX_BUFFERED_BATCHES = 4
# On the CPU a pass over several large images runs slower than one pass per image (activations outgrow
# the caches): bench/restore.py, tiny preset, 2 cores: 4 images of 128x128 a pass 1.52x, 256x256 0.98x,
# 480x320 0.76x. A CPU pass holds at most this many pixels (at least one image or tile); GPUs take
# --batch-size as given.
CPU_PASS_PIXELS = 128 * 128 * 4

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- image I/O


def read_image(path: str | os.PathLike) -> Tensor:
    """Read an image file (PNG, JPEG, BMP, TIFF, WebP, PPM/PGM/PBM) into a float32 RGB tensor (3, H, W) in
    [0, 1], upright as it is displayed: `read_image_oriented` without the orientation."""
    return read_image_oriented(path)[0]


@contextlib.contextmanager
def open_image(data: bytes | None, path: Path, load: bool = True) -> Iterator:
    """PIL's image of `data`, of any size this machine can hold. Pillow refuses files over ~179 MP
    as possible decompression bombs; a panorama or a stitched scan is a user's real photo, so the
    limit here is the free memory instead, checked from the header before any pixel is decoded
    (a DataError without the file's name: the caller adds it). `data` is the file's bytes when the
    caller has read them, else None (the file is opened). `load` decodes the pixels before the
    limit is put back (TIFF checks it again when it decodes); False gives the header only."""
    from PIL import Image

    from uniremoval.data.transforms import pil_limit_lifted

    with pil_limit_lifted():  # only around this open and decode
        img = Image.open(io.BytesIO(data) if data is not None else path)
        try:
            width, height = img.size
            free = available_memory()
            if free is not None and width * height * BYTES_PER_PIXEL > free:
                raise DataError(f"{width}x{height} pixels need about "
                                f"{width * height * BYTES_PER_PIXEL / 2**30:.1f} GiB to restore, more than the "
                                f"{free / 2**30:.1f} GiB free here; downscale or crop it, or use a larger machine")
            if load:
                img.load()  # the whole file: a truncated one is refused here, not half-restored
        except BaseException:
            img.close()
            raise
    with img:
        yield img


def _decode_tiff16(data: bytes) -> np.ndarray:
    """A 16-bit RGB(A) TIFF at full precision (Pillow opens it as 8-bit RGB): through OpenCV."""
    from uniremoval.data.transforms import _cv2

    cv2 = _cv2()
    if cv2 is None:
        raise DataError("a 16-bit RGB TIFF needs OpenCV to decode at full precision: "
                        "pip install opencv-python-headless")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] < 3:
        raise DataError("OpenCV could not decode this 16-bit TIFF; save it as a 16-bit PNG")
    return np.ascontiguousarray(arr[:, :, 2::-1])  # BGR(A) -> RGB


def read_image_oriented(path: str | os.PathLike) -> tuple[Tensor, int]:
    """Read an image file into a float32 RGB tensor (3, H, W) in [0, 1]; return it and the EXIF
    orientation (1-8, 1: none) that was applied.

    The one reader of image files for `restore` and `eval --data FOLDER`:
    - EXIF orientation is applied (a phone photo whose pixels are stored sideways, with a tag
      saying how to turn them, comes out upright as every viewer shows it, so the restored PNG,
      which carries no tag, is upright too). `eval` refuses a pair whose tags differ.
    - Grey (L, 16-bit I;16), palette (P), CMYK and YCbCr are converted to RGB; 16-bit PNGs and
      TIFFs keep their precision (65535 -> 1.0, never clipped at 255). A 16-bit grey+alpha PNG,
      which no decoder here reads right, is refused by name (`transforms.unsupported_png`).
    - Any size that fits in the free memory (`open_image`), not only Pillow's ~179 MP.
    - An alpha channel is dropped, not composited: the colour values are kept as stored, like
      PIL's ``convert("RGB")`` in the official MPRNet demo and the shard loaders (OpenCV).
    Raises DataError naming the file and what is wrong with it (missing, empty, not an image,
    truncated).
    """
    from PIL import Image

    from uniremoval.data.transforms import (
        apply_orientation,
        decode_image,
        decode_problem,
        exif_orientation,
        unsupported_png,
        unsupported_tiff,
    )

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if problem := unsupported_png(data):
        raise DataError(f"{path}: {problem}")
    try:
        with open_image(data, path) as img:
            orientation = exif_orientation(img)
            if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
                # 16-bit RGB(A): Pillow reads 8 bits of it; the shard decoder keeps all 16.
                arr = decode_image(data).astype(np.float32) / 65535.0
            elif img.format == "TIFF" and img.mode in ("RGB", "RGBA") and 16 in (img.tag_v2.get(258) or ()):
                arr = _decode_tiff16(data).astype(np.float32) / 65535.0
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey PNGs and TIFFs open as I;16 or (older Pillow, PNG) I; a PGM of more than
                # 8 bits as I, scaled by Pillow to 16 bits whatever its maxval.
                sixteen = img.mode.startswith("I;16") or img.format in ("PNG", "PPM")
                arr = np.asarray(img, dtype=np.float32) / (65535.0 if sixteen else 255.0)
                arr = np.clip(arr, 0.0, 1.0)[..., None].repeat(3, axis=2)
            elif img.mode == "F":
                arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[..., None].repeat(3, axis=2)
            else:
                if img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
                    rgba = img.convert("RGBA")
                    img = Image.merge("RGB", rgba.split()[:3])
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except DataError as exc:  # too large for memory, or a 16-bit file without OpenCV
        raise DataError(f"{path}: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        if problem := unsupported_tiff(data):  # a float RGB TIFF: not "no image format recognised"
            raise DataError(f"{path}: {problem}") from exc
        kind, reason = decode_problem(exc, data)
        raise DataError(f"{path}: {'truncated file: ' if kind == 'truncated' else ''}{reason}") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: empty image")
    arr = apply_orientation(arr, orientation)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), orientation


def to_uint8(x: Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, clamped and rounded to nearest."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    arr = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def png_bytes(tensor: Tensor, icc_profile: bytes | None = None) -> bytes:
    """A [0, 1] image tensor encoded as an 8-bit RGB PNG, `icc_profile` embedded: `write_png`'s bytes."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(to_uint8(tensor), mode="RGB")
    info = PngInfo()
    info.add_text(*WRITTEN_BY)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info, **({"icc_profile": icc_profile} if icc_profile else {}))
    return buf.getvalue()


def write_png(path: str | os.PathLike, tensor: Tensor, icc_profile: bytes | None = None) -> Path:
    """Write a [0, 1] image tensor as an 8-bit RGB PNG, atomically, with `icc_profile` embedded."""
    path = Path(path)
    with atomic_writer(path, "wb") as fh:
        fh.write(png_bytes(tensor, icc_profile))
    return path


def written_by_restore(path: str | os.PathLike) -> bool:
    """Whether an existing file is a PNG that `write_png` wrote: its text chunk, which PIL writes
    before the pixels, says so. Read from the chunks, any size, without decoding the image."""
    import struct

    mark = b"\0".join(s.encode("latin-1") for s in WRITTEN_BY)
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while len(head := fh.read(8)) == 8:
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return False
                body = fh.read(length)
                fh.seek(4, os.SEEK_CUR)  # the chunk's CRC
                if kind == b"tEXt" and body == mark:
                    return True
    except OSError:
        return False
    return False


def rgb_icc_profile(path: str | os.PathLike) -> bytes | None:
    """The RGB colour profile embedded in an image file (a camera's Adobe RGB, a phone's Display
    P3...), or None. The model restores the stored values as they are (its training data carried no
    conversion either), so `restore` embeds the input's profile in the output: a viewer then shows
    the restored photo in the input's colours, not as if its values were sRGB. A grey or CMYK
    profile (ICC header: colour space at bytes 16-20) does not describe the RGB output: None."""
    try:
        with open_image(None, Path(path), load=False) as img:
            icc = img.info.get("icc_profile")
    except Exception:  # noqa: BLE001 - read_image names a file that does not open
        return None
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None


def list_images(root: str | os.PathLike, others: list[Path] | None = None,
                skip: str | os.PathLike | None = None) -> list[Path]:
    """A file, or every image under a directory as the shard builders list them (`walk_images`:
    their extensions in any case, recursive, sorted, hidden files and folders such as .DS_Store
    and macOS's ._<name> skipped). Files in formats no reader decodes (HEIC, GIF, raw) go to
    `others` when given. A folder `skip` inside `root` (restore's --output there) is left out."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() in OTHER_IMAGE_EXTS:  # as in a folder, where it is left out with a note
            raise DataError(f"input {root}: {root.suffix.lower()} images are not read here (see the README's "
                            "Image files); convert it to PNG or JPEG")
        return [root]
    if not root.is_dir():
        raise DataError(f"input {root} does not exist")
    inside: tuple[Path, ...] = ()
    if skip is not None:
        with contextlib.suppress(ValueError):  # not inside root: nothing to leave out
            inside = (root / Path(skip).resolve().relative_to(root.resolve()),)
    return walk_images(root, skip=inside, others=others)


def other_formats_note(files: list[Path], command: str) -> str:
    """One line naming files left out because their format is not read (e.g. an iPhone's HEIC)."""
    kinds = ", ".join(sorted({p.suffix.lower() for p in files}))
    shown = ", ".join(str(p) for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return (f"note: {command} left out {len(files)} file(s) in a format it does not read ({kinds}): {shown}; "
            f"convert them to PNG or JPEG to include them")


# ---------------------------------------------------------------------------------------- memory

# Peak memory of an untiled MPRNet forward pass, per pixel and per feature channel (n_feat), fp32 on
# the CPU (inference mode), measured with ru_maxrss: tiny (n_feat 12) 92-117 bytes at 256-1024 px
# squares and 3000x2000 (6.4 GB), deblur (n_feat 96) 103-128 at 128-256 px. The low end is used:
# an image is only refused when it surely does not fit.
MPRNET_BYTES_PER_PIXEL_PER_FEAT = 90


def untiled_memory(model: nn.Module, h: int, w: int) -> int | None:
    """Bytes an untiled forward pass of `model` needs on an h x w image (a lower estimate), or None
    when the model is not one whose memory is known (only MPRNet's is: another architecture's config
    may well have an `n_feat` too, for another network)."""
    if getattr(model, "arch", None) != "mprnet":
        return None
    cfg = getattr(model, "config", None)
    n_feat = getattr(cfg, "n_feat", None)
    if not isinstance(n_feat, int):
        return None
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    ph, pw = h + (-h) % 8, w + (-w) % 8  # padded to a multiple of 8
    return MPRNET_BYTES_PER_PIXEL_PER_FEAT * n_feat * ph * pw * itemsize // 4


def untiled_shortfall(model: nn.Module, h: int, w: int, batch: int, tile: int | None,
                      free: int | None) -> str | None:
    """Why restoring `batch` h x w images untiled surely does not fit in `free` bytes of CPU memory
    (the kernel would kill the process, with no error to catch), or None. Tiled passes (an image
    larger than `tile`) are not checked."""
    if free is None or (tile is not None and (h > tile or w > tile)):
        return None
    need = untiled_memory(model, h, w)
    if need is None or need * batch <= free:
        return None
    return (f"{batch} image(s) of {w}x{h} need about {need * batch / 2**30:.1f} GiB untiled, "
            f"{free / 2**30:.1f} GiB is free")


def available_memory() -> int | None:
    """Bytes this process may still allocate on the CPU: MemAvailable, capped by a cgroup (container,
    Slurm job) limit; None where that cannot be read (not Linux)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if free is not None and limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


# ---------------------------------------------------------------------------------------- inference


def same_size_batches(items: Iterable[T], key: Callable[[T], Hashable], batch_size: int,
                      max_buffered: int | None = None) -> Iterator[list[T]]:
    """Group `items` into lists of up to `batch_size` items of one `key` (an image's size): a model runs
    a list as one batch. A group goes as soon as it is full; once `max_buffered` items wait
    (default MAX_BUFFERED_BATCHES batches), the fullest group goes. The rest go at the end, in the order
    their first item came. A key of None is never batched: its item goes alone at once."""
    limit = MAX_BUFFERED_BATCHES * batch_size if max_buffered is None else max_buffered
    groups: dict[Hashable, list[T]] = {}
    waiting = 0
    for item in items:
        k = key(item)
        if k is None:
            yield [item]
            continue
        group = groups.setdefault(k, [])
        group.append(item)
        waiting += 1
        if len(group) >= batch_size:
            waiting -= len(group)
            yield groups.pop(k)
        elif waiting >= limit:
            fullest = max(groups, key=lambda g: len(groups[g]))
            waiting -= len(groups[fullest])
            yield groups.pop(fullest)
    yield from groups.values()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    # MPRNet returns [final, stage2, stage1]; plain models return a tensor.
    return out[0] if isinstance(out, (list, tuple)) else out


def _positions(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, lead: bool, trail: bool, device: torch.device) -> Tensor:
    """1-D blending weights of one window.

    On a side shared with a neighbouring window (``lead``/``trail``), the outer quarter of the
    overlap gets weight 0 (that is where the window's own border effects are), then the weight
    rises linearly to 1 at the overlap's end. Facing ramps of two neighbours sum to 1, and every
    pixel keeps a positive total weight. On image borders the weight stays 1.
    """
    w = torch.ones(length, device=device)
    if overlap <= 0:
        return w
    margin = overlap // 4
    dist = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    ramp = ((dist - margin) / (overlap - 2 * margin)).clamp(0.0, 1.0)
    if lead:
        w = torch.minimum(w, ramp)
    if trail:
        w = torch.minimum(w, ramp.flip(0))
    return w


def images_per_pass(batch_size: int, h: int, w: int, device: torch.device | str) -> int:
    """Images (or windows) of h x w px that go through the model together: `batch_size`, on the CPU at
    most CPU_PASS_PIXELS of them (at least one)."""
    if torch.device(device).type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_PASS_PIXELS // max(1, h * w)))


def tiling_problem(tile: int | None, tile_overlap: int) -> str | None:
    """Why ``tile``/``tile_overlap`` cannot cut an image into windows (None: they can), so the
    commands refuse them before loading a model, naming their own flags."""
    if tile is None:
        return None
    if tile < MIN_TILE or not 0 <= tile_overlap < tile:
        return f"the tile must be at least {MIN_TILE} px and larger than the overlap (0 <= overlap < tile)"
    return None


def restore_tensor(
    model: nn.Module,
    x: Tensor,
    input_range: str,
    tile: int | None = None,
    tile_overlap: int = TILE_OVERLAP,
    batch_size: int = 4,
    on_tiles: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Restore images ``x`` (N, 3, H, W) or (3, H, W) in [0, 1]; returns the same shape in [0, 1].

    ``input_range`` is the model's ("minus_one_one" or "zero_one"). With ``tile`` the image is
    processed in overlapping windows (see the module docstring for the tolerance), ``batch_size``
    windows (or images) at a time (on the CPU fewer, up to CPU_PASS_PIXELS a pass). The model is used
    as given (call ``model.eval()`` first); no gradients are kept. ``on_tiles(done, total)`` is called
    after each batch of windows of a tiled image (a 12-Mpixel photo restores for minutes on a CPU:
    restore shows it).
    """
    if input_range not in INPUT_RANGES:
        raise UniremovalError(f"input_range {input_range!r} must be one of {INPUT_RANGES}")
    if batch_size < 1:
        raise UniremovalError(f"batch size must be >= 1, got {batch_size}")
    if problem := tiling_problem(tile, tile_overlap):
        raise UniremovalError(f"tile {tile} / overlap {tile_overlap}: {problem}")
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise UniremovalError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    out_device = x.device
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)

    def run(batch: Tensor) -> Tensor:
        batch = batch.to(device=device, dtype=dtype)
        y = _run(model, unit_to_model_range(batch, input_range)).float()
        return model_range_to_unit(y, input_range).clamp(0, 1)

    results: list[Tensor] = []
    with torch.inference_mode():
        n, _, h, w = x.shape
        if tile is None or (h <= tile and w <= tile):
            step = images_per_pass(batch_size, h, w, device)
            for i in range(0, n, step):
                results.append(run(x[i : i + step]).to(out_device))
        else:
            tiles = images_per_pass(batch_size, min(tile, h), min(tile, w), device)
            for i in range(n):
                # Blend on the model's device: the crops and outputs never leave it.
                tiled = _restore_tiled(run, x[i : i + 1].to(device), tile, tile_overlap, tiles, on_tiles)
                results.append(tiled.to(out_device))
    y = torch.cat(results, 0)
    return y[0] if single else y


def _restore_tiled(run, x: Tensor, tile: int, overlap: int, batch_size: int,
                   on_tiles: Callable[[int, int], None] | None = None) -> Tensor:
    _, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    stride = tile - overlap
    tops, lefts = _positions(h, th, stride), _positions(w, tw, stride)
    boxes = [(t, l) for t in tops for l in lefts]

    def weight(t: int, l: int) -> Tensor:
        wy = _ramp(th, overlap, t > 0, t + th < h, x.device)
        wx = _ramp(tw, overlap, l > 0, l + tw < w, x.device)
        return (wy[:, None] * wx[None, :]).view(1, 1, th, tw)

    acc: Tensor | None = None
    norm = torch.zeros(1, 1, h, w, device=x.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.cat([x[:, :, t : t + th, l : l + tw] for t, l in chunk], 0)
        outs = run(crops).to(x.device)
        if acc is None:
            acc = torch.zeros(1, outs.shape[1], h, w, device=x.device)
        for (t, l), o in zip(chunk, outs):
            wt = weight(t, l)
            acc[:, :, t : t + th, l : l + tw] += o.unsqueeze(0) * wt
            norm[:, :, t : t + th, l : l + tw] += wt
        if on_tiles is not None:
            on_tiles(i + len(chunk), len(boxes))
    assert acc is not None
    return acc / norm
