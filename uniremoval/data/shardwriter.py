"""Write webdataset tar shards: deterministic plan, worker processes, resume, array jobs, merge.

How a build stays correct when it is interrupted, rerun or split across machines:

1. The plan is a pure function of the listed items (sorted, keyed) and the shard size: item i goes
   to shard k by cumulative estimated bytes. Every job of an array computes the same plan and
   takes the shards with k % num_jobs == job_index, so shard names never clash and no sample
   lands in two shards.
2. Each shard is written under a temporary name and renamed when complete, then recorded (with
   its sha256 and a fingerprint of its planned items) in a per-job state file.
3. A rerun recomputes the plan and skips a shard only if its record has the same fingerprint and
   the file on disk still has the recorded size and sha256; anything else is rebuilt in full.
   Leftover temporary files are removed. So an interrupted build, resumed, yields byte-identical
   shards (tar headers carry no times or owners).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from uniremoval import __version__
from uniremoval.data.manifest import FORMAT_VERSION, MANIFEST_NAME, image_probe, load_manifest
from uniremoval.data.readers import Issue, Item
from uniremoval.errors import ConfigError, DataError
from uniremoval.io import (
    TMP_SUFFIX,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    folder_lock,
    sha256_file,
)
from uniremoval.progress import progress_bar

COUNT_GROUPS = ("degradation", "domain", "split")


# ---------------------------------------------------------------------------------------------
# turning an item into a sample


class SampleBuilder(Protocol):
    """Makes the tar sample of one item (in a worker process); must be picklable."""

    def fingerprint(self) -> str: ...

    def plan_info(self, item: Item) -> tuple[int, list]:
        """(estimated bytes in the shard, signature of the source files: size, mtime...)."""
        ...

    def build(self, item: Item, cache: dict) -> tuple[dict | None, list[Issue]]: ...


def image_ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jfif", "jpe") else ext  # one member name for JPEG bytes


def _probe(data: bytes, cache: dict, name: str) -> tuple[tuple[tuple[int, int], int] | None, Issue | None]:
    """((stored height, width), EXIF orientation) or an issue; decoded once per file per shard (ITS
    pairs ten hazy images with one clear image)."""
    if name in cache:
        return cache[name]
    try:
        result = (image_probe(data), None)
    except ValueError as exc:
        kind, _, reason = str(exc).partition(": ")
        result = (None, Issue(kind, name, reason))
    cache[name] = result
    return result


@dataclass(frozen=True)
class FileSampleBuilder:
    """Samples from files on disk: the original encoded bytes, checked to decode and to pair."""

    root: str
    dataset: str

    def fingerprint(self) -> str:
        return f"files:{self.dataset}"

    def plan_info(self, item: Item) -> tuple[int, list]:
        size, signature = 2048, []  # 2 kB: tar headers and json
        for rel in (item.input, item.target) if item.target else (item.input,):
            try:
                st = os.stat(os.path.join(self.root, rel))
            except OSError:  # gone since listing: `build` reports it as unreadable
                signature.append(None)
                continue
            size += st.st_size
            signature += [st.st_size, st.st_mtime_ns]
        return size, signature

    def _read(self, rel: str, cache: dict) -> tuple[bytes | None, tuple[tuple[int, int], int] | None, Issue | None]:
        if ("bytes", rel) in cache:
            data = cache[("bytes", rel)]
        else:
            try:
                data = Path(self.root, rel).read_bytes()
            except OSError as exc:
                return None, None, Issue("unreadable", rel, f"cannot read file: {exc}")
            if rel in cache["shared"]:  # a target used by several inputs in this shard
                cache[("bytes", rel)] = data
        probe, issue = _probe(data, cache, rel)
        return data, probe, issue

    def build(self, item: Item, cache: dict) -> tuple[dict | None, list[Issue]]:
        from uniremoval.data.transforms import orientation_mismatch, pair_alignment, upright_size

        data, probe, issue = self._read(item.input, cache)
        if issue:  # named with its partner, as a bad target is: the report shows which pair was lost
            return None, [Issue(issue.kind, issue.path, issue.reason, partner=item.target)]
        hw, turn = probe
        sample = {"__key__": item.key, f"input.{image_ext(item.input)}": data}
        if item.target:
            tdata, tprobe, tissue = self._read(item.target, cache)
            if tissue:
                return None, [Issue(tissue.kind, tissue.path, tissue.reason, partner=item.input)]
            thw, tturn = tprobe
            if tturn != turn:  # a sample's json records one orientation for both of its images
                reason = orientation_mismatch(turn, tturn, pair_alignment(hw, turn, thw, tturn))
                return None, [Issue("orientation_mismatch", item.input, reason, partner=item.target)]
            if thw != hw:
                reason = f"input is {hw[0]}x{hw[1]} (HxW) but target is {thw[0]}x{thw[1]}"
                return None, [Issue("size_mismatch", item.input, reason, partner=item.target)]
            sample[f"target.{image_ext(item.target)}"] = tdata
        hw = upright_size(hw, turn)
        meta = {
            "degradation": item.degradation,
            "domain": item.domain,
            "source": item.source,
            "dataset": self.dataset,
            "split": item.split,
            "height": hw[0],
            "width": hw[1],
            "input_name": item.input,
            "target_name": item.target,
            **item.extra,
        }
        if turn != 1:  # the original bytes are kept; the loaders turn them upright (untagged: no key)
            meta["orientation"] = turn
        sample["json"] = meta
        return sample, []


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class ShardPlan:
    index: int
    name: str
    items: list[Item]
    fingerprint: str = ""


def plan_fingerprint(plans: list[ShardPlan]) -> str:
    """One fingerprint of a whole plan (every job's shards): the jobs of an array build agree on it
    exactly when they listed the same inputs with the same options."""
    return hashlib.sha256("\n".join(p.fingerprint for p in plans).encode()).hexdigest()


def _item_record(item: Item, signature: list) -> list:
    return [
        item.key,
        item.input,
        item.target,
        item.degradation,
        item.domain,
        item.split,
        item.extra,
        signature,
    ]


def plan_shards(
    items: list[Item], builder: SampleBuilder, prefix: str, shard_bytes: int, max_samples: int = 0
) -> list[ShardPlan]:
    """Cut the item list into consecutive shards of about `shard_bytes` (and <= max_samples).

    A shard's fingerprint covers its items and their files' sizes and mtimes, so a resumed build
    rebuilds a shard whose source files changed even when their names did not.
    """
    groups: list[list[tuple[Item, list]]] = []
    current: list[tuple[Item, list]] = []
    size = 0
    for item in items:
        est, signature = builder.plan_info(item)
        full = current and (size + est > shard_bytes or (max_samples and len(current) >= max_samples))
        if full:
            groups.append(current)
            current, size = [], 0
        current.append((item, signature))
        size += est
    if current:
        groups.append(current)
    plans = []
    for index, group in enumerate(groups):
        blob = json.dumps([builder.fingerprint(), [_item_record(i, sig) for i, sig in group]], sort_keys=True)
        plans.append(
            ShardPlan(
                index,
                f"{prefix}-{index:06d}.tar",
                [i for i, _ in group],
                hashlib.sha256(blob.encode()).hexdigest(),
            )
        )
    return plans


# ---------------------------------------------------------------------------------------------
# building samples and writing shards


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """The header of one tar member as every shard writer here writes it (shards and cache shards)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0  # no time, owner or group: the same items give byte-identical shards
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sample_members(sample: dict) -> list[tuple[str, bytes]]:
    key = sample["__key__"]
    members = []
    for ext in sorted(k for k in sample if k not in ("__key__", "json")):
        members.append((f"{key}.{ext}", sample[ext]))
    members.append((f"{key}.json", json.dumps(sample["json"], sort_keys=True).encode()))
    return members


def _counts_of(metas: Iterable[dict]) -> dict:
    counts = {g: Counter() for g in COUNT_GROUPS}
    for meta in metas:
        for g in COUNT_GROUPS:
            counts[g][meta[g]] += 1
    return {g: dict(sorted(c.items())) for g, c in counts.items()}


def _groups(items: list[Item], cap: int = 32) -> list[list[Item]]:
    """Consecutive items that share a target (ITS: ten hazy images per clear one; synth: the
    variants of one clean image) go together so the shared file is read and decoded once."""
    groups: list[list[Item]] = []
    for item in items:
        last = groups[-1] if groups else None
        same = last and len(last) < cap and last[-1].target == item.target
        if same and (item.target is not None or len(last) < 8):
            last.append(item)
        else:
            groups.append([item])
    return groups


def build_group(builder: SampleBuilder, group: list[Item]) -> list[tuple[dict | None, list[Issue]]]:
    """Samples of one group, in order (runs in a worker process or in the main one)."""
    uses = Counter(i.target for i in group if i.target)
    # Decoded sizes per file, and the bytes of a target used by several inputs of the group.
    cache: dict = {"shared": {t for t, n in uses.items() if n > 1}}
    return [builder.build(item, cache) for item in group]


def build_items(builder: SampleBuilder, items: list[Item]) -> Iterator[tuple[dict | None, list[Issue]]]:
    for group in _groups(items):
        yield from build_group(builder, group)


def build_and_write(out_dir: str, plan: ShardPlan, builder: SampleBuilder, strict: bool) -> dict:
    """One whole shard in one worker process."""
    return write_shard(out_dir, plan, build_items(builder, plan.items), strict)


def write_shard(
    out_dir: str, plan: ShardPlan, results: Iterator[tuple[dict | None, list[Issue]]], strict: bool
) -> dict:
    """Write the samples of `plan` (taken from `results`, one per item) to out_dir/<name>;
    return the shard's record, with the issues of its items."""
    path = Path(out_dir) / plan.name
    issues: list[Issue] = []
    metas: list[dict] = []
    with (
        atomic_writer(path, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        for _ in plan.items:
            sample, bad = next(results)
            if sample is None:
                if strict and bad:
                    raise DataError(f"{bad[0].message()} (--strict stops at the first bad input)")
                issues += bad
                continue
            for name, data in sample_members(sample):
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
            metas.append(sample["json"])
    record = {
        "name": plan.name,
        "index": plan.index,
        "samples": len(metas),
        "plan_sha256": plan.fingerprint,
        "counts": _counts_of(metas),
        "issues": [{**i.to_dict(), "shard": plan.name} for i in issues],
    }
    if not metas:  # every item was bad: no file, but remember the shard is done
        path.unlink()
        record.update(bytes=0, sha256="")
    else:
        os.chmod(path, 0o644)  # mkstemp creates 0600; shards are read by other users and nodes
        st = path.stat()
        # mtime_ns: a rerun trusts a shard of the recorded size and time without re-hashing it
        record.update(bytes=st.st_size, sha256=sha256_file(path), mtime_ns=st.st_mtime_ns)
    return record


# ---------------------------------------------------------------------------------------------
# jobs, state, manifests


def job_tag(job_index: int, num_jobs: int) -> str:
    return f"job{job_index:03d}of{num_jobs:03d}"


def manifest_name(job_index: int, num_jobs: int) -> str:
    return MANIFEST_NAME if num_jobs == 1 else f"manifest-{job_tag(job_index, num_jobs)}.json"


def report_name(job_index: int, num_jobs: int) -> str:
    return "report.jsonl" if num_jobs == 1 else f"report-{job_tag(job_index, num_jobs)}.jsonl"


def _state_path(out_dir: Path, job_index: int, num_jobs: int) -> Path:
    return out_dir / f".build-state-{job_tag(job_index, num_jobs)}.json"


def _known_records(out_dir: Path, job_index: int, num_jobs: int) -> dict[str, dict]:
    """Shard records from this job's state file, else from a finished manifest (and its report)."""
    state = _state_path(out_dir, job_index, num_jobs)
    if state.is_file():
        try:
            return json.loads(state.read_text())["shards"]
        except (ValueError, KeyError, OSError):
            return {}  # unreadable state: rebuild everything, which is always safe
    records: dict[str, dict] = {}
    for mname in (manifest_name(job_index, num_jobs), MANIFEST_NAME):
        if not (out_dir / mname).is_file():
            continue
        try:
            manifest = load_manifest(out_dir / mname)
        except DataError:
            continue
        report = out_dir / manifest.get("report", "report.jsonl")
        issues = _read_report(report) if report.is_file() else []
        for entry in manifest["shards"] + manifest.get("empty_shards", []):
            if "plan_sha256" in entry:
                mine = [i for i in issues if i.get("shard") == entry["name"]]
                records[entry["name"]] = {**entry, "issues": mine}
        break
    return records


def _read_report(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _is_complete(out_dir: Path, plan: ShardPlan, record: dict | None) -> bool:
    if not record or record.get("plan_sha256") != plan.fingerprint:
        return False
    if record["samples"] == 0:
        return True
    path = out_dir / plan.name
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != record["bytes"]:
        return False
    # Untouched since it was written (same size and modification time): trusted as `cache` trusts its
    # shards, without re-reading tens of GB on every rerun; `shards verify` re-hashes everything.
    if record.get("mtime_ns") == st.st_mtime_ns:
        return True
    return sha256_file(path) == record["sha256"]


def _touched_now(out_dir: Path, record: dict) -> dict:
    """A complete shard's record with its file's modification time now: once re-hashed after a touch
    (or recorded by an older version without one), the next rerun trusts it again."""
    if not record["samples"]:
        return record
    return {**record, "mtime_ns": (out_dir / record["name"]).stat().st_mtime_ns}


def _remove_temp_files(out_dir: Path, names: set[str]) -> int:
    """Temporary files of this job's `names` left by a killed build (other jobs' are not touched)."""
    removed = 0
    pattern = re.compile(r"^\.(.+?)\.[^.]+" + re.escape(TMP_SUFFIX) + "$")
    for path in out_dir.glob(f".*{TMP_SUFFIX}"):
        m = pattern.match(path.name)
        if m and m.group(1) in names:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _sum_counts(records: Iterable[dict]) -> dict:
    totals = {g: Counter() for g in COUNT_GROUPS}
    total = 0
    for r in records:
        total += r["samples"]
        for g in COUNT_GROUPS:
            totals[g].update(r["counts"][g])
    return {"total": total, **{g: dict(sorted(c.items())) for g, c in totals.items()}}


def _issue_counts(issues: list[dict]) -> dict:
    counts = Counter(i["kind"] for i in issues)
    return {"total": len(issues), **dict(sorted(counts.items()))}


def _manifest_entry(record: dict) -> dict:
    keys = ("name", "samples", "bytes", "sha256", "plan_sha256", "counts")
    return {k: record[k] for k in keys}


@dataclass
class BuildSummary:
    out_dir: Path
    manifest: Path
    report: Path
    shards_built: int
    shards_skipped: int
    samples: int
    bytes: int
    seconds: float
    issues: dict
    counts: dict
    temp_removed: int = 0
    stale_removed: list[str] = field(default_factory=list)

    def text(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        mbps = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        lines = [
            (
                f"{self.out_dir}: {self.shards_built} shard(s) written, {self.shards_skipped} already complete; "
                f"{self.samples} samples, {self.bytes / 1e6:.1f} MB written in {self.seconds:.1f} s "
                f"({rate:.1f} samples/s, {mbps:.1f} MB/s)"
            ),
            "counts: "
            + "; ".join(
                f"{g} " + ", ".join(f"{k} {v}" for k, v in self.counts[g].items()) for g in COUNT_GROUPS
            )
            + f"; total {self.counts['total']}",
        ]
        if self.issues["total"]:
            details = ", ".join(f"{k} {v}" for k, v in self.issues.items() if k != "total")
            lines.append(f"skipped inputs: {self.issues['total']} ({details}); listed in {self.report}")
        else:
            lines.append("skipped inputs: none")
        if self.temp_removed:
            lines.append(f"removed {self.temp_removed} temporary file(s) of an interrupted build")
        if self.stale_removed:
            lines.append(f"removed {len(self.stale_removed)} shard(s) beyond the current plan")
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start in milliseconds with the modules already imported (spawn
    re-imports everything per worker: seconds on a busy machine, measured by bench/shards.py).
    The parent holds no locks the workers need (like torch's DataLoader, which forks too)."""
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the process that started it is gone. Pool workers
    otherwise outlive a main process that was killed (`kill PID`, SIGKILL, the OOM killer): they
    wait on their task queue forever, and forked ones keep the shard folder's lock (the flock is
    shared with them), so every rerun is refused as "in use" by a process that no longer exists."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_pool(workers: int):
    """The process pool of `shards build`/`synth` and `verify`: `pool_context`, workers that end with
    this process."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_exit_with_parent,
                               initargs=(os.getpid(),))


def worker_died(command: str, then: str) -> DataError:
    """The error for a pool whose worker was killed (BrokenProcessPool): most often the kernel's
    out-of-memory killer, on large images with many --workers."""
    return DataError(f"a worker process of `{command}` ended abruptly (killed: out of memory? `dmesg` tells); "
                     f"{then}, with fewer --workers if memory ran out")


def _ordered_results(pool, builder: SampleBuilder, plans: list[ShardPlan], window: int) -> Iterator:
    """Sample results of all `plans`, in order, built group by group in the pool with at most
    `window` groups in flight (so memory stays bounded when the writer is the slower side)."""
    from collections import deque

    groups = (g for plan in plans for g in _groups(plan.items))
    in_flight: deque = deque()
    for group in groups:
        in_flight.append(pool.submit(build_group, builder, group))
        if len(in_flight) >= window:
            yield from in_flight.popleft().result()
    while in_flight:
        yield from in_flight.popleft().result()


def _ticking(results: Iterator, tick) -> Iterator:
    for result in results:
        tick()  # before the yield: write_shard takes no result past a shard's last one
        yield result


def _iter_records(
    pending: list[ShardPlan], out_dir: Path, builder: SampleBuilder, strict: bool, workers: int,
    tick=lambda: None,
):
    """Yield shard records as shards complete.

    One worker: everything in this process. At least as many shards as workers: each worker builds
    and writes whole shards (no image bytes cross processes). Fewer shards (small datasets, synth
    on a few clean images): workers build groups of samples, this process writes the shards.
    Either way the bytes are identical. Where this process writes, `tick()` is called per sample
    taken, so progress moves within a shard (a 256 MB shard may be a whole test set).
    """
    if workers <= 1 or not pending:
        for plan in pending:
            yield write_shard(str(out_dir), plan, _ticking(build_items(builder, plan.items), tick), strict)
        return
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pool = worker_pool(workers)
    try:
        if len(pending) < workers:
            results = _ticking(_ordered_results(pool, builder, pending, 4 * workers), tick)
            for plan in pending:
                yield write_shard(str(out_dir), plan, results, strict)
            return
        todo = list(pending)
        running = set()
        while todo or running:
            while todo and len(running) < 2 * workers:  # bounded queue: don't pickle all plans at once
                running.add(pool.submit(build_and_write, str(out_dir), todo.pop(0), builder, strict))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    except BrokenProcessPool as exc:
        raise worker_died("shards build", "the shards finished so far are kept: rerun the same command to go on") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _removed_if_nothing_built(out: Path, created: bool, lock_name: str, state_path: Path) -> Iterator[None]:
    """Entered holding the job's lock: if the block fails and `out` is new (`created`: it was not
    there before this build's lock) and holds only the lock and a state file recording no shard,
    remove it: a failed build (--strict, Ctrl-C in the first shard) leaves no empty --out behind.
    Anything else written (a shard, a report) stays; a build refused by the lock removes nothing."""
    try:
        yield
    except BaseException:
        if created:
            try:
                names = {p.name for p in out.iterdir()}
                if names <= {lock_name, state_path.name} and not (
                        state_path.is_file() and json.loads(state_path.read_text()).get("shards")):
                    for name in names:
                        (out / name).unlink()
                    out.rmdir()
            except (OSError, ValueError):  # best effort: a leftover folder is harmless
                pass
        raise


def build_shards(
    items: list[Item],
    planning_issues: list[Issue],
    builder: SampleBuilder,
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    source: dict,
    shard_bytes: int,
    max_samples: int = 0,
    workers: int = 1,
    strict: bool = False,
    num_jobs: int = 1,
    job_index: int = 0,
    command: list[str] | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Plan, (re)build this job's shards, and write its manifest and report."""
    if num_jobs < 1:
        raise ConfigError(f"--num-jobs must be >= 1 (got {num_jobs})")
    if not 0 <= job_index < num_jobs:
        raise ConfigError(f"--job-index {job_index} must be in 0..{num_jobs - 1} (--num-jobs {num_jobs})")
    if max_samples < 0:
        raise ConfigError(f"--max-samples-per-shard must be >= 0, 0 for no cap (got {max_samples})")
    if shard_bytes <= 0:
        raise ConfigError(f"--shard-size-mb must be positive (got {shard_bytes / 1e6:g})")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset):
        raise ConfigError(f"dataset name {dataset!r}: use letters, digits, '_' and '-' only (--name)")
    if strict and planning_issues:
        raise DataError(f"{planning_issues[0].message()} (--strict stops at the first bad input)")
    out = Path(out_dir)
    lock_name = f".lock-job{job_index}of{num_jobs}"
    state_path = _state_path(out, job_index, num_jobs)
    # a second process on the same job's outputs (another command, or the same one twice) stops here
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, lock_name, f"shards (job {job_index})"), \
            _removed_if_nothing_built(out, created, lock_name, state_path):
        if not items:
            built = [n for n in (manifest_name(job_index, num_jobs), MANIFEST_NAME) if (out / n).is_file()]
            if built:  # a finished build's report stays with its shards (a root whose clean folders are gone)
                first = f" (first: {planning_issues[0].message()})" if planning_issues else ""
                raise DataError(f"no usable samples: all {len(planning_issues)} input(s) were rejected while "
                                f"listing{first}; {out} was left as its last build made it")
            report = out / report_name(job_index, num_jobs)
            atomic_write_text(
                report, "".join(json.dumps(i.to_dict(), sort_keys=True) + "\n" for i in planning_issues)
            )
            raise DataError(f"no usable samples: all {len(planning_issues)} input(s) were rejected; see {report}")
        start = time.perf_counter()

        plans = plan_shards(items, builder, dataset, shard_bytes, max_samples)
        mine = [p for p in plans if p.index % num_jobs == job_index]
        # this job's own outputs besides its shards (manifest, report, state): a kill while one was written
        # leaves its temporary too, which no later write reuses
        temp_removed = _remove_temp_files(out, {p.name for p in mine} | {
            manifest_name(job_index, num_jobs), report_name(job_index, num_jobs), state_path.name})
        known = _known_records(out, job_index, num_jobs)
        records: dict[str, dict] = {}
        pending = []
        # A finished shard touched since its record (or recorded by an older version) is re-hashed: shown.
        with progress_bar(len(mine), f"check finished shards of {dataset}", "shard",
                          disable=not progress or not known) as checking:
            for plan in mine:
                if _is_complete(out, plan, known.get(plan.name)):
                    records[plan.name] = _touched_now(out, known[plan.name])
                else:
                    pending.append(plan)
                checking.update(1)

        last_save = [0.0]

        def save_state(force: bool = False) -> None:
            # Throttled: a record lost to a kill only costs rebuilding that (identical) shard.
            if force or time.monotonic() - last_save[0] > 2.0:
                atomic_write_json(state_path, {"dataset": dataset, "shards": records})
                last_save[0] = time.monotonic()

        if pending or any(r.get("mtime_ns") != known[n].get("mtime_ns") for n, r in records.items()):
            save_state(force=True)  # (re-hashed shards: their new times, trusted by the next rerun)
        if pending:
            # The manifests on disk describe the shards about to be replaced: a stream reading them
            # mid-build would mix old and new. The state file keeps the finished shards' records.
            for name in {manifest_name(job_index, num_jobs), MANIFEST_NAME}:
                (out / name).unlink(missing_ok=True)

        sizes = {p.name: len(p.items) for p in mine}
        bar = progress_bar(
            sum(len(p.items) for p in mine),
            f"shards {dataset}",
            "img",
            initial=sum(len(p.items) for p in mine if p.name in records),
            disable=not progress,
        )
        written_bytes = written_samples = 0
        ticked = [0]  # samples of the shard being written that the bar already shows

        def tick() -> None:
            ticked[0] += 1
            bar.update(1)

        try:
            for record in _iter_records(pending, out, builder, strict, workers, tick):
                records[record["name"]] = record
                save_state()
                written_bytes += record["bytes"]
                written_samples += record["samples"]
                bar.update(sizes[record["name"]] - ticked[0])
                ticked[0] = 0
        finally:
            bar.close()
            if pending:
                save_state(force=True)

        # Shards numbered past the current plan belong to an older, larger plan: no job owns them now.
        stale = []
        for path in out.glob(f"{dataset}-*.tar"):
            m = re.fullmatch(re.escape(dataset) + r"-(\d{6})\.tar", path.name)
            if m and int(m.group(1)) >= len(plans):
                path.unlink()
                stale.append(path.name)

        ordered = [records[p.name] for p in mine]
        sample_issues = [i for r in ordered for i in r["issues"]]
        # Listing problems are found identically by every job: job 0 alone reports them.
        listing = [i.to_dict() for i in planning_issues] if job_index == 0 else []
        all_issues = listing + sample_issues
        report = out / report_name(job_index, num_jobs)
        atomic_write_text(report, "".join(json.dumps(i, sort_keys=True) + "\n" for i in all_issues))
        counts = _sum_counts(ordered)
        if num_jobs == 1 and counts["total"] == 0:  # one job of several may hold only bad inputs
            raise DataError(f"no usable samples: all {len(items)} input(s) failed to decode or pair "
                            f"({len(all_issues)} reported); see {report}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "created_by": {"command": command or list(sys.argv), "version": __version__},
            "source": source,
            "shards": [_manifest_entry(r) for r in ordered if r["samples"] > 0],
            "empty_shards": [_manifest_entry(r) for r in ordered if r["samples"] == 0],
            "counts": counts,
            "issues": _issue_counts(all_issues),
            "report": report.name,
            "plan": {"num_shards": len(plans), "num_jobs": num_jobs, "job_indices": [job_index],
                     "sha256": plan_fingerprint(plans)},
            "complete": True,
        }
        mpath = out / manifest_name(job_index, num_jobs)
        atomic_write_json(mpath, manifest)
        for path in (mpath, report):
            os.chmod(path, 0o644)
        return BuildSummary(
            out_dir=out,
            manifest=mpath,
            report=report,
            shards_built=len(pending),
            shards_skipped=len(mine) - len(pending),
            samples=written_samples,
            bytes=written_bytes,
            seconds=time.perf_counter() - start,
            issues=manifest["issues"],
            counts=counts,
            temp_removed=temp_removed,
            stale_removed=stale,
        )


def merge_job_manifests(out_dir: str | os.PathLike, command: list[str] | None = None) -> dict:
    """Combine `manifest-jobIIIofNNN.json` (and their reports) into manifest.json + report.jsonl."""
    out = Path(out_dir)
    if not out.is_dir():
        what = "does not exist" if not out.exists() else "is a file, not a folder"
        raise DataError(f"{out} {what}; `shards merge` takes the shard folder that holds the per-job "
                        f"manifests (manifest-jobIIIofNNN.json) of an array build")
    files = sorted(out.glob("manifest-job*of*.json"))
    if not files:
        raise DataError(f"no per-job manifests (manifest-jobIIIofNNN.json) in {out}; nothing to merge")
    parts = [load_manifest(f, fix=_rerun_job(f) + " to rewrite it, then merge again") for f in files]
    for f, p in zip(files, parts):
        plan = p.get("plan")
        if not (isinstance(plan, dict) and isinstance(plan.get("num_jobs"), int)
                and isinstance(plan.get("num_shards"), int) and isinstance(plan.get("job_indices"), list)):
            raise DataError(f"per-job manifest {f} lacks its plan (num_jobs, num_shards, job_indices); "
                            f"{_rerun_job(f)} to rewrite it, then merge again")
    totals = {p["plan"]["num_jobs"] for p in parts}
    datasets = {p["dataset"] for p in parts}
    plans = {p["plan"]["num_shards"] for p in parts}
    if len(totals) != 1 or len(datasets) != 1 or len(plans) != 1:
        raise DataError(
            f"per-job manifests in {out} come from different builds (num_jobs {sorted(totals)}, "
            f"datasets {sorted(datasets)}, planned shards {sorted(plans)}); remove the stale ones"
        )
    # A job run by an older uniremoval records less (no listing sha256, fewer source fields): its
    # manifest differs from the others' by what it lacks, not by the options or files it was built from.
    fields = set().union(*(set(p.get("source") or {}) for p in parts))
    lacking = {f.name: ([] if "sha256" in p["plan"] else ["plan.sha256"])
               + [f"source.{k}" for k in sorted(fields - set(p.get("source") or {}))] for f, p in zip(files, parts)}
    older = [f for f in files if lacking[f.name]]
    if older and len(older) < len(files):
        fix = _rerun_job(*older)
        raise DataError(
            f"per-job manifests in {out} were written by different uniremoval versions: "
            + "; ".join(f"{f.name} lacks {', '.join(lacking[f.name])}" for f in older)
            + f" (an older version's); nothing was merged. {fix[:1].upper()}{fix[1:]} with this version, "
            f"then merge again")
    # Every job plans all shards from the same listing: a job run with other options (--root,
    # --degradation, ...) or after the input folder changed planned another dataset.
    for what, of in (("options", lambda p: json.dumps(p.get("source"), sort_keys=True)),
                     ("input files", lambda p: p["plan"].get("sha256"))):
        groups: dict[str, list[str]] = {}
        for f, p in zip(files, parts):
            groups.setdefault(of(p), []).append(f.name)
        if len(groups) > 1:
            listed = "; ".join(", ".join(names) for names in groups.values())
            raise DataError(
                f"per-job manifests in {out} were built with different {what} (groups: {listed}); nothing "
                f"was merged. Rerun every job with the same command (finished shards that still match are "
                f"kept), then merge again"
            )
    num_jobs = totals.pop()
    have = sorted(i for p in parts for i in p["plan"]["job_indices"])
    missing = sorted(set(range(num_jobs)) - set(have))
    if missing:
        raise DataError(
            f"{out}: jobs {missing} of {num_jobs} have no manifest yet; run them "
            f"(--num-jobs {num_jobs} --job-index I) before merging"
        )
    if len(have) != len(set(have)):
        raise DataError(f"{out}: a job index appears in two per-job manifests; remove the stale one")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
    names = [s["name"] for s in shards]
    if len(names) != len(set(names)):
        raise DataError(
            f"{out}: a shard is listed by two jobs; remove the stale per-job manifests and rebuild"
        )
    _check_job_shards(out, files, parts)
    issues = []
    for p in parts:
        report = out / p.get("report", "")
        if p.get("report") and report.is_file():
            issues += _read_report(report)
    if sum(p["counts"]["total"] for p in parts) == 0:
        raise DataError(f"{out}: no job wrote a usable sample (see its report-job*.jsonl); nothing was merged")
    atomic_write_text(out / "report.jsonl", "".join(json.dumps(i, sort_keys=True) + "\n" for i in issues))
    merged = {
        **parts[0],
        "created_by": {
            "command": command or list(sys.argv),
            "version": __version__,
            "jobs": [p.get("created_by", {}) for p in parts],
        },
        "shards": shards,
        "empty_shards": sorted(
            (s for p in parts for s in p.get("empty_shards", [])), key=lambda s: s["name"]
        ),
        "counts": _sum_counts(shards),
        "issues": _issue_counts(issues),
        "report": "report.jsonl",
        "plan": {**parts[0]["plan"], "job_indices": list(range(num_jobs))},
        "complete": True,
    }
    atomic_write_json(out / MANIFEST_NAME, merged)
    for name in (MANIFEST_NAME, "report.jsonl"):
        os.chmod(out / name, 0o644)
    return merged


def _rerun_job(*manifests: Path) -> str:
    """How to rewrite per-job manifests or their shards: rerun their jobs (finished shards are kept)."""
    jobs = [re.search(r"job(\d+)of(\d+)", m.name) for m in manifests]
    if not all(jobs):
        return "rerun their jobs"
    indices = ", ".join(str(int(m.group(1))) for m in jobs)
    n = int(jobs[0].group(2))
    index = indices if len(jobs) == 1 else "I"
    return (f"rerun job{'s' if len(jobs) > 1 else ''} {indices} of {n} (the same `uniremoval shards build` "
            f"with --num-jobs {n} --job-index {index}; finished shards are kept)")


def _check_job_shards(out: Path, files: list[Path], parts: list[dict]) -> None:
    """Every tar a per-job manifest lists is there with its size, before manifest.json is written: a
    merged manifest pointing at missing shards would only fail later, in training."""
    bad: dict[Path, list[str]] = {}
    for f, p in zip(files, parts):
        for s in p["shards"]:
            path = out / s["name"]
            if not path.is_file():
                bad.setdefault(f, []).append(f"{s['name']} (missing)")
            elif path.stat().st_size != s["bytes"]:
                bad.setdefault(f, []).append(
                    f"{s['name']} ({path.stat().st_size} bytes, listed with {s['bytes']})")
    if not bad:
        return
    count = sum(len(v) for v in bad.values())

    def names(v: list[str]) -> str:
        return ", ".join(v[:5]) + (f" and {len(v) - 5} more" if len(v) > 5 else "")

    where = "; ".join(f"{f.name} lists {len(v)}: {names(v)}" for f, v in bad.items())
    fix = _rerun_job(*bad)
    raise DataError(f"{out}: {count} shard(s) listed in per-job manifests are missing or damaged ({where}); "
                    f"nothing was merged. {fix[0].upper() + fix[1:]}, which rebuilds them, then merge again")
