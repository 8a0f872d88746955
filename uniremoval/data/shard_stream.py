"""Shards as streams of raw samples: which tars a dataset is (a folder, its manifest.json, a brace
pattern, URLs), which of them each rank and loader worker reads, and the (key, {field: bytes})
samples of one tar. No decoding here: pipelines.py decodes, crops, mixes and batches.

URLs are opened with webdataset's `gopen`, so local paths, `file:`, `http(s)://` (through curl)
and `pipe:` commands all work. See pipelines.py's docstring for why the split is explicit
(`assign_shards`) rather than webdataset's `split_by_node` / `split_by_worker`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import get_worker_info

from uniremoval.data.manifest import MANIFEST_NAME, is_streamed, split_specs
from uniremoval.errors import DataError

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


# --------------------------------------------------------------------------------------------
# Resolving a dataset to shard URLs
# --------------------------------------------------------------------------------------------


def _other_url_scheme(s: str) -> str | None:
    """The scheme of a URL this reader does not open (s3://, gs://, hdfs://...), else None."""
    scheme, sep, _ = s.partition("://")
    if sep and scheme.isascii() and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme):
        return None if scheme.lower() in ("http", "https", "file") else scheme
    return None


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "file") or s.startswith("pipe:")


def _manifest_entries(manifest: dict, where: str) -> list[str]:
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(
            f"{where}: 'shards' must be a non-empty list; rebuild it with `uniremoval shards build`"
        )
    out = []
    for entry in shards:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            name = entry.get("path") or entry.get("name") or entry.get("file") or entry.get("url")
            if not isinstance(name, str):
                raise DataError(f"{where}: shard entry {entry!r} has no 'path', 'name', 'file' or 'url'")
            out.append(name)
        else:
            raise DataError(f"{where}: shard entry {entry!r} is neither a string nor an object")
    return out


def read_manifest_shards(manifest: str | os.PathLike) -> list[str]:
    """Shard URLs listed by a `manifest.json` (local path or http(s) URL), in manifest order.

    Relative entries are resolved against the manifest's location.
    """
    m = str(manifest)
    if m.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(m, timeout=60) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read manifest {m}: {exc}") from exc
        return [e if _is_url(e) else urllib.parse.urljoin(m, e) for e in _manifest_entries(data, m)]
    path = Path(m)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"manifest {path} does not exist; build the shards first") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    # A listed shard missing on disk is not refused here: the streams skip it as a bad sample, named
    # in a warning and counted (data.bad_samples=skip), or stop on it (fail); see pipelines.py.
    return [
        e if (_is_url(e) or os.path.isabs(e)) else str(path.parent / e) for e in _manifest_entries(data, m)
    ]


def listed_shards(data: Any) -> list[str]:
    """`data.<section>.<i>: <shard>` for every shard each source of a DataConfig lists, a local one
    not on disk marked `(missing)`, a source that cannot be listed by its error: what one rank
    reads, to compare across ranks (`launch.same_on_every_rank`) before a multi-process run starts."""
    out: list[str] = []
    for section in ("train", "val", "clear"):
        for i, src in enumerate(getattr(data, section, None) or []):
            key = f"data.{section}.{i}"
            try:
                urls = resolve_shards(src.shards)
            except DataError as exc:  # kept in the list: a rank raising alone would leave the others waiting
                out.append(f"{key}: cannot be listed ({exc})")
                continue
            local = [u for u in urls if not is_streamed(u)]
            out.extend(f"{key}: {u}{'' if u not in local or os.path.exists(u) else ' (missing)'}" for u in urls)
    return out


