"""``pmp-quickstart``: the whole PMP loop on the debug model, on CPU, in one command.

corpora + tokenizer -> dense baseline and PMP pretraining (2 processes, TP=2, through ``pmp-pretrain``)
-> releases (HF Llama dirs) -> the private mask -> leakage audit -> ``smoke`` attack suite -> report.

Output layout (stable, for scripts)::

    OUT/data/                 tokenizer.model, indexed datasets
    OUT/runs/{pmp,dense}/     checkpoints + metrics.jsonl
    OUT/release/{pmp,dense}/  Hugging Face directories (never a mask)
    OUT/private/mask.safetensors      the owner's key (mask + W0 seed)
    OUT/private/release-{pmp,dense}/  owner-side manifest and leakage audit of each release
    OUT/results.jsonl         one line per attack cell
    OUT/report/report.md + PNGs
    OUT/summary.json          verdict + decision (the smoke suite's rule, its intervals per task), the
                              older ratios, base_loss_ratio, seconds
                              (on the smoke suite's tiny budgets `inconclusive` is the expected verdict)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pmp_megatron.resources import shipped

logger = logging.getLogger("pmp_megatron.quickstart")

CONFIGS = shipped("configs")  # the recipes, from the checkout or the installed package
VOCAB = 512
STEPS = 120


def _pretrain_args(out: Path, mode: str) -> list[str]:
    data = out / "data"
    args = [f"data.data_path=[0.5,{data / 'prose'},0.5,{data / 'code'}]",
            f"data.tokenizer_model={data / 'tokenizer.model'}",
            "data.split=95,5,0", f"model.vocab_size={VOCAB}", "parallel.tensor_model_parallel_size=2",
            f"train.train_steps={STEPS}", "train.micro_batch_size=8", "train.global_batch_size=16",
            "train.eval_interval=40", "train.eval_steps=4", "optim.lr=3e-3", "optim.lr_warmup_steps=10",
            "optim.weight_decay=0.1", f"checkpoint.dir={out / 'runs' / mode}", "checkpoint.save_interval=60",
            "logging.log_interval=20", f"pmp.mode={mode}"]
    if mode == "pmp":
        # The reference recipe's policy (decay + projection) at debug scale: R and tau shrink with the model.
        args += ["pmp.rho=0.5", "pmp.complement=decay", "pmp.projection=true", "pmp.projection_radius=2.0",
                 "pmp.projection_interval=40", "pmp.discovery.max_steps=20", "pmp.discovery.lr=3e-3"]
    return args


def _run(cmd: list[str], what: str) -> None:
    logger.info("%s: %s", what, " ".join(cmd[:6]) + " ...")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: {what} failed (exit {proc.returncode})")


def run(out: str | Path) -> dict:
    """Run the whole loop into ``out``; return the summary (also written to ``OUT/summary.json``)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from pmp_megatron.data.prepare import prepare_builtin

    logger.info("[1/6] offline corpora + tokenizer -> %s", out / "data")
    prepare_builtin(out / "data", VOCAB, max_docs=200, max_chars=6000)

    from pmp_megatron.mcore import free_port

    for mode in ("dense", "pmp"):
        logger.info("[2/6] pretraining the %s model (torchrun, 2 processes, TP=2)", mode)
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain",
              "--config", str(CONFIGS / "model" / "debug.yaml"), *_pretrain_args(out, mode)],
             f"pretrain {mode}")

    logger.info("[3/6] releases and the private mask")
    from pmp_megatron.release.from_checkpoint import release
    from pmp_megatron.release.key_export import export_mask

    mask = out / "private" / "mask.safetensors"
    export_mask(out / "runs" / "pmp", mask, force=True)
    for mode in ("dense", "pmp"):
        release(out / "runs" / mode, out / "release" / mode, overwrite=True,
                mask=str(mask) if mode == "pmp" else None, owner_dir=out / "private" / f"release-{mode}")

    logger.info("[4/6] smoke attack suite (unauthorized, authorized, mask recovery) on both releases")
    from pmp_megatron.attack.run import run_suite

    summary = run_suite(str(CONFIGS / "attacks" / "smoke.yaml"), str(out / "release" / "pmp"),
                        str(out / "results.jsonl"), report_dir=str(out / "report"),
                        dense_model=str(out / "release" / "dense"), mask=str(mask))

    logger.info("[5/6] base quality: PMP vs dense validation loss")
    valid = {m: _last_valid_loss(out / "runs" / m) for m in ("dense", "pmp")}
    summary = dict(summary)
    summary["base_loss_ratio"] = valid["pmp"] / valid["dense"]
    summary["valid_loss"] = valid
    summary["seconds"] = round(time.time() - t0, 1)
    summary["out"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.info("[6/6] done in %.0f s; report: %s", summary["seconds"], out / "report" / "report.md")
    return summary


def _last_valid_loss(run_dir: Path) -> float:
    losses = [json.loads(x).get("valid_loss") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [v for v in losses if v is not None]
    if not losses:
        raise RuntimeError(f"no validation loss in {run_dir / 'metrics.jsonl'}")
    return losses[-1]
