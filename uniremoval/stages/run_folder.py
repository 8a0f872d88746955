"""A training run's folder on disk: checkpoint folders (complete or a killed write's temporaries),
exported weights, resume files read safely, RNG state, and a full disk turned into one error.

    <output_dir>/<name>/
        checkpoints/step-N/   state.pt, config.yaml, <model>.safetensors, rng-rank<R>.pt[, deepspeed/]
        checkpoints/.step-N.tmp   a checkpoint being written (or killed mid-write): never resumed
        last|best.safetensors (+ .json)   the primary model's exports; <model>-last for others
        .lock   held by the job writing the run (uniremoval.io.folder_lock)

The Trainer (trainer.py) decides when to write; this module is how.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from uniremoval.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or torch.save's zip writer failing to write (it
    reports a full disk as a RuntimeError, 'unexpected pos ...' / 'file write failed', no errno)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, RuntimeError) and any(s in str(seen) for s in ("unexpected pos", "file write failed")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


@contextlib.contextmanager
def disk_full_is_an_error(what: str, where: Path, intact: str, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into one CheckpointError that says what to do; `cleanup`
    (a partial temporary folder) is removed first to give its space back. Other errors pass."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise CheckpointError(f"{what}: the disk is full ({free_space(where)} free on {where}). {intact}. "
                              f"Free some space, then rerun the same command with --resume auto") from exc


def export_name(trainable: Sequence[str], name: str, which: str) -> str:
    """`last`/`best` for the stage's primary (first) model, `<model>-last` for any other."""
    return which if name == trainable[0] else f"{name}-{which}"


def load_weights_into(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Strictly load saved weights into an existing model; shared-parameter aliases that
    save_checkpoint dropped (MPRNet's one PReLU) are refilled from their kept key."""
    from uniremoval.models.checkpoint import alias_groups

    state = dict(state)
    for keys in alias_groups(model.state_dict()):
        present = [k for k in keys if k in state]
        for k in keys:
            if present:
                state.setdefault(k, state[present[0]])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not match the model being trained: {str(exc)[:500]}") from None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (step-N folders; hidden .tmp folders are incomplete), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


_CKPT_TMP_RE = re.compile(r"^\.step-\d+\.tmp$")


def keep_file(src: Path, dst: Path) -> None:
    """`dst` as a lasting copy of `src`: a hard link where the file system has them (no space; safe as
    the exports are replaced by rename, never rewritten in place), else a copy written atomically."""
    try:
        os.link(src, dst)
    except OSError:
        from uniremoval.io import atomic_writer

        with open(src, "rb") as fh, atomic_writer(dst) as out:
            shutil.copyfileobj(fh, out)


def remove_stale_temporaries(run_dir: Path, exports: Sequence[str]) -> list[Path]:
    """Remove `checkpoints/.step-N.tmp` folders and the atomic-write temporaries of the exported
    weights `<export>.safetensors|.json` in `run_dir`; anything else is left alone. Only safe while
    no process of this run is writing (the trainer calls it before the first step). Returns what
    was removed."""
    removed: list[Path] = []
    ckpt_root = Path(run_dir) / CHECKPOINT_DIR
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if _CKPT_TMP_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    from uniremoval.io import leftover_temporaries
    from uniremoval.models.checkpoint import META_SUFFIX, WEIGHTS_SUFFIX

    for e in exports:
        for suffix in (WEIGHTS_SUFFIX, META_SUFFIX):
            for p in leftover_temporaries(Path(run_dir) / f"{e}{suffix}"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return sorted(removed)


def rng_state() -> dict[str, Any]:
    # Plain types and tensors only, so the file loads with weights_only=True.
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume_file(path: Path, read: Any) -> Any:
    """One file of a resume checkpoint; a truncated file or a pickle with code is a CheckpointError."""
    import pickle

    try:
        return read(path)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused to load: it holds pickled code or objects other than tensors "
                              f"(read with weights_only=True); resume from another checkpoints/step-* folder "
                              f"(--resume PATH)") from None
    except Exception as exc:  # noqa: BLE001 (torch, zipfile and safetensors each raise their own type)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path}: truncated or corrupt ({first}); resume from another checkpoints/step-* "
                              f"folder (--resume PATH)") from None


