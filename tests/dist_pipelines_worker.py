"""Two-process check of the data pipelines, launched by tests/test_pipelines.py with
`accelerate launch --multi_gpu --num_processes 2 tests/dist_pipelines_worker.py DATA_DIR OUT_DIR`.

Each rank (gloo, two DataLoader workers) writes OUT_DIR/rank<r>.json with what it saw; the test
asserts on the union. Every training step does an all_reduce, so ranks running different step
counts would hang (and the test's timeout would fail it) rather than pass silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEGS = ["haze", "rain", "blur"]
CELL, CROP, BATCH, STEPS, EPOCHS, WORKERS = 16, 32, 5, 4, 2, 2


def main(data: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from _shardgen import check_batch
    from accelerate import PartialState

    from uniremoval.data.pipelines import da_loader, eval_samples, kt_loader

    state = PartialState(cpu=True)  # rank and world come from accelerate, passed explicitly below
    rank, world = state.process_index, state.num_processes
    assert world == 2 and dist.is_initialized() and dist.get_backend() == "gloo"
    res: dict = {"rank": rank, "world": world}

    # Evaluation: 1 shard (< 4 global workers: samples interleaved) and 5 shards (whole shards).
    res["eval"] = {}
    for name in ("rain", "blur", "evalbad"):
        items = list(eval_samples(data / name, rank, world, num_workers=WORKERS))
        res["eval"][name] = {
            "keys": [it["key"] for it in items if "error" not in it],
            "errors": [it["key"] for it in items if "error" in it],
            "full_size": all(tuple(it["input"].shape[1:]) == (it["meta"]["height"], it["meta"]["width"])
                             for it in items if "error" not in it),
        }

    # KT: 3 sources with 3, 1 and 5 shards (uneven), cache fields, 2 epochs.
    sources = [(d, data / d, d, w) for d, w in zip(DEGS, (1.0, 2.0, 1.0))]
    loader = kt_loader(sources, DEGS, BATCH, CROP, STEPS, WORKERS, seed=1, rank=rank, world_size=world,
                       cell=CELL, require=("target", "teacher", "feature"), shuffle_buffer=4)
    epochs = []
    for _ in range(EPOCHS):
        steps, types, problems, keys, bad = 0, [], [], [], 0
        for batch in loader:
            t = torch.ones(1)
            dist.all_reduce(t)  # a rank with fewer steps would leave the other blocked here
            assert t.item() == world
            steps += 1
            types.append(sorted({DEGS[i] for i in batch["degradation"].tolist()}))
            problems += check_batch(batch, DEGS, CELL)
            keys.append(batch["key"])
            bad += batch["bad_samples"]
        epochs.append({"steps": steps, "types": types, "problems": problems, "keys": keys, "bad": bad,
                       "len": len(loader)})
    res["kt"] = epochs

    # DA: degraded (all types, unpaired use) + clear (targets of the haze set).
    da = da_loader(sources, [("clear", data / "haze")], DEGS, BATCH, CROP, 3, WORKERS, seed=2, rank=rank,
                   world_size=world, clear_batch_size=2, shuffle_buffer=4)
    da_steps = []
    for step in da:
        t = torch.ones(1)
        dist.all_reduce(t)
        da_steps.append({
            "types": sorted({DEGS[i] for i in step["degraded"]["degradation"].tolist()}),
            "degraded_shape": list(step["degraded"]["input"].shape),
            "clear_shape": list(step["clear"]["input"].shape),
            "clear_keys": step["clear"]["key"],
        })
    res["da"] = da_steps

    # Disjoint reading across ranks, where it is exact: one source (23 samples in 5 shards, so each
    # of the 4 global workers has whole shards, 4+ samples) and few enough steps that no worker ends
    # its share and starts a second pass (passes re-permute the shards, so over a long epoch a
    # sample can come round on another rank). Each worker reads 3 samples plus a 1-slot buffer.
    one = kt_loader([("blur", data / "blur", "blur", 1.0)], ["blur"], 3, CROP, 2, WORKERS, seed=3, rank=rank,
                    world_size=world, cell=CELL, require=("target",), shuffle_buffer=1)
    res["one_source_keys"] = [k for batch in one for k in batch["key"]]

    counts = [None] * world
    dist.all_gather_object(counts, [e["steps"] for e in epochs])
    res["all_rank_steps"] = counts
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    from uniremoval.launch import leave_process_group_at_exit

    leave_process_group_at_exit()  # every rank is done: no abort at interpreter finalization


if __name__ == "__main__":
    from uniremoval.launch import exit_process

    main(Path(sys.argv[1]), Path(sys.argv[2]))
    exit_process(0)  # as the `uniremoval` command ends a rank
