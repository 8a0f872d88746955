"""Data pipelines: splitting, mixing, aligned crops, bad samples, http/pipe streams, and one real
two-process launch (accelerate launch, gloo, two DataLoader workers per rank)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shardgen import check_batch, ident, pool, to_uint8, write_dataset

from uniremoval.data.pipelines import CropPadding, da_loader, eval_samples, kt_loader
from uniremoval.data.shard_stream import ShardReadError, assign_shards, iter_shard, resolve_shards
from uniremoval.data.transforms import decode_image, to_tensor
from uniremoval.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEGS = ["haze", "rain", "blur"]
SIZES = [(40, 48), (33, 70), (64, 64), (47, 35)]


def paired_loader(shards, degradation, *args, **kw):
    """(input, target) batches of one degradation, as the teacher stage reads them."""
    return kt_loader([(degradation, shards, degradation, 1.0)], [degradation], *args, require=("target",), **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    # Uneven shard counts on purpose: 3, 1 and 5 shards for 4 global workers (2 ranks x 2).
    write_dataset(root, "haze", "haze", 14, 3, SIZES, cache=True)
    write_dataset(root, "rain", "rain", 7, 1, SIZES, cache=True)
    write_dataset(root, "blur", "blur", 23, 5, SIZES, cache=True)
    write_dataset(root, "evalbad", "haze", 9, 2, SIZES, corrupt=(4,))
    return root


# ---------------------------------------------------------------- splitting


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n_workers", [1, 2, 4, 6])
def test_assign_shards_every_sample_exactly_once(n_shards, n_workers):
    samples = {s: 7 + s for s in range(n_shards)}  # shards of different lengths
    owners = Counter()
    for g in range(n_workers):
        for shard, stride, offset in assign_shards(n_shards, g, n_workers):
            owners.update((shard, i) for i in range(samples[shard]) if i % stride == offset)
    assert set(owners) == {(s, i) for s, n in samples.items() for i in range(n)}
    assert set(owners.values()) == {1}


def test_resolve_shards_forms(data, tmp_path):
    from_manifest = resolve_shards(data / "haze")
    assert [Path(p).name for p in from_manifest] == [f"haze-{i:06d}.tar" for i in range(3)]
    assert resolve_shards(str(data / "haze" / "haze-{000000..000002}.tar")) == from_manifest
    assert resolve_shards([data / "rain", data / "haze" / "manifest.json"]) == resolve_shards(data / "rain") + from_manifest
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "b.tar").write_bytes((data / "rain" / "rain-000000.tar").read_bytes())
    assert resolve_shards(bare) == [str(bare / "b.tar")]
    (bare / "manifest-job000of002.json").write_text("{}")  # an unmerged array build: maybe half done
    with pytest.raises(DataError, match="shards merge"):
        resolve_shards(bare)
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards(tmp_path / "nope.tar")
    with pytest.raises(DataError, match="neither manifest.json"):
        resolve_shards(tmp_path)


def test_resolve_shards_reads_globs_joined_specs_and_pipe_braces(data):
    """A glob and `a::b` (which check_inputs lets through) were taken for one
    file name ("does not exist"), and braces in a `pipe:` command were not expanded (webdataset's
    idiom `pipe:curl .../x-{000000..000009}.tar`): the shell got one command naming no file."""
    haze = resolve_shards(data / "haze")
    assert resolve_shards(str(data / "haze" / "*.tar")) == haze
    assert resolve_shards(f"{data / 'rain'}::{data / 'haze'}") == resolve_shards(data / "rain") + haze
    with pytest.raises(DataError, match="no file matches"):
        resolve_shards(str(data / "haze" / "*.nope"))
    # braces and a glob: each alternative names a source, and one that matches nothing (a typo) was left out
    assert resolve_shards(f"{data}/{{haze,rain}}/*.tar") == sorted(haze + resolve_shards(data / "rain"))
    with pytest.raises(DataError, match=r"1 of its alternatives match no file, e\.g\. .*/hzae/\*\.tar"):
        resolve_shards(f"{data}/{{haze,hzae}}/*.tar")
    pipes = resolve_shards(f"pipe:cat {data / 'haze'}/haze-{{000000..000002}}.tar")
    assert pipes == [f"pipe:cat {p}" for p in haze]
    assert [k for u in pipes for k, _ in iter_shard(u)] == [k for u in haze for k, _ in iter_shard(u)]
    from uniremoval.eval.evaluate import dataset_name, is_shard_source

    joined = f"{data / 'rain'}::{data / 'haze'}"  # `eval --data a::b` took it for an image folder
    assert is_shard_source(joined) and dataset_name(joined) == "rain"


def test_streamed_specs_are_told_from_local_paths_in_one_place():
    """Every stage asks the same question of a spec (hash it? stat it? name its folder?) through one
    test: any `scheme://` URL or a `pipe:` command is streamed; a path, even one holding a colon, is not."""
    from uniremoval.data.manifest import is_streamed

    for spec in ("http://h/x.tar", "https://h/ds/", "file:///d/x.tar", "s3://b/x.tar", "pipe:cat /d/x.tar"):
        assert is_streamed(spec), spec
    for spec in ("/d/x.tar", "shards/haze", "d/a:b.tar", "d/{a,b}/*.tar", "C:/d/x.tar", "runs:/abc/weights"):
        assert not is_streamed(spec), spec


def test_an_ipv6_shard_url_is_not_split_as_joined_specs(data):
    """`::` joins shard specs, but an IPv6 host holds it too: `eval --data http://[::1]:8000/shards/haze/`
    was split into 'http://[' and '1]:8000/...' ("shard 1]:8000/shards/haze does not exist") and
    named '_'; training's listing split it alike."""
    from uniremoval.data.manifest import split_specs
    from uniremoval.eval.evaluate import dataset_name

    url = "http://[::1]:8000/shards/haze-{000000..000001}.tar"
    assert split_specs(url) == [url] and dataset_name("http://[::1]:8000/shards/haze/") == "haze"
    assert resolve_shards(url) == [url.replace("{000000..000001}", f"00000{i}") for i in (0, 1)]
    assert split_specs(f"{url}::http://[fe80::2]/x.tar::{data}") == [url, "http://[fe80::2]/x.tar", str(data)]


