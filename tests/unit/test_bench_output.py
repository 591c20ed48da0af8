"""tools/bench_pmp.py runs end to end with tiny settings and ends with its summary line: finite positive
numbers, and the MEASURED mask storage of bool masks (1 byte = 8 bits per parameter)."""

import math
import re
import subprocess
import sys

import pytest

from pmp_megatron.testing import REPO

LAST_LINE = re.compile(r"step_ratio=(\S+) mask_bits_per_param=(\S+) select_over_backward=(\S+)")
FLOAT = re.compile(r"\d+\.\d{4}")


@pytest.mark.dist  # the script spawns 2 gloo processes; ~30 s on 2 idle cores
def test_bench_pmp_last_line():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_pmp.py"), "--steps", "2", "--warmup", "1",
         "--sizes", "debug"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, proc.stdout  # the table comes first
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, f"unexpected last line: {lines[-1]!r}"
    assert all(FLOAT.fullmatch(g) for g in match.groups()), match.groups()  # 4 decimals
    step_ratio, mask_bits, select_over_backward = map(float, match.groups())
    for value in (step_ratio, mask_bits, select_over_backward):
        assert math.isfinite(value) and value > 0
    assert mask_bits == 8.0  # bool masks: one byte per parameter, as measured on the model
    assert "Trainer.train" in proc.stdout and "mask_grads" in proc.stdout
