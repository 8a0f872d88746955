"""PatchGAN discriminator (pix2pix/CycleGAN layout) for the domain-adaptation stage.

Each output logit sees one receptive-field patch (70x70 px for the default 3 layers), so the
discriminator judges local texture - rain streaks, haze veils, blur - rather than global content.
Outputs raw scores (no sigmoid): the GAN loss decides how to use them (least squares or BCE with
logits).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

NORMS = ("instance", "batch", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """``n_layers`` stride-2 4x4 convs (width doubling, capped at 8x), one stride-1 conv, a 1-channel head."""

    arch = "patch_discriminator"
    preset = None

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm {norm!r} must be one of {NORMS}")
        if n_layers < 1 or base_channels < 1:
            raise ValueError(
                f"discriminator needs n_layers >= 1 and base_channels >= 1, got {n_layers}, {base_channels}"
            )
        self.overrides = {
            "in_channels": in_channels,
            "base_channels": base_channels,
            "n_layers": n_layers,
            "norm": norm,
            "spectral_norm": spectral_norm,
        }
        # A conv followed by instance/batch norm needs no bias: the norm subtracts the channel mean.
        use_bias = norm == "none"

        def conv(cin: int, cout: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(cin, cout, kernel_size=4, stride=stride, padding=1, bias=bias)
            return _spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = [conv(in_channels, base_channels, 2, True), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                conv(base_channels * prev, base_channels * mult, stride, use_bias),
                _norm(norm, base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(conv(base_channels * mult, 1, 1, True))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) image in [-1, 1] -> (N, 1, h, w) patch logits."""
        return self.model(x)


def min_input_size(n_layers: int) -> int:
    """Smallest square input the discriminator takes: its last normalised map must hold at least
    2x2 values (instance norm over one value fails) and the head's patch grid at least 1x1.

    Each stride-2 4x4 conv (padding 1) maps s to s // 2, the stride-1 ones s to s - 1, so the last
    normalised map is s // 2**n_layers - 1 and the logits one less: s // 2**n_layers >= 3."""
    return 3 * 2**n_layers

