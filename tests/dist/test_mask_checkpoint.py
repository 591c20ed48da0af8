"""Masks saved with dist_checkpointing at one TP/PP layout load at another identical to the gathered
original (SwiGLU fc1, embeddings and the output layer included), because their sharded state mirrors
the weights'."""

import pytest
import torch

from pmp_megatron.testing import spawn
from pmp_megatron.pmp.masks import mask_of


def _save(overrides, world, ckpt_dir):
    from pmp_megatron import mcore
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.pmp import masks
    from pmp_megatron.testing import attach_random_masks, init_debug_model

    cfg, chunks = init_debug_model(overrides, world)
    attach_random_masks(chunks, cfg, density=0.3)
    mcore.dist_checkpointing.save(masks.sharded_state_dict(chunks), ckpt_dir)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    return gather_full({n: (mask_of(p), i) for n, (p, i) in infos.items()})


def _load(overrides, world, ckpt_dir):
    from pmp_megatron import mcore
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.pmp import masks
    from pmp_megatron.testing import init_debug_model

    cfg, chunks = init_debug_model(overrides, world)
    template = masks.sharded_state_dict(chunks, empty=True)
    loaded = mcore.dist_checkpointing.load(template, ckpt_dir)
    masks.attach_loaded(loaded, template)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    padded_rows_false = all(not mask_of(p)[~i.real(p.shape)].any() for p, i in infos.values())
    return gather_full({n: (mask_of(p), i) for n, (p, i) in infos.items()}), padded_rows_false


TP2PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


@pytest.mark.dist
@pytest.mark.parametrize("target,world", [
    ([], 1),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"], 2),
    (["parallel.tensor_model_parallel_size=2"], 2),
])
def test_masks_reshard_like_weights(tmp_path, target, world):
    ckpt = str(tmp_path / "ckpt")
    import os

    os.makedirs(ckpt)
    saved = spawn(_save, 4, TP2PP2, 4, ckpt)[0]
    loaded, padded_false = spawn(_load, world, target, world, ckpt)[0]
    assert padded_false
    assert saved.keys() == loaded.keys()
    assert any("linear_fc1.weight" in n for n in saved) and "embedding.word_embeddings.weight" in saved
    for name, m in saved.items():
        assert m.dtype == torch.bool and 0 < m.sum() < m.numel()
        assert torch.equal(loaded[name], m), name
