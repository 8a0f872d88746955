"""read_ahead and WriteBehind: reading the next images and writing the last outputs in threads while
validation, eval and restore run the model."""

from __future__ import annotations

import threading
import time

import pytest

from uniremoval.data.read_ahead import read_ahead
from uniremoval.errors import DataError


def _wait_for(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def _counted(n: int, made: list[int]):
    """0..n-1, each noted in `made` as it is made (by the read-ahead thread)."""
    for i in range(n):
        made.append(i)
        yield i


def test_items_come_in_order_and_are_made_ahead_of_the_consumer():
    made: list[int] = []
    it = read_ahead(_counted(6, made), depth=2)
    assert next(it) == 0
    # While the consumer holds item 0 (restoring it), the thread has made the next ones: 2 queued and
    # a third in hand, waiting for room.
    assert _wait_for(lambda: len(made) == 4)
    time.sleep(0.1)
    assert len(made) == 4  # no further than depth ahead
    assert list(it) == [1, 2, 3, 4, 5]


def test_an_error_comes_after_the_items_before_it():
    def source():
        yield "a"
        yield "b"
        raise DataError("shard x.tar, key k3: truncated")

    it = read_ahead(source())
    assert [next(it), next(it)] == ["a", "b"]
    with pytest.raises(DataError, match="key k3"):
        next(it)


def test_a_loop_left_early_stops_the_thread_without_reading_on():
    made: list[int] = []
    it = read_ahead(_counted(1000, made), depth=3)
    assert next(it) == 0
    assert _wait_for(lambda: len(made) == 5)
    it.close()
    n = len(made)
    time.sleep(0.1)
    assert len(made) == n <= 5
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        next(read_ahead([1], depth=0))


def test_eval_and_validation_decode_in_the_read_ahead_thread(tmp_path, monkeypatch):
    """`uniremoval eval` and a stage's validation decode their images in the read-ahead thread (the
    main thread meanwhile restores the previous ones), and score every image once; eval's
    --save-images PNGs are encoded in the write-behind threads."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_kt_common import write_pairs

    import uniremoval.eval.restore as restore_mod
    from uniremoval.data import pipelines
    from uniremoval.eval.evaluate import EvalOptions, run_eval
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.stages.validation import validate_paired

    readers: list[str] = []
    decode = pipelines.decode_sample
    monkeypatch.setattr(pipelines, "decode_sample",
                        lambda *a, **kw: (readers.append(threading.current_thread().name), decode(*a, **kw))[1])
    shards = write_pairs(tmp_path, "val_haze", "haze", 5, n_shards=2, split="test")
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), all_sum=dict)
    src = SimpleNamespace(name="val_haze", shards=str(shards), max_samples=None)
    with torch.no_grad():
        out = validate_paired(ctx, MPRNet("tiny").eval(), "minus_one_one", [src], lockstep=False)
    assert readers == ["read-ahead"] * 5 and "val/val_haze/psnr" in out

    readers.clear()
    read = restore_mod.read_image_oriented
    monkeypatch.setattr(restore_mod, "read_image_oriented",
                        lambda *a, **kw: (readers.append(threading.current_thread().name), read(*a, **kw))[1])
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    writers: list[str] = []
    encode = restore_mod.png_bytes
    monkeypatch.setattr(restore_mod, "png_bytes",
                        lambda *a, **kw: (writers.append(threading.current_thread().name), encode(*a, **kw))[1])
    saved = tmp_path / "saved"
    result = run_eval(EvalOptions("none", str(folder), metrics=["piqe"], mlflow=False, device="cpu",
                                  save_images=str(saved)))
    assert readers == ["read-ahead"] * 4 and len(result.images) == 4
    assert len(writers) == 4 and all(w.startswith("write-behind") for w in writers)  # --save-images
    assert sorted(p.name for p in saved.glob("*.png")) == [f"{i}.png" for i in range(4)]


def test_write_behind_encodes_in_threads_writes_in_order_here_and_raises_errors_here(tmp_path, monkeypatch):
    import uniremoval.io as io_mod
    from uniremoval.io import WriteBehind

    encoded: list[str] = []
    written: list[tuple[str, str]] = []
    gate = threading.Event()
    write = io_mod.atomic_write_bytes
    monkeypatch.setattr(io_mod, "atomic_write_bytes", lambda path, data: (
        written.append((path.name, threading.current_thread().name)), write(path, data))[1])

    started = threading.Event()

    def encode(i, fail=False):
        started.set()
        gate.wait(10)
        encoded.append(threading.current_thread().name)
        if fail:
            raise ValueError(f"image {i} cannot be encoded")
        return f"image {i}".encode()

    with WriteBehind(workers=2, pending=3) as w:
        for i in range(3):
            w.submit(tmp_path / f"{i}.png", encode, i)  # returns at once: the encodes wait on the gate
        assert encoded == [] and written == []
        gate.set()
    assert [n for n, _ in written] == ["0.png", "1.png", "2.png"]  # in the order asked, all by the block's end
    assert {t for _, t in written} == {"MainThread"} and all(t.startswith("write-behind") for t in encoded)
    assert (tmp_path / "1.png").read_bytes() == b"image 1"

    gate.clear()
    w = WriteBehind(workers=1, pending=2)
    w.submit(tmp_path / "a.png", encode, 0, fail=True)
    w.submit(tmp_path / "b.png", encode, 1)
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(ValueError, match="image 0 cannot be encoded"):
        w.submit(tmp_path / "c.png", encode, 2)  # the queue is full: the oldest is waited for, its error raised
    w.close()
    assert (tmp_path / "b.png").read_bytes() == b"image 1" and not (tmp_path / "a.png").exists()

    # A with-block left by the caller's error reports that error and writes nothing more; it waits for an
    # encode that hangs 2 s at most (a daemon thread, then abandoned).
    gate.clear()
    written.clear()
    started.clear()
    with pytest.raises(KeyError), WriteBehind(workers=1, pending=5) as w:
        for i in range(3):
            w.submit(tmp_path / f"late{i}.png", encode, i)
        assert started.wait(10)  # the first encode is under way (the ones not started are cancelled)
        t0 = time.monotonic()
        raise KeyError("the caller's")
    assert time.monotonic() - t0 >= 1.9 and written == []  # it waited for the hung encode...
    (encoder,) = w._threads
    assert encoder.is_alive()  # ... and left it, still hung on the gate
    gate.set()
    encoder.join(10)
    assert not encoder.is_alive() and written == [] and not list(tmp_path.glob("late*"))


def test_write_behind_joins_its_encoders_when_its_block_ends(tmp_path):
    """An encoder thread still alive (it had run torch ops) when the interpreter exits aborted `restore` now
    and then after it had written everything ("terminate called without an active exception", exit 134):
    the encoders are joined when the block ends, normally or on an error (after the encode under way)."""
    import torch

    from uniremoval.eval.restore import png_bytes
    from uniremoval.io import WriteBehind

    def encoders() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("write-behind")]

    def slow_png(x):
        time.sleep(0.3)
        return png_bytes(x)

    with WriteBehind(workers=2, pending=4) as w:
        for i in range(3):
            w.submit(tmp_path / f"{i}.png", png_bytes, torch.rand(3, 8, 8))
    assert encoders() == []
    with pytest.raises(KeyError), WriteBehind(workers=2, pending=4) as w:
        w.submit(tmp_path / "slow.png", slow_png, torch.rand(3, 8, 8))
        time.sleep(0.05)  # the encode is under way
        raise KeyError("the caller's")
    assert encoders() == [] and not (tmp_path / "slow.png").exists()