def test_eval_names_the_current_folder_after_itself(data, monkeypatch):
    """`eval --data .` (or `--data x.tar` in the folder) was named "dataset", not after the folder."""
    from uniremoval.eval.evaluate import dataset_name

    monkeypatch.chdir(data / "haze")
    assert dataset_name(".") == dataset_name("./") == dataset_name("haze-000000.tar") == "haze"
    monkeypatch.chdir(data / "haze" / "..")
    assert dataset_name("haze/..") == data.name and dataset_name("pipe:cat x.tar") == "dataset"  # not the cwd


# ---------------------------------------------------------------- transforms


def test_sixteen_bit_png_keeps_precision(tmp_path):
    import cv2

    img = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(np.uint16)
    ok, buf = cv2.imencode(".png", img[:, :, ::-1])  # cv2 writes BGR
    assert ok
    dec = decode_image(buf.tobytes())
    assert dec.dtype == np.uint16 and (dec == img).all()
    t = to_tensor(dec)
    assert torch.allclose(t, torch.from_numpy(img.transpose(2, 0, 1) / 65535.0 * 2 - 1).float(), atol=1e-6)


def test_sixteen_bit_grey_alpha_png_is_refused_by_name():
    # PNG colour type 4 (grey + alpha) at 16 bits, written by hand. OpenCV decodes it with swapped
    # bytes (3 -> 768): refused rather than read wrong. Plain 16-bit grey decodes right.
    import struct
    import zlib

    grey = (np.arange(3 * 4).reshape(3, 4) * 5000 + 3).astype(">u2")
    alpha = np.full((3, 4), 65535, ">u2")
    rows = np.stack([grey, alpha], axis=2).reshape(3, -1)
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def png(colour_type: int, body: bytes) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 16, colour_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))

    with pytest.raises(ValueError, match="16-bit grey\\+alpha PNG .* save it as 16-bit grey or RGB"):
        decode_image(png(4, raw))
    dec = decode_image(png(0, b"".join(b"\x00" + r.tobytes() for r in grey)))
    assert dec.shape == (3, 4, 3) and dec.dtype == np.uint16
    assert (dec == grey.astype(np.uint16)[:, :, None]).all()


def test_small_images_are_mirror_padded_with_consistent_grid(tmp_path):
    # 20x23 and 17x40 images, 32 crops: padded; the feature grid is padded by whole mirrored
    # cells, so it still equals the pooled input crop.
    write_dataset(tmp_path, "haze", "haze", 4, 1, [(20, 23), (17, 40)], cache=True)
    ld = kt_loader([("haze", tmp_path / "haze", "haze", 1)], ["haze"], 4, 32, 2, 0, 0, 0, 1,
                   require=("target", "teacher", "feature"), shuffle_buffer=2)
    with pytest.warns(RuntimeWarning, match="mirror-padded"):
        batches = list(ld)
    for batch in batches:
        assert batch["input"].shape == (4, 3, 32, 32) and batch["feature"].shape == (4, 3, 2, 2)
        for j in range(4):
            inp = to_uint8(batch["input"][j])
            assert np.allclose(batch["feature"][j].numpy(), pool(inp, 16), atol=1e-3)
            assert (to_uint8(batch["target"][j])[..., :2] == 255 - inp[..., :2]).all()


# ---------------------------------------------------------------- mixing and alignment (1 process)


