"""Issue #14's lean-at-scale items that CPU can check: the Stage-I mask dict is freed at the rewind (the
parameters' own masks are the only ones left, before the Stage-II optimizer state is allocated), and CPU
runs step with torch's fused AdamW (the same update as the single-tensor loop, to fp32 rounding). One
spawned process each, debug model."""

from __future__ import annotations

import pytest
import torch

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
    with_mask = sum(hasattr(p, "pmp_mask") for chunk in state.model for p in chunk.parameters())
    return alive_at_optimizer, sum(r() is not None for r in refs), len(refs), with_mask


def test_stage1_mask_dict_is_freed_at_the_rewind():
    at_optimizer, after_build, num_stage1, with_mask = spawn(_stage1_masks_alive, 1)[0]
    assert num_stage1 > 0 and with_mask == num_stage1  # Stage I ran; every parameter got its own mask
    assert at_optimizer == [0], f"{at_optimizer[0]} Stage-I masks still referenced at the Stage-II optimizer"
    assert after_build == 0
