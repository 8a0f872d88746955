"""Run under `accelerate launch --multi_gpu --num_processes 2` (tests/test_multinode.py): how the two
ranks of one job agree on their output folder, each case a `train teacher` of CONFIG (a relative
output_dir) in a working folder under BASE:
- blind: each rank in a folder of its own (BASE/node<R>), as two nodes without a shared file system;
- shared: both in BASE/shared, as on a shared file system (it trains);
- marker_full / lock_full: both in one folder, and rank 0's disk is full (ENOSPC) when it writes the
  marker the other ranks look for / when it takes the folder's lock.
Then a resume of a checkpoint only rank 0 sees, and `eval --degradation rain` of SHARDS (haze): an
error every rank's listing holds alike.
OUT/rank<R>.json records each exit status."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import torch

import uniremoval.io
from uniremoval import launch
from uniremoval.cli import main
from uniremoval.launch import exit_process

torch.set_num_threads(1)
cfg, base, out, shards = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
rank = int(os.environ["RANK"])  # the launcher's: no accelerate state before the commands make theirs
launch.SEE_WAIT_S = 1.0  # a blind rank re-lists for 10 s by default (NFS); a second is enough on one disk


def full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


write_text, folder_lock = Path.write_text, uniremoval.io.folder_lock


def marker_full(path, *args, **kwargs):
    if path.name.startswith(launch.MARKER_PREFIX):
        full()
    return write_text(path, *args, **kwargs)


codes = {}
for case, folder in (("blind", base / f"node{rank}"), ("shared", base / "shared"),
                     ("marker_full", base / "marker_full"), ("lock_full", base / "lock_full")):
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    if rank == 0:
        Path.write_text = marker_full if case == "marker_full" else write_text
        uniremoval.io.folder_lock = full if case == "lock_full" else folder_lock
    codes[case] = main(["train", "teacher", "--config", cfg])
Path.write_text, uniremoval.io.folder_lock = write_text, folder_lock
# A --resume checkpoint only rank 0 sees (the relative `ckpt` is a link in rank 0's folder alone), the
# run folder shared: the path is refused on both ranks before the run folder is made.
os.chdir(base / f"node{rank}")
if rank == 0:
    Path("ckpt").symlink_to(next((base / "shared" / "outputs" / "teacher-haze" / "checkpoints").glob("step-*")))
codes["resume_one_node"] = main(["train", "teacher", "--config", cfg, f"output_dir={base / 'resume_one_node'}",
                                 "--resume", "ckpt"])
codes["eval_wrong_type"] = main(["eval", "--checkpoint", "none", "--data", shards, "--degradation", "rain",
                                 "--metrics", "psnr", "--no-mlflow", "--device", "cpu"])
(out / f"rank{rank}.json").write_text(json.dumps(codes))

exit_process(0)  # as the `uniremoval` command ends a rank
