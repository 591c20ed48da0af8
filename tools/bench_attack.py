"""Benchmark attack-cell throughput: one loaded model shared by the cells of a release (``runner.base_model``,
the default) against a fresh load and un-attacked evaluation per cell (``set_model_reuse(False)``, what
every cell did before), measured in the same run, interleaved cell by cell.

Synthetic releases of ``configs/model/cpu-4m.yaml`` (a PMP-like one with a complement shrunk to 0.9 W0
and a key, a dense one) are written once to WORK; the first ``--cells`` cells of the suite's grid on one
task and seed (keyless, authorized and dense cells alike) then run once per mode, alternating modes cell
by cell. Each cell's process CPU time (one torch thread) and wall time are recorded; the output is
cells/hour per mode and the per-cell time ratio (fresh / shared) with a 95% t-interval over the cells.

    python tools/bench_attack.py [--suite configs/attacks/results-cpu.yaml] [--task code_test]
                                 [--cells 6] [--work /tmp/bench_attack]

The ratio is the share of a cell spent loading the release and re-scoring it un-attacked: large when a
cell trains for a few steps (the smoke suite), close to 1 when each cell's fine-tuning dominates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_releases(work: Path) -> tuple[Path, Path, Path]:
    """(PMP-like release, dense release, key) of the cpu-4m architecture, built once under ``work``."""
    import torch

    from pmp_megatron.config import load_config
    from pmp_megatron.data.corpora import iter_documents
    from pmp_megatron.data.tokenizer import train_tokenizer
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release.recovery import iter_w0
    from pmp_megatron.release.writer import write_release

    pmp, dense, key = work / "pmp", work / "dense", work / "key.safetensors"
    if key.is_file():
        return pmp, dense, key
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "model" / "cpu-4m.yaml", ["pmp.mode=dense", "model.seed=0"]).model
    tok = work / "tok.model"
    train_tokenizer(iter_documents("prose", max_docs=300, max_chars=6000), tok, vocab_size=cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    w0 = dict(iter_w0(cfg))
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in w0.items()}
    weights = {"pmp": {n: torch.where(masks[n], t + 0.02 * torch.randn(t.shape, generator=gen), 0.9 * t)
                       for n, t in w0.items()},
               "dense": {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in w0.items()}}
    for role, out in (("pmp", pmp), ("dense", dense)):
        write_release(weights[role].items(), out, cfg, "float32", {"bench": role}, str(tok))
    maskfile.save(masks, key, rho=0.5, w0_seed=0)
    return pmp, dense, key


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    from pmp_megatron.attack.stats import mean_interval

    i = mean_interval(xs)
    return i.estimate, i.low, i.high


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=str(REPO / "configs" / "attacks" / "results-cpu.yaml"))
    ap.add_argument("--task", default="code_test")
    ap.add_argument("--cells", type=int, default=6, help="cells per mode (default 6)")
    ap.add_argument("--work", default="/tmp/bench_attack")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from pmp_megatron.attack import runner
    from pmp_megatron.attack.run import prepare

    pmp, dense, key = make_releases(Path(args.work))
    cells, ctx = prepare(args.suite, str(pmp), dense_model=str(dense), mask=str(key),
                         attackers=["unauthorized", "authorized"], device="cpu")
    chosen = [c for c in cells if c.task.name == args.task and c.seed == 0][: args.cells]
    if len(chosen) < 2:
        sys.exit(f"bench_attack: the suite has fewer than 2 cells of task {args.task!r} at seed 0")
    runner._task(str(pmp), chosen[0].task, ctx.suite.seq_length, ctx.suite.eval_blocks)  # tokenize once
    runner._REUSE = True
    for role in dict.fromkeys(c.role for c in chosen):  # each shared model's one load, outside the timing
        runner.run_cell(next(c for c in chosen if c.role == role), ctx)
    times = {"shared": [], "fresh": []}
    for i, cell in enumerate(chosen):
        for mode in (("fresh", "shared") if i % 2 else ("shared", "fresh")):
            runner._REUSE = mode == "shared"  # set_model_reuse would also clear the shared models
            c0, w0 = time.process_time(), time.perf_counter()
            runner.run_cell(cell, ctx)
            times[mode].append((time.process_time() - c0, time.perf_counter() - w0))
            print(json.dumps({"cell": i, "mode": mode, "adversary": cell.adversary.label, "role": cell.role,
                              "attacker": cell.attacker, "cpu_s": round(times[mode][-1][0], 4)}), flush=True)
    ratios = [f[0] / s[0] for f, s in zip(times["fresh"], times["shared"], strict=True)]
    est, low, high = t_interval(ratios)
    out = {mode: {"cells_per_cpu_hour": round(3600 * len(v) / sum(c for c, _ in v), 1),
                  "cells_per_wall_hour": round(3600 * len(v) / sum(w for _, w in v), 1)}
           for mode, v in times.items()}
    out["cpu_time_ratio_fresh_over_shared"] = {"mean": round(est, 3), "ci95": [round(low, 3), round(high, 3)]
                                               if math.isfinite(low) else None, "cells": len(ratios)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
