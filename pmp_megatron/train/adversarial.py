"""Adversarial Stage II (``pmp.adversarial``): PMP trained against simulated keyless fine-tuning.

Every ``interval`` Stage-II steps, ``Adversary.step`` replaces the plain step. From the current weights
W (on this rank's shards, at any TP/PP layout, through megatron's own schedules):

1. **retain**: the language-modelling gradient of the training batch, ``g_lm`` (as a plain step);
2. **keyless attack**: ``inner_steps`` (K) steps of full fine-tuning on proxy rows, with every gradient
   entry (the mask is lifted), AdamW (no weight decay; torch's defaults) or SGD at a learning rate drawn
   log-uniformly from ``inner_lr``, each step's gradient clipped to ``inner_clip_grad``; it reaches W_K.
   The penalty gradient ``g_adv`` is the gradient at W_K of ``objective`` on other proxy rows (the probe):
   minus the entropy of the next-token distribution, or minus the proxy loss capped at log(vocab);
3. **key attack**: the same simulated fine-tune (same rows, same lr) but mask-only, as the owner would
   run it, reaching W^m_K; ``g_key`` is the proxy loss gradient at W^m_K on the probe rows;
4. W is restored exactly after each attack, the outer gradient ``g_lm + penalty_weight * g_adv +
   key_weight * g_key`` is masked (complement entries zero) and the optimizer steps; the complement
   policy then runs as after any step.

First-order, as TAR (arXiv 2408.00761) makes its meta-gradient tractable: the gradient of a term taken at
W_K is used as its gradient at W (d W_K / d W ~ I). The term still depends on the inner trajectory: it
is evaluated where the simulated attack went, not at W (``tests/dist/test_adversarial_dist.py`` fails
if it is taken at W).

The draw of an adversarial step (lr, the rows of each inner step and the probe) is a function of
``train.seed`` and the step number: a resumed run repeats it exactly, and there is no state to save.

The simulated fine-tunes step the model's own parameters (bf16 ones rounded once a step; moments and
update math in fp32), not the optimizer's fp32 main copies, which only the outer update changes. The
distributed optimizer is refused: its reduce-scatter leaves each rank the reduced gradient of its own
shard only, and a simulated full fine-tune needs all of it.

Memory beyond plain Stage II while an adversarial step runs: one copy of the weights (W, to restore,
in their dtype), one of the gradients (the outer sum, fp32), and with an AdamW attacker its two fp32
moments (freed after each attack): 4 extra copies of this rank's parameters at peak (2 with SGD).
Time: one adversarial step is ~(2K + 2) forward-backward passes over ``inner_batch_size`` proxy rows plus
one over the training batch (``tools/bench_pmp.py --adversarial`` measures it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import partial

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config
from pmp_megatron.data.proxy import ProxyRows
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp.update import MaskedUpdate
from pmp_megatron.train.step import StepResult, forward_backward, forward_step, zero_grads

ADAM_BETAS = (0.9, 0.999)  # the simulated AdamW attacker: torch's defaults
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class AttackDraw:
    """One adversarial step's simulated fine-tune: its lr, the proxy rows of each inner step ``[K, B]``,
    and the probe rows its objective is scored on ``[B]`` (global indices; disjoint from the inner ones)."""

    lr: float
    rows: torch.Tensor
    probe: torch.Tensor


def draw(cfg: Config, step: int, num_rows: int) -> AttackDraw:
    """The simulated fine-tune of adversarial step ``step``: a function of ``train.seed`` and ``step``."""
    a = cfg.pmp.adversarial
    digest = hashlib.sha256(f"pmp-adversarial:{cfg.train.seed}:{step}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    lo, hi = (math.log(x) for x in a.inner_lr)
    lr = math.exp(lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item())
    b = a.inner_batch_size
    perm = torch.randperm(num_rows, generator=gen)
    probe, pool = perm[:b], perm[b:]  # the inner steps go through the other rows, epoch after epoch
    need = a.inner_steps * b
    rows = torch.cat([pool[torch.randperm(pool.numel(), generator=gen)]
                      for _ in range(-(-need // pool.numel()))])[:need]
    return AttackDraw(lr, rows.view(a.inner_steps, b), probe)


def _entropy_loss(loss_mask: torch.Tensor, vocab_size: int, logits: torch.Tensor):
    """Minus the entropy of the next-token distribution at the scored positions, summed; ``logits``
    ``[b, s, v / tp]`` are this TP rank's vocabulary shard (padded vocabulary columns excluded)."""
    logits = logits.float()
    v_local = logits.shape[-1]
    real = torch.arange(v_local, device=logits.device) + mcore.tp_rank() * v_local < vocab_size  # [v/tp]
    logits = logits.masked_fill(~real, float("-inf"))
    top = logits.detach().max(-1, keepdim=True).values  # [b, s, 1]
    mcore.all_reduce(top, group=mcore.tp_group(), op=torch.distributed.ReduceOp.MAX)
    shifted = torch.where(real, logits - top, torch.zeros((), device=logits.device))
    exp = torch.where(real, shifted.exp(), torch.zeros((), device=logits.device))
    total = mcore.reduce_from_tp(exp.sum(-1))  # [b, s]
    weighted = mcore.reduce_from_tp((exp * shifted).sum(-1))  # [b, s]
    entropy = total.log() - weighted / total  # H = log S - sum_v p_v (z_v - max)
    mask = loss_mask.view(-1).float()
    neg_sum = torch.sum(-entropy.view(-1) * mask)
    return neg_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([-neg_sum.detach(), mask.sum()])}