def resolve_shards(spec: ShardSpec) -> list[str]:
    """Turn a dataset spec into a list of shard URLs.

    Accepts: a shard directory (its `manifest.json`, else its `*.tar` sorted by name; an unfinished
    build or an array build not yet merged is refused), a
    `manifest.json` path or URL, an http(s) directory URL ending in `/` (its manifest.json), a
    brace pattern (`shards/haze-{000000..000009}.tar`, also inside a `pipe:` command or a URL), a
    glob (`shards/haze/*.tar`), a single tar / URL / `pipe:` command, or a list of any of these (also
    joined with `::`).
    """
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(resolve_shards(s))
        if not out:
            raise DataError("empty shard list")
        return out
    s = str(spec)
    if len(parts := split_specs(s)) > 1:  # several specs in one string (`a::b`), as check_inputs splits them
        return resolve_shards(parts)
    if s.startswith("pipe:"):  # braces expand to one command per shard, as webdataset reads a pipe: URL
        import braceexpand

        return list(braceexpand.braceexpand(s))
    if s.startswith(("http://", "https://")):
        if s.endswith("/"):
            return read_manifest_shards(s + MANIFEST_NAME)
        if s.endswith(".json"):
            return read_manifest_shards(s)
        if "{" in s:
            import braceexpand

            return list(braceexpand.braceexpand(s))
        return [s]
    if s.startswith("file:"):
        s = urllib.request.url2pathname(urllib.parse.urlparse(s).path)
    elif scheme := _other_url_scheme(s):  # taken for a local path, it "did not exist"
        tool = {"s3": f"e.g. 'pipe:aws s3 cp {s} -'", "gs": f"e.g. 'pipe:gcloud storage cat {s}'"}.get(
            scheme.lower(), f"'pipe:<a command that writes {s} to stdout>'")
        raise DataError(f"shard {s}: {scheme}:// URLs are not opened directly (http(s)://, file: and local paths "
                        f"are); stream it through a command that writes the tar to stdout, {tool} (braces expand "
                        f"to one command per shard)")
    if glob.has_magic(s) and not os.path.exists(s):  # a glob (shards/its/*.tar)
        import braceexpand

        found = {part: glob.glob(part) for part in braceexpand.braceexpand(s)}
        if not any(found.values()):
            raise DataError(f"shard pattern {s}: no file matches")
        if empty := [part for part, hits in found.items() if not hits]:
            # each alternative of the braces names a source: one that matches nothing (a typo, a folder
            # not synced yet) would be left out of the run in silence
            raise DataError(f"shard pattern {s}: {len(empty)} of its alternatives match no file, e.g. {empty[0]}")
        return sorted(p for hits in found.values() for p in hits)
    if "{" in s:
        import braceexpand

        out = list(braceexpand.braceexpand(s))
        missing = [p for p in out if not os.path.exists(p)]
        if missing:
            raise DataError(f"shard pattern {s}: {len(missing)} files missing, e.g. {missing[0]}")
        return out
    path = Path(s)
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return read_manifest_shards(path / MANIFEST_NAME)
        if any(path.glob("manifest-job*.json")):  # an array build: its tars may be only some jobs'
            raise DataError(
                f"{path} holds per-job manifests but no manifest.json: when every job has finished, "
                f"run `uniremoval shards merge {path}`"
            )
        if any(path.glob(".build-state-*.json")):  # a build stopped before its manifest: some tars only
            raise DataError(
                f"{path} holds an unfinished build (a .build-state file, no manifest.json): rerun the "
                f"`uniremoval shards build`/`synth` command that wrote it; finished shards are kept"
            )
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            from uniremoval.data.readers import IMAGE_EXTS

            images = next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS), None)
            hint = (f"; it holds images ({images.name}...): pack them into shards first, e.g. `uniremoval shards "
                    f"build --format folder --root {path} --degradation TYPE --out shards/NAME`, and give that "
                    f"folder" if images is not None else "")
            raise DataError(f"{path} holds neither manifest.json nor *.tar shards{hint}")
        return tars
    if path.suffix == ".json":
        return read_manifest_shards(path)
    if not path.exists():
        raise DataError(f"shard {path} does not exist")
    return [str(path)]


# --------------------------------------------------------------------------------------------
# Splitting work over ranks and workers
# --------------------------------------------------------------------------------------------


