"""Console entry points (each has --help and takes a YAML plus dotted overrides where it trains):

- ``pmp-pretrain --config configs/X.yaml [key=value ...]`` (under torchrun or srun)
- ``pmp-export-mask --checkpoint DIR --out FILE [--iteration N] [--force]``
- ``pmp-release --checkpoint DIR --out HF_DIR [--mask FILE]``, ``pmp-release --audit --model DIR --mask FILE``
- ``pmp-quickstart [--out DIR]``
Also ``python -m pmp_megatron.cli <command> ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _logging(level: str = "INFO") -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if rank != "0":  # other ranks: warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def pretrain(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="pmp-pretrain",
        description="PMP pretraining (pmp.mode=pmp: Stage I mask discovery, rewind, Stage II) or the dense "
                    "baseline (pmp.mode=dense) on megatron-core. Run under torchrun or srun; resumes "
                    "automatically from checkpoint.dir; exits 42 after a preemption checkpoint.")
    parser.add_argument("--config", action="append", required=True,
                        help="YAML recipe (repeatable: merged in order)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    args = parser.parse_args(argv)
    from pmp_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)
    _logging(cfg.logging.level)
    from pmp_megatron.train.trainer import main

    main(cfg)


def export_mask(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="pmp-export-mask",
        description="Write the private PMP mask (the owner's key) of a checkpoint as a safetensors file "
                    "keyed by the release's Hugging Face parameter names (bit-packed, hashed, mode 0600).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.dir of a PMP run")
    parser.add_argument("--out", required=True, help="output file, e.g. private/mask.safetensors")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest valid one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing mask file")
    args = parser.parse_args(argv)
    _logging()
    from pmp_megatron.release.key_export import export_mask as run

    digest = run(args.checkpoint, args.out, iteration=args.iteration, force=args.force)
    print(f"wrote {args.out} (sha256 {digest[:16]}...)")


def release(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="pmp-release",
        description="Write the dense Hugging Face Llama release of a checkpoint saved at any TP/PP layout "
                    "(never the mask); with --mask, audit how much of the mask the release leaks. "
                    "--audit audits an existing release instead.")
    parser.add_argument("--checkpoint", help="checkpoint.dir of a run")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest valid one")
    parser.add_argument("--out", help="output release directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer-model", default=None, help="default: the run's data.tokenizer_model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--mask", default=None, help="the owner's private mask file: run the leakage audit")
    parser.add_argument("--audit-seed", type=int, default=None,
                        help="init seed for the init-regeneration attacker (default: the checkpoint's)")
    parser.add_argument("--no-init-attack", action="store_true", help="skip the init-regeneration attacker")
    parser.add_argument("--warn-level", type=float, default=0.5, help="warn above this mask-recovery IoU")
    parser.add_argument("--audit", action="store_true", help="audit the existing release --model")
    parser.add_argument("--model", help="release directory to audit (with --audit)")
    parser.add_argument("--seed", type=int, default=None, help="init seed for the audit (with --audit)")
    parser.add_argument("--model-config", default=None,
                        help="YAML recipe of the released model for the init attacker (with --audit; "
                             "default: derived from the release's config.json)")
    args = parser.parse_args(argv)
    if args.audit:
        if not (args.model and args.mask):
            parser.error("--audit needs --model and --mask")
    elif not (args.checkpoint and args.out):
        parser.error("--checkpoint and --out are required (or --audit --model DIR --mask FILE)")
    if args.audit_seed is not None and args.no_init_attack:
        parser.error("--audit-seed and --no-init-attack exclude each other")
    _logging()
    from pmp_megatron.release import audit

    if args.audit:
        cfg = audit.model_config_for_audit(args.model, args.seed, args.model_config) \
            if args.seed is not None else None
        report = audit.audit_release(args.model, args.mask, model_cfg=cfg, warn_level=args.warn_level)
    else:
        from pmp_megatron.release.from_checkpoint import AUDIT_FILE
        from pmp_megatron.release.from_checkpoint import release as run

        out = run(args.checkpoint, args.out, iteration=args.iteration, dtype=args.dtype,
                  tokenizer_model=args.tokenizer_model, overwrite=args.overwrite, mask=args.mask,
                  audit_seed=args.audit_seed, init_attack=not args.no_init_attack,
                  warn_level=args.warn_level)
        print(f"wrote release {out}")
        if args.mask is None:
            return
        report = json.loads((out / AUDIT_FILE).read_text())
    print(audit.markdown_table(report))  # ends with the WARNING line when the mask leaks


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"pretrain": pretrain, "export-mask": export_mask, "release": release,
                "quickstart": quickstart}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python -m pmp_megatron.cli {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


def quickstart(argv=None) -> None:
    from pmp_megatron.quickstart import main as run

    run(argv)


if __name__ == "__main__":
    main()
