"""Run under `accelerate launch --multi_gpu --num_processes 2` (tests/test_multinode.py): two "nodes"
without a shared file system. Each rank works in a folder of its own (BASE/node<R>), so the same
relative output_dir of CONFIG names two different folders; then both ranks work in BASE/shared, as on
a shared file system. OUT/rank<R>.json records each exit status."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from uniremoval import launch
from uniremoval.cli import main

torch.set_num_threads(1)
cfg, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])  # the launcher's: no accelerate state before the commands make theirs
launch.SEE_WAIT_S = 1.0  # a blind rank re-lists for 10 s by default (NFS); a second is enough on one disk
codes = {}
for case, folder in (("blind", base / f"node{rank}"), ("shared", base / "shared")):
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    codes[case] = main(["train", "teacher", "--config", cfg])
(out / f"rank{rank}.json").write_text(json.dumps(codes))
