"""Tiny webdataset shards for the pipeline tests, written directly with webdataset.TarWriter.

Pixels encode their position so crops can be checked after flips and rotations:
input  = (x, y, ident), target = (255 - x, 255 - y, ident), teacher = (x, y, 255 - ident),
feature = the input average-pooled on `cell` x `cell` cells (float16, partial cells dropped).
`ident` is derived from the key, so a wrong pairing (another sample's target) is caught too.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def ident(key: str) -> int:
    return zlib.crc32(key.encode()) % 256


def position_images(key: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w]
    b = np.full((h, w), ident(key))
    inp = np.stack([xs, ys, b], axis=-1).astype(np.uint8)
    tgt = np.stack([255 - xs, 255 - ys, b], axis=-1).astype(np.uint8)
    tea = np.stack([xs, ys, 255 - b], axis=-1).astype(np.uint8)
    return inp, tgt, tea


def pool(img: np.ndarray, cell: int) -> np.ndarray:
    """HWC image -> (C, H//cell, W//cell) cell averages, partial border cells dropped."""
    gh, gw = img.shape[0] // cell, img.shape[1] // cell
    a = img[: gh * cell, : gw * cell].astype(np.float64)
    return a.reshape(gh, cell, gw, cell, -1).mean(axis=(1, 3)).transpose(2, 0, 1)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_dataset(
    root: Path,
    name: str,
    degradation: str,
    n_samples: int,
    n_shards: int,
    sizes: list[tuple[int, int]] | None = None,
    paired: bool = True,
    cache: bool = False,
    cell: int = 16,
    corrupt: tuple[int, ...] = (),
    no_target: tuple[int, ...] = (),
) -> list[str]:
    """Write `root/name/name-%06d.tar` + manifest.json; return the keys (in shard order).

    Samples are dealt round-robin over shards so shard sizes differ by at most one.
    `corrupt`: sample indices whose input bytes are garbage; `no_target`: paired samples
    written without their target.
    """
    import webdataset as wds

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(40, 48)]
    per_shard: list[list[int]] = [list(range(s, n_samples, n_shards)) for s in range(n_shards)]
    entries, keys = [], []
    for s, idxs in enumerate(per_shard):
        fname = f"{name}-{s:06d}.tar"
        with wds.TarWriter(str(out / fname)) as sink:
            for i in idxs:
                key = f"{name}-{i:05d}"
                h, w = sizes[i % len(sizes)]
                inp, tgt, tea = position_images(key, h, w)
                sample = {
                    "__key__": key,
                    "input.png": b"not a png at all" if i in corrupt else png(inp),
                    "json": json.dumps({"degradation": degradation, "domain": "synthetic", "source": name,
                                        "split": "train", "height": h, "width": w}).encode(),
                }
                if paired and i not in no_target:
                    sample["target.png"] = png(tgt)
                if cache:
                    sample["teacher.png"] = png(tea)
                    buf = io.BytesIO()
                    np.save(buf, pool(inp, cell).astype(np.float16))
                    sample["feature.npy"] = buf.getvalue()
                sink.write(sample)
                keys.append(key)
        entries.append({"name": fname, "samples": len(idxs)})
    (out / "manifest.json").write_text(json.dumps({"dataset": name, "shards": entries}))
    return keys


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    out = []
    for r in range(4):
        b = np.rot90(a, r, axes=(0, 1))
        out += [b, np.flip(b, axis=1)]
    return out


def to_uint8(t) -> np.ndarray:
    """CHW float tensor in [-1, 1] -> HWC uint8 (exact for 8-bit sources)."""
    return np.rint((t.numpy().transpose(1, 2, 0) + 1.0) * 127.5).astype(np.int64)


def check_batch(batch: dict, degradations: list[str], cell: int | None = None) -> list[str]:
    """Problems found in a training batch of position-encoded samples (empty list: all good).

    Checks, per sample: the input is a true window of the image up to one of the 8 dihedral
    maps (cell-aligned when a feature grid is present); target, teacher and feature agree with
    the input pixel for pixel after the same flips/rotation; the content belongs to the key;
    the label matches the key's dataset (named after its degradation in these tests).
    """
    problems = []
    for j, key in enumerate(batch["key"]):
        inp = to_uint8(batch["input"][j])
        h, w = inp.shape[:2]
        if not (inp[..., 2] == ident(key)).all():
            problems.append(f"{key}: input content belongs to another sample")
        window = None
        for t in _dihedral(inp):
            rx, gy = t[..., 0], t[..., 1]
            if (rx == rx[0, 0] + np.arange(t.shape[1])[None, :]).all() and (
                gy == gy[0, 0] + np.arange(t.shape[0])[:, None]
            ).all():
                window = (int(gy[0, 0]), int(rx[0, 0]))
                break
        if window is None:
            problems.append(f"{key}: input is not a window of the image under any flip/rotation")
        elif cell and "feature" in batch and (window[0] % cell or window[1] % cell):
            problems.append(f"{key}: window {window} not aligned to cell {cell}")
        if "target" in batch:
            tgt = to_uint8(batch["target"][j])
            if not ((tgt[..., :2] == 255 - inp[..., :2]).all() and (tgt[..., 2] == inp[..., 2]).all()):
                problems.append(f"{key}: target crop disagrees with input crop")
        if "teacher" in batch:
            tea = to_uint8(batch["teacher"][j])
            if not ((tea[..., :2] == inp[..., :2]).all() and (tea[..., 2] == 255 - inp[..., 2]).all()):
                problems.append(f"{key}: teacher crop disagrees with input crop")
        if "feature" in batch:
            feat = batch["feature"][j].numpy()
            if feat.shape != (3, h // cell, w // cell) or not np.allclose(feat, pool(inp, cell), atol=1e-3):
                problems.append(f"{key}: feature grid disagrees with input crop")
        if "degradation" in batch:
            label = degradations[int(batch["degradation"][j])]
            if not key.startswith(label + "-"):
                problems.append(f"{key}: labelled {label}")
    return problems