def test_kt_batches_single_process(data):
    sources = [(d, data / d, d, w) for d, w in zip(DEGS, (1.0, 3.0, 1.0))]
    ld = kt_loader(sources, DEGS, 6, 32, 6, 0, seed=3, rank=0, world_size=1,
                   require=("target", "teacher", "feature"), shuffle_buffer=4)
    assert len(ld) == 6
    labels = Counter()
    first_keys = []
    for _ in range(2):
        batches = list(ld)
        assert len(batches) == 6
        first_keys.append(batches[0]["key"])
        for b in batches:
            assert b["input"].dtype == torch.float32 and b["input"].shape == (6, 3, 32, 32)
            assert b["input"].min() >= -1 and b["input"].max() <= 1
            assert set(b["degradation"].tolist()) == {0, 1, 2}
            assert check_batch(b, DEGS, 16) == []
            labels.update(b["degradation"].tolist())
    assert first_keys[0] != first_keys[1]  # epochs reshuffle
    assert labels[1] > labels[0] and labels[1] > labels[2]  # rain has 3x the weight of the others


def test_loader_config_errors(data):
    src = [(d, data / d, d, 1.0) for d in DEGS]
    with pytest.raises(ConfigError, match="cannot hold one sample"):
        kt_loader(src, DEGS, 2, 32, 1, 0, 0, 0, 1)
    with pytest.raises(ConfigError, match="no source for degradation"):
        kt_loader(src[:2], DEGS, 4, 32, 1, 0, 0, 0, 1)
    with pytest.raises(ConfigError, match="multiple of the feature cell"):
        kt_loader(src, DEGS, 4, 40, 1, 0, 0, 0, 1)
    with pytest.raises(ConfigError, match="bad_samples"):
        kt_loader(src, DEGS, 4, 32, 1, 0, 0, 0, 1, bad_samples="ignore")


# ---------------------------------------------------------------- bad samples


def test_bad_samples_skip_counts_and_fail_names_shard_and_key(tmp_path):
    # A paired set with one corrupt input and one sample missing its target.
    write_dataset(tmp_path, "rain", "rain", 6, 2, [(32, 32)], corrupt=(1,), no_target=(4,))
    keys = [f"rain-{i:05d}" for i in range(6)]
    ld = paired_loader(tmp_path / "rain", "rain", 4, 32, 3, 0, seed=0, rank=0, world_size=1, shuffle_buffer=1)
    seen, bad = set(), 0
    for b in ld:
        seen.update(b["key"])
        bad += b["bad_samples"]
        assert check_batch(b, ["rain"]) == []
    assert 4 <= bad <= 6  # 12 good samples = 3 passes of 4 good + 2 bad (one pass may be partial)
    assert seen == set(keys) - {keys[1], keys[4]}

    with pytest.raises(DataError, match=r"rain-00000[01]\.tar, key rain-0000[14]"):
        list(paired_loader(tmp_path / "rain", "rain", 4, 32, 3, 0, 0, 0, 1, bad_samples="fail", shuffle_buffer=1))

    items = list(eval_samples(tmp_path / "rain", require=("target",)))
    assert sorted(it["key"] for it in items if "error" in it) == [keys[1], keys[4]]
    assert "missing required 'target'" in next(it["error"] for it in items if it["key"] == keys[4])
    with pytest.raises(DataError, match=f"key {keys[1]}"):
        list(eval_samples(tmp_path / "rain", bad_samples="fail"))


def test_wrong_label_is_a_bad_sample(tmp_path):
    write_dataset(tmp_path, "rain", "rain", 3, 1, [(32, 32)])
    with pytest.raises(DataError, match="json says degradation 'rain'"):
        list(paired_loader(tmp_path / "rain", "haze", 2, 32, 1, 0, 0, 0, 1, bad_samples="fail", shuffle_buffer=1))


