"""Networks: MPRNet (teachers and student), the PatchGAN discriminator, the VGG-19 feature space."""

from __future__ import annotations

from typing import Any

from torch import nn

from uniremoval.errors import ConfigError

ARCHS = ("mprnet", "patch_discriminator")
RESTORERS = ("mprnet",)  # image -> image; the discriminator maps an image to patch logits


def build_model(arch: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build a model by name: ``mprnet`` (presets deblur/derain/denoise/tiny) or ``patch_discriminator``."""
    if arch == "mprnet":
        from uniremoval.models.mprnet_arch import PRESETS, MPRNet

        preset = preset or "deblur"
        if preset not in PRESETS:
            raise ConfigError(f"unknown MPRNet preset {preset!r}; choose one of {sorted(PRESETS)}")
        try:
            return MPRNet(preset, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"mprnet options {overrides}: {exc}") from exc
    if arch == "patch_discriminator":
        from uniremoval.models.discriminator_arch import PatchDiscriminator

        try:
            return PatchDiscriminator(**overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"patch_discriminator options {overrides}: {exc}") from exc
    raise ConfigError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
