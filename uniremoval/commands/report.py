"""`uniremoval report`: not implemented yet (placeholder registered so the group is listed)."""

from __future__ import annotations

from uniremoval.errors import UniremovalError


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="(not yet available)", description="Not yet available.")
    p.set_defaults(func=_not_yet)


def _not_yet(args) -> int:
    raise UniremovalError("'uniremoval report' is not available yet in this version")
