"""The `uniremoval` command line: one entry point, one subcommand group per step of the data flow.

Each group lives in `uniremoval/commands/<group>.py` and exposes `register(subparsers)`, which adds
its parser and sets `func` to a handler `handler(args) -> int`. Handlers import torch and friends
lazily, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from uniremoval import __version__
from uniremoval.errors import UniremovalError
from uniremoval.launch import leave_process_group_at_exit

# Order follows the data flow: shards -> train -> cache -> eval/restore -> report.
GROUPS = ("shards", "train", "cache", "eval", "restore", "report", "demo", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniremoval",
        description="All-in-one real-world image restoration (Uni-Removal): build shards, train "
        "teachers, cache them, distil (kt), adapt (da), evaluate, restore, report.",
    )
    parser.add_argument("--version", action="version", version=f"uniremoval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        importlib.import_module(f"uniremoval.commands.{group}").register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that key=value overrides may sit on both sides of the options
    (`--config c.yaml a=1 --resume auto b=2`): argparse takes one run of a positional list only."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        rc = int(args.func(args) or 0)
        leave_process_group_at_exit()
        return rc
    except UniremovalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "on_every_rank", False):  # an error agreed by every rank (e.g. eval's data)
            leave_process_group_at_exit()
        return 2
    except OSError as exc:  # a file system refusal met mid-way (full disk, read-only, permissions): no traceback
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        print(f"error: {exc.strerror or exc}{': ' + where if where else ''} (what was finished is kept; "
              f"fix the cause and rerun: training continues with --resume auto)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
