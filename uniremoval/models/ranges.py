"""The value range a restoration network takes and returns, as its checkpoint records it.

Our networks work in [-1, 1] (the paper's scaling of the data); official MPRNet weights in [0, 1].
A checkpoint's JSON names its range (`input_range`); the training pipelines hand out [-1, 1] and
eval/restore read images in [0, 1], so each converts to the model's range and back here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from uniremoval.errors import ConfigError

MINUS_ONE_ONE = "minus_one_one"
ZERO_ONE = "zero_one"
INPUT_RANGES = (MINUS_ONE_ONE, ZERO_ONE)


def recorded_range(meta: dict[str, Any]) -> str:
    """A checkpoint's range: the one its JSON records, ours when it records none."""
    return meta.get("input_range", MINUS_ONE_ONE)


def _check(input_range: str) -> None:
    if input_range not in INPUT_RANGES:
        raise ConfigError(f"unknown input_range {input_range!r}; use {MINUS_ONE_ONE!r} or {ZERO_ONE!r}")


def to_model_range(x: Tensor, input_range: str) -> Tensor:
    """Training tensors in [-1, 1] -> the model's range."""
    _check(input_range)
    return (x + 1.0) * 0.5 if input_range == ZERO_ONE else x


def from_model_range(y: Tensor, input_range: str) -> Tensor:
    """The model's range -> [-1, 1]."""
    _check(input_range)
    return y * 2.0 - 1.0 if input_range == ZERO_ONE else y


def unit_to_model_range(x: Tensor, input_range: str) -> Tensor:
    """Images in [0, 1] (eval, restore) -> the model's range."""
    _check(input_range)
    return x * 2 - 1 if input_range == MINUS_ONE_ONE else x


def model_range_to_unit(y: Tensor, input_range: str) -> Tensor:
    """The model's range -> [0, 1] (not clamped)."""
    _check(input_range)
    return (y + 1) * 0.5 if input_range == MINUS_ONE_ONE else y
