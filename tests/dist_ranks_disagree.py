"""Run under `accelerate launch --multi_gpu --num_processes 2` (tests/faults/test_data_faults.py): the
ranks of one job disagree on their inputs, as when one node's mount lags or holds another copy.
Rank 1 does not see the shard `argv[2]` (its shard listing drops it). Then, in the same two
processes (saves a launch): `uniremoval eval` and `uniremoval cache` on the shards; OUT/rank<R>.json
records each exit status."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from uniremoval.cli import main
from uniremoval.data import shard_stream

torch.set_num_threads(1)
out, hidden = Path(sys.argv[1]), sys.argv[2]
eval_args, cache_cfg = json.loads(sys.argv[3]), sys.argv[4]
rank = int(os.environ["RANK"])  # the launcher's: no accelerate state before the commands make theirs
if rank == 1:
    listed = shard_stream.resolve_shards

    def resolve_without_hidden(spec, *args, **kwargs):
        return [u for u in listed(spec, *args, **kwargs) if Path(u).name != hidden]

    shard_stream.resolve_shards = resolve_without_hidden
codes = {"eval": main(eval_args), "cache": main(["cache", "--config", cache_cfg])}
(out / f"rank{rank}.json").write_text(json.dumps(codes))
