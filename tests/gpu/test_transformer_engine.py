"""GPU tier: the debug model with the Transformer Engine layer spec (and FP8) on CUDA. Skipped without
CUDA (conftest) or without Transformer Engine."""

import pytest
import torch

from pmp_megatron.testing import spawn

pytestmark = pytest.mark.gpu


def _losses(overrides, steps):
    from pmp_megatron import mcore
    from pmp_megatron.testing import init_debug_model, synthetic_batches
    from pmp_megatron.train.optimizer import build_optimizer
    from pmp_megatron.train.step import train_step, wrap_ddp

    cfg, chunks = init_debug_model(["optim.lr=1e-3", "model.params_dtype=bfloat16", *overrides], 1)
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    out = []
    for _ in range(steps):
        out.append(train_step(model, opt, synthetic_batches(cfg, 2, 4, seed=0), cfg).loss)
    assert mcore.HAVE_TE or "transformer_engine" not in " ".join(overrides)
    return out


def test_te_spec_matches_local_spec_in_bf16():
    pytest.importorskip("transformer_engine")
    local = spawn(_losses, 1, [], 3)[0]
    te = spawn(_losses, 1, ["model.transformer_impl=transformer_engine"], 3)[0]
    print(f"te_vs_local_bf16: losses local {local} te {te}; first-step relative difference "
          f"{abs(te[0] - local[0]) / abs(local[0]):.2e}")  # tools/gpu_check.sh shows it (pytest -s)
    assert te[0] == pytest.approx(local[0], rel=2e-2)
    assert te[-1] < te[0]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_training_runs_and_learns(recipe):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs Hopper or newer")
    losses = spawn(_losses, 1, ["model.transformer_impl=transformer_engine", "model.fp8=hybrid",
                                f"model.fp8_recipe={recipe}"], 5)[0]
    print(f"fp8_{recipe}: losses {losses}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
