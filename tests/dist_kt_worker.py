"""Worker for the multi-process KT/DA tests: run stages in turn, then compare weights across ranks.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_kt_worker.py OUT_JSON PHASE [PHASE ...]

Each PHASE is a JSON object {"config": path, "overrides": [...], "resume": null|"auto"}. A phase
runs its stage exactly as `uniremoval train kt|da` does (same accelerator choice, cache check and
trainer); afterwards every rank fingerprints each trained model's parameters. Rank 0 writes a list
with one record per phase: {stage, status, step, run_id, world_size, fingerprints: {model:
[per-rank [3 numbers]]}, initial (the student's fingerprint before training), distributed_type,
zero_stage, sharded_params}. Several phases in one launch keep the number of
(slow) launches small. DeepSpeed is requested through the environment, as `accelerate launch` does:
ACCELERATE_USE_DEEPSPEED=true plus ACCELERATE_DEEPSPEED_ZERO_STAGE (launch/deepspeed_zero2.yaml)
or ACCELERATE_DEEPSPEED_CONFIG_FILE (a DeepSpeed JSON, an accelerate config's deepspeed_config_file).
"""

from __future__ import annotations

import json
import sys

import torch


def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Sum, absolute sum and a position-weighted sum of all parameters (float64)."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    pos = torch.arange(flat.numel(), dtype=torch.float64) % 9973
    return torch.stack([flat.sum(), flat.abs().sum(), (flat * pos).sum()])


def _sharded(model) -> list[int]:
    """[parameters ZeRO-3 partitions across ranks, all parameters] ([0, n] outside ZeRO-3):
    DeepSpeed keeps parameters under stage3_param_persistence_threshold whole on every rank."""
    params = list(model.parameters())
    return [sum(1 for p in params if hasattr(p, "ds_id") and not p.ds_persist), len(params)]


def run_phase(phase: dict) -> tuple[dict, object]:
    from accelerate.utils import set_seed

    from uniremoval.config import load_config
    from uniremoval.stages import da, kt
    from uniremoval.stages.trainer import Trainer

    cfg = load_config(phase["config"], phase.get("overrides", []))
    set_seed(cfg.train.seed)  # as Trainer.setup: the student is the first model built after seeding
    initial = fingerprint(kt.build_student(cfg)).tolist()
    # as run_stage (the trainer checks KT's teacher cache; DA refuses DeepSpeed when built)
    stage = kt.KnowledgeTransfer(cfg) if cfg.stage == "kt" else da.DomainAdaptation(cfg)
    trainer = Trainer(cfg, stage)
    result = trainer.fit(resume=phase.get("resume"))
    acc = trainer.accelerator
    prints = {}
    for name in stage.trainable:
        model = trainer.models[name]
        if kt.zero_stage(acc) == 3:  # sharded parameters: gather them on every rank (collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                fp = fingerprint(acc.unwrap_model(model)).to(acc.device)
        else:
            fp = fingerprint(acc.unwrap_model(model)).to(acc.device)
        prints[name] = acc.gather(fp.unsqueeze(0)).cpu().tolist()
    record = {"stage": cfg.stage, "status": result.status, "step": result.step, "run_id": result.run_id,
              "world_size": acc.num_processes, "fingerprints": prints, "initial": initial,
              "distributed_type": str(acc.distributed_type), "zero_stage": kt.zero_stage(acc),
              "sharded_params": {n: _sharded(trainer.models[n]) for n in stage.trainable}}
    return record, acc


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    out_json, *phases = argv
    records, acc = [], None
    for text in phases:
        record, acc = run_phase(json.loads(text))
        records.append(record)
    if acc is not None and acc.is_main_process:
        with open(out_json, "w") as fh:
            json.dump(records, fh)
    if acc is not None:
        acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    from uniremoval.launch import exit_process

    exit_process(main(sys.argv[1:]))  # as the `uniremoval` command ends a rank
