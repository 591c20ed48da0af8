"""Console entry points (each has --help and takes a YAML plus dotted overrides where it trains):

- ``pmp-pretrain --config configs/X.yaml [key=value ...]`` (under torchrun or srun)
- ``pmp-export-mask --checkpoint DIR --out FILE [--iteration N] [--force]``
- ``pmp-quickstart [--out DIR]``
Also ``python -m pmp_megatron.cli <command> ...``.
"""

from __future__ import annotations

import argparse
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
    from pmp_megatron.pmp.export import export_mask as run

    digest = run(args.checkpoint, args.out, iteration=args.iteration, force=args.force)
    print(f"wrote {args.out} (sha256 {digest[:16]}...)")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"pretrain": pretrain, "export-mask": export_mask, "quickstart": quickstart}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python -m pmp_megatron.cli {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


def quickstart(argv=None) -> None:
    from pmp_megatron.quickstart import main as run

    run(argv)


if __name__ == "__main__":
    main()
