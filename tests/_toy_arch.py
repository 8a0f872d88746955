"""A small architecture that is not MPRNet, for tests of the README's "Extending" recipe (not a test module).

A plain residual CNN: a head conv, residual blocks at full resolution (the last one's map is the feature),
a tail conv added to the input. One output image; any input size (no padding needed).
"""

from __future__ import annotations

from torch import Tensor, nn

PRESETS = {"small": {"width": 8, "depth": 2}}


class ToyNet(nn.Module):
    arch = "toy"

    def __init__(self, preset: str = "small", **overrides: object) -> None:
        super().__init__()
        self.preset, self.overrides = preset, dict(overrides)
        cfg = {**PRESETS[preset], **overrides}
        width, depth = int(cfg["width"]), int(cfg["depth"])
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(depth))
        self.tail = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: Tensor, return_feature: bool = False):
        feat = self.head(x)
        for block in self.blocks:
            feat = feat + block(feat)
        images = [x + self.tail(feat)]
        return (images, feat) if return_feature else images
