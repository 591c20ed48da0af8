"""tools/gpu_check.sh, the one GPU verification command: on a machine without CUDA it measures nothing,
says so in one line and exits 3; its benchmark flags are ones tools/bench_pmp.py accepts (checked here by
running the bench on CPU with the same flags on the debug size, which also shows the mfu and ci_high
output the script relies on)."""

import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

from pmp_megatron.testing import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"


def test_script_is_valid_bash():
    assert shutil.which("bash")
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure")
def test_without_cuda_it_measures_nothing():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"gpu_check: no CUDA device visible to {sys.executable}: "
                                                "nothing measured"]
    assert "step_ratio" not in proc.stdout and "mfu" not in proc.stdout


@pytest.mark.dist  # 2 gloo processes, ~40 s
def test_the_scripts_bench_flags_on_cpu():
    text = SCRIPT.read_text()
    flags = re.search(r"tools/bench_pmp.py (--tp .*?) \\\n\s+(--peak-tflops .*?) --overrides", text)
    assert flags, "the bench line of gpu_check.sh changed: update this test"
    assert "--sizes 1b" in flags.group(1)
    argv = [sys.executable, str(REPO / "tools" / "bench_pmp.py"), "--tp", "2", "--sizes", "debug", "--steps",
            "2", "--warmup", "1", "--block", "2", "--peak-tflops", "0.05", "--overrides",
            "model.params_dtype=float32", "model.transformer_impl=local"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    mfu = re.fullmatch(r"debug: mfu_dense=(\S+) mfu_pmp=(\S+) "
                       r"\(Megatron's FLOPs formula, (\S+) FLOP per step, .*", lines[-2])
    assert mfu, lines[-2]
    assert all(0 < float(x) and math.isfinite(float(x)) for x in mfu.groups())
    last = re.fullmatch(r"step_ratio=(\S+) mask_bits_per_param=(\S+) select_over_backward=(\S+) "
                        r"ci_high=(\S+)", lines[-1])
    assert last, lines[-1]
    assert float(last.group(4)) >= float(last.group(1)) * 0.5  # the interval's top, near the ratio
    assert "overrides model.params_dtype=float32" in proc.stdout


def test_megatron_flops_formula():
    sys.path.insert(0, str(REPO / "tools"))
    from bench_pmp import megatron_flops

    from pmp_megatron.testing import debug_config

    cfg = debug_config(["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                        "model.num_query_groups=4", "model.ffn_hidden_size=256", "model.vocab_size=512",
                        "model.seq_length=64", "model.make_vocab_size_divisible_by=128"])
    h, s, n_layers, v = 64, 64, 2, 512
    # by hand: per layer 2 x fwd+bwd (x3) x (QKV + proj 4h^2(with GQA = MHA here) + attention 2sh + MLP
    # 3 x h x 4h) per token, plus the logits 2 x 3 x h x v
    per_token = 3 * 2 * (n_layers * (4 * h * h + 2 * s * h + 3 * h * 256) + h * v)
    assert megatron_flops(cfg, 5) == pytest.approx(5 * s * per_token, rel=1e-12)
