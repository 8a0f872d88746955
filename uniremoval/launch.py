"""Process-group lifetime under `accelerate launch` (torch.distributed, gloo or NCCL).

A process group left to interpreter finalization can abort a rank that finished cleanly: gloo's
worker threads are torn down after the interpreter (SIGABRT, "terminate called without an active
exception"), and the launcher then fails the whole job. `leave_process_group_at_exit()` registers
a barrier and `destroy_process_group()` to run at exit while the interpreter is still alive. Call it
only where every rank has finished together (a trainer's fit, a command that succeeded, or an error
all ranks raised): a rank that leaves alone while the others wait in a collective could hang there.
"""

from __future__ import annotations

import atexit
import sys


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
