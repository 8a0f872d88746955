"""The ranks of one `accelerate launch` (torch.distributed, gloo or NCCL): how they end, and the
output-folder lock the main process holds for all of them.

A process group left to interpreter finalization can abort a rank that finished cleanly: gloo's
worker threads are torn down after the interpreter (SIGABRT, "terminate called without an active
exception"), and the launcher then fails the whole job. `leave_process_group_at_exit()` registers
a barrier and `destroy_process_group()` to run at exit while the interpreter is still alive: no rank
closes its sockets under another, and the default group is let go (this made the abort rare under DDP).
It does not stop every gloo thread: the groups' threads run until the last reference to a group
goes (DDP's reducer and DeepSpeed's engine, optimizer and parameters hold theirs), and a rare abort
at exit remained (a CPU ZeRO-2 test run; once a plain 2-process DDP KT/DA run under load). So the
`uniremoval` command ends a rank with `exit_process`: the exit handlers run, then `os._exit`, no
finalization. Call `leave_process_group_at_exit`
only where every rank has finished together (a trainer's fit, a command that succeeded, or an error
all ranks raised): a rank that leaves alone while the others wait in a collective could hang there.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


def _destroy_process_group() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()  # every rank is here: none closes its sockets under another
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass


def exit_process(rc: int) -> NoReturn:
    """End this process with status `rc`: `raise SystemExit(rc)`, except in a rank of a distributed job.

    There the exit handlers run now (MLflow's last sends, the barrier + destroy registered by
    `leave_process_group_at_exit`), output is flushed, and the process leaves with `os._exit`,
    without interpreter finalization: the process group's threads that outlive the handler (DDP's
    and DeepSpeed's references keep groups alive) are torn down there, and a rank that finished
    cleanly could abort (SIGABRT, "terminate called without an active exception"), which makes the
    launcher fail the whole job, seen about once in a few hundred CPU launches under load."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise SystemExit(rc)
    import logging

    atexit._run_exitfuncs()  # what a normal exit would run, in the same (last registered first) order
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone (`| head`): nothing left to tell it
            stream.flush()
    os._exit(rc)


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
        except OSError as exc:
            if accelerator.num_processes == 1:
                raise
            # Raised here alone, it would leave the other ranks waiting in the broadcast below.
            refused = f"rank 0 cannot take {what} in {folder} ({exc}); free space or fix the folder, then rerun"
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused is None and accelerator.num_processes > 1:
        try:
            _every_rank_sees(accelerator, folder, what)
        except UniremovalError:
            stack.close()
            raise
    if refused is not None:
        stack.close()
        error = UniremovalError(refused)
        error.on_every_rank = True  # type: ignore[attr-defined]  # see cli.main
        raise error
    return stack


SEE_WAIT_S = 10.0  # how long a rank re-lists an output folder before it says it does not see it
MARKER_PREFIX = ".rank-check-"


def _every_rank_sees(accelerator: Any, folder: str | os.PathLike, what: str) -> None:
    """Refuse, on every rank together, a `folder` (made by the main process) that another rank does
    not see: without a shared file system a node writes its part of each checkpoint, cache shard or
    eval image into a folder of its own disk, and the job fails at its first checkpoint, hours in, or
    loses that node's outputs. The main process writes a marker file (closed, so NFS clients see it);
    each rank looks for it, re-listing the folder for up to SEE_WAIT_S (NFS caches directory entries)
    only when it is not there at once. Two collectives: the marker's name (or rank 0's error) out,
    every rank's view back."""
    import secrets
    import time
    from pathlib import Path

    from accelerate.utils import broadcast_object_list, gather_object

    from uniremoval.errors import UniremovalError

    folder = Path(folder)
    box: list[Any] = [None]
    if accelerator.is_main_process:
        box = [f"{MARKER_PREFIX}{secrets.token_hex(6)}"]
        try:
            (folder / box[0]).write_text(os.uname().nodename)
        except OSError as exc:  # a full disk: said on every rank, else the others wait in the broadcast
            box = [(f"rank 0 cannot write in {folder} ({exc.strerror or exc}); free space there or choose "
                    f"another output folder")]
    broadcast_object_list(box, from_process=0)
    if not box[0].startswith(MARKER_PREFIX):  # rank 0's error instead of the marker's name
        error = UniremovalError(box[0])
        error.on_every_rank = True  # type: ignore[attr-defined]  # see cli.main
        raise error
    marker = folder / box[0]
    deadline = time.monotonic() + SEE_WAIT_S
    seen = marker.exists()
    while not seen and time.monotonic() < deadline:
        time.sleep(0.5)
        with contextlib.suppress(OSError):
            os.listdir(folder)  # revalidates the NFS client's cached listing
        seen = marker.exists()
    views = gather_object([(seen, os.uname().nodename)])
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        rank, host = blind[0]
        others = f" (and {len(blind) - 1} more rank(s))" if len(blind) > 1 else ""
        error = UniremovalError(
            f"rank {rank} on {host}{others} does not see {folder}, where rank 0 on {views[0][1]} writes {what}: "
            f"every rank writes its part of the outputs (checkpoint RNG state, cache shards, eval images) "
            f"there, so every node must see the same output paths; put the output folder on a file system "
            f"every node mounts at the same path")
        error.on_every_rank = True  # type: ignore[attr-defined]  # see cli.main
        raise error


