"""The ranks of one `accelerate launch` (torch.distributed, gloo or NCCL): how they end, and the
output-folder lock the main process holds for all of them.

A process group left to interpreter finalization can abort a rank that finished cleanly: gloo's
worker threads are torn down after the interpreter (SIGABRT, "terminate called without an active
exception"), and the launcher then fails the whole job. `leave_process_group_at_exit()` registers
a barrier and `destroy_process_group()` to run at exit while the interpreter is still alive. Call it
only where every rank has finished together (a trainer's fit, a command that succeeded, or an error
all ranks raised): a rank that leaves alone while the others wait in a collective could hang there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any


def _destroy_process_group() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()  # every rank is here: none closes its sockets under another
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass


def leave_process_group_at_exit() -> None:
    """Register the exit-time barrier + destroy once (no-op without an initialised process group)."""
    torch = sys.modules.get("torch")  # never imports torch: `uniremoval --help` stays fast
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)  # once, however many commands ran in this process
        atexit.register(_destroy_process_group)


def lock_on_main_process(accelerator: Any, folder: str | os.PathLike, what: str,
                         prepare: Callable[[], None] | None = None) -> contextlib.ExitStack:
    """One job per output folder: the main process takes `folder`/.lock (`io.folder_lock`) and every
    rank learns whether it got it. Refused, every rank raises the holder's message together (so
    cli.main lets the process group go cleanly); else the returned stack holds the lock until closed.
    `prepare` runs on the main process once it holds the lock, before the other ranks go on (e.g.
    clearing what a killed job left in `folder`); a UniremovalError from it is a refusal as well."""
    from uniremoval.errors import UniremovalError
    from uniremoval.io import folder_lock

    stack = contextlib.ExitStack()
    refused = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(folder_lock(folder, ".lock", what))
            if prepare is not None:
                prepare()
        except UniremovalError as exc:
            refused = str(exc)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused is not None:
        stack.close()
        error = UniremovalError(refused)
        error.on_every_rank = True  # type: ignore[attr-defined]  # see cli.main
        raise error
    return stack