def test_truncated_shard_keeps_complete_samples(tmp_path, data):
    raw = (data / "rain" / "rain-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    third = [m for m in members if m.name.startswith("rain-00002.")]
    cut = third[1].offset_data + 10  # inside the 3rd sample's 2nd file
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    items = list(eval_samples(tmp_path / "cut.tar"))
    good = [it["key"] for it in items if "error" not in it]
    assert good == ["rain-00000", "rain-00001"]
    assert len(items) == 3 and "unreadable after key 'rain-00001'" in items[-1]["error"]
    with pytest.raises(DataError, match="cut.tar is unreadable"):
        list(eval_samples(tmp_path / "cut.tar", bad_samples="fail"))
    # Cut inside its first sample: the message said "after key None".
    (tmp_path / "cut0.tar").write_bytes(raw[:members[1].offset_data + 10])
    (item,) = list(eval_samples(tmp_path / "cut0.tar"))
    assert item["error"].startswith("shard unreadable before its first sample: "), item
    with pytest.raises(DataError, match=r"cut0\.tar is unreadable before its first sample: "):
        list(eval_samples(tmp_path / "cut0.tar", bad_samples="fail"))


def test_first_n_samples_are_the_same_images_on_any_process_and_worker_count(data, tmp_path):
    """A validation cap (max_samples) read the first N samples of each rank's own shards: with several
    shards the validated images changed with the process count, so one row's val/ curve on 1 GPU and
    on 8 were scores of different images. `first=N` is the set's first N in shard-list-then-tar order."""
    order = [it["key"] for it in eval_samples(data / "blur")]  # 5 shards, 23 samples
    assert len(order) == 23
    for first in (1, 7, 23, 40):
        for world in (1, 2, 3, 8):
            keys = [it["key"] for rank in range(world) for it in eval_samples(data / "blur", rank, world, first=first)]
            assert sorted(keys) == sorted(order[:first]), (first, world)
    # DataLoader workers deal the same samples (2 ranks x 2 workers)
    keys = [it["key"] for rank in range(2) for it in eval_samples(data / "blur", rank, 2, num_workers=2, first=7)]
    assert sorted(keys) == sorted(order[:7])
    # A bad sample inside the first N is reported once (by the rank it falls to) and counts as one of them
    bad_order = [it["key"] for it in eval_samples(data / "evalbad")]
    items = [it for rank in range(3) for it in eval_samples(data / "evalbad", rank, 3, first=6)]
    assert sorted(it["key"] for it in items) == sorted(bad_order[:6])
    assert [it["key"] for it in items if "error" in it] == ["evalbad-00004"]
    # A shard cut short: its complete samples, then one report of the cut, then the next shard
    raw = (data / "rain" / "rain-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("rain-00002.")).offset_data + 10
    (tmp_path / "a.tar").write_bytes(raw[:cut])
    (tmp_path / "b.tar").write_bytes((data / "haze" / "haze-000000.tar").read_bytes())
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    whole = list(eval_samples(urls))  # one process: a.tar's whole samples, the cut, b.tar
    good = [it["key"] for it in whole if "error" not in it]
    assert whole[1]["key"] is None and good[0] == "rain-00000" and len(good) == 1 + 5
    items = [it for rank in range(2) for it in eval_samples(urls, rank, 2, first=4)]
    assert sorted(str(it["key"]) for it in items) == sorted(["None", *good[:4]])
    assert next(it["error"] for it in items if it["key"] is None) == whole[1]["error"]
    with pytest.raises(DataError, match="a.tar is unreadable"):
        list(eval_samples(urls, 1, 2, first=4, bad_samples="fail"))


# ---------------------------------------------------------------- images smaller than the crop


def _crop_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "mirror-padded" in str(w.message)]


def test_images_smaller_than_crop_are_counted_and_named_once(tmp_path):
    # Even samples are 23x20 (smaller than the 32 crop), odd ones 48x40. One loader per epoch with
    # the run's CropPadding, as the stages do: one warning for the run, every padded sample counted.
    write_dataset(tmp_path, "rain", "rain", 6, 2, [(20, 23), (40, 48)])
    padding = CropPadding()
    per_batch = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            ld = paired_loader(tmp_path / "rain", "rain", 4, 32, 3, 0, seed=0, rank=0, world_size=1,
                                shuffle_buffer=2, padding=padding)
            ld.set_epoch(epoch)
            for b in ld:
                assert "_padded_warning" not in b and b["input"].shape == b["target"].shape == (4, 3, 32, 32)
                per_batch.append((b["padded_samples"], sum(int(k[-5:]) % 2 == 0 for k in b["key"])))
    assert [n for n, _ in per_batch] == [small for _, small in per_batch]  # exactly the small ones
    assert padding.samples == sum(n for n, _ in per_batch) > 0 and padding.warned
    msgs = _crop_warnings(caught)
    assert len(msgs) == 1, msgs
    assert re.search(r"^training crop 32x32 \(data.crop_size=32\) is larger than sample rain-0000[024] of source "
                     r"rain \(23x20 px, shard \S+/rain/rain-00000[01]\.tar\): its crops are mirror-padded", msgs[0])
    assert "once per run on rank 0" in msgs[0] and "counts them (train/padded_samples in MLflow" in msgs[0]
    assert "lower data.crop_size (to 16 or less for this image)" in msgs[0]
    assert "rebuild the shards from images at least 32 px on each side" in msgs[0]


def test_small_cached_images_warn_from_workers(tmp_path):
    # Two DataLoader workers, two epochs of one loader: the warning crosses to the main process once.
    # 47x40 cache samples at crop 48, cell 16: the largest crop that fits is 32 (multiple of the cell).
    write_dataset(tmp_path, "haze", "haze", 4, 2, [(40, 47)], cache=True)
    ld = kt_loader([("haze", tmp_path / "haze", "haze", 1)], ["haze"], 2, 48, 2, 2, 0, 0, 1,
                   require=("teacher", "feature"), shuffle_buffer=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = [b["padded_samples"] for _ in range(2) for b in ld]
    assert counts == [2, 2, 2, 2] and ld.padding.samples == 8
    msgs = _crop_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "(47x40 px" in msgs[0] and "to 32 or less for this image" in msgs[0]


def test_no_crop_warning_when_images_are_large_enough(data):
    # Every image of `data` is at least 32 px on each side: no warning, zero counts, on both DA sides.
    sources = [(d, data / d, d) for d in DEGS]
    ld = da_loader(sources, [("clear", data / "haze")], DEGS, 3, 32, 3, 0, 0, 0, 1, clear_batch_size=2,
                   shuffle_buffer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        counts = [step["padded_samples"] for step in ld]
    assert counts == [0, 0, 0] and ld.padding.samples == 0 and not ld.padding.warned


# ---------------------------------------------------------------- DA


def test_da_clear_side_uses_targets(data):
    sources = [(d, data / d, d) for d in DEGS]
    ld = da_loader(sources, [("clear", data / "haze")], DEGS, 3, 32, 2, 0, 0, 0, 1, clear_batch_size=2,
                   shuffle_buffer=2)
    steps = list(ld)
    assert len(steps) == 2  # steps_per_epoch: the checks below cannot pass on an empty epoch
    for step in steps:
        assert set(step["degraded"]["degradation"].tolist()) == {0, 1, 2}
        assert step["clear"]["input"].shape == (2, 3, 32, 32) and "degradation" not in step["clear"]
        for j, key in enumerate(step["clear"]["key"]):
            clear = to_uint8(step["clear"]["input"][j])
            # targets hold (255 - x, 255 - y): R values fall in the upper range, never the input's
            assert (clear[..., 2] == ident(key)).all() and clear[..., 0].min() >= 255 - 70


# ---------------------------------------------------------------- remote streams


def test_a_pipe_command_that_ends_after_the_tar_is_read_whole_is_not_an_error(data):
    """`pipe:curl -s URL` (webdataset's own form) failed about one read in two on a real shard: the
    reader stopped at the tar's first end-of-archive block and closed the pipe, so curl, still
    writing the record padding after it, exited 23 (write error) and the shard was refused (eval) or
    skipped with its last sample (training). Here the tar ends in 256 KiB of zero blocks (as `tar -b 512`
    pads) sent after a pause: curl writes them once the reader is done, every time, not one time in two."""
    import shutil
    import time

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    tar = data / "rain" / "rain-000000.tar"
    body = tar.read_bytes() + bytes(256 * 1024)
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512 + 512  # through the first end-of-archive block
    assert not body[end - 512:].strip(b"\0")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:end])
            self.wfile.flush()
            time.sleep(0.3)
            self.wfile.write(body[end:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"pipe:curl -s http://127.0.0.1:{server.server_address[1]}/rain-000000.tar"
        assert [k for k, _ in iter_shard(url)] == [f"rain-{i:05d}" for i in range(7)]
    finally:
        server.shutdown()
        server.server_close()


def test_stream_over_http_and_pipe(data):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = resolve_shards(f"{base}/blur/")  # the manifest over http, relative entries joined
        assert urls == [f"{base}/blur/blur-{i:06d}.tar" for i in range(5)]
        keys = sorted(it["key"] for it in eval_samples(f"{base}/blur/"))
        assert keys == [f"blur-{i:05d}" for i in range(23)]
        sources = [(d, f"{base}/{d}/manifest.json", d, 1.0) for d in DEGS]
        ld = kt_loader(sources, DEGS, 4, 32, 2, 1, 0, 0, 1, require=("target", "teacher", "feature"),
                       shuffle_buffer=2)
        batches = list(ld)
        assert len(batches) == 2 and all(check_batch(b, DEGS, 16) == [] for b in batches)
        missing = list(eval_samples(f"{base}/blur/blur-000099.tar"))
        assert len(missing) == 1 and "error" in missing[0]  # curl -f fails on 404: reported, not hung
    finally:
        server.shutdown()
        server.server_close()
    tar = data / "rain" / "rain-000000.tar"
    assert [k for k, _ in iter_shard(f"pipe:cat {tar}")] == [f"rain-{i:05d}" for i in range(7)]


# ---------------------------------------------------------------- two real processes


@pytest.mark.slow
def test_two_process_launch(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "dist_pipelines_worker.py"),
           str(data), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    # Evaluation: every key exactly once over 2 ranks x 2 workers, full size, bad one reported.
    for name, n in (("rain", 7), ("blur", 23), ("evalbad", 9)):
        got = Counter(k for r in ranks for k in r["eval"][name]["keys"])
        expected = {f"{name}-{i:05d}" for i in range(n)} - ({"evalbad-00004"} if name == "evalbad" else set())
        assert set(got) == expected and set(got.values()) == {1}, (name, got)
        assert all(r["eval"][name]["full_size"] for r in ranks)
        assert all(r["eval"][name]["keys"] for r in ranks)  # both ranks got work
    assert [k for r in ranks for k in r["eval"]["evalbad"]["errors"]] == ["evalbad-00004"]

    # Training: the same number of steps on both ranks, every epoch; every batch has every type;
    # every crop aligned across input/target/teacher/feature.
    for r in ranks:
        assert r["all_rank_steps"] == [[4, 4], [4, 4]]
        for ep in r["kt"]:
            assert ep["steps"] == ep["len"] == 4 and ep["bad"] == 0
            assert all(t == sorted(DEGS) for t in ep["types"])
            assert ep["problems"] == []
        assert len(r["da"]) == 3
        for step in r["da"]:
            assert step["types"] == sorted(DEGS)
            assert step["degraded_shape"] == [5, 3, 32, 32] and step["clear_shape"] == [2, 3, 32, 32]
    assert all(k.startswith("haze-") for r in ranks for step in r["da"] for k in step["clear_keys"])
    # The ranks read disjoint samples: 6 each, none in common. (Different first batches would not
    # show it: each rank shuffles with its own seed, so ranks reading the same shards differ too.)
    one = [r["one_source_keys"] for r in ranks]
    assert len(one[0]) == len(one[1]) == 6 and len(set(one[0]) | set(one[1])) == 12, one


def test_decoder_matches_pil_pixel_for_pixel():
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for mode, fmt in [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG")]:
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, format=fmt)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        got = decode_image(buf.getvalue())
        # JPEG: two libjpeg builds may round the IDCT differently by one level
        tol = 1 if fmt == "JPEG" else 0
        assert got.shape == (20, 30, 3) and np.abs(got.astype(int) - ref).max() <= tol, (mode, fmt)
    with pytest.raises((ValueError, OSError)):  # PIL's UnidentifiedImageError is an OSError
        decode_image(b"definitely not an image")


def test_all_bad_source_raises_instead_of_hanging(tmp_path):
    write_dataset(tmp_path, "rain", "rain", 3, 1, [(32, 32)], corrupt=(0, 1, 2))
    with pytest.raises(DataError, match="bad samples in a row"):
        list(paired_loader(tmp_path / "rain", "rain", 2, 32, 1, 0, 0, 0, 1, shuffle_buffer=2))


def test_training_ranks_read_disjoint_samples(data):
    # One 7-sample shard, 2 ranks: the ranks interleave its samples (4 + 3), never share one.
    seen = []
    for rank in range(2):
        ld = paired_loader(data / "rain", "rain", 2, 32, 2, 0, seed=5, rank=rank, world_size=2, shuffle_buffer=1)
        seen.append({k for b in ld for k in b["key"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"rain-{i:05d}" for i in range(7)}


def test_short_epochs_reach_every_part_of_a_shard(tmp_path):
    # Epochs much shorter than a pass (6 of a rank's 30 samples): each epoch must start somewhere
    # new in the shard, or the same first few samples are read every epoch and the rest never.
    write_dataset(tmp_path, "rain", "rain", 60, 1, [(32, 32)])
    seen = []
    for rank in range(2):
        ld = paired_loader(tmp_path / "rain", "rain", 2, 32, 3, 0, seed=0, rank=rank, world_size=2, shuffle_buffer=2)
        seen.append(Counter(k for _ in range(30) for b in ld for k in b["key"]))
    assert not seen[0].keys() & seen[1].keys()
    assert len(seen[0] | seen[1]) >= 50, sorted(seen[0] | seen[1])


def test_loader_workers_leave_ctrl_c_to_the_main_process(data):
    """The terminal sends Ctrl-C to every process of the group: a worker it killed would fail the
    main process's next fetch before training could write its checkpoint. Workers ignore it."""
    import multiprocessing
    import os
    import signal
    import time

    # Long enough that no worker runs out of data (a worker whose share is done exits by design).
    ld = paired_loader(data / "haze", "haze", 2, 32, 60, 2, 0, 0, 1)
    batches = iter(ld)
    next(batches), next(batches)  # one batch from each worker: both have run their worker_init_fn
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert [w.exitcode for w in workers] == [None, None]  # alive (one that took the SIGINT has exited)
    assert len([b for _, b in zip(range(10), batches)]) == 10
    del batches


def test_making_an_epochs_iterator_starts_its_workers_and_changes_no_batch(data, tmp_path):
    """The trainer makes the next epoch's iterator while the current epoch drains, so that the new
    workers' start-up (fork, shard opening, shuffle buffers) overlaps the last steps: making it must
    start them reading, its batches must be the ones the epoch gives when started late, and it must
    not draw from the global RNG (a training step's random numbers would then depend on when)."""
    import multiprocessing
    import time

    log = tmp_path / "opened.log"
    shards = sorted((data / "haze").glob("*.tar"))
    piped = [f"pipe:sh -c 'echo {p.name} >> {log}; cat {p}'" for p in shards]

    def loader(spec):
        ld = paired_loader(spec, "haze", 2, 32, 6, 2, seed=3, rank=0, world_size=1)
        ld.set_epoch(1)
        return ld

    rng_before = torch.get_rng_state()
    early = iter(loader(piped))
    assert len(multiprocessing.active_children()) == 2
    deadline = time.monotonic() + 30
    while not (log.is_file() and len(log.read_text().split()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(log.read_text().split()) >= 2  # both workers opened a shard before the first next()
    got = list(early)
    assert torch.equal(torch.get_rng_state(), rng_before)
    late = list(loader(shards))  # epoch 1 started the usual way, from the plain paths
    assert len(got) == len(late) == 6
    for a, b in zip(got, late):
        assert a["key"] == b["key"]
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])

    # An epoch cut short (a run stopped in its last steps) stops its workers when closed.
    ld = loader(shards)
    cut = iter(ld)
    next(cut)
    cut.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(StopIteration):
        next(cut)
    assert ld.epoch == 1  # not a finished epoch
    list(iter(ld))
    assert ld.epoch == 2


def test_epochs_made_back_to_back_without_workers_keep_their_own_epoch(data):
    """Without workers the dataset is iterated in this process: an epoch's iterator made before the
    next epoch's (set_epoch in between) must still read its own epoch, not the last one set."""
    def keys(epoch, it=None):
        if it is None:
            ld = paired_loader(data / "blur", "blur", 2, 32, 4, 0, seed=3, rank=0, world_size=1)
            ld.set_epoch(epoch)
            it = iter(ld)
        return [k for b in it for k in b["key"]]

    ld = paired_loader(data / "blur", "blur", 2, 32, 4, 0, seed=3, rank=0, world_size=1)
    ld.set_epoch(1)
    one = iter(ld)
    ld.set_epoch(2)
    two = iter(ld)
    assert keys(1) != keys(2)
    assert keys(1, one) == keys(1) and keys(2, two) == keys(2)


def test_an_epoch_whose_loader_cannot_start_raises_once_and_leaves_nothing_to_clean_up(data, monkeypatch):
    import gc

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    ld = paired_loader(data / "haze", "haze", 2, 32, 2, 2, 0, 0, 1)
    ld.multiprocessing_context = "no-such-start-method"
    with pytest.raises(ValueError, match="no-such-start-method"):
        iter(ld)
    gc.collect()
    assert unraisable == []  # (was: AttributeError in EpochBatches.__del__, printed as "Exception ignored")


def test_only_the_symmetries_switched_on_are_drawn_and_the_crops_stay_the_same():
    """paired_crop draws a symmetry among those allowed; turning one off keeps every crop window
    (the generator's later draws) where it was with all three on."""
    from uniremoval.data.transforms import Aug, paired_crop

    img = np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3)
    allowed = Aug(hflip=True, vflip=False, rot90=True)
    drawn_all, drawn_some = [], []
    for seed in range(64):
        full_rng, some_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        drawn_all.append([paired_crop({"input": img}, None, 16, 16, full_rng, True)[2] for _ in range(3)])
        drawn_some.append([paired_crop({"input": img}, None, 16, 16, some_rng, allowed)[2] for _ in range(3)])
    pairs = [(a, s) for run_a, run_s in zip(drawn_all, drawn_some) for a, s in zip(run_a, run_s)]
    assert all(a[:2] == s[:2] for a, s in pairs)  # the same windows
    assert all(s[2] == Aug(a[2].hflip, False, a[2].rot90) for a, s in pairs)
    assert any(s[2].hflip for _, s in pairs) and any(s[2].rot90 for _, s in pairs)
    assert any(a[2].vflip for a, _ in pairs)  # vflip was drawn, and left out
    none_rng = np.random.default_rng(0)
    assert all(paired_crop({"input": img}, None, 16, 16, none_rng, Aug())[2][2] == Aug() for _ in range(32))


def test_the_shuffle_buffer_holds_at_most_shuffle_buffer_mb_of_raw_samples(tmp_path, monkeypatch):
    """data.shuffle_buffer (1000) alone bounded each source's buffer in every loader worker by count:
    1000 cached 720p samples (~5 MB each) held 5 GB per source per worker, and each epoch read 1000
    samples per source before its first batch. data.shuffle_buffer_mb caps the raw bytes held; under
    the cap the stream is the same sample for sample, and no sample is lost past it."""
    from uniremoval.data import pipelines

    write_dataset(tmp_path, "haze", "haze", 30, 1, [(32, 32)], cache=True)
    shard = tmp_path / "haze" / "haze-000000.tar"
    sizes = {}
    read = []
    real_iter_shard = pipelines.iter_shard

    def counting(url, *keep):
        for key, files in real_iter_shard(url, *keep):
            sizes[key] = sum(len(v) for v in files.values())
            read.append(key)
            yield key, files

    monkeypatch.setattr(pipelines, "iter_shard", counting)

    def first_batches(n_batches, **kw):
        read.clear()
        ld = kt_loader([("haze", [str(shard)], "haze", 1.0)], ["haze"], 2, 32, n_batches, 0, seed=1, rank=0,
                       world_size=1, shuffle_buffer=1000, augment=False, **kw)
        keys = [k for b in ld for k in b["key"]]
        return keys, len(read)

    _, uncapped_reads = first_batches(1)
    assert uncapped_reads > 1000  # the whole buffer (30 samples, over and over) before a batch
    pulled = uncapped_reads - 1000  # what one batch takes from the stream past its buffer
    five = 5 * max(sizes.values()) / 2**20
    assert first_batches(1, shuffle_buffer_mb=five)[1] <= 5 + pulled
    # a cap the buffer never reaches changes nothing
    assert first_batches(20, shuffle_buffer_mb=1e3)[0] == first_batches(20)[0]
    # past the cap, every sample read is yielded once: over 3 passes, each key about 3 times
    keys, _ = first_batches(45, shuffle_buffer_mb=five)
    counts = Counter(keys)
    assert len(keys) == 90 and set(counts) == set(sizes) and max(counts.values()) - min(counts.values()) <= 2, counts


def test_a_worker_sharing_a_shard_seeks_past_the_others_samples(tmp_path, monkeypatch):
    """With fewer shards than ranks x workers, each worker read every byte of a shared shard to keep
    1/m of its samples (8x the I/O for a test set of one shard on 8 GPUs). iter_shard's keep() now
    skips the others' samples unread: a seek in a local file, reads on a pipe; the same samples."""
    import webdataset
    from _fixtures import png

    from uniremoval.data.pipelines import EvalStream

    shard = str(tmp_path / "one.tar")
    rng = np.random.default_rng(0)
    with webdataset.TarWriter(shard) as tw:  # noise images: the samples' bytes outweigh the tar headers
        for i in range(24):
            tw.write({"__key__": f"s{i:02d}", "input.png": png(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)),
                      "json": {"degradation": "haze"}})
    read_bytes = []
    real_gopen = webdataset.gopen

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            b = self.f.read(n)
            read_bytes.append(len(b))
            return b

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(webdataset, "gopen", lambda url, mode="rb": Counting(real_gopen(url, mode)))
    everything = list(iter_shard(shard))
    whole = sum(read_bytes)
    for rank in range(4):
        read_bytes.clear()
        got = [(s["key"], s["input"].sum().item()) for s in EvalStream(shard, rank=rank, world_size=4)]
        assert [k for k, _ in got] == [k for k, _ in everything[rank::4]]
        assert sum(read_bytes) < 0.4 * whole, (sum(read_bytes), whole)  # a quarter of the samples, and headers
    # keep(): the same bytes as reading all; None stops; a pipe reads through to the same samples
    picked = list(iter_shard(shard, lambda i: i % 3 == 1))
    assert picked == everything[1::3]
    assert list(iter_shard(shard, lambda i: None if i >= 5 else True)) == everything[:5]
    assert list(iter_shard(f"pipe:cat {shard}", lambda i: i % 3 == 1)) == picked
    import gzip
    import shutil

    gz = tmp_path / "one.tar.gz"  # a decompressor seeks too, and its file is not the tar's size
    with open(shard, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert list(iter_shard(str(gz), lambda i: i % 3 == 1)) == picked
    assert list(iter_shard(shard, lambda i: np.int64(i) % 3 == 1)) == picked  # any truth value
    # a shard cut inside a skipped sample: the same samples and error as read through (a seek past a
    # file's end succeeds, so the file's size is compared)
    cut = tmp_path / "cut.tar"
    raw = Path(shard).read_bytes()
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    with gzip.open(tmp_path / "cut.tar.gz", "wb") as dst:
        dst.write(cut.read_bytes())
    for spec in (str(cut), f"pipe:cat {cut}", str(tmp_path / "cut.tar.gz")):
        got = []
        with pytest.raises(ShardReadError, match=r"cut short inside a member"):
            got.extend(k for k, _ in iter_shard(spec, lambda i: i % 3 == 0))
        assert got == [k for k, _ in everything[: len(got) * 3 : 3]] and len(got) == 5, (spec, got)


def test_a_tar_header_of_an_impossible_size_is_a_shard_read_error(tmp_path):
    """A header with a valid checksum and a size field of 2**40 (base-256) made the reader ask for a
    terabyte at once (MemoryError/OverflowError: a loader worker died even under bad_samples=skip)."""
    hdr = bytearray(512)
    hdr[0:5] = b"a.png"
    hdr[100:107] = b"0000644"
    hdr[124:136] = bytes([0x80]) + (2**40).to_bytes(11, "big")
    hdr[156:157] = b"0"
    hdr[148:156] = b" " * 8
    hdr[148:155] = f"{sum(hdr):06o}\0".encode()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(hdr) + b"x" * 1024)
    for keep in (None, lambda i: False):
        with pytest.raises(ShardReadError, match="cut short inside a member"):
            list(iter_shard(str(bad), keep))