def same_on_every_rank(num_processes: int, value: Any, what: str, fix: str,
                       explain: Callable[[Any, Any], str] | None = None) -> None:
    """Refuse, on every rank together, a `value` (json-able) that differs between the ranks: each
    rank acts on its own copy, so a different file list split by rank index reads some files twice
    and others never, and a different config trains each replica its own way. `what` names it,
    `fix` says what to do, `explain(rank 0's value, the other's)` how they differ. One small
    collective (a digest per rank); the values themselves are gathered only on a mismatch."""
    if num_processes < 2:
        return
    from accelerate.utils import gather_object

    from uniremoval.errors import UniremovalError

    blob = json.dumps(value, sort_keys=True, default=str).encode()
    digests = gather_object([hashlib.sha256(blob).hexdigest()])
    if len(set(digests)) == 1:
        return
    values = gather_object([value])  # every rank saw the mismatch, so every rank joins this one too
    rank = next(r for r, d in enumerate(digests) if d != digests[0])
    how = explain(values[0], values[rank]) if explain is not None else ""
    error = UniremovalError(f"rank {rank} and rank 0 see different {what}{': ' + how if how else ''}; {fix}")
    error.on_every_rank = True  # type: ignore[attr-defined]  # every rank raises here: see cli.main
    raise error


SAME_FILES_FIX = "every process must see the same files (a shared file system, or the same copy on every node)"


def agreed_listing(num_processes: int, make: Callable[[], Any], key: Callable[[Any], list[str]], what: str,
                   fix: str) -> Any:
    """`make()` on every rank (a file listing or a plan of work split by rank index), refused on every
    rank together unless `key(result)` is the same on all (`same_on_every_rank`). An error of `make`
    (a folder missing on one node) stands in that rank's listing and is raised after the comparison:
    a rank that raised alone would leave the others waiting in the collective."""
    from uniremoval.errors import UniremovalError

    try:
        result, error, listing = make(), None, None
    except (UniremovalError, OSError) as exc:  # OSError: a folder this rank may not read
        result, error, listing = None, exc, [f"(cannot be listed: {exc})"]
    same_on_every_rank(num_processes, listing if error is not None else key(result), what, fix, listing_difference)
    if error is not None:
        # the listings agreed, so every rank holds this same error: each leaves the process group cleanly
        error.on_every_rank = True  # type: ignore[union-attr]  # see cli.main
        raise error
    return result


def listing_difference(ours: list[str], theirs: list[str]) -> str:
    """How a rank's file list differs from rank 0's, for `same_on_every_rank`."""
    only0, only_r = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if not only0 and not only_r:
        return f"the same {len(ours)} file(s) in another order"

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") if names else "none"

    return f"{len(ours)} vs {len(theirs)} file(s); only rank 0 sees {few(only0)}; only the other sees {few(only_r)}"


def config_difference(ours: dict, theirs: dict) -> str:
    """The settings in which a rank's resolved config differs from rank 0's, for `same_on_every_rank`."""
    from uniremoval.config import flatten_keys

    a, b = flatten_keys(ours), flatten_keys(theirs)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = [f"{k}={a.get(k)!r} on rank 0, {b.get(k)!r} on the other" for k in keys[:3]]
    return "; ".join(shown) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def same_config_on_every_rank(num_processes: int, cfg: Any) -> None:
    """Refuse a stage config that differs between the ranks (another copy of the file, a per-node
    override): DDP would average the gradients of replicas that each train their own way."""
    from uniremoval.config import config_to_dict

    same_on_every_rank(num_processes, config_to_dict(cfg), "configs", "every process must read the same config "
                       "file and overrides (a shared file system, the same copy on every node, and no per-node "
                       "values in the command line)", config_difference)
