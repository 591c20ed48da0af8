"""Adaptive mask-recovery attackers: guess the private mask by running the model on the attacker's own data.

The attackers of ``release.recovery`` read the released weights only. These two also compute gradients of
the released architecture (transformers' ``LlamaForCausalLM``) on pretraining-like token batches of the
attacker's own (``attacker_batches``: the repo's offline corpora tokenized with the release's own
tokenizer -- an attacker who knows the pretraining distribution, the strongest realistic one):

- ``recovery_gradient`` (``recover_gradient_stationarity``): the release is loaded and, over many batches,
  every entry's gradient is averaged with a streaming Welford mean and variance (two fp32 accumulators:
  memory = model + gradients + 2 copies). Stage II trained the masked-in entries towards a stationary
  point of the pretraining loss, so their mean gradient is small against its batch-to-batch spread; the
  never-trained complement sits wherever W0 (or its shrunk copy) put it, with a gradient that points
  somewhere. Entries are ranked by ``std g / |mean g|`` (the inverse of a t statistic; an entry that got
  no gradient at all -- an embedding row of a token the batches never hold -- ranks last) and the global
  top ``rho`` is the predicted mask. On a dense release every entry is trained and the ranking is at
  chance.
- ``recovery_stage1`` (``recover_stage1_replication``): the attacker runs Stage I itself from ITS OWN
  random init of the same architecture (HF init, std ``initializer_range``, under the attacker's seed --
  HF's init order, not ``model.w0``'s per-name seeding, so it is never the owner's W0 even for an equal
  integer): ``steps`` dense AdamW steps (betas (0.9, 0.999), no decay, grad-norm clip 1.0), one batch each,
  and the global exact top-k of ``|grad|`` over every parameter at the last step is the predicted mask (the
  reference method's ranking). What carries over is the structure of the owner's selection: the share of
  each tensor type, the embedding rows of frequent tokens, the lm_head, the norms.

``rho`` (the density to keep): given (an attacker may assume the published value), else estimated --
Otsu's split of ``log10`` of the attacker's score for ``recovery_gradient``, ``recovery.estimate_density``
of the released weights for ``recovery_stage1`` (the |w| attackers' estimate).

Both return HF name -> bool mask with the release's tensor names and shapes, like ``recovery.recover``;
``recover_adaptive`` is the one entry point by attacker name, returning ``(masks, info)``. The audit runs
them only when asked (``audit.audit_release(..., adaptive=AdaptiveAudit())``); their cost is a few
forward/backward passes per batch (``AdaptiveAudit`` keeps the counts small by default).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from pmp_megatron.release import reader, recovery
from pmp_megatron.release.reader import ReleaseTokenizer

logger = logging.getLogger(__name__)

ADAPTIVE_ATTACKERS = ("recovery_gradient", "recovery_stage1")
DEFAULT_NUM_BATCHES = 16
DEFAULT_STAGE1_STEPS = 8
DEFAULT_BATCH_SIZE = 4  # the reference's Stage-I micro-batch
DEFAULT_SEQ_LENGTH = 256  # the reference's block length (capped by the model's context)
ATTACKER_SEED = 0
PRETRAINING_SOURCES = ("builtin:prose", "builtin:code")
_SCORE_MAX = torch.finfo(torch.float32).max


@dataclasses.dataclass(frozen=True)
class AdaptiveAudit:
    """What the audit runs of the adaptive attackers (``audit.audit_release(adaptive=...)``; None skips).

    ``batches`` are pre-tokenized ``[b, s]`` id tensors; None builds ``attacker_batches`` from the offline
    corpora with the release's tokenizer (``num_batches`` of ``batch_size`` x ``seq_length`` tokens, the
    first ``stage1_steps`` of them also feed Stage I)."""

    attackers: tuple[str, ...] = ADAPTIVE_ATTACKERS
    num_batches: int = DEFAULT_NUM_BATCHES  # recovery_gradient: batches averaged
    stage1_steps: int = DEFAULT_STAGE1_STEPS  # recovery_stage1: AdamW steps
    batch_size: int = DEFAULT_BATCH_SIZE
    seq_length: int | None = None  # None: min(DEFAULT_SEQ_LENGTH, the model's max_position_embeddings)
    seed: int = ATTACKER_SEED  # the attacker's data order and Stage-I init
    device: str = "cpu"
    batches: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        unknown = sorted(set(self.attackers) - set(ADAPTIVE_ATTACKERS))
        if unknown:
            raise ValueError(f"unknown adaptive attacker(s) {unknown}; known: "
                             f"{', '.join(ADAPTIVE_ATTACKERS)}")
        if self.num_batches < 2 or self.stage1_steps < 1 or self.batch_size < 1:
            raise ValueError("AdaptiveAudit needs num_batches >= 2, stage1_steps >= 1 and batch_size >= 1")


def attacker_batches(model_dir: str | Path, num_batches: int, batch_size: int = DEFAULT_BATCH_SIZE,
                     seq_length: int | None = None, seed: int = ATTACKER_SEED,
                     sources: Sequence[str] = PRETRAINING_SOURCES,
                     max_chars: int = 6000) -> list[torch.Tensor]:
    """``num_batches`` id tensors ``[batch_size, seq_length]`` of the attacker's pretraining-like data:
    the documents of ``sources`` shuffled by ``seed``, tokenized with the release's tokenizer until enough
    tokens, joined by end-of-document, cut into blocks and shuffled into batches (deterministic)."""
    from pmp_megatron.data import corpora

    model_dir = reader.check_model_dir(model_dir)
    if seq_length is None:
        seq_length = min(DEFAULT_SEQ_LENGTH, int(reader.read_config(model_dir).get("max_position_embeddings")
                                                 or DEFAULT_SEQ_LENGTH))
    tokenizer = ReleaseTokenizer(model_dir)
    encode, eod = tokenizer.encode, tokenizer.eod
    docs = [d for src in sources for d in corpora.iter_source(src, max_chars=max_chars)]
    rng = random.Random(seed)
    rng.shuffle(docs)
    need = num_batches * batch_size * seq_length
    ids: list[int] = []
    for text in docs:
        ids.extend(encode(text))
        ids.append(eod)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the attacker's data {list(sources)} holds {len(ids)} tokens, fewer than the "
                         f"{need} of {num_batches} batches of {batch_size} x {seq_length}")
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(-1, seq_length)  # [num_batches * b, s]
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return list(blocks[order].split(batch_size))


def load_release_model(model_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The release as a float32 ``LlamaForCausalLM`` on ``device`` (eval mode: no dropout)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(reader.check_model_dir(model_dir)), dtype=torch.float32)
    return model.to(device).eval()


def _check_names(masks: Mapping[str, torch.Tensor], model_dir: str | Path) -> None:
    shapes = reader.read_shapes(model_dir)
    if shapes is not None and {n: tuple(m.shape) for n, m in masks.items()} != shapes:
        raise ValueError(f"the model built from {str(model_dir)!r} has other parameters than its safetensors "
                         f"(tied embeddings?): {sorted(set(masks) ^ set(shapes))[:5]}")


def topk_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly the ``k`` largest entries of non-negative ``scores`` over all tensors; ties at the threshold
    are taken in name-then-flattened order (deterministic)."""
    thr = recovery.kth_largest(scores.values(), k)
    masks = {n: s > thr for n, s in scores.items()}
    need = k - sum(int(m.sum()) for m in masks.values())
    for n, s in scores.items():
        if need <= 0:
            break
        ties = (s == thr).reshape(-1).nonzero().squeeze(1)[:need]
        masks[n].view(-1)[ties] = True
        need -= ties.numel()
    return masks


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(next(model.parameters()).device)  # [b, s]
    return model(input_ids=ids, labels=ids).loss


