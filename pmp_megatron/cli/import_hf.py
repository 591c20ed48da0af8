"""``pmp-import-hf HF_DIR --out CKPT [--tp N --pp M] [--config X.yaml] [key=value ...]``: a Hugging Face
Llama directory (e.g. a public base model) -> a megatron dist checkpoint that training starts from.

    pmp-import-hf llama-hf/ --out ckpt/base --tp 2
    torchrun --nproc_per_node 2 -m pmp_megatron pretrain --config ckpt/base/config.yaml \\
        checkpoint.init_from=ckpt/base checkpoint.dir=runs/continued data.data_path=[...] ...

The checkpoint (``CKPT/iter_0000000``, weights only) loads at any TP/PP layout; ``CKPT/config.yaml`` is the
run's config: the HF architecture (``model.*``), dense mode, the layout of ``--tp``/``--pp``, and the HF
directory's tokenizer (``tokenizer.model``, else its ``tokenizer.json`` as ``data.tokenizer_type``
huggingface). ``--config`` / overrides give another run config; its ``model.*`` must match the HF
architecture. Runs in one process; the HF weights are read once, in fp32.
"""

from __future__ import annotations

import argparse
import sys

from pmp_megatron.cli.logs import setup_logging


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pmp-import-hf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="Hugging Face Llama directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (CKPT)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size recorded in config.yaml")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size recorded in config.yaml")
    parser.add_argument("--config", action="append", default=None,
                        help="run config(s) the checkpoint is for (default: derived from config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --out")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. data.split=90,10,0")
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("overrides need --config (the derived config is the HF architecture alone)")
    setup_logging()
    import copy
    from pathlib import Path

    from pmp_megatron.config import load_config
    from pmp_megatron.release.to_megatron import to_megatron

    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"HF directory {str(hf_dir)!r} has no config.json (not a Hugging Face model)")
    config = load_config(args.config, args.overrides) if args.config else None
    parallel = None
    if args.tp is not None or args.pp is not None:
        from pmp_megatron.config import ParallelConfig

        parallel = copy.deepcopy(config.parallel) if config is not None else ParallelConfig()
        if args.tp is not None:
            parallel.tensor_model_parallel_size = args.tp
        if args.pp is not None:
            parallel.pipeline_model_parallel_size = args.pp
    folder = to_megatron(hf_dir, args.out, config=config, overwrite=args.overwrite, parallel=parallel)
    sys.stdout.write(f"wrote {folder} (config: {Path(args.out) / 'config.yaml'})\n")
    return 0
