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
