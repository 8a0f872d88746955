"""Model checkpoints: our safetensors + JSON format, and official MPRNet `.pth` files.

Our format: ``<base>.safetensors`` (weights only; nothing is unpickled on load) and
``<base>.json`` (arch, preset, model options, input range, step, config hash, caller's meta). The
JSON is written after the weights, both atomically, so a JSON on disk means complete weights.

Shared parameters (MPRNet's one PReLU seen under many keys) cannot be stored twice in
safetensors: the file keeps the first key of each alias group, the JSON lists the dropped
aliases, and loading refills them from the model's own alias structure, so the loaded model still
has one shared Parameter.

Official files are read with ``torch.load(weights_only=True)``: pickles that would run code or
build arbitrary objects are refused with a CheckpointError.

Training state for resuming (optimizers, schedulers, RNG) is not stored here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniremoval.errors import CheckpointError, ConfigError
from uniremoval.io import atomic_write_bytes, atomic_write_json, sha256_file
from uniremoval.models.ranges import INPUT_RANGES, MINUS_ONE_ONE, ZERO_ONE

WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
_MAX_LISTED = 12
# torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (protocol >= 2)
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def _base(path: str | Path) -> Path:
    """`run/step_10`, `run/step_10.safetensors` and `run/step_10.json` all name the same checkpoint."""
    path = Path(path)
    if path.suffix in (WEIGHTS_SUFFIX, META_SUFFIX):
        return path.with_suffix("")
    return path


def _with_suffix(base: Path, suffix: str) -> Path:
    return base.parent / (base.name + suffix)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # type: ignore[assignment]
        else:
            return model


def alias_groups(source: nn.Module | dict[str, Tensor]) -> list[list[str]]:
    """State_dict keys that name one shared tensor (e.g. MPRNet's PReLU), in registration order.

    Given a module, found from its structure (one Parameter object reached by several paths), so
    it also works when state_dicts are gathered from sharded (ZeRO-3) models whose storages
    differ. Given a state_dict, found from shared storage (what ``model.state_dict()`` keeps).
    """
    groups: dict[object, list[str]] = {}
    if isinstance(source, nn.Module):
        for name, t in source.named_parameters(remove_duplicate=False):
            groups.setdefault(id(t), []).append(name)
        for name, t in source.named_buffers(remove_duplicate=False):
            groups.setdefault(id(t), []).append(name)
    else:
        for name, t in source.items():
            if t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.device)
            groups.setdefault(ident, []).append(name)
    return [keys for keys in groups.values() if len(keys) > 1]


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write ``<path>.safetensors`` then ``<path>.json``; return the weights path.

    ``meta`` may carry ``step``, ``config_hash``, ``input_range`` (default "minus_one_one": our
    training works on [-1, 1] images) and anything JSON-serialisable. ``state_dict`` replaces
    ``model.state_dict()`` when the weights had to be gathered first (e.g. DeepSpeed ZeRO-3:
    ``accelerator.get_state_dict(model)``); ``model`` then only supplies the architecture.
    """
    from safetensors.torch import save as st_save

    base = _base(path)
    net = unwrap_model(model)
    state = net.state_dict()
    if state_dict is not None:
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if set(state_dict) != set(state):
            diff = sorted(set(state_dict) ^ set(state))
            raise CheckpointError(
                f"save_checkpoint({base}): state_dict keys differ from the model's: {_fmt_list(diff)}"
            )
        state = state_dict
    dropped: dict[str, str] = {}
    for keys in alias_groups(net):
        for dup in keys[1:]:
            dropped[dup] = keys[0]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k not in dropped}

    record: dict[str, Any] = {"input_range": MINUS_ONE_ONE, "step": None, "config_hash": None}
    record.update(meta)
    record["arch"] = getattr(net, "arch", type(net).__name__)
    record["preset"] = getattr(net, "preset", None)
    record["model_kwargs"] = dict(getattr(net, "overrides", {}))
    record["aliases"] = dropped
    if record["input_range"] not in INPUT_RANGES:
        raise CheckpointError(
            f"save_checkpoint({base}): input_range {record['input_range']!r} must be one of {INPUT_RANGES}"
        )
    try:
        json.dumps(record)
    except TypeError as exc:
        raise CheckpointError(f"save_checkpoint({base}): meta is not JSON-serialisable: {exc}") from exc

    weights = _with_suffix(base, WEIGHTS_SUFFIX)
    # One metadata key only: safetensors writes metadata in hash-map order, so several keys would give
    # identical weights different file hashes (and a re-saved teacher would look like another one).
    atomic_write_bytes(weights, st_save(tensors, metadata={"format": "pt"}))
    record["weights_sha256"] = sha256_file(weights)
    atomic_write_json(_with_suffix(base, META_SUFFIX), record)
    return weights


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of the weights file (ours: the .safetensors; official: the .pth) - the model's identity."""
    return sha256_file(resolve_weights(Path(path)))


