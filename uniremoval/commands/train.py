"""`uniremoval train teacher|kt|da --config FILE [key=value ...] [--resume auto|PATH]`.

Run it under `accelerate launch` for several GPUs/processes (see launch/); a plain `uniremoval
train ...` is one process. Exit status 75 means preempted (SIGTERM/SIGUSR1): a checkpoint was
written; rerun with `--resume auto`.
"""

from __future__ import annotations

import argparse

from uniremoval.commands import add_overrides, overrides

STAGE_HELP = {
    "teacher": "supervised teacher (model.arch: MPRNet by default) on one degradation's synthetic pairs",
    "kt": "knowledge transfer: the student learns every degradation from the frozen teachers",
    "da": "domain adaptation of the student on unpaired real images",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a teacher, the student (kt) or adapt it (da)",
                              description="Train one stage on the shared trainer (accelerate).")
    sub = p.add_subparsers(dest="train_stage", metavar="STAGE")
    sub.required = True
    for stage, text in STAGE_HELP.items():
        sp = sub.add_parser(stage, help=text, description=text + ".",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example: uniremoval train {} --config configs/{}.yaml optim.lr=1e-4".format(
                                stage, "teacher/haze" if stage == "teacher" else stage))
        sp.add_argument("--config", required=True, help="stage config YAML")
        add_overrides(sp)
        sp.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = newest checkpoint in the run dir (start fresh if none), "
                             "or a checkpoints/step-N folder. Settings may change (each that changes what is "
                             "trained is named; max_steps, checkpoint.*, tracking.* go unsaid), the "
                             "architecture, degradation types and stage may not")
        sp.set_defaults(func=_handler, stage_name=stage)


def _handler(args) -> int:
    from uniremoval.config import load_config
    from uniremoval.stages import da, kt, teacher
    from uniremoval.stages.trainer import run_stage

    stages = {"teacher": teacher.TeacherTraining, "kt": kt.KnowledgeTransfer, "da": da.DomainAdaptation}
    cfg = load_config(args.config, overrides(args), stage=args.stage_name)
    return run_stage(stages[args.stage_name](cfg), args.resume)
