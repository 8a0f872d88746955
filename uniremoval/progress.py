"""Progress of long work: a tqdm bar on a terminal, plain lines in a log.

A batch job's stderr is a file (Slurm's, a `> log 2>&1`). tqdm writes there as on a terminal: a
carriage return and a redraw up to ten times a second, so a day of training left one line of tens of
megabytes that `less` and `grep` choke on. In a log, `progress_bar` writes whole lines instead, as
BasicSR's logger does: one every `every_s` seconds and one at the end, or (`on_postfix`) one each time
the caller sets the postfix, i.e. at the trainer's `train.log_every` steps with that window's losses.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from typing_extensions import Self


def progress_bar(total: int | None, desc: str, unit: str, *, initial: int = 0, disable: bool = False,
                 file: TextIO | None = None, every_s: float | None = 60.0, on_postfix: bool = False,
                 **tqdm_options: Any) -> Any:
    """A tqdm bar when `file` (stderr by default) is a terminal, else `LogLines` (the same calls:
    update, set_postfix, set_postfix_str, close, a with-block)."""
    from tqdm.auto import tqdm

    file = file if file is not None else sys.stderr
    if disable or _is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file, **tqdm_options)
    return LogLines(total, desc, unit, initial=initial, file=file, every_s=every_s, on_postfix=on_postfix)


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LogLines:
    """tqdm's counting calls, written as whole lines: `desc: n/total unit (p%), r unit/s, eta h:mm:ss | postfix`.
    The rate counts from this object's start (a resumed run's earlier steps are not in it)."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, file: TextIO,
                 every_s: float | None = 60.0, on_postfix: bool = False):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = self._start_n = initial
        self.every_s, self.on_postfix = every_s, on_postfix
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._shown_n: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every_s is not None and time.monotonic() - self._last >= self.every_s:
            self.show()

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **more: Any) -> None:
        items = {**(values or {}), **more}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()), refresh)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)
        if self.on_postfix:
            self.show()

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {count}", f"{rate:.3g} {self.unit}/s" if done else f"{_clock(elapsed)} elapsed"]
        if self.total and done and self.n < self.total:
            parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        return ", ".join(parts) + (f" | {self.postfix}" if self.postfix else "")

    def show(self) -> None:
        self._last = time.monotonic()
        self._shown_n = self.n
        print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        """A last line, unless the last one shown was at this count already."""
        if self._closed:
            return
        self._closed = True
        if self._shown_n != self.n and self.n != self._start_n:
            self.show()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