def stationarity_scores(model: torch.nn.Module, batches: Iterable[torch.Tensor], num_batches: int,
                        accum_dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """Per parameter entry ``std g / |mean g|`` over ``num_batches`` batches (large: near a stationary
    point; 0: no gradient at all), by Welford's streaming update; returns (scores, batches used)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mean = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in params.items()}
    m2 = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in params.items()}
    count = 0
    for ids in itertools.islice(batches, num_batches):
        model.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        count += 1
        for n, p in params.items():
            g = torch.zeros_like(mean[n]) if p.grad is None else p.grad.to(accum_dtype)
            delta = g - mean[n]
            mean[n].add_(delta, alpha=1.0 / count)
            m2[n].addcmul_(delta, g.sub_(mean[n]))  # Welford: M2 += (g - mean_old) (g - mean_new)
    model.zero_grad(set_to_none=True)
    if count < 2:
        raise ValueError(f"gradient stationarity needs at least 2 batches, got {count}")
    scores = {}
    for n in params:
        s = m2.pop(n).div_(count - 1).sqrt_()  # std, in place
        s.div_(mean.pop(n).abs_()).nan_to_num_(nan=0.0, posinf=_SCORE_MAX)  # 0/0 (never a gradient) -> 0
        scores[n] = s.float()
    return scores, count


def recover_gradient_stationarity(model_dir: str | Path, batches: Iterable[torch.Tensor],
                                  rho: float | None = None, num_batches: int = DEFAULT_NUM_BATCHES,
                                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """The entries whose gradient over ``num_batches`` of ``batches`` is most stationary (the top ``rho``
    of ``std g / |mean g|``; ``rho`` None: Otsu's estimate on that score)."""
    model = load_release_model(model_dir, device)
    scores, count = stationarity_scores(model, batches, num_batches)
    del model
    if rho is None:
        rho = recovery.estimate_density(scores, ignore_zeros=True)
    total = sum(s.numel() for s in scores.values())
    masks = topk_masks(scores, max(1, min(total, round(rho * total))))
    _check_names(masks, model_dir)
    logger.info("recovery_gradient: %d batches, density %.4f", count, rho)
    return masks


def recover_stage1_replication(model_dir: str | Path, batches: Iterable[torch.Tensor],
                               rho: float | None = None, steps: int = DEFAULT_STAGE1_STEPS, lr: float = 2e-5,
                               seed: int | None = ATTACKER_SEED,
                               device: str = "cpu") -> dict[str, torch.Tensor]:
    """Stage I from the attacker's own init (``seed``; None draws a fresh one): ``steps`` AdamW steps on
    ``batches``, then the global top ``rho`` of the last step's clipped ``|grad|`` (``rho`` None: the
    |w| attackers' estimate on the released weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = reader.check_model_dir(model_dir)
    if rho is None:
        rho = recovery.estimate_density(reader.read_weights(model_dir)[0])
    seed = random.SystemRandom().getrandbits(63) if seed is None else seed
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(model_dir)))
    model = model.to(device, torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    done = 0
    for ids in itertools.islice(batches, steps):
        opt.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()  # the grads stay: after the loop they are the last step's
        done += 1
    if done == 0:
        raise ValueError("Stage-I replication got no batch")
    grads = {n: (p.grad.abs() if p.grad is not None else torch.zeros_like(p)).float()
             for n, p in model.named_parameters()}
    del model, opt, params
    total = sum(g.numel() for g in grads.values())
    masks = topk_masks(grads, max(1, min(total, round(rho * total))))
    _check_names(masks, model_dir)
    logger.info("recovery_stage1: %d steps from the attacker's init, density %.4f", done, rho)
    return masks


def recover_adaptive(attacker: str, model_dir: str | Path, batches: Sequence[torch.Tensor],
                     density: float | None = None, num_batches: int = DEFAULT_NUM_BATCHES,
                     stage1_steps: int = DEFAULT_STAGE1_STEPS, seed: int | None = ATTACKER_SEED,
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Run one adaptive attacker by name (``ADAPTIVE_ATTACKERS``) on the release in ``model_dir``; returns
    (HF name -> bool mask on ``device``, info) like ``recovery.recover``."""
    if attacker == "recovery_gradient":
        masks = recover_gradient_stationarity(model_dir, batches, density, num_batches, device)
        info = {"num_batches": min(num_batches, len(batches))}
    elif attacker == "recovery_stage1":
        masks = recover_stage1_replication(model_dir, batches, density, stage1_steps, seed=seed,
                                           device=device)
        info = {"stage1_steps": min(stage1_steps, len(batches))}
    else:
        raise ValueError(f"{attacker!r} is not an adaptive recovery attacker; known: "
                         f"{', '.join(ADAPTIVE_ATTACKERS)}")
    info["recovered_density"] = recovery.mask_density(masks)
    return masks, info


def run_for_audit(model_dir: str | Path, opts: AdaptiveAudit,
                  density: float) -> dict[str, Callable[[], tuple[dict[str, torch.Tensor], dict]]]:
    """Attacker name -> a call running it as ``opts`` says (the audit's ``extra_attackers``); the
    attacker's batches are built once, on the first call."""
    cache: list[list[torch.Tensor]] = []

    def data() -> list[torch.Tensor]:
        if not cache:
            cache.append(list(opts.batches) if opts.batches is not None else attacker_batches(
                model_dir, max(opts.num_batches, opts.stage1_steps), opts.batch_size, opts.seq_length,
                opts.seed))
        return cache[0]

    return {name: (lambda name=name: recover_adaptive(name, model_dir, data(), density, opts.num_batches,
                                                      opts.stage1_steps, opts.seed, opts.device))
            for name in opts.attackers}
