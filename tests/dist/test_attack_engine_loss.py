"""The megatron attack engine's loss and metrics against one process over the full vocabulary:

- vocab-parallel token losses, argmax and label argmax at TP2 equal torch's over the real vocabulary (the
  padded columns excluded even when their logits are the largest; ties go to the first index);
- a training step on rows with UNEQUAL numbers of scored tokens, split over two data-parallel ranks in
  one-row micro-batches, gives the loss and the weights of one process taking the whole batch at once:
  the gradient of HF's mean over the batch's tokens, not a mean of micro-batch means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmp_megatron.testing import spawn

pytestmark = pytest.mark.dist
VOCAB, PADDED = 500, 512


def _logits():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, 5, PADDED, generator=gen)
    full[..., VOCAB:] = 20.0  # padded columns: never a prediction, never in the softmax
    full[0, 0, 7] = full[0, 0, 300] = 30.0  # a tie across the two TP ranks: the first index wins
    full[1, 1, 260] = full[1, 1, 270] = 30.0  # a tie inside one rank
    labels = torch.randint(0, VOCAB, (3, 5), generator=gen)
    return full, labels


def _metrics_tp2():
    from pmp_megatron import mcore
    from pmp_megatron.attack import vocab_parallel

    mcore.setup_parallel(2, 1)
    full, labels = _logits()
    width = PADDED // 2
    local = full[..., mcore.tp_rank() * width: (mcore.tp_rank() + 1) * width].clone()
    label_ids = torch.tensor([300, 3, 270, 260, 499])
    return (vocab_parallel.token_losses(local, labels, VOCAB), vocab_parallel.argmax(local, VOCAB),
            vocab_parallel.label_argmax(local, label_ids, VOCAB))


def test_vocab_parallel_metrics_equal_full_vocabulary():
    full, labels = _logits()
    real = full[..., :VOCAB]
    label_ids = torch.tensor([300, 3, 270, 260, 499])
    want = (F.cross_entropy(real.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5),
            real.argmax(-1), label_ids[real.index_select(-1, label_ids).argmax(-1)])
    assert want[1][0, 0] == 7 and want[1][1, 1] == 260 and want[2][0, 0] == 300
    for rank in spawn(_metrics_tp2, 2):
        torch.testing.assert_close(rank[0], want[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(rank[1], want[1]) and torch.equal(rank[2], want[2])


def _step(world: int, mbs: int):
    """One SGD step of the debug model on 4 rows (this DP rank's share in micro-batches of ``mbs``)."""
    from pmp_megatron import mcore
    from pmp_megatron.attack import megatron_engine
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import init_debug_model
    from pmp_megatron.train.optimizer import build_optimizer
    from pmp_megatron.train.step import train_step

    cfg, chunks = init_debug_model(["optim.lr=0.5", "optim.weight_decay=0.0", "optim.clip_grad=0.0"], world)
    model = megatron_engine.wrap_per_token(chunks, cfg)
    optimizer = build_optimizer(model, cfg, decay_every_param=True, optimizer="sgd", sgd_momentum=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (4, 16), generator=gen)
    y = x.clone()
    for row, scored in enumerate((15, 2, 9, 1)):  # scored next-token positions per row
        y[row, : 16 - scored] = -100
    share = 4 // mcore.dp_size()
    rows = slice(mcore.dp_rank() * share, (mcore.dp_rank() + 1) * share)
    micro = [megatron_engine.microbatch(x[rows][i: i + mbs], y[rows][i: i + mbs])
             for i in range(0, share, mbs)]
    step = megatron_engine.train_forward_step(VOCAB)
    result = train_step(model, optimizer, micro, cfg, forward_step_func=step)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    return result.loss, gather_full({n: (p, i) for n, (p, i) in infos.items()})


def test_per_token_loss_over_micro_batches_and_dp_ranks():
    ref_loss, ref_weights = spawn(_step, 1, 1, 4)[0]
    loss, weights = spawn(_step, 2, 2, 1)[0]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6, msg=name)
