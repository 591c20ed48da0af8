"""tools/bench_pmp.py runs end to end with tiny settings and ends with its summary line: finite positive
numbers, and the MEASURED mask storage of bool masks (1 byte = 8 bits per parameter); tools/bench_attack.py
derives its summary from the cell times it prints."""

import math
import re
import subprocess
import sys

import pytest

from pmp_megatron.testing import REPO

LAST_LINE = re.compile(r"step_ratio=(\S+) mask_bits_per_param=(\S+) select_over_backward=(\S+) ci_high=(\S+)")
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
    step_ratio, mask_bits, select_over_backward, ci_high = map(float, match.groups())
    for value in (step_ratio, mask_bits, select_over_backward, ci_high):
        assert math.isfinite(value) and value > 0
    assert mask_bits == 8.0  # bool masks: one byte per parameter, as measured on the model
    assert "Trainer.train" in proc.stdout and "mask_grads" in proc.stdout


def test_bench_attack_reports_both_modes_and_the_ratio_of_its_own_times(tmp_path):
    """tools/bench_attack.py on 2 smoke-suite cells: every timed cell is printed, and the summary's
    cells/hour and fresh/shared ratio are those of the printed per-cell times (not constants)."""
    import json

    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_attack.py"), "--suite",
         str(REPO / "configs" / "attacks" / "smoke.yaml"), "--task", "copy", "--cells", "2",
         "--work", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    cells = [json.loads(line) for line in out.splitlines() if line.startswith('{"cell"')]
    summary = json.loads(out[out.index("{\n"):])
    assert sorted((c["cell"], c["mode"]) for c in cells) == [(0, "fresh"), (0, "shared"), (1, "fresh"),
                                                             (1, "shared")]
    cpu = {m: [c["cpu_s"] for c in sorted(cells, key=lambda c: c["cell"]) if c["mode"] == m]
           for m in ("fresh", "shared")}
    for mode in ("fresh", "shared"):
        assert summary[mode]["cells_per_cpu_hour"] == pytest.approx(3600 * 2 / sum(cpu[mode]), rel=0.02)
    ratio = sum(f / s for f, s in zip(cpu["fresh"], cpu["shared"], strict=True)) / 2
    assert summary["cpu_time_ratio_fresh_over_shared"]["mean"] == pytest.approx(ratio, rel=0.05)
    assert summary["cpu_time_ratio_fresh_over_shared"]["cells"] == 2


ADVERSARIAL_LAST_LINE = re.compile(r"adversarial_step_ratio=(\S+) ci=(\S+)-(\S+) amortized_ratio=(\S+)")


@pytest.mark.dist  # 2 gloo processes, ~30 s
def test_bench_pmp_adversarial_mode_prints_the_ratio_against_plain_pmp():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_pmp.py"), "--adversarial", "--steps", "2",
         "--warmup", "1", "--sizes", "debug", "--inner-steps", "1", "--interval", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = ADVERSARIAL_LAST_LINE.fullmatch(last)
    assert match, f"unexpected last line: {last!r}"
    ratio, lo, hi, amortized = map(float, match.groups())
    assert lo <= ratio <= hi and ratio > 1  # an adversarial step does a plain step's work and more
    assert amortized == pytest.approx(1 + (ratio - 1) / 4, abs=2e-4)
    assert "plain ms" in proc.stdout and "adv ms" in proc.stdout
