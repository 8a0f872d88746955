"""File helpers that never leave a half-written file under a final name.

Every artefact (shard, manifest, checkpoint, cache) is written to a temporary name in the same
directory, flushed and fsynced, then renamed: a crash, a kill -9 or a full disk leaves the previous
version intact.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

TMP_SUFFIX = ".tmp"


def is_stream(path: str | os.PathLike) -> bool:
    """`-` (stdout), or an existing output that is no plain file: /dev/stdout, /dev/null, a FIFO
    (`--json >(jq .)`), a terminal. Such a path is written through, never renamed over (as root a
    rename replaced /dev/stdout itself with a regular file)."""
    if str(path) == "-":
        return True
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or _names_a_descriptor(p)


def _names_a_descriptor(path: Path) -> bool:
    """/dev/stdout, /dev/fd/N, /proc/self/fd/N: a link to an open descriptor, a stream even when
    stdout is redirected to a plain file. A plain file elsewhere under /dev (/dev/shm) is not."""
    name = str(path.absolute())
    for _ in range(8):  # /dev/stdout -> /proc/self/fd/1: a short chain of links
        if re.fullmatch(r"/(dev|proc/[^/]+)/fd/\d+", name):
            return True
        if not os.path.islink(name):
            return False
        name = os.path.normpath(os.path.join(os.path.dirname(name), os.readlink(name)))
    return False


def is_stdout(path: str | os.PathLike | None) -> bool:
    """`-`, or a path naming this process's standard output (/dev/stdout, /dev/fd/1, ...)."""
    if path is None or str(path) == "-":
        return path is not None
    try:
        return is_stream(path) and os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # stdout closed, or no descriptor (captured)
        return False


@contextlib.contextmanager
def _stream_writer(path: str | os.PathLike, mode: str) -> Iterator[IO]:
    sys.stdout.flush()  # what was printed before comes first
    if is_stdout(path):  # through sys.stdout, so that one offset serves both (`> file`)
        yield sys.stdout.buffer if "b" in mode else sys.stdout
        sys.stdout.flush()
        return
    # appended, not truncated: `--json /dev/stdout > log` keeps what was printed before it
    with open(path, mode.replace("w", "a")) as fh:
        yield fh


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    On any exception the temporary file is removed and `path` is untouched. A stream (see
    is_stream) is written to directly.
    """
    if is_stream(path):
        with _stream_writer(path, mode) as fh:
            yield fh
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # (errno None: an OSError of a one-argument message raised inside the block, e.g. Pillow's
        # "image file is truncated"; a filename would turn its text into "[Errno None] None: ...")
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # A write or fsync that fails (a full disk) names no file: the error line would say "No
            # space left on device" and not which output, nor on which disk. Name the file it replaces.
            exc.filename = str(path)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files `atomic_writer` left beside `path` when its process was killed mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = f".{glob.escape(path.name)}.*{TMP_SUFFIX}"
    return sorted(p for p in path.parent.glob(pattern) if p.is_file())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class WriteBehind:
    """Files encoded in `workers` threads while the caller goes on to the next image (PNG's zlib
    releases the GIL: a 720p image takes 175-330 ms to encode, longer than a GPU restores it), and
    written, in the order asked, from the caller's thread (`atomic_write_bytes`).

    `submit(path, encode, *args)`: `encode(*args)` returns the file's bytes. The bytes of finished
    encodes are written at the next `submit`, and every one at `close` (at most `pending` wait,
    each holding its image). An encode's or a write's error is raised in the caller there. The file
    system work stays in the caller's thread, so Ctrl-C or SIGTERM interrupt a write as they did
    (its temporary removed, the file it replaces intact); the encoders are daemon threads that hold
    no file: when a with-block is left by an exception no further file is encoded or written, and the
    encoders are joined after the encode under way (up to 2 s).
    """

    def __init__(self, workers: int = 2, pending: int = 4) -> None:
        import queue
        import threading
        from collections import deque

        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque = deque()  # (path, Future) in the order asked
        self._limit = max(1, pending)
        self._threads = [threading.Thread(target=self._encode, name=f"write-behind-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def _encode(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args, kwargs, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by result()
                future.set_exception(exc)

    def submit(self, path: str | os.PathLike, encode, /, *args, **kwargs) -> None:
        from concurrent.futures import Future

        while self._pending and (self._pending[0][1].done() or len(self._pending) >= self._limit):
            self._write_oldest()
        future: Future = Future()
        self._tasks.put((encode, args, kwargs, future))
        self._pending.append((path, future))

    def _write_oldest(self) -> None:
        path, future = self._pending.popleft()
        atomic_write_bytes(path, future.result())

    def close(self) -> None:
        """Write every file (waiting for its encode); raise the first error."""
        try:
            while self._pending:
                self._write_oldest()
        finally:
            self._stop()

    def _stop(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        for _ in self._threads:
            self._tasks.put(None)
        # Joined (an encode under way finishes first; 2 s at most, Ctrl-C must not hang): an encoder thread
        # that had run torch ops still alive at interpreter exit aborted the process now and then
        # ("terminate called without an active exception", exit 134 after restore had written everything).
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:  # the caller's error is the one to report: nothing more is written
            self._stop()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output(path: str | os.PathLike, option: str, folder: bool, create: bool = False,
                 fix: str = "choose a writable place") -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted
    (or the reverse), or a place whose nearest existing folder is read-only. `option` names the
    flag or key in the message, `fix` says what to do. With `create` (a folder the job makes now
    anyway) the folder is made and a file written in it, which also catches what access() passes:
    a read-only or full mount. Raises UniremovalError."""
    import tempfile

    from uniremoval.errors import UniremovalError

    if not folder and is_stream(path):  # stdout, /dev/null, a FIFO: written through
        if str(path) != "-" and not os.access(path, os.W_OK):
            raise UniremovalError(f"{option} {path} cannot be written (no permission); {fix}")
        return
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        want, have = ("a folder", "a file") if folder else ("a file", "a folder")
        raise UniremovalError(f"{option} {path} is {have}; give {want}")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UniremovalError(f"{option} {path}: {probe} is a file, so no folder can be made there; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UniremovalError(f"{option} {path}: {probe} cannot be written (read-only or no permission); {fix}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise UniremovalError(f"{option} {path} cannot be written ({exc.strerror or exc}); {fix}") from exc


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder`/`name` for the block: a second process that would write
    the same outputs at the same time stops with an error naming the holder, instead of the two
    interleaving. The lock dies with its process (flock), so a killed job never leaves it stuck;
    on a file system without flock the block runs unlocked."""
    import fcntl

    from uniremoval.errors import UniremovalError

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:  # closing it releases the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UniremovalError(f"{Path(folder)} is in use: {holder} is writing {what} there; wait for it to "
                                  f"end, or choose another folder") from None
        except OSError:
            pass  # no flock on this file system (some network mounts): run unlocked
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        yield