def recorded_meta(path: str | Path) -> dict[str, Any]:
    """What a checkpoint's JSON records (run id, ablation row...) for the tags of the runs that read it;
    empty for official weights (no JSON) or a file that cannot be read (the stage itself reports that)."""
    try:
        meta = json.loads(resolve_weights(Path(path)).with_suffix(META_SUFFIX).read_text())
    except (CheckpointError, OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def checkpoint_run_id(path: str | Path) -> str | None:
    """The MLflow run that trained a checkpoint (its JSON's `mlflow_run_id`); None when not recorded."""
    run_id = recorded_meta(path).get("mlflow_run_id")
    return str(run_id) if run_id else None


def resolve_weights(path: Path) -> Path:
    """The weights file a checkpoint path names (the file, its .json, or its base name), or the local
    copy of the weights a training run logged to MLflow (runs:/<run id>/weights/last; see
    `tracking.fetch_run_checkpoint`)."""
    from uniremoval.tracking import fetch_run_checkpoint, is_run_artifact

    if is_run_artifact(path):  # the copy an entry point fetched (and checked against the run) first
        return fetch_run_checkpoint(str(path), refresh=False)
    if path.suffix == META_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if path.is_file():
        return path
    # a run folder (outputs/teacher-haze) or a checkpoints/step-* folder, unless the base name also
    # names a weights file beside it (m/ and m.safetensors: the file, as before folders were refused)
    if path.is_dir() and not _with_suffix(path, WEIGHTS_SUFFIX).is_file():
        # last/best first; the exports a run kept when it trained on (last-step<N>) after them
        inside = sorted((p.name for p in path.glob(f"*{WEIGHTS_SUFFIX}")), key=lambda n: ("-step" in n, n))
        raise CheckpointError(f"checkpoint {path} is a folder, not a weights file; give "
                              + (f"one of its weights files: {', '.join(str(path / n) for n in inside[:4])}"
                                 if inside else "a .safetensors (or official .pth) file"))
    if path.suffix == WEIGHTS_SUFFIX:
        raise CheckpointError(f"checkpoint {path} not found")
    candidate = _with_suffix(path, WEIGHTS_SUFFIX)
    if candidate.is_file():
        return candidate
    raise CheckpointError(f"checkpoint {path} not found (nor {candidate.name} beside it)")


def load_checkpoint(
    path: str | Path,
    arch: str | None = None,
    preset: str | None = None,
    map_location: str | torch.device = "cpu",
    preset_key: str | None = None,
    restorer: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes, load it strictly, return ``(model, meta)`` (eval mode).

    Accepts our ``.safetensors`` (with its ``.json``) and official MPRNet ``.pth``/``.pt`` files
    (``{"state_dict": ...}`` or bare, optional ``module.`` prefix). For official files the preset
    is inferred from the shapes unless given, and ``meta["input_range"]`` is "zero_one".
    ``preset_key`` names the config key that gave ``preset`` (default: the ``--preset`` option).
    ``restorer=True`` refuses a model that does not restore images (the DA discriminator).
    ``overrides`` (a config's model.overrides): the architecture options the file must have been saved with.
    """
    from uniremoval.models import build_model, restorers

    weights = resolve_weights(Path(path))
    if weights.suffix == WEIGHTS_SUFFIX:
        state, meta = _read_ours(weights)
        if restorer and meta.get("arch") not in restorers():
            raise CheckpointError(f"{weights}: holds a {meta.get('arch')!r} model, which does not restore images; "
                                  f"give a teacher's or student's weights (e.g. outputs/<run>/last.safetensors)")
        if arch is not None and arch != meta.get("arch"):
            raise CheckpointError(f"{weights}: holds a {meta.get('arch')!r} model, not {arch!r}")
        if preset is not None and preset != meta.get("preset"):
            raise CheckpointError(
                f"{weights}: was saved from preset {meta.get('preset')!r}, not {preset!r}; "
                + (f"set {preset_key}={meta.get('preset')}" if preset_key else "drop --preset or pass the right one")
            )
        try:
            model = build_model(meta["arch"], meta.get("preset"), **meta.get("model_kwargs", {}))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{weights}: its JSON does not describe a buildable model: {exc}") from exc
    else:
        state = _read_official(weights)
        if arch not in (None, "mprnet"):
            key = "model.arch" if preset_key else "--arch"  # a stage's config, or restore's option
            raise CheckpointError(f"{weights}: a .pth is read as an official MPRNet, not a {arch!r} model ({key}); "
                                  f"give the .safetensors of a {arch} run")
        model, meta = _build_for_official(weights, state, preset, preset_key)

    saved_options = dict(meta.get("model_kwargs") or {})
    if overrides is not None and saved_options != dict(overrides):
        raise CheckpointError(f"{weights}: was saved with the architecture options {saved_options}, not "
                              f"model.overrides {dict(overrides)}; set model.overrides to {saved_options or '{}'}")
    _load_strict(model, state, weights, hint=_preset_hint(state),
                 fix=f"check {preset_key}" if preset_key else "check --arch/--preset")
    model.to(map_location)
    model.eval()
    meta["checkpoint"] = str(weights)
    return model, meta


def _check_readable(path: Path) -> None:
    """A file that exists but cannot be opened is said to be so: safetensors reports a refused open as
    "No such file or directory", which the corrupt-file message then called a partial download."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); give the user running this read "
                              "access to it") from exc


def _read_ours(weights: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    _check_readable(weights)
    meta_path = weights.with_suffix(META_SUFFIX)
    if not meta_path.is_file():
        raise CheckpointError(
            f"{weights}: metadata file {meta_path.name} is missing beside it (save_checkpoint writes both; "
            "copy them together)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata: {exc}") from exc
    if not isinstance(meta, dict) or "arch" not in meta:
        raise CheckpointError(f"{meta_path}: checkpoint metadata has no 'arch' field")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
        raise CheckpointError(f"{weights}: truncated or corrupt safetensors file ({exc}); a partial download or copy "
                              "looks like this: fetch the checkpoint again") from exc
    recorded = meta.get("weights_sha256")
    if recorded and recorded != sha256_file(weights):
        raise CheckpointError(
            f"{weights}: the weights do not match {meta_path.name} (sha256 differs): the pair was mixed up "
            "or one of them was overwritten"
        )
    return state, meta


def load_torch_tensors(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on the CPU of a file that should hold tensors; every way it
    can be unusable is a CheckpointError naming the file: not a torch.save file at all (a download
    that saved an HTML error page), pickled code or other objects (refused, never run), truncated or
    corrupt. torch's unpickler raises whatever its parser meets (KeyError, IndexError...) on junk."""
    _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head):  # our weights renamed (.pth, .bin): torch.load cannot read them
        raise CheckpointError(
            f"{path}: is a safetensors file (the weights format uniremoval saves), not a torch.save file; rename it "
            f"{path.with_suffix(WEIGHTS_SUFFIX).name} and put the {META_SUFFIX} saved with it beside it as "
            f"{path.with_suffix(META_SUFFIX).name}")
    if not head.startswith(TORCH_FILE_MAGIC):
        raise CheckpointError(
            f"{path}: not a PyTorch file ({path.stat().st_size} bytes, starting {head!r}; torch.save writes a zip "
            f"archive or a pickle): a failed or partial download looks like this; download the {what} again"
        )
    try:
        # A zip archive can be memory-mapped (large files are then read only where needed); legacy cannot.
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=head.startswith(TORCH_FILE_MAGIC[0]))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled code or objects other than tensors "
            f"(only plain state_dicts are read, with weights_only=True). Detail: {_unpickler_reason(exc)}"
        ) from exc
    except Exception as exc:  # zipfile, torch and its unpickler each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first.split(". ")[0][:200]  # the first sentence; torch's next ones only advise a bug report
        raise CheckpointError(f"{path}: truncated or corrupt {what} ({type(exc).__name__}: {first}); a partial "
                              f"download or copy looks like this: fetch the {what} again") from exc


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file opens with its JSON header's length (8 bytes, little-endian) and that JSON."""
    return len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (its message opens with advice to load unsafely)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    # torch's own lines (load unsafely, read the docs) say nothing of this file: the refused object's does
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(advice)]
    return (lines[0].split(". ")[0] if lines else type(exc).__name__)[:200]


