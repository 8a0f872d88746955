"""The `uniremoval` command line: one entry point, one subcommand group per step of the data flow.

Each group lives in `uniremoval/commands/<group>.py` and exposes `register(subparsers)`, which adds
its parser and sets `func` to a handler `handler(args) -> int`. Handlers import torch and friends
lazily, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import threading
import warnings

from uniremoval import __version__
from uniremoval.errors import UniremovalError
from uniremoval.launch import exit_process, leave_process_group_at_exit

# Order follows the data flow: shards -> train -> cache -> eval/restore -> report.
GROUPS = ("shards", "train", "cache", "eval", "restore", "report", "demo", "config")
# Commands that a scheduler's stop signals end where they are, as Ctrl-C does: the exception unwinds,
# so temporary files are removed and an open MLflow run is marked KILLED, not RUNNING forever. SIGTERM
# is the time limit; SIGUSR1 the warning launch/slurm_paper.sh forwards to every process of the step
# (its default action kills silently). `train` too, until its trainer takes the signals over for the
# loop (a checkpoint at the next step's end) and after it: a stop while it sets up (a rank whose peer
# failed at its first batch is stopped by the launcher then) was a silent kill, a run being created
# in MLflow left RUNNING.
SIGTERM_INTERRUPTS = ("train", "cache", "eval", "restore", "report")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Terminated(KeyboardInterrupt):
    """A stop signal raised in the main thread, handled everywhere as an interrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


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


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_python_warning = warnings.formatwarning


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """The command's own warnings as one `warning: ...` line (Python's format adds the file, line number
    and a line of source code); other libraries' keep Python's format, where they come from counts."""
    if os.path.abspath(filename).startswith(_PACKAGE + os.sep):
        return f"warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


def entry() -> None:
    """The `uniremoval` command (and `python -m uniremoval`): main(), then the process's end, which a
    rank of a distributed job takes without interpreter finalization (`launch.exit_process`), an
    error no command handles (its traceback printed, status 1, as Python's own) included."""
    warnings.formatwarning = _warning_line  # the command's process only: main() called from Python keeps Python's
    try:
        rc = main()
    except Exception:  # noqa: BLE001 - shown as Python would, then ended like any other status
        import traceback

        traceback.print_exc()
        rc = 1
    exit_process(rc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    old_handlers = {}
    if args.command in SIGTERM_INTERRUPTS and threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not as a traceback at exit
        leave_process_group_at_exit()
        return rc
    except UniremovalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "on_every_rank", False):  # an error agreed by every rank (e.g. eval's data)
            leave_process_group_at_exit()
        return 2
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():
            return _os_error(exc, args.command)
        # `uniremoval shards inspect DIR --json | head`: the reader has what it wanted. Nothing failed,
        # so no error line; the rest of stdout goes nowhere (else exit's flush fails again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # the status of a tool that SIGPIPE ended, as the shell reports it
    except OSError as exc:
        return _os_error(exc, args.command)
    except RuntimeError as exc:
        if not _lost_peer(exc):
            raise
        rerun = "the same command with --resume auto" if args.command == "train" else "the same command"
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # a DistStoreError may say nothing
        print(f"error: this process lost contact with another process of the job (a node or process died, "
              f"or the network failed): {cause}; its own error, if any, is in its "
              f"node's log. What was finished is kept: rerun {rerun} on every node", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"terminated ({signal.Signals(signum).name})" if signum != signal.SIGINT else "interrupted",
              file=sys.stderr)
        if argv is None and threading.current_thread() is threading.main_thread():
            # The program is stopping: a second Ctrl-C while the interpreter exits ends it at once, instead
            # of a KeyboardInterrupt traceback from an exit handler ("Exception ignored in atexit callback").
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        return 128 + signum
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports POLLERR on its write end),
    as opposed to a socket or file that broke mid-way, which is a real error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform, or stdout has no fd
        return False


# gloo's words for a peer whose process ended (its sockets closed) in the middle of a collective
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
             "remote process exited")  # ...and NCCL's (ncclRemoteError)


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone: a torch.distributed network or
    store error (the rendezvous store raises those), or gloo's or NCCL's words for it. Not a bug
    here, so one line rather than a traceback (which torchrun prints again for the launcher)."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    kinds = tuple(getattr(dist, k) for k in ("DistNetworkError", "DistStoreError")
                  if hasattr(dist, k))
    return isinstance(exc, kinds) or any(m in str(exc) for m in LOST_PEER)


def _os_error(exc: OSError, command: str | None = None) -> int:
    """A file system refusal met mid-way (full disk, read-only, permissions, a missing file): one
    line, no traceback; the --resume hint only where it applies (training)."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    rerun = "rerun: training continues with --resume auto" if command == "train" else "rerun"
    print(f"error: {exc.strerror or exc}{': ' + where if where else ''} (what was finished is kept; "
          f"fix the cause and {rerun})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    entry()
