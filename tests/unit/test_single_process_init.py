"""A process without a launcher gets a world of one that binds no port and leaves os.environ alone, so a
child process it starts (a script running ``pmp-release`` after an in-process step) cannot inherit RANK and
a MASTER_PORT this process already holds."""

import json
import subprocess
import sys

CHILD = """
import json, os
from pmp_megatron import mcore
import torch
mcore.setup_parallel()
t = torch.ones(2)
mcore.all_reduce(t)
mcore.barrier()
keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(json.dumps({"sum": t.tolist(), "env": sorted(k for k in keys if k in os.environ)}))
"""


def test_single_process_world_leaves_the_environment_alone():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"sum": [1.0, 1.0], "env": []}
