"""A `pipe:` shard source that stops mid-stream: `python gate.py SHARD.tar GATE_DIR`.

While GATE_DIR/open does not exist it writes GATE_DIR/reached and blocks (the test then kills the
job, so the job is killed at a known point without any sleep in the test); once it exists, it is
`cat SHARD.tar`."""

import shutil
import sys
import time
from pathlib import Path

shard, gate = Path(sys.argv[1]), Path(sys.argv[2])
if not (gate / "open").exists():
    (gate / "reached").touch()
    while True:  # killed with the job's process group
        time.sleep(3600)
with open(shard, "rb") as fh:
    shutil.copyfileobj(fh, sys.stdout.buffer)