def _entropy_step(vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    dev = mcore.device()
    output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None)  # logits on the last stage
    return output, partial(_entropy_loss, batch["loss_mask"].to(dev), vocab_size)


def _capped_loss(loss_mask: torch.Tensor, cap: float, output: torch.Tensor):
    """Minus the token loss capped at ``cap``, summed over the scored positions."""
    losses = torch.clamp(output.float().view(-1), max=cap)
    mask = loss_mask.view(-1).float()
    neg_sum = torch.sum(-losses * mask)
    return neg_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([-neg_sum.detach(), mask.sum()])}


def _capped_loss_step(cap: float, data_iterator, model):
    batch = next(data_iterator)
    dev = mcore.device()
    output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None,
                   labels=batch["labels"].to(dev))
    return output, partial(_capped_loss, batch["loss_mask"].to(dev), cap)


class Adversary:
    """Runs the adversarial steps of a Stage-II run (module docstring) on ``model`` (DDP-wrapped chunks)
    whose PMP rule is ``rule``, with the proxy rows ``proxy`` (the same on every rank)."""

    def __init__(self, model: list, rule: MaskedUpdate, proxy: ProxyRows, cfg: Config):
        a = cfg.pmp.adversarial
        dp, mbs = mcore.dp_size(), cfg.train.micro_batch_size
        if a.inner_batch_size % (dp * mbs):
            raise ValueError(f"pmp.adversarial.inner_batch_size ({a.inner_batch_size}) must be divisible by "
                             f"train.micro_batch_size * data-parallel size ({mbs} * {dp})")
        if len(proxy) < a.inner_batch_size * 2:
            raise ValueError(f"pmp.adversarial: {len(proxy)} proxy rows, fewer than two batches of "
                             f"pmp.adversarial.inner_batch_size ({a.inner_batch_size})")
        self.model, self.rule, self.proxy, self.cfg = model, rule, proxy, cfg
        self.params = [p for chunk in model for p in mcore.unwrap(chunk).parameters()]
        self.counted = [(p, i.counted) for p, i in shard_infos(model, cfg.model.vocab_size).values()]
        vocab = cfg.model.vocab_size
        self.objective = (partial(_entropy_step, vocab) if a.objective == "entropy"
                          else partial(_capped_loss_step, math.log(vocab)))

    def due(self, step: int) -> bool:
        """Whether Stage-II step ``step`` (1-based) is an adversarial one."""
        return step % self.cfg.pmp.adversarial.interval == 0

    def _batches(self, rows: torch.Tensor) -> list[dict]:
        """This DP rank's microbatches of the global proxy rows ``rows``."""
        share = rows.numel() // mcore.dp_size()
        mine = rows[mcore.dp_rank() * share: (mcore.dp_rank() + 1) * share]
        return self.proxy.microbatches(mine, self.cfg.train.micro_batch_size)

    def step(self, optimizer, microbatches: list[dict], step: int) -> tuple[StepResult, dict]:
        """Adversarial Stage-II step number ``step`` over this DP rank's ``microbatches`` of the training
        batch: the optimizer has stepped when it returns. Returns the step's result (its loss is the
        language-modelling loss) and the simulated attacks' statistics (owner-side metrics)."""
        a = self.cfg.pmp.adversarial
        plan = draw(self.cfg, step, len(self.proxy))
        zero_grads(self.model, optimizer)
        loss = forward_backward(self.model, microbatches, self.cfg)
        total = [p.main_grad.clone() for p in self.params]  # g_lm, masked
        start = [p.detach().clone() for p in self.params]
        stats = dict(adversarial_lr=plan.lr)
        stats["adversarial_keyless"] = self._term(plan, masked=False, weight=a.penalty_weight, total=total,
                                                  start=start, step_func=self.objective)
        if a.key_weight > 0:
            stats["adversarial_key_loss"] = self._term(plan, masked=True, weight=a.key_weight, total=total,
                                                       start=start, step_func=forward_step)
        for p, g in zip(self.params, total, strict=True):
            p.main_grad.copy_(g)
        del total, start
        ok, grad_norm, _ = optimizer.step()
        return StepResult(loss=loss, ok=ok, grad_norm=grad_norm), stats

    def _term(self, plan: AttackDraw, masked: bool, weight: float, total: list, start: list,
              step_func) -> float:
        """Simulate one fine-tune from ``start`` (mask-only if ``masked``), add ``weight`` * the gradient of
        ``step_func``'s loss at the weights it reached (masked) to ``total``, restore ``start``; return
        the mean value ``step_func`` reports there."""
        self.fine_tune(plan, masked)
        for m in self.model:
            m.zero_grad_buffer()
        value = forward_backward(self.model, self._batches(plan.probe), self.cfg,
                                 forward_step_func=step_func)
        with torch.no_grad():
            for p, g, w in zip(self.params, total, start, strict=True):
                g.add_(p.main_grad, alpha=weight)
                p.copy_(w)
        return value

    @torch.no_grad()
    def fine_tune(self, plan: AttackDraw, masked: bool) -> None:
        """The simulated fine-tune of ``plan`` on the weights in place: keyless (every entry) or
        mask-only. Leaves the weights it reached; the caller restores."""
        a = self.cfg.pmp.adversarial
        adam = a.inner_optimizer == "adamw"
        # fp32 moments and update math whatever the parameters' dtype (bf16 weights are rounded once a step)
        moments = ([(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
                    for p in self.params] if adam else None)
        for k in range(a.inner_steps):
            for m in self.model:
                m.zero_grad_buffer()
            with torch.enable_grad():
                if masked:
                    forward_backward(self.model, self._batches(plan.rows[k]), self.cfg)
                else:
                    with self.rule.unmasked():
                        forward_backward(self.model, self._batches(plan.rows[k]), self.cfg)
            scale = self._clip_scale()
            if adam:
                b1, b2 = ADAM_BETAS
                c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
                for p, (m1, m2) in zip(self.params, moments, strict=True):
                    g = p.main_grad.float() * scale
                    m1.lerp_(g, 1 - b1)
                    m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (m2.sqrt() / math.sqrt(c2)).add_(ADAM_EPS)
                    p.copy_(p.float().addcdiv_(m1, denom, value=-plan.lr / c1))  # fp32: p itself, in place
            else:
                for p in self.params:
                    p.copy_(p.float().add_(p.main_grad.float(), alpha=-plan.lr * scale))

    def _clip_scale(self) -> float:
        """The factor that clips this gradient to ``inner_clip_grad`` (global norm over the model-parallel
        group, each real parameter counted once), 1 if it is within it or clipping is off."""
        clip = self.cfg.pmp.adversarial.inner_clip_grad
        if not clip:
            return 1.0
        sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
        for p, counted in self.counted:
            if counted:
                sq += p.main_grad.double().pow(2).sum()
        mcore.all_reduce(sq, group=mcore.model_parallel_group())
        norm = math.sqrt(sq.item())
        return min(1.0, clip / (norm + 1e-6))