def _read_official(weights: Path) -> dict[str, Tensor]:
    obj = load_torch_tensors(weights)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        beside = [w for w in sorted(weights.parent.glob(f"*{WEIGHTS_SUFFIX}")) if _restores(w)]  # a training state.pt
        fix = (f"; the weights beside it: {', '.join(str(p) for p in beside[:3])}" if beside else "")
        raise CheckpointError(
            f"{weights}: not a state_dict (expected {{'state_dict': {{name: tensor}}}} or {{name: tensor}}){fix}"
        )
    prefix = "module."
    return {(k.removeprefix(prefix)): v for k, v in obj.items()}


def _restores(weights: Path) -> bool:
    """Whether our weights file holds a model that restores images (its .json says; DA's discriminator does not)."""
    from uniremoval.models import restorers

    try:
        return json.loads(weights.with_suffix(META_SUFFIX).read_text()).get("arch") in restorers()
    except (OSError, ValueError, AttributeError):
        return False


def _build_for_official(
    weights: Path, state: dict[str, Tensor], preset: str | None, preset_key: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    from uniremoval.models.mprnet_arch import MPRNet, infer_config, preset_and_overrides

    overrides: dict[str, Any] = {}
    if preset is None:
        cfg = infer_config({k: tuple(v.shape) for k, v in state.items()})
        if cfg is None:
            raise CheckpointError(
                f"{weights}: not an MPRNet state_dict (no 'shallow_feat1.0.weight'/'tail.weight'): a .pth is read as "
                f"an official MPRNet; another architecture's weights load from our .safetensors + .json"
                + (f" (set {preset_key} to list the mismatched keys)" if preset_key else "")
            )
        preset, overrides = preset_and_overrides(cfg)
    try:
        model = MPRNet(preset, **overrides)
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{weights}: {exc}") from exc
    meta = {
        "arch": "mprnet",
        "preset": preset,
        "model_kwargs": overrides,
        "input_range": ZERO_ONE,
        "step": None,
        "config_hash": None,
        "source": "official",
    }
    return model, meta


def _preset_hint(state: dict[str, Tensor]) -> str:
    from uniremoval.models.mprnet_arch import infer_config, preset_and_overrides

    cfg = infer_config({k: tuple(v.shape) for k, v in state.items()})
    if cfg is None:
        return ""
    preset, overrides = preset_and_overrides(cfg)
    return f"the file's shapes look like MPRNet preset {preset!r}" + (
        f" with {overrides}" if overrides else ""
    )


def _fmt_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: Path, hint: str = "",
                 fix: str = "check --arch/--preset") -> None:
    """Strict key/shape check (shared-parameter aliases refilled), then load."""
    expected = model.state_dict()
    state = dict(state)
    for keys in alias_groups(model):
        present = [k for k in keys if k in state]
        if not present:
            continue
        ref = state[present[0]]
        for k in present[1:]:
            if state[k].shape != ref.shape or not torch.equal(state[k], ref):
                raise CheckpointError(
                    f"{source}: keys {present[0]} and {k} must hold one shared parameter but differ"
                )
        for k in keys:
            state.setdefault(k, ref)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source}: does not match {type(model).__name__}({getattr(model, 'preset', '')})"]
        if hint:  # first: the lists of keys below run to kilobytes
            parts.append(hint)
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_list(unexpected)}")
        if mismatched:
            parts.append(f"mismatched shapes ({len(mismatched)}): {_fmt_list(mismatched)}")
        parts.append(f"{fix}, or that the file is the model you meant")
        raise CheckpointError("; ".join(parts))
    bad_dtype = [k for k, v in state.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{source}: wrong tensor types for {_fmt_list(bad_dtype)}")
    model.load_state_dict(state, strict=True)
