"""Networks: MPRNet (teachers and student), the PatchGAN discriminator, the VGG-19 feature space.

Architectures are registered in ARCH_SPECS by name: what the config checks (`model.arch`, its presets,
the crop multiple) is read from there without importing torch; `build_model` imports the module.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uniremoval.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """One architecture, as the config and the stages need to know it before it is built."""

    module: str  # its *_arch.py module, imported when a model is built
    cls: str  # the nn.Module class there: cls(preset, **overrides), or cls(**overrides) without presets
    presets: tuple[str, ...] = ()  # what model.preset / teachers.preset may name
    default_preset: str | None = None  # model.preset when the config gives none
    size_multiple: int = 1  # a training crop's side (data.crop_size) must be a multiple of this
    restorer: bool = True  # image -> restored images (a student or teacher); False: the discriminator

    def __post_init__(self) -> None:
        # A config that names no preset takes the default: with presets there must be one of them.
        if self.presets and self.default_preset not in self.presets:
            raise ValueError(f"ArchSpec({self.cls}): default_preset {self.default_preset!r} must be one of its "
                             f"presets {self.presets}")
        if not self.presets and self.default_preset is not None:
            raise ValueError(f"ArchSpec({self.cls}): default_preset {self.default_preset!r} without presets")
        if self.size_multiple < 1:
            raise ValueError(f"ArchSpec({self.cls}): size_multiple must be >= 1, got {self.size_multiple}")


ARCH_SPECS: dict[str, ArchSpec] = {
    # size_multiple 8: MPRNet splits its input into quarters and halves (and pads whole images itself)
    "mprnet": ArchSpec("uniremoval.models.mprnet_arch", "MPRNet", ("deblur", "derain", "denoise", "tiny"), "deblur", 8),
    "patch_discriminator": ArchSpec("uniremoval.models.discriminator_arch", "PatchDiscriminator", restorer=False),
}
def restorers() -> tuple[str, ...]:
    """The registered architectures that restore images (read when asked: an entry added at run time counts)."""
    return tuple(name for name, spec in ARCH_SPECS.items() if spec.restorer)


def arch_spec(arch: str) -> ArchSpec:
    spec = ARCH_SPECS.get(arch)
    if spec is None:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {tuple(ARCH_SPECS)} (a new one is registered in "
                          "uniremoval/models/__init__.py's ARCH_SPECS: README, Extending)")
    return spec


def build_model(arch: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered architecture by name (ARCH_SPECS): ``mprnet`` (presets deblur/derain/denoise/
    tiny; default deblur) or ``patch_discriminator`` (no presets)."""
    spec = arch_spec(arch)
    args: tuple[str, ...] = ()
    if spec.presets:
        preset = preset or spec.default_preset
        if preset not in spec.presets:
            raise ConfigError(f"unknown {arch} preset {preset!r}; choose one of {sorted(spec.presets)}")
        args = (preset,)
    elif preset:
        raise ConfigError(f"{arch} has no presets; got preset {preset!r}")
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    try:
        return cls(*args, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{arch} options {overrides}: {exc}") from exc


def build_configured(model_cfg: Any) -> nn.Module:
    """A new model of a config's `model` section: its arch, preset and overrides (an error names the last)."""
    try:
        return build_model(model_cfg.arch, model_cfg.preset, **model_cfg.overrides)
    except ConfigError as exc:
        if not model_cfg.overrides:
            raise
        raise ConfigError(f"model.overrides {model_cfg.overrides}: {exc}") from exc


def checked_outputs(out: Any, x: Any, with_feature: bool = False) -> tuple[Sequence[Any], Any]:
    """A restorer's forward result, checked against what the stages rely on (README: Extending):
    ``forward(x)`` a list of restored images, the final one first, each of the input's shape (the
    teacher loss takes every one); ``forward(x, return_feature=True)`` ``(images, feature)``, the feature
    (N, C, H, W) at the input's full H x W (L_fg and the cache pool it on data.feature_cell cells).
    Shapes only: nothing waits for the device. Returns ``(images, feature)`` (feature None without)."""
    want = "forward(x, return_feature=True) must return (images, feature)" if with_feature else \
        "forward(x) must return a list of restored images, the final one first"
    if with_feature:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ConfigError(f"the model's {want}; it returned {_kind(out)} (README: Extending)")
        images, feature = out
    else:
        images, feature = out, None
    if not isinstance(images, (list, tuple)) or not images:
        raise ConfigError(f"the model's {want}; its images are {_kind(images)} (README: Extending)")
    size = tuple(x.shape)
    for i, image in enumerate(images):
        if tuple(getattr(image, "shape", ())) != size:
            raise ConfigError(f"the model's output {i} has shape {tuple(getattr(image, 'shape', ()))}, not the input's "
                              f"{size}: every output is a full-size restored image (README: Extending)")
    if feature is not None:
        shape = tuple(getattr(feature, "shape", ()))
        if len(shape) != 4 or shape[0] != size[0] or shape[-2:] != size[-2:]:
            raise ConfigError(f"the model's feature has shape {shape}; it must be (N, C, H, W) at the input's full "
                              f"size (N, H, W) = {(size[0], *size[-2:])}, which L_fg and the cache pool on "
                              f"data.feature_cell cells (README: Extending)")
    return images, feature


def _kind(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"a tensor of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
