#!/usr/bin/env bash
# The one GPU verification command (issue #14), under 10 minutes on one H100/H200:
#   1. the GPU test tier (tests/gpu: Transformer Engine spec vs the local spec in bf16, FP8 training; the
#      loss-parity figures are printed), and any other test marked `gpu`;
#   2. tools/bench_pmp.py on the largest Llama this check times (TinyLlama-1.1B shapes, 8 x 2048 tokens per
#      step, TP=1): dense vs PMP interleaved in paired blocks after warm-up, each timed span closed by
#      torch.cuda.synchronize, in bf16 (Transformer Engine spec) and in FP8 (hybrid, delayed scaling).
# Prints step_ratio with its 95% interval (ci_high), mfu (Megatron's FLOPs formula against the stated peak,
# PMP_PEAK_TFLOPS, default 989 = H100/H200 SXM dense bf16) and mask_bits_per_param (measured).
# Without a CUDA device it measures nothing, says so in one line and exits 3: never a fake GPU figure.
#
#   bash tools/gpu_check.sh                 # from the repository root, with .venv (or PYTHON=...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PEAK="${PMP_PEAK_TFLOPS:-989}"
STEPS="${PMP_GPU_CHECK_STEPS:-12}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY: nothing measured" >&2
    exit 3
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, peak stated {\"$PEAK\"} TFLOP/s')"

echo "== 1/3 GPU tests (loss parity printed) =="
timeout 240 "$PY" -m pytest -q -s -m gpu tests/gpu

bench() {  # $1: label; the rest: config overrides
    local label=$1
    shift
    echo "== $label: dense vs PMP, TinyLlama-1.1B shapes =="
    timeout 300 "$PY" tools/bench_pmp.py --tp 1 --sizes 1b --steps "$STEPS" --warmup 3 --block 2 \
        --peak-tflops "$PEAK" --overrides "$@"
}
bench "2/3 bf16" model.params_dtype=bfloat16 model.transformer_impl=transformer_engine
bench "3/3 fp8" model.params_dtype=bfloat16 model.transformer_impl=transformer_engine model.fp8=hybrid \
    model.fp8_recipe=delayed
