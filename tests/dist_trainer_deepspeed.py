"""Manual check (not collected by pytest): the trainer under DeepSpeed ZeRO-2 on two CPU processes.

    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 --num_machines 1 \\
        --mixed_precision no --gradient_accumulation_steps 1 tests/dist_trainer_deepspeed.py OUT

Trains the toy stage of tests/test_trainer.py 4 steps, resumes to 10, trains 10 uninterrupted
in another folder, and prints whether both runs end with the same weights on every rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import ToyStage, make_cfg

from uniremoval.stages.trainer import Trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    shas = []
    for folder, max_steps, resume in (("a", 4, None), ("a", None, "auto"), ("b", None, None)):
        cfg = make_cfg(out / folder, max_steps=max_steps)
        trainer = Trainer(cfg, ToyStage(cfg))
        res = trainer.fit(resume=resume)
        w = trainer.accelerator.unwrap_model(trainer.models["net"]).weight.detach()
        shas.append(hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16])
        rank = trainer.accelerator.process_index
        print(json.dumps({"rank": rank, "run": folder, "step": res.step, "ds": trainer.deepspeed,
                          "sha": shas[-1]}), flush=True)
    print(json.dumps({"rank": rank, "resumed_equals_uninterrupted": shas[1] == shas[2]}), flush=True)


if __name__ == "__main__":
    from uniremoval.launch import exit_process

    main(Path(sys.argv[1]))
    exit_process(0)  # as the `uniremoval` command ends a rank
