"""The recipes experiment (docs/results, v2): one resumable command on CPU.

    python tools/run_results_experiment.py [--work runs/results-v2] [--out docs/results/v2]
                                           [--scale full|smoke] [--budget-minutes 150]

Plan, scale cuts and the decision rule: ``docs/results/v2-preregistration.md`` (committed before the first
run). Six pretraining runs of the ~4M-parameter model from one SECRET W0 (same data, same order): dense and
five PMP recipes of ``configs/pmp/`` at rho 0.5 (reference-faithful, accumulated Stage-I score, per-tensor
quota, frozen complement, redrawn complement), plus the dense-matched control of the reference run
(``pmp-dense-matched``). Each PMP run is released, its key exported (0600, under WORK/private) and the
release audited by every recovery attacker (adaptive ones included). Then the ``recipes-cpu`` suite attacks
every release next to the controls (dense, dense-matched, scratch), and the report (verdict per recipe,
intervals, ablations, key privacy, base quality) goes to ``--out``: text and PNG only, no weights, no masks.

Resumable: finished pretraining runs, the dense-matched search's attempts, releases, audits and attack
cells are skipped on a rerun; an interrupted run continues from its last checkpoint. ``--budget-minutes``
stops starting new work once the wall time of this invocation passes it (the report is then written from
what exists, marked partial); rerun to continue. ``--scale smoke`` runs the same pipeline on the debug
model in a few minutes (the e2e test).
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
from dataclasses import asdict, dataclass, field
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
    micro_batch: int
    lr: float
    warmup: int
    eval_interval: int
    eval_steps: int
    projection_rms: float
    projection_interval: int
    redraw_interval: int
    suite: str
    discovery_max_steps: int | None = None  # None: the recipe's (the reference's 500)
    max_docs: int | None = None
    max_chars: int | None = None
    attack_workers: int = 2
    concurrent_runs: int = 2
    save_interval: int = 100
    matched_tolerance: float = 0.01  # dense-matched: |valid loss - target| / target
    extra: tuple[str, ...] = field(default_factory=tuple)


SCALES = {
    "full": Scale(model_config="model/cpu-4m.yaml", vocab=2048, train_steps=400, global_batch=16,
                  micro_batch=4, lr=3e-3, warmup=40, eval_interval=50, eval_steps=8, projection_rms=8.5e-5,
                  projection_interval=8, redraw_interval=8, suite="attacks/recipes-cpu.yaml"),
    "smoke": Scale(model_config="model/debug.yaml", vocab=512, train_steps=12, global_batch=8, micro_batch=4,
                   lr=3e-3, warmup=2, eval_interval=6, eval_steps=2, projection_rms=8.5e-5,
                   projection_interval=4, redraw_interval=4, suite="attacks/recipes-smoke.yaml",
                   discovery_max_steps=6, max_docs=120, max_chars=4000, attack_workers=1, save_interval=6,
                   matched_tolerance=0.05,  # 12 steps: the step grid cannot reach 1%
                   extra=("model.seq_length=64",)),
}

# run name -> recipe file under configs/pmp (dense.yaml: PMP off)
RUNS = {
    "dense": "dense.yaml",
    "reference": "reference-rho0.5.yaml",
    "accumulated": "accumulated.yaml",
    "per-tensor": "per-tensor.yaml",
    "frozen": "frozen.yaml",
    "redraw": "redraw.yaml",
}
REFERENCE = "reference"
PMP_RUNS = [n for n in RUNS if n != "dense"]
KEYLESS, KEY = "unauthorized", "authorized"
ABLATIONS = ["unauthorized_frozen_embedding", "authorized_plus_embedding"]  # on the reference run only
FULL_ONLY = {KEY, *ABLATIONS}  # attackers that get the full fine-tuning adversaries only (no LoRA)


def experiment_seed_file(work: Path) -> Path:
    """One SECRET W0 seed shared by every run (the runs are compared from the same start), drawn once from
    OS entropy into WORK/private/w0_seed (0600); runs read it through ``model.seed_file``, so it reaches no
    config.yaml, log or report."""
    import secrets

    from pmp_megatron.atomic import write_text_atomic

    path = work / "private" / "w0_seed"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_text_atomic(path, f"{secrets.randbits(128)}\n", mode=0o600)
    return path


def pretrain_command(work: Path, name: str, scale: Scale, runs: dict[str, str] = RUNS,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """The pretraining command of run ``name`` (recipe ``runs[name]``) with ``extra`` overrides last."""
    from pmp_megatron.mcore import free_port

    data = work / "data"
    args = [f"model.seed_file={experiment_seed_file(work)}",
            f"data.data_path=[0.5,{data / 'prose'},0.5,{data / 'code'}]",
            f"data.tokenizer_model={data / 'tokenizer.model'}", "data.split=98,2,0", "data.num_workers=1",
            f"model.vocab_size={scale.vocab}", f"train.train_steps={scale.train_steps}",
            f"train.micro_batch_size={scale.micro_batch}", f"train.global_batch_size={scale.global_batch}",
            f"train.eval_interval={scale.eval_interval}", f"train.eval_steps={scale.eval_steps}",
            f"optim.lr={scale.lr}", f"optim.lr_warmup_steps={scale.warmup}",
            f"checkpoint.dir={work / 'runs' / name}", f"checkpoint.save_interval={scale.save_interval}",
            "logging.log_interval=25",
            # the reference's projection at a size-free per-entry scale, 50 projections (redraws) per run
            "pmp.projection_target=rms", f"pmp.projection_rms={scale.projection_rms}",
            f"pmp.projection_interval={scale.projection_interval}",
            f"pmp.redraw_interval={scale.redraw_interval}", *scale.extra, *extra]
    if scale.discovery_max_steps is not None:
        args.append(f"pmp.discovery.max_steps={scale.discovery_max_steps}")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
            f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain",
            "--config", str(CONFIGS / scale.model_config),
            "--config", str(CONFIGS / "pmp" / runs[name]), *args]


def matched_command(work: Path, scale: Scale) -> list[str]:
    return [sys.executable, "-m", "pmp_megatron", "dense-matched", str(work / "runs" / REFERENCE),
            "--out", str(work / "matched"), "--tolerance", str(scale.matched_tolerance), "data.num_workers=1"]


def _finished(run_dir: Path, steps: int) -> bool:
    from pmp_megatron.train import checkpoint

    return run_dir.is_dir() and checkpoint.latest_valid(run_dir) == steps


def _matched_dir(work: Path) -> Path | None:
    summary = work / "matched" / "dense_matched.json"
    if not summary.is_file():
        return None
    chosen = json.loads(summary.read_text()).get("chosen")
    return None if chosen is None else Path(chosen["dir"])


class Budget:
    def __init__(self, minutes: float):
        self.start, self.seconds = time.time(), minutes * 60

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)

    def over(self) -> bool:
        return self.left() <= 0


def pretrain_all(work: Path, scale: Scale, budget: Budget, runs: dict[str, str] = RUNS, matched: bool = True,
                 extra: dict[str, tuple[str, ...]] | None = None) -> bool:
    """Every pretraining run of ``runs`` and (``matched``) the dense-matched search once the reference run
    is done, ``concurrent_runs`` jobs at a time, one torch thread each; skip finished ones. ``extra``: run
    name -> its own overrides. False: the budget ran out with jobs not started (running ones finish)."""
    jobs = {n: pretrain_command for n in runs if not _finished(work / "runs" / n, scale.train_steps)}
    if matched and _matched_dir(work) is None:
        jobs["dense-matched"] = None
    (work / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    threads = max(1, (os.cpu_count() or 2) // scale.concurrent_runs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    while jobs or running:
        # the dense-matched search (sequential attempts) goes first once the reference run is done
        ready = sorted((n for n in jobs if n != "dense-matched" or _finished(work / "runs" / REFERENCE,
                                                                          scale.train_steps)),
                       key=lambda n: n != "dense-matched")
        while ready and len(running) < scale.concurrent_runs and not budget.over():
            name = ready.pop(0)
            del jobs[name]
            if name == "dense-matched":
                cmd = matched_command(work, scale)
            else:
                cmd = pretrain_command(work, name, scale, runs, (extra or {}).get(name, ()))
            log = open(work / "logs" / f"{name}.log", "a")  # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
            logger.info("started %s (log: %s)", name, work / "logs" / f"{name}.log")
        if not running:
            break  # budget over (or nothing ready, which cannot happen: the reference run is a job)
        time.sleep(2)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log.close()
            if proc.returncode != 0 and name == "dense-matched":  # the experiment goes on without it
                logger.warning("the dense-matched search found no run within %.0f%% (see %s): the report has "
                               "no matched-start statistics", 100 * scale.matched_tolerance,
                               work / "logs" / f"{name}.log")
                continue
            if proc.returncode != 0:
                for p, _, _ in running.values():
                    p.terminate()
                raise SystemExit(f"{name} failed (exit {proc.returncode}); see "
                                 f"{work / 'logs' / f'{name}.log'}")
            logger.info("%s done in %.0f s (%d left)", name, time.time() - t0, len(jobs) + len(running))
    return not jobs


def release_all(work: Path, adaptive: bool, runs: dict[str, str] = RUNS) -> dict[str, dict]:
    """Release every run of ``runs`` and the dense-matched control (if searched); export each PMP key (0600,
    WORK/private) and audit its release with every recovery attacker (WORK/audits/<run>.json, owner-side)."""
    from pmp_megatron.release.adaptive_recovery import AdaptiveAudit
    from pmp_megatron.release.audit import audit_release
    from pmp_megatron.release.from_checkpoint import release
    from pmp_megatron.release.key_export import export_mask

    audits = {}
    sources = {n: work / "runs" / n for n in runs}
    if _matched_dir(work) is not None:
        sources["dense-matched"] = _matched_dir(work)
    for name, run in sources.items():
        rel = work / "release" / name
        if not (rel / "config.json").is_file():
            release(run, rel, overwrite=True)
        if name not in runs or name == "dense":
            continue
        key = work / "private" / f"{name}.safetensors"
        if not key.is_file():
            export_mask(run, key)
        out = work / "audits" / f"{name}.json"
        if not out.is_file():
            report = audit_release(rel, key, adaptive=AdaptiveAudit() if adaptive else None)
            out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            from pmp_megatron.atomic import write_text_atomic

            write_text_atomic(out, json.dumps(report, indent=2, default=str) + "\n")
        audits[name] = json.loads(out.read_text())
    return audits


def variant_cells(work: Path, scale: Scale, name: str, suite: str | None = None):
    """The cells of one PMP release (with the controls, shared between releases by cell id) and their
    context, on ``suite`` (default: the scale's). The key and the ablation attackers get the full
    fine-tuning adversaries only."""
    from pmp_megatron.attack.run import prepare

    attackers = [KEYLESS, KEY, *(ABLATIONS if name == REFERENCE else [])]
    matched = work / "release" / "dense-matched"
    cells, ctx = prepare(str(CONFIGS / (suite or scale.suite)), str(work / "release" / name),
                         dense_model=str(work / "release" / "dense"),
                         dense_matched_model=str(matched) if name == REFERENCE and matched.is_dir() else None,
                         mask=str(work / "private" / f"{name}.safetensors"), attackers=attackers,
                         device="cpu")
    cells = [c for c in cells if not (c.attacker in FULL_ONLY and c.adversary.method != "full")]
    return cells, ctx


def attack_all(work: Path, scale: Scale, budget: Budget, names: list[str] = PMP_RUNS,
               suite: str | None = None) -> tuple[dict[str, set[str]], bool]:
    """Run the suite on the PMP releases ``names`` in order; return (run -> its cell ids, complete)."""
    from pmp_megatron.attack.execute import pending_cells, run_cells

    ids: dict[str, set[str]] = {}
    complete = True
    for name in names:
        if not (work / "release" / name / "config.json").is_file():
            complete = False
            continue
        cells, ctx = variant_cells(work, scale, name, suite)
        ids[name] = {c.id for c in cells}
        todo = pending_cells(cells, work / "results.jsonl")
        if todo and budget.over():
            complete = False
            continue
        logger.info("attacks on %s: %d cells, %d to run", name, len(cells), len(todo))
        # chunks, so the budget is checked while a long grid runs
        for i in range(0, len(todo), 8 * max(1, scale.attack_workers)):
            if budget.over():
                complete = False
                break
            run_cells(todo[i: i + 8 * max(1, scale.attack_workers)], ctx, work / "results.jsonl",
                      workers=scale.attack_workers)
    return ids, complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/results-v2",
                        help="checkpoints, releases, keys (not committed)")
    parser.add_argument("--out", default="docs/results/v2", help="report, plots, summary, results JSONL")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--budget-minutes", type=float, default=150.0,
                        help="start no new work after this many minutes of this invocation (default 150)")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive key attackers' audits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    scale = SCALES[args.scale]
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget, timings = Budget(args.budget_minutes), {}
    from pmp_megatron.data.prepare import prepare_builtin

    logger.info("[1/5] corpora + tokenizer (vocab %d) -> %s", scale.vocab, work / "data")
    prepare_builtin(work / "data", scale.vocab, max_docs=scale.max_docs, max_chars=scale.max_chars)
    logger.info("[2/5] pretraining %d runs and the dense-matched search", len(RUNS))
    t = time.time()
    pretrained = pretrain_all(work, scale, budget)
    timings["pretraining_s"] = round(time.time() - t)
    logger.info("[3/5] releases, keys, audits")
    t = time.time()
    audits = release_all(work, adaptive=not args.no_adaptive) if pretrained else {}
    timings["release_audit_s"] = round(time.time() - t)
    logger.info("[4/5] attack suite %s", scale.suite)
    t = time.time()
    ids, attacked = attack_all(work, scale, budget) if pretrained else ({}, False)
    timings["attacks_s"] = round(time.time() - t)
    logger.info("[5/5] report -> %s", out)
    sys.path.insert(0, str(REPO / "tools"))
    return report(work, out, scale.suite, ids, audits, budget, timings, pretrained and attacked,
                  {"command": f"python tools/run_results_experiment.py --scale {args.scale}",
                   "scale": args.scale, "scale_settings": asdict(scale),
                   "budget_minutes": args.budget_minutes})


def report(work: Path, out: Path, suite: str, ids: dict[str, set[str]], audits: dict, budget: Budget,
           timings: dict, complete: bool, meta: dict, **report_options) -> int:
    """Step 5 of an experiment: the report from what exists (marked partial unless ``complete``); the exit
    code (0, or 3: rerun to continue). ``report_options`` go to ``write_experiment_report``."""
    from results_report import write_experiment_report

    meta = {**meta, "complete": complete,
            "this_invocation_s": {**timings, "total_s": round(time.time() - budget.start)},
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": __import__("torch").__version__}
    if not ids:
        logger.warning("nothing attacked yet (budget reached); rerun to continue")
        return 3
    summary = write_experiment_report(work, out, suite, ids, audits, meta, **report_options)
    logger.info("done in %.0f s%s: %s", time.time() - budget.start, "" if complete else
                " (PARTIAL: rerun to continue)", out / "report.md")
    print(json.dumps(summary["headline"], indent=2))  # noqa: T201
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
