"""The `uniremoval` command groups (one module each); shared option helpers below."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(least: int, unit: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= `least` (of `unit`), else one usage error naming both."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least} ({unit}), got {text!r}")
        return value

    return parse


def positive_number(unit: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (of `unit`), else one usage error naming it
    (float() takes 'nan' and 'inf', which would fail later with a traceback)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0 ({unit}), got {text!r}")
        return value

    return parse


def degradation_type(text: str) -> str:
    """An argparse type: a degradation type name as configs take it (or 'clear'), else one usage error."""
    from uniremoval.config import degradation_name_problem

    if problem := degradation_name_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def split_name(text: str) -> str:
    """An argparse type: a split name as the samples' json and the manifests' counts record it (and
    eval's --split selects it): letters, digits, '_' and '-', as --name."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a split is letters, digits, '_' and '-' (e.g. train, test, val)")
    return text


def add_overrides(p, text: str = "dotted config overrides, e.g. optim.lr=1e-4 (before or after the options)") -> None:
    """Dotted key=value overrides, positional as in `config show`, or `--set KEY=VALUE` as `eval` spells them."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=text)
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one dotted override (repeatable; the spelling `eval --config` takes), applied after "
                   "the key=value ones")


def overrides(args) -> list[str]:
    """Every override of the command line: the key=value ones, then each --set."""
    return [*args.overrides, *getattr(args, "set_overrides", [])]