def assign_shards(n_shards: int, worker: int, n_workers: int) -> list[tuple[int, int, int]]:
    """Work of global worker `worker` out of `n_workers`: a list of (shard index, stride, offset).

    The worker reads shard `index` and keeps samples i with i % stride == offset. With at least
    as many shards as workers every worker gets whole shards (stride 1); otherwise the workers are
    spread over the shards as evenly as possible and the ones sharing a shard interleave its
    samples. Every sample belongs to exactly one worker.
    """
    if n_shards <= 0:
        raise ValueError("no shards")
    if n_shards >= n_workers:
        return [(s, 1, 0) for s in range(worker, n_shards, n_workers)]
    shard = worker % n_shards
    sharing = [w for w in range(n_workers) if w % n_shards == shard]
    return [(shard, len(sharing), sharing.index(worker))]


def worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --------------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------------


def read_position(last_key: str | None) -> str:
    """Where a shard's reading stopped, for messages: after the last key read, or at its start."""
    return f"after key {last_key!r}" if last_key is not None else "before its first sample"


class ShardReadError(Exception):
    """A shard could not be opened or was cut short (after the samples already yielded)."""

    def __init__(self, url: str, last_key: str | None, cause: BaseException):
        super().__init__(f"{url} ({read_position(last_key)}): {type(cause).__name__}: {cause}")
        self.url, self.last_key, self.cause = url, last_key, cause


