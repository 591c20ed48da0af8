"""The committed small-scale PMP experiment (docs/results/), rerunnable with one command on CPU.

    python tools/run_results_experiment.py [--work runs/results] [--out docs/results] [--scale full|smoke]

Five pretraining runs of the ~4M-parameter model (configs/model/cpu-4m.yaml) from the same W0, data and
schedule: the dense baseline, PMP with the reference complement policy (decay + projection) at
rho = 0.1 / 0.5 / 0.9, and PMP with the complement frozen at rho = 0.5. Each is released (HF dir), its
private mask exported and the release audited (mask recovery from the release alone). Then the
``results-cpu`` attack suite runs against every PMP release and the dense one: all five attackers on the
reference rho = 0.5 run, unauthorized + authorized on the others. The report, plots, summary and the
results JSONL go to ``--out`` (text and PNG only: no weights, no masks); everything heavy stays in
``--work``. Rerunning resumes: finished pretraining runs, releases and attack cells are skipped.

``--scale full`` is the committed experiment (~70-90 minutes on 2 cores). ``--scale smoke`` runs the
same pipeline on the debug model in about two minutes (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
logger = logging.getLogger("pmp_megatron.results")


@dataclass(frozen=True)
class Scale:
    model_config: str
    vocab: int
    train_steps: int
    global_batch: int
    lr: float
    warmup: int
    eval_interval: int
    eval_steps: int
    discovery_steps: int
    projection_radius: float
    projection_interval: int
    suite: str
    max_docs: int | None = None
    max_chars: int | None = None
    attack_workers: int = 2
    concurrent_runs: int = 2
    extra: tuple[str, ...] = field(default_factory=tuple)


# R: the reference's R = 2.0 at 1.1B parameters shrinks the complement to a per-entry RMS of
# 2.0 / sqrt(0.55e9) ~ 8.5e-5 at rho 0.5. We keep that per-entry scale: R = 2.0 * sqrt(N / 1.1e9), i.e.
# 0.12 at ~4M parameters. tau: the reference projects 50 times in 20k steps; 500 / 10 = 50 here too.
SCALES = {
    "full": Scale(model_config="model/cpu-4m.yaml", vocab=2048, train_steps=500, global_batch=16, lr=3e-3,
                  warmup=50, eval_interval=50, eval_steps=8, discovery_steps=30, projection_radius=0.12,
                  projection_interval=10, suite="attacks/results-cpu.yaml"),
    "smoke": Scale(model_config="model/debug.yaml", vocab=512, train_steps=12, global_batch=8, lr=3e-3,
                   warmup=2, eval_interval=6, eval_steps=2, discovery_steps=4, projection_radius=0.5,
                   projection_interval=4, suite="attacks/smoke.yaml", max_docs=120, max_chars=4000,
                   attack_workers=1, extra=("model.seq_length=64",)),
}

# name -> (PMP overrides or None for dense, attackers on its release)
ALL_ATTACKERS = ["unauthorized", "authorized", "recovery_global", "recovery_per_tensor", "recovery_init"]
KEYED = ["unauthorized", "authorized"]
RUNS = {
    "dense": (None, None),
    "pmp-rho0.5": ({"rho": 0.5, "complement": "decay", "projection": True}, ALL_ATTACKERS),
    "pmp-rho0.1": ({"rho": 0.1, "complement": "decay", "projection": True}, KEYED),
    "pmp-rho0.9": ({"rho": 0.9, "complement": "decay", "projection": True}, KEYED),
    "frozen-rho0.5": ({"rho": 0.5, "complement": "frozen", "projection": False}, KEYED),
}
REFERENCE_RUN = "pmp-rho0.5"


def experiment_seed_file(work: Path) -> Path:
    """One SECRET W0 seed shared by every run of the experiment (the runs are compared from the same start),
    drawn from OS entropy once and kept in WORK/private/w0_seed (0600); the runs read it through
    ``model.seed_file``, so it reaches no config.yaml, log or report."""
    import secrets

    from pmp_megatron.atomic import write_text_atomic

    path = work / "private" / "w0_seed"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_text_atomic(path, f"{secrets.randbits(128)}\n", mode=0o600)
    return path


def pretrain_overrides(work: Path, name: str, scale: Scale) -> list[str]:
    data = work / "data"
    pmp, _ = RUNS[name]
    args = [f"model.seed_file={experiment_seed_file(work)}",
            f"data.data_path=[0.5,{data / 'prose'},0.5,{data / 'code'}]",
            f"data.tokenizer_model={data / 'tokenizer.model'}", "data.split=98,2,0", "data.num_workers=1",
            f"model.vocab_size={scale.vocab}", f"train.train_steps={scale.train_steps}",
            f"train.micro_batch_size={scale.global_batch}", f"train.global_batch_size={scale.global_batch}",
            f"train.eval_interval={scale.eval_interval}", f"train.eval_steps={scale.eval_steps}",
            f"optim.lr={scale.lr}", f"optim.lr_warmup_steps={scale.warmup}", "optim.weight_decay=0.1",
            "optim.lr_decay_style=cosine", f"checkpoint.dir={work / 'runs' / name}",
            f"checkpoint.save_interval={scale.train_steps}", "logging.log_interval=25", *scale.extra]
    if pmp is None:
        return [*args, "pmp.mode=dense"]
    args += ["pmp.mode=pmp", f"pmp.rho={pmp['rho']}", f"pmp.complement={pmp['complement']}",
             f"pmp.projection={str(pmp['projection']).lower()}",
             f"pmp.discovery.max_steps={scale.discovery_steps}", f"pmp.discovery.lr={scale.lr}"]
    if pmp["projection"]:
        args += [f"pmp.projection_radius={scale.projection_radius}",
                 f"pmp.projection_interval={scale.projection_interval}"]
    return args


def _finished(run_dir: Path, steps: int) -> bool:
    from pmp_megatron.train import checkpoint

    return run_dir.is_dir() and checkpoint.latest_valid(run_dir) == steps


def pretrain_all(work: Path, scale: Scale) -> None:
    """Pretrain every run (``concurrent_runs`` at a time, one torch thread each); skip finished ones."""
    from pmp_megatron.mcore import free_port

    todo = [n for n in RUNS if not _finished(work / "runs" / n, scale.train_steps)]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    threads = max(1, (os.cpu_count() or 2) // scale.concurrent_runs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    while todo or running:
        while todo and len(running) < scale.concurrent_runs:
            name = todo.pop(0)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                   f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain",
                   "--config", str(CONFIGS / scale.model_config), *pretrain_overrides(work, name, scale)]
            log = open(work / "logs" / f"{name}.log", "a")  # noqa: SIM115 (closed when the run ends)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
            logger.info("pretraining %s (log: %s)", name, work / "logs" / f"{name}.log")
        time.sleep(2)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log.close()
            if proc.returncode != 0:
                for p, _, _ in running.values():
                    p.terminate()
                raise SystemExit(f"pretraining {name} failed (exit {proc.returncode}); see "
                                 f"{work / 'logs' / f'{name}.log'}")
            logger.info("pretraining %s done in %.0f s (%d left)", name, time.time() - t0,
                        len(todo) + len(running))


def release_all(work: Path) -> dict[str, dict]:
    """Release every run, export the PMP masks (mode 0600, under WORK/private) and audit the releases."""
    from pmp_megatron.release.from_checkpoint import AUDIT_FILE, release
    from pmp_megatron.release.key_export import export_mask
    from pmp_megatron.release.writer import default_owner_dir

    audits = {}
    for name, (pmp, _) in RUNS.items():
        rel = work / "release" / name
        mask = work / "private" / f"{name}.safetensors" if pmp is not None else None
        if mask is not None and not mask.is_file():
            export_mask(work / "runs" / name, mask)
        audit = default_owner_dir(rel) / AUDIT_FILE  # owner-side, never in the release
        if not (rel / "config.json").is_file() or (mask is not None and not audit.is_file()):
            release(work / "runs" / name, rel, overwrite=True, mask=None if mask is None else str(mask))
        if mask is not None:
            audits[name] = json.loads(audit.read_text())
            audits[name]["embedding_rows_trainable"] = _embedding_rows_trainable(mask)
    return audits


def _embedding_rows_trainable(mask_path: Path) -> float:
    """Fraction of the input embedding's rows (tokens) with at least one masked-in entry: Stage I ranks one
    step's gradient, and a token absent from that step's batch has an all-zero embedding gradient row."""
    from pmp_megatron.pmp import maskfile

    masks, _ = maskfile.load(mask_path)
    return float(masks["model.embed_tokens.weight"].any(dim=1).float().mean())


def attack_all(work: Path, scale: Scale) -> tuple[dict[str, str], set[str]]:
    """Run the suite on every PMP release (paired with the dense one); return (run name -> model id, the
    ids of this suite's cells: the results file may hold cells of an earlier grid, left out of the report)."""
    from pmp_megatron.attack.execute import run_cells
    from pmp_megatron.attack.run import prepare

    ids: dict[str, str] = {}
    cell_ids: set[str] = set()
    for name, (pmp, attackers) in RUNS.items():
        if pmp is None:
            continue
        logger.info("attack suite on %s (%s)", name, ", ".join(attackers))
        cells, ctx = prepare(str(CONFIGS / scale.suite), str(work / "release" / name),  # the key has the seed
                             dense_model=str(work / "release" / "dense"),
                             mask=str(work / "private" / f"{name}.safetensors"), attackers=attackers)
        run_cells(cells, ctx, work / "results.jsonl", workers=scale.attack_workers)
        ids[name], ids["dense"] = ctx.model_ids["pmp"], ctx.model_ids["dense"]
        cell_ids |= {c.id for c in cells}
    return ids, cell_ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/results", help="checkpoints, releases, masks (not committed)")
    parser.add_argument("--out", default="docs/results", help="report, plots, summary, results JSONL")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    scale = SCALES[args.scale]
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}

    from pmp_megatron.data.prepare import prepare_builtin

    logger.info("[1/5] corpora + tokenizer (vocab %d) -> %s", scale.vocab, work / "data")
    prepare_builtin(work / "data", scale.vocab, max_docs=scale.max_docs, max_chars=scale.max_chars)
    logger.info("[2/5] pretraining %d runs", len(RUNS))
    t = time.time()
    pretrain_all(work, scale)
    timings["pretraining_s"] = round(time.time() - t)
    logger.info("[3/5] releases, private masks, leakage audits")
    audits = release_all(work)
    logger.info("[4/5] attack suite %s", scale.suite)
    t = time.time()
    ids, cell_ids = attack_all(work, scale)
    timings["attacks_s"] = round(time.time() - t)
    logger.info("[5/5] report -> %s", out)
    from results_report import write_experiment_report  # tools/ is sys.path[0] when run as a script

    meta = {"command": f"python tools/run_results_experiment.py --scale {args.scale}",
            "scale": args.scale, "scale_settings": scale.__dict__,
            # this invocation only: a rerun skips finished work (run times in the report: from the logs)
            "this_invocation_s": {**timings, "total_s": round(time.time() - t0)},
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": __import__("torch").__version__}
    summary = write_experiment_report(work, out, RUNS, REFERENCE_RUN, ids, cell_ids, audits, meta)
    logger.info("done in %.0f s: %s", time.time() - t0, out / "report.md")
    print(json.dumps(summary["headline"], indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
