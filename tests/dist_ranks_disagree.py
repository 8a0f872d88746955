"""Run under `accelerate launch --multi_gpu --num_processes 2` (tests/faults/test_data_faults.py): the
ranks of one job disagree on their inputs, as when one node's mount lags or holds another copy.
Rank 1 does not see the shard `argv[2]` (its shard listing drops it) and reads `argv[3]` (key=value)
as an extra override of the training config. Then, in the same two processes (saves launches):
`uniremoval eval` and `uniremoval cache` on the shards, `uniremoval train teacher` with the
override, then without it (the shard listing alone differs), then `eval` once more with rank 1 unable
to list the data at all; OUT/rank<R>.json records each exit status."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from uniremoval.cli import main
from uniremoval.data import shard_stream
from uniremoval.launch import exit_process

torch.set_num_threads(1)
out, hidden, override = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
eval_args, cache_cfg, teacher_cfg = json.loads(sys.argv[4]), sys.argv[5], sys.argv[6]
rank = int(os.environ["RANK"])  # the launcher's: no accelerate state before the commands make theirs
if rank == 1:
    listed = shard_stream.resolve_shards

    def resolve_without_hidden(spec, *args, **kwargs):
        return [u for u in listed(spec, *args, **kwargs) if Path(u).name != hidden]

    shard_stream.resolve_shards = resolve_without_hidden
codes = {"eval": main(eval_args), "cache": main(["cache", "--config", cache_cfg])}
codes["train"] = main(["train", "teacher", "--config", teacher_cfg, *([override] if rank == 1 else [])])
codes["train_shards"] = main(["train", "teacher", "--config", teacher_cfg])  # same config, one shard fewer
if rank == 1:  # the data cannot be listed on this rank alone (a mount missing on one node)
    from uniremoval.errors import DataError

    def unlisted(spec, *args, **kwargs):
        raise DataError(f"{spec} is not mounted here")

    shard_stream.resolve_shards = unlisted
codes["eval_unlisted"] = main(eval_args)  # every rank stops with the error; none waits for the other
(out / f"rank{rank}.json").write_text(json.dumps(codes))

exit_process(0)  # as the `uniremoval` command ends a rank
