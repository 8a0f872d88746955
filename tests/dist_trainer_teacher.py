"""Worker for tests/test_teacher_cache.py (not a test module itself).

    python tests/dist_trainer_teacher.py kill CONFIG STEP
        train a teacher and SIGKILL this very process inside the step after STEP updates.
    accelerate launch --multi_gpu --num_processes 2 tests/dist_trainer_teacher.py dist CONFIG CACHE_CONFIG OUT
        two ranks: train the teacher, record each rank's weights and a fixed batch's loss before
        and after, then build the cache with the trained teacher, then a toy run where one rank
        alone meets a NaN loss and a SIGUSR1; OUT/rank<r>.json per rank.
    accelerate launch --multi_gpu --num_processes 2 tests/dist_trainer_teacher.py diskfull CONFIG
        `uniremoval train teacher` where rank 0 alone meets a full disk at its first checkpoint.
    accelerate launch --multi_gpu --num_processes 2 tests/dist_trainer_teacher.py unused CONFIG [OVERRIDE...]
        `uniremoval train teacher` of an MPRNet with one more layer that no forward uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch


def _kill(config: str, step: int) -> None:
    from uniremoval.config import load_config
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    class Killed(TeacherTraining):
        def training_step(self, batch, ctx):
            if ctx.step == step:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real kill -9
            return super().training_step(batch, ctx)

    cfg = load_config(config, stage="teacher")
    Trainer(cfg, Killed(cfg)).fit()


def _fixed_batch_loss(model: torch.nn.Module, cfg) -> float:
    from uniremoval.losses.pixel import mprnet_stage_loss

    g = torch.Generator().manual_seed(1234)
    y = torch.rand(2, 3, 32, 32, generator=g) * 1.6 - 0.8
    x = y * 0.5 + 0.2  # the fixtures' haze model in [-1, 1] terms
    with torch.no_grad():
        return float(mprnet_stage_loss(model(x), y, edge_weight=cfg.loss.edge_weight)["total"])


def _dist(config: str, cache_config: str, out: str) -> None:
    from accelerate.utils import set_seed

    from uniremoval.config import load_config
    from uniremoval.models import build_model
    from uniremoval.stages import cache
    from uniremoval.stages.teacher import TeacherTraining
    from uniremoval.stages.trainer import Trainer

    cfg = load_config(config, stage="teacher")
    set_seed(cfg.train.seed)  # the trainer seeds the same way before building: same initial weights
    before = _fixed_batch_loss(build_model("mprnet", cfg.model.preset), cfg)
    trainer = Trainer(cfg, TeacherTraining(cfg))
    result = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.models["teacher"])
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    after = _fixed_batch_loss(model, cfg)
    rank = trainer.accelerator.process_index
    record = {"rank": rank, "world": trainer.accelerator.num_processes, "weights_sha": h.hexdigest(),
              "loss_before": before, "loss_after": after, "step": result.step, "run_id": result.run_id,
              "metrics": result.metrics}
    cache.run(load_config(cache_config, stage="cache"))
    record.update(_toy_rank_events(Path(out) / "toy", rank))
    # The same with torch's fused Adam: the skip and the stop are agreed on the device, read a step late.
    record.update(_toy_rank_events(Path(out) / "fused", rank, {"lr": 0.05, "fused": True}, prefix="fused"))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def _toy_rank_events(out: Path, rank: int, optim: dict | None = None, prefix: str = "toy") -> dict:
    """Only rank 1 sees a NaN loss (step 2) and only rank 1 gets SIGUSR1 (during step 4): both
    ranks must skip the same update and stop at the same step, or DDP would hang."""
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_trainer import ToyStage, make_cfg

    from uniremoval.stages.trainer import Trainer

    cfg = make_cfg(out, optim)
    stage = ToyStage(cfg, poison_at=1 if rank == 1 else None, signal_at=3 if rank == 1 else None)
    trainer = Trainer(cfg, stage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = trainer.fit()
    w = trainer.accelerator.unwrap_model(trainer.models["net"]).weight.detach()
    return {f"{prefix}_status": res.status, f"{prefix}_step": res.step, f"{prefix}_skipped": res.nonfinite_skipped,
            f"{prefix}_checkpoint": sorted(p.name for p in (out / "toy" / "checkpoints").glob("step-*")),
            f"{prefix}_sha": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
            f"{prefix}_deferred": trainer._defer_check,
            f"{prefix}_warnings": [str(c.message) for c in caught if "non-finite" in str(c.message)]}


def _disk_full_on_rank0(config: str) -> int:
    """Rank 0's disk fills up while it writes the first checkpoint's state.pt (rank 1's writes go
    through): the CLI's way of running a teacher, so the error line and exit status are the user's."""
    import errno

    from uniremoval.cli import main

    # The launcher's RANK, not accelerate's state: a PartialState made here, before the trainer's
    # Accelerator(cpu=True), would leave each process training alone.
    if os.environ.get("RANK") == "0":
        real_save = torch.save

        def full(obj, f, *args, **kwargs):
            if str(f).endswith("state.pt"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        torch.save = full
    return main(["train", "teacher", "--config", config])


def _unused_parameter(config: str, overrides: list[str]) -> int:
    from uniremoval.cli import main
    from uniremoval.models import mprnet_arch

    built = mprnet_arch.MPRNet.__init__

    def with_unused_layer(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.unused = torch.nn.Conv2d(3, 3, 1)  # registered, never called: DDP waits for its gradient

    mprnet_arch.MPRNet.__init__ = with_unused_layer
    return main(["train", "teacher", "--config", config, *overrides])


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "kill":
        _kill(sys.argv[2], int(sys.argv[3]))
    elif mode == "diskfull":
        raise SystemExit(_disk_full_on_rank0(sys.argv[2]))
    elif mode == "unused":
        raise SystemExit(_unused_parameter(sys.argv[2], sys.argv[3:]))
    elif mode == "dist":
        _dist(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
