"""``pmp-release`` and ``pmp-export-mask``: the public release of a checkpoint and the owner's private key.

- ``pmp-release --checkpoint DIR --out HF_DIR [--mask FILE]``: the dense Hugging Face Llama of a checkpoint of
  any TP/PP layout (never the mask); with ``--mask``, the leakage audit. ``--audit --model DIR --mask FILE``
  audits an existing release.
- ``pmp-export-mask --checkpoint DIR --out FILE [--iteration N] [--force]``: the private key.
"""

from __future__ import annotations

import argparse
import json
import sys

from pmp_megatron.cli.logs import setup_logging


def export_mask(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pmp-export-mask",
        description="Write the owner's private key of a PMP checkpoint: the mask (keyed by the release's "
                    "Hugging Face parameter names, bit-packed) and the W0 seed, hashed, mode 0600.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.dir of a PMP run")
    parser.add_argument("--out", required=True, help="output file, e.g. private/mask.safetensors")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest valid one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing mask file")
    args = parser.parse_args(argv)
    setup_logging()
    from pmp_megatron.release.key_export import export_mask as run

    digest = run(args.checkpoint, args.out, iteration=args.iteration, force=args.force)
    sys.stdout.write(f"wrote {args.out} (sha256 {digest[:16]}...)\n")
    return 0


def release(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pmp-release",
        description="Write the dense Hugging Face Llama release of a checkpoint saved at any TP/PP layout "
                    "(never the mask); with --mask, audit how much of the mask the release leaks. "
                    "--audit audits an existing release instead.")
    parser.add_argument("--checkpoint", help="checkpoint.dir of a run")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest valid one")
    parser.add_argument("--out", help="output release directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default float32, what was trained and evaluated; the model "
                             "card says which)")
    parser.add_argument("--license", default=None,
                        help="the model card's license (SPDX id / HF tag; default: release.license)")
    parser.add_argument("--name", default=None,
                        help="the model card's title (default: release.model_name, else the --out name)")
    parser.add_argument("--tokenizer-model", default=None, help="default: the run's data.tokenizer_model")
    parser.add_argument("--tokenizer-type", default=None,
                        choices=("sentencepiece", "huggingface", "tiktoken"),
                        help="how to read --tokenizer-model (default: the run's data.tokenizer_type)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--mask", default=None, help="the owner's private mask file: run the leakage audit")
    parser.add_argument("--owner-dir", default=None,
                        help="owner-side directory for the manifest and the audit (default: OUT.owner, "
                             "mode 0700); "
                             "never inside the release")
    parser.add_argument("--audit-seed", type=int, default=None,
                        help="W0 seed for the init-regeneration attacker, only for a v1 key without a seed "
                             "(a v2 key carries it)")
    parser.add_argument("--no-init-attack", action="store_true", help="skip the init-regeneration attacker")
    parser.add_argument("--warn-level", type=float, default=0.5, help="warn above this mask-recovery IoU")
    parser.add_argument("--adaptive", action="store_true",
                        help="with --audit: also run the adaptive key attackers (gradient stationarity, "
                             "Stage-I replication), which run the model on the attacker's own data")
    parser.add_argument("--audit", action="store_true", help="audit the existing release --model")
    parser.add_argument("--model", help="release directory to audit (with --audit)")
    parser.add_argument("--seed", type=int, default=None,
                        help="W0 seed for the audit (with --audit), only for a v1 key without a seed")
    parser.add_argument("--model-config", default=None,
                        help="YAML recipe of the released model for the init attacker (with --audit; "
                             "default: derived from the release's config.json)")
    args = parser.parse_args(argv)
    if args.audit:
        if not (args.model and args.mask):
            parser.error("--audit needs --model and --mask")
    elif not (args.checkpoint and args.out):
        parser.error("--checkpoint and --out are required (or --audit --model DIR --mask FILE)")
    if args.adaptive and not args.audit:
        parser.error("--adaptive goes with --audit (audit a written release)")
    if args.audit_seed is not None and args.no_init_attack:
        parser.error("--audit-seed and --no-init-attack exclude each other")
    setup_logging()
    from pmp_megatron.release import audit

    if args.audit:
        cfg = audit.model_config_for_audit(args.model, args.seed, args.model_config) \
            if args.seed is not None or args.model_config else None
        from pmp_megatron.release.adaptive_recovery import AdaptiveAudit

        adaptive = AdaptiveAudit() if args.adaptive else None
        report = audit.audit_release(args.model, args.mask, model_cfg=cfg, warn_level=args.warn_level,
                                     owner_dir=args.owner_dir, adaptive=adaptive)
    else:
        from pmp_megatron.release.from_checkpoint import AUDIT_FILE
        from pmp_megatron.release.from_checkpoint import release as run
        from pmp_megatron.release.writer import owner_dir_of

        out = run(args.checkpoint, args.out, iteration=args.iteration, dtype=args.dtype,
                  tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                  overwrite=args.overwrite, mask=args.mask,
                  audit_seed=args.audit_seed, init_attack=not args.no_init_attack,
                  warn_level=args.warn_level, owner_dir=args.owner_dir, license=args.license,
                  model_name=args.name)
        sys.stdout.write(f"wrote release {out}\n")
        if args.mask is None:
            return 0
        report = json.loads((owner_dir_of(args.owner_dir, out) / AUDIT_FILE).read_text())
    sys.stdout.write(audit.markdown_table(report) + "\n")  # ends with the WARNING line when the mask leaks
    return 0
