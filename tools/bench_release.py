"""Benchmark `pmp-release` on the TinyLlama-1.1B recipe: conversion time and peak memory of reading a
checkpoint one layer at a time and streaming it into the HF writer.

1. In a child process: build the model at TP=1 (W0, random init) and save it with ``checkpoint.save``
   as ``WORK/ckpt/iter_0000000`` (fp32, ~4.4 GB).
2. In a fresh child process per run: ``release.from_checkpoint.release`` into ``WORK/release``; peak RSS
   from ``getrusage`` (the true high-water mark) against the RSS right before the conversion, compared
   with the largest layer + the embedding and output layer, and with the writer's shard buffer.
3. ``WORK`` is deleted at the end unless ``--keep``.

    python tools/bench_release.py [--work /tmp/bench_release] [--max-shard-bytes N ...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "model" / "tinyllama-1.1b.yaml"
GiB = 1024**3


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def make_checkpoint(root: str) -> None:
    from pmp_megatron import mcore
    from pmp_megatron.config import config_to_dict, load_config
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.train import checkpoint

    # public seed (a benchmark); fp32 on the local spec: the GPU recipe's sizes, built on CPU
    cfg = load_config(RECIPE, ["pmp.mode=dense", "model.seed=0", "model.params_dtype=float32",
                               "model.transformer_impl=local"], world_size=1)
    mcore.setup_parallel(rng_seed=cfg.train.seed)
    t0 = time.perf_counter()
    chunks = build_model(cfg)
    t1 = time.perf_counter()
    common = dict(scheduler={}, config=config_to_dict(cfg), consumed_samples=0, pmp_mode="dense")
    checkpoint.save(root, 0, chunks, None, cfg, common)
    print(json.dumps({"build_s": t1 - t0, "save_s": time.perf_counter() - t1}))


def convert(root: str, out: str, max_shard_bytes: int) -> None:
    from pmp_megatron.release.from_checkpoint import release

    before = _rss_now()
    t0 = time.perf_counter()
    release(root, out, max_shard_bytes=max_shard_bytes, overwrite=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak}))


def _sizes() -> dict:
    from pmp_megatron.config import load_config
    from pmp_megatron.release.hf_llama import canonical_shapes

    m = load_config(RECIPE, ["pmp.mode=dense"]).model
    shapes = canonical_shapes(m)
    layer = sum(math.prod(s) for n, s in shapes.items() if n.startswith("decoder.layers.0.")) * 4
    embeddings = sum(math.prod(s) for n, s in shapes.items()
                     if n in ("embedding.word_embeddings.weight", "output_layer.weight")) * 4
    total = sum(math.prod(s) for s in shapes.values()) * 4
    return {"layer_bytes": layer, "embedding_bytes": embeddings, "model_bytes": total}


def _child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench_release")
    parser.add_argument("--max-shard-bytes", type=int, nargs="+", default=[2 * GiB, 512 * 1024**2],
                        help="writer shard sizes to run (one conversion each)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the release")
    parser.add_argument("--_make", help=argparse.SUPPRESS)
    parser.add_argument("--_convert", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._make:
        return make_checkpoint(args._make)
    if args._convert:
        return convert(args._convert[0], args._convert[1], int(args._convert[2]))

    work = Path(args.work)
    ckpt, out = work / "ckpt", work / "release"
    try:
        if not (ckpt / "latest").is_file():
            made = _child("--_make", ckpt)
            print(f"made the W0 checkpoint: {made['build_s']:.0f} s build + {made['save_s']:.0f} s save")
        disk = sum(p.stat().st_size for p in (ckpt / "iter_0000000").rglob("*") if p.is_file())
        sizes = _sizes()
        print(f"checkpoint {disk / GiB:.2f} GiB on disk; model {sizes['model_bytes'] / GiB:.2f} GiB fp32; "
              f"largest layer {sizes['layer_bytes'] / GiB:.3f} GiB; embedding + output layer "
              f"{sizes['embedding_bytes'] / GiB:.3f} GiB")
        for shard in args.max_shard_bytes:
            r = _child("--_convert", ckpt, out, shard)
            grew = r["peak_rss"] - r["rss_before"]
            bound = sizes["layer_bytes"] + sizes["embedding_bytes"]
            print(f"max_shard_bytes {shard / GiB:.2f} GiB: {r['seconds']:.1f} s "
                  f"({disk / GiB / r['seconds']:.2f} GiB/s); peak RSS {r['peak_rss'] / GiB:.2f} GiB "
                  f"(before {r['rss_before'] / GiB:.2f} GiB, +{grew / GiB:.2f} GiB during conversion) = "
                  f"{grew / bound:.2f} x (largest layer + embeddings) = "
                  f"{grew / (bound + shard):.2f} x (largest layer + embeddings + one writer shard)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
