"""Issue #14's lean-at-scale items that CPU can check: the Stage-I mask dict is freed at the rewind (the
parameters' own masks are the only ones left, before the Stage-II optimizer state is allocated), and CPU
runs step with torch's fused AdamW (the same update as the single-tensor loop, to fp32 rounding). One
spawned process each, debug model."""

from __future__ import annotations

import pytest
import torch

from pmp_megatron.pmp.masks import has_mask
from pmp_megatron.testing import spawn

STAGE1 = ["pmp.mode=pmp", "pmp.rho=0.5", "pmp.discovery.max_steps=1", "pmp.discovery.batch=global",
          "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_interval=0"]


def _stage1_masks_alive():
    """(Stage-I masks alive when the Stage-II optimizer is built, alive after build(), masks Stage I gave,
    parameters with a mask)."""
    import gc
    import weakref

    from pmp_megatron.testing import init_debug_parallel, synthetic_batches
    from pmp_megatron.train import trainer as trainer_mod

    cfg = init_debug_parallel(STAGE1, 1)
    refs, alive_at_optimizer = [], []
    discover, build_optimizer = trainer_mod.Trainer.discover, trainer_mod.build_optimizer

    def spy_discover(self):
        result = discover(self)
        refs.extend(weakref.ref(m) for m in result.masks.values())
        return result

    def spy_build_optimizer(model, cfg, **kw):  # Trainer.build: after the rewind and the masks' attach
        gc.collect()
        alive_at_optimizer.append(sum(r() is not None for r in refs))
        return build_optimizer(model, cfg, **kw)

    trainer_mod.Trainer.discover = spy_discover
    trainer_mod.build_optimizer = spy_build_optimizer

    def source(split, consumed):
        while True:
            yield synthetic_batches(cfg, cfg.num_microbatches(1), cfg.train.micro_batch_size, seed=1)

    state = trainer_mod.Trainer(cfg, batches=source).build()
    gc.collect()
    with_mask = sum(has_mask(p) for chunk in state.model for p in chunk.parameters())
    return alive_at_optimizer, sum(r() is not None for r in refs), len(refs), with_mask


def test_stage1_mask_dict_is_freed_at_the_rewind():
    at_optimizer, after_build, num_stage1, with_mask = spawn(_stage1_masks_alive, 1)[0]
    assert num_stage1 > 0 and with_mask == num_stage1  # Stage I ran; every parameter got its own mask
    assert at_optimizer == [0], f"{at_optimizer[0]} Stage-I masks still referenced at the Stage-II optimizer"
    assert after_build == 0


def _one_stage2_step(variant: list[str]):
    """One Stage-II step (PMP, decay) from W0 with the optimizer build_optimizer gives and with the same
    optimizer switched back to torch's single-tensor loop: (fused flags, fused kernel calls, flags after a
    state round trip, weights, reference weights)."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.testing import attach_random_masks, debug_config, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.optimizer import build_optimizer, torch_adams
    from pmp_megatron.train.step import train_step, wrap_ddp

    overrides = ["pmp.mode=pmp", "pmp.rho=0.5", "optim.lr=1e-2", *variant]
    init_debug_parallel(overrides, 1)
    calls = []
    for name in ("_fused_adamw_", "_fused_adam_"):
        kernel = getattr(torch, name)
        setattr(torch, name, lambda *a, _k=kernel, **kw: calls.append(1) or _k(*a, **kw))
    out = {}
    for run in ("fused", "reference"):
        cfg = debug_config(overrides, 1)
        chunks = build_model(cfg)
        model = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(model, cfg)
        inner = torch_adams(optimizer)
        if run == "fused":
            out["flags"] = [g["fused"] for opt in inner for g in opt.param_groups]
        else:
            for opt in inner:
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = None, None
        attach_random_masks(chunks, cfg, density=0.5)
        MaskedUpdate(model, optimizer, cfg)
        w0 = {n: p.detach().float().clone() for n, p in chunks[0].named_parameters()}
        train_step(model, optimizer, synthetic_batches(cfg, 2, 2, seed=0), cfg)
        out[run] = {n: p.detach().float().clone() for n, p in chunks[0].named_parameters()}
        if run == "fused":
            out["moved"] = sum(not torch.equal(w0[n], w) for n, w in out[run].items()) / len(w0)
            out["calls"] = len(calls)
            optimizer.load_state_dict(optimizer.state_dict())
            out["flags_after_load"] = [g["fused"] for opt in inner for g in opt.param_groups]
    return out


@pytest.mark.parametrize("variant", [[], ["parallel.use_distributed_optimizer=true"],
                                     ["model.params_dtype=bfloat16"]], ids=["fp32", "distopt", "bf16"])
def test_cpu_runs_step_with_fused_adamw_equal_to_the_single_tensor_update(variant):
    r = spawn(_one_stage2_step, 1, variant)[0]
    assert r["flags"] and all(r["flags"]) and all(r["flags_after_load"]), r
    assert r["calls"] > 0 and r["moved"] > 0.9  # the fused kernel ran and moved the weights
    assert r["fused"].keys() == r["reference"].keys()
    for name, ref in r["reference"].items():
        torch.testing.assert_close(r["fused"][name], ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(),
                                   msg=name)