def _split_name(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the path up to the first dot of the base name.
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar stream (bad checksum, cut short, empty)."""


def _read_exact(stream: Any, n: int) -> bytes:
    """Up to `n` bytes (fewer at the stream's end), read 1 MiB at a time: a corrupt header's size
    field (2**40) reaches the end of the stream, not a MemoryError or OverflowError."""
    chunks, got = [], 0
    while got < n:
        b = stream.read(min(n - got, 1 << 20))
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _skip(stream: Any, n: int) -> bool:
    """Move past `n` bytes of `stream` without keeping them: a seek where the stream can (a file, a
    .tar.gz's decompressor), reads on a pipe. False when the stream ends first."""
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        try:
            start = stream.tell()
            end = stream.seek(n, os.SEEK_CUR)
        except (OverflowError, OSError):  # a corrupt header's size field past any file
            return False
        if end < start + n:  # a decompressor stops at its end
            return False
        try:  # a file's seek passes its end without a word: compare with its size
            size = stream.seek(0, os.SEEK_END)
        except (OSError, ValueError):  # (a decompressor cannot seek from its end: it stopped above)
            return True
        stream.seek(end, os.SEEK_SET)
        return end <= size
    while n > 0:
        got = len(stream.read(min(n, 1 << 20)))
        if not got:
            return False
        n -= got
    return True


def tar_members(stream: Any, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every regular file in a tar stream, in order.

    A small sequential reader instead of `tarfile` in stream mode: tarfile spends most of the
    loader's non-decode time parsing pax headers (webdataset's TarWriter writes one per member).
    Handles ustar prefixes, pax `path`/`size` and GNU long names; checks header checksums; raises
    TarFormatError on an empty stream or one that ends without its end-of-archive blocks.
    `want(name)` False: the member comes as (name, None), its data skipped unread (seeked past in a file).
    """
    pax: dict[str, str] = {}
    long_name: bytes | None = None
    first = True
    while True:
        hdr = _read_exact(stream, 512)
        if len(hdr) < 512:
            raise TarFormatError(
                "empty shard" if first and not hdr else "tar stream cut short (no end-of-archive)"
            )
        first = False
        if hdr.count(0) == 512:
            return  # end-of-archive block
        stored = _octal(hdr[148:156])
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("tar header checksum mismatch (corrupt or not a tar file)")
        kind = hdr[156:157]
        size = int(pax["size"]) if "size" in pax else _octal(hdr[124:136])
        pad = -size % 512
        if kind in (b"0", b"\0", b"7") and want is not None and not want(name := _member_name(hdr, pax, long_name)):
            if not _skip(stream, size + pad):
                raise TarFormatError("tar stream cut short inside a member")
            yield name, None
            pax, long_name = {}, None
            continue
        data = _read_exact(stream, size)
        if len(data) < size or len(_read_exact(stream, pad)) < pad:
            raise TarFormatError("tar stream cut short inside a member")
        if kind == b"x":  # pax extended header for the next member: records "LEN key=value\n"
            pax, pos = {}, 0
            while pos < len(data):
                length = int(data[pos : data.index(b" ", pos)])
                key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
                pax[key.decode()] = value.decode("utf-8")
                pos += length
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0")
            continue
        if kind in (b"0", b"\0", b"7"):
            yield _member_name(hdr, pax, long_name), data
        pax, long_name = {}, None  # directories, links, global headers: skipped


def _member_name(hdr: bytes, pax: dict[str, str], long_name: bytes | None) -> str:
    """A regular member's name: pax `path`, else a GNU long name, else the ustar prefix/name."""
    name = hdr[0:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    if long_name is not None:
        name = long_name
    return pax.get("path") or name.decode("utf-8")


def iter_shard(url: str, keep: Callable[[int], bool | None] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for every complete sample of one shard, in tar order.

    A sample is yielded only once the next key starts or the tar ends cleanly, so a shard cut in
    the middle of a sample never yields that half sample. Errors raise ShardReadError.
    `keep(i)` (i: the sample's index in the shard) picks samples: False skips one unread (a worker
    sharing a shard seeks past the others' samples instead of reading the whole tar), None stops.
    """
    from webdataset import gopen

    key: str | None = None
    last: str | None = None
    files: dict[str, bytes] = {}
    stream = None
    index, member_key, wanted = -1, None, True  # the sample of the member read last, and keep()'s say

    def close_quietly() -> None:
        if stream is not None:
            with contextlib.suppress(Exception):  # already failing or abandoned: report the first error
                stream.close()

    def want(name: str) -> bool:
        nonlocal index, member_key, wanted
        k = _split_name(name)[0]
        if k != member_key:
            member_key, index = k, index + 1
            wanted = keep(index) if keep is not None else True
        return wanted is not None and bool(wanted)

    try:
        stream = gopen(url, "rb")
        if url.endswith((".tar.gz", ".tgz")):
            import gzip

            stream = gzip.GzipFile(fileobj=stream)
        kept = True
        for name, data in tar_members(stream, want if keep is not None else None):
            k, ext = _split_name(name)
            if k != key:
                if key is not None:
                    last = key
                    if kept:
                        yield key, files
                if wanted is None:  # keep() said stop: no sample from here on is wanted
                    close_quietly()
                    return
                key, files, kept = k, {}, data is not None
            if data is not None:
                files[ext] = data
        # The tar ends at its first end-of-archive block; the rest (the second block, the record's
        # padding) is read too: a `pipe:curl` closed before curl wrote it failed with exit 23.
        while stream.read(1 << 16):
            pass
        stream.close()  # a failed pipe or curl (non-zero exit) raises here, before the last sample
    except GeneratorExit:  # the consumer stopped early (end of epoch): not an error
        close_quietly()
        raise
    except (OSError, EOFError, ValueError) as exc:
        close_quietly()
        raise ShardReadError(url, last, exc) from exc
    if key is not None and kept:
        yield key, files


def count_samples(url: str) -> int | None:
    """Samples in a local uncompressed shard, from its tar headers alone (tarfile seeks past the
    data); None for URLs, compressed or unreadable shards."""
    if _is_url(url) or url.endswith((".gz", ".tgz")) or not os.path.isfile(url):
        return None
    try:
        with tarfile.open(url, "r:") as tar:
            keys = [_split_name(m.name)[0] for m in tar if m.isfile()]
    except (OSError, tarfile.TarError):
        return None
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
