"""Run under `accelerate launch --multi_gpu --num_processes 2`: two `uniremoval eval` calls in the same
two processes (saves a launch): argv[3:] first, then the same on a dataset with an unreadable image,
which must fail on every rank instead of leaving one waiting. Writes rank<R>.json with both exit codes."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

from uniremoval.cli import main
from uniremoval.launch import exit_process

torch.set_num_threads(1)
out, bad_data, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]


@atexit.register  # registered first, so it runs last: after the CLI's own exit handler
def record_exit_state() -> None:
    # cli.main destroys the process group at exit (gloo's threads left to finalization could abort)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}-exit.json").write_text(json.dumps({"initialized": torch.distributed.is_initialized()}))


rc_good = main(args)
i = args.index("--data")
bad_args = [*args[:i + 1], bad_data, *args[i + 2:]]
bad_args[bad_args.index("--json") + 1] = str(out / "bad.json")
rc_bad = main(bad_args)
rank = int(os.environ.get("RANK", "0"))
(out / f"rank{rank}.json").write_text(json.dumps({"good": rc_good, "bad": rc_bad}))

exit_process(0)  # as the `uniremoval` command ends a rank
