"""VGG-19 feature space (phi) for the image-grained contrastive losses.

Frozen, always in eval mode, takes images in [-1, 1] and normalises them to ImageNet statistics
itself. Gradients still flow to the input (the student's output).

Weights: torchvision's ImageNet VGG-19 (``vgg19-dcbb9e9d.pth``), read from a given path or the
torch hub cache. Nothing is downloaded here: when the file is absent a CheckpointError says where
to put it. ``weights="random"`` gives a fixed-seed random network for tests and demos only
(``is_pretrained`` is False); the KT and DA stages tag their runs ``vgg_weights`` from the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from uniremoval.errors import CheckpointError, ConfigError

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
DEFAULT_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# torchvision's VGG-19 "E" configuration: conv widths per block, a max-pool after each block.
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RANDOM_SEED = 0


def _layer_names() -> list[str]:
    """Names of torchvision's `vgg19().features` entries in order: conv1_1, relu1_1, ..., pool5."""
    names: list[str] = []
    for b, block in enumerate(_BLOCKS, start=1):
        for i in range(1, len(block) + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return names


LAYER_NAMES = tuple(_layer_names())


def default_weights_path() -> Path:
    """Where torchvision caches the file: ``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


class VGGFeatures(nn.Module):
    def __init__(
        self,
        layers: tuple[str, ...] | list[str] = DEFAULT_LAYERS,
        weights: str = "imagenet",
        path: str | Path | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        unknown = [name for name in layers if name not in LAYER_NAMES]
        if not layers or unknown:
            raise ConfigError(
                f"VGG-19 layers {list(unknown) or layers} unknown; valid names: {', '.join(LAYER_NAMES)}"
            )
        if weights not in ("imagenet", "random"):
            raise ConfigError(f"VGG weights {weights!r} must be 'imagenet' or 'random' (tests/demos only)")
        self.layers = layers
        self._indices = [LAYER_NAMES.index(name) for name in layers]
        # Only build (and run) the network up to the deepest requested layer.
        depth = max(self._indices) + 1
        modules: list[nn.Module] = []
        cin = 3
        for name in LAYER_NAMES[:depth]:
            if name.startswith("conv"):
                cout = _BLOCKS[int(name[4]) - 1][0]
                modules.append(nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
            elif name.startswith("relu"):
                # Not in-place: a requested conv output must not be overwritten by its ReLU.
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*modules)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if weights == "imagenet":
            self._load_imagenet(Path(path) if path else default_weights_path())
            self.is_pretrained = True
        else:
            self._init_random()
            self.is_pretrained = False
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _init_random(self) -> None:
        # Fixed seed: every rank/process (and the cache vs. the trainer) sees the same phi.
        gen = torch.Generator().manual_seed(_RANDOM_SEED)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                nn.init.zeros_(m.bias)

    def _load_imagenet(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(
                f"VGG-19 ImageNet weights not found at {path}. Put torchvision's file {VGG19_FILE} there "
                f"(downloadable from {VGG19_URL}; default place: $TORCH_HOME/hub/checkpoints/), or give its "
                f"place with features.path=/path/to/{VGG19_FILE}. Only for tests/demos: features.weights=random."
            )
        from uniremoval.models.checkpoint import load_torch_tensors

        # memory-mapped: the 548 MB file's classifier weights are never read into memory
        state = load_torch_tensors(path, what=f"VGG-19 weights file ({VGG19_URL})")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        wanted = {}
        for i, m in enumerate(self.features):
            if isinstance(m, nn.Conv2d):
                for p in ("weight", "bias"):
                    key = f"features.{i}.{p}"
                    if key not in state:
                        raise CheckpointError(f"{path}: not torchvision's VGG-19 file (missing key {key})")
                    if tuple(state[key].shape) != tuple(getattr(m, p).shape):
                        raise CheckpointError(
                            f"{path}: {key} has shape {tuple(state[key].shape)}, VGG-19 needs {tuple(getattr(m, p).shape)}"
                        )
                    wanted[f"{i}.{p}"] = state[key]
        # Copy out of the memory map so the file can be closed/replaced.
        self.features.load_state_dict({k: v.clone() for k, v in wanted.items()}, strict=True)

    def train(self, mode: bool = True) -> VGGFeatures:
        # Frozen feature extractor: stays in eval mode whatever the trainer calls.
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images in [-1, 1], (N, 3, H, W) -> feature maps of the requested layers, in their order."""
        h = ((x + 1) * 0.5 - self.mean) / self.std
        by_index: dict[int, Tensor] = {}
        wanted = set(self._indices)
        last = max(self._indices)
        for i, m in enumerate(self.features):
            h = m(h)
            if i in wanted:
                by_index[i] = h
            if i == last:
                break
        return [by_index[i] for i in self._indices]
