"""Adversarial Stage II (``train/adversarial.py``) against a plain one-process reference loop.

The engine runs the simulated fine-tunes and the outer gradient on megatron-core at TP2, PP2 and DP2;
the reference is written with nothing but autograd and ``torch.optim`` on the one-process model. They must
agree within fp32 tolerance on the weights each simulated fine-tune reaches and on the masked outer
gradient. The penalty is checked to be taken where the keyless attack went: the same gradient taken at
the starting weights differs from it by far more than the tolerance. After the outer step every
complement entry is what the complement policy says, bit for bit.
"""

import pytest
import torch

from pmp_megatron.testing import spawn
from pmp_megatron.pmp.masks import mask_of

STEP = 3
BASE = ["pmp.mode=pmp", "pmp.rho=0.5", "optim.lr=1e-2", "optim.lr_decay_style=constant", "optim.clip_grad=0.0",
        "train.micro_batch_size=2", "train.global_batch_size=4", "optim.weight_decay=0.1",
        "pmp.adversarial.enabled=true", "pmp.adversarial.inner_steps=2", "pmp.adversarial.inner_batch_size=4",
        "pmp.adversarial.inner_lr=[0.01,0.02]", "pmp.adversarial.inner_clip_grad=1.0",
        "pmp.adversarial.penalty_weight=2.0", "pmp.adversarial.key_weight=0.5",
        "pmp.adversarial.proxy=[synthetic:reverse:4]", "pmp.adversarial.proxy_rows=64",
        "pmp.adversarial.evaluation_tasks=[synthetic:copy:8]"]
LAYOUTS = {"tp2": ["parallel.tensor_model_parallel_size=2"],
           "pp2": ["parallel.pipeline_model_parallel_size=2"],
           "dp2": []}


def _setup(overrides, world):
    from pmp_megatron.data.proxy import load_proxy
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.testing import attach_random_masks, init_debug_parallel
    from pmp_megatron.train.adversarial import Adversary
    from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
    from pmp_megatron.train.step import wrap_ddp

    cfg = init_debug_parallel([*BASE, *overrides], world)
    chunks = build_model(cfg)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, cfg)
    attach_random_masks(chunks, cfg, density=0.5)
    rule = MaskedUpdate(chunks, opt, cfg)
    a = cfg.pmp.adversarial
    proxy = load_proxy(a.proxy, a.proxy_rows, cfg.model.vocab_size, cfg.model.seq_length)
    return cfg, model, opt, rule, Adversary(model, rule, proxy, cfg), infos


def _engine(overrides, world):
    """At a layout: W0, the weights each simulated fine-tune reaches, then one adversarial outer step:
    its masked outer gradient and the weights after it (all gathered)."""
    from pmp_megatron import mcore
    from pmp_megatron.model.params import gather_full
    from pmp_megatron.testing import synthetic_batches
    from pmp_megatron.train.adversarial import draw

    cfg, model, opt, rule, adv, infos = _setup(overrides, world)

    def gather(get):
        return gather_full({n: (get(p), i) for n, (p, i) in infos.items()})

    start = {n: p.detach().clone() for n, (p, _) in infos.items()}
    plan = draw(cfg, STEP, len(adv.proxy))
    reached = {}
    for masked in (False, True):
        adv.fine_tune(plan, masked)
        reached[masked] = gather(lambda p: p.detach())
        with torch.no_grad():
            for n, (p, _) in infos.items():
                p.copy_(start[n])
    batches = synthetic_batches(cfg, 2, 2, seed=5)[mcore.dp_rank()::mcore.dp_size()]
    result, stats = adv.step(opt, batches, STEP)
    return dict(start=gather_full({n: (start[n], i) for n, (_, i) in infos.items()}), keyless=reached[False],
                keyed=reached[True], grad=gather(lambda p: p.main_grad), masks=gather(mask_of),
                loss=result.loss, stats=stats, lr=plan.lr)


def _reference(overrides):
    """One process, TP1: the same simulated fine-tunes and outer gradient with autograd and torch.optim
    only. Also the penalty gradient taken at the starting weights (what a detached penalty would give)."""
    from pmp_megatron.data.proxy import load_proxy
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import attach_random_masks, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.adversarial import ADAM_BETAS, ADAM_EPS, draw

    cfg = init_debug_parallel([*BASE, *overrides], 1)
    chunks = build_model(cfg)  # no DDP: gradients land in .grad
    chunk = chunks[0]
    attach_random_masks(chunks, cfg, density=0.5)
    a, vocab = cfg.pmp.adversarial, cfg.model.vocab_size
    proxy = load_proxy(a.proxy, a.proxy_rows, vocab, cfg.model.seq_length)
    infos = shard_infos(chunks, vocab)
    names = list(infos)
    params = [infos[n][0] for n in names]
    masks = [mask_of(p) for p in params]
    start = [p.detach().clone() for p in params]
    plan = draw(cfg, STEP, len(proxy))

    def mean_over(batches, per_batch):
        return sum(per_batch(b) for b in batches) / len(batches)

    def lm(b):
        ce = chunk(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return (ce * b["loss_mask"]).sum() / b["loss_mask"].sum()

    def neg_entropy(b):
        logits = chunk(b["tokens"], b["position_ids"], None)[..., :vocab].float()
        h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        return -(h * b["loss_mask"]).sum() / b["loss_mask"].sum()

    def grad_of(loss):
        return [g.detach() for g in torch.autograd.grad(loss, params)]

    def fine_tune(masked):
        if a.inner_optimizer == "adamw":
            inner = torch.optim.AdamW(params, lr=plan.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
        else:
            inner = torch.optim.SGD(params, lr=plan.lr)
        for k in range(a.inner_steps):
            inner.zero_grad()
            mean_over(proxy.microbatches(plan.rows[k], 2), lm).backward()
            if masked:
                for p, m in zip(params, masks):
                    p.grad.mul_(m)
            torch.nn.utils.clip_grad_norm_(params, a.inner_clip_grad)
            inner.step()
        return [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)

    probe = proxy.microbatches(plan.probe, 2)
    g_lm = grad_of(mean_over(synthetic_batches(cfg, 2, 2, seed=5), lm))
    g_adv_at_start = grad_of(mean_over(probe, neg_entropy))
    keyless = fine_tune(False)
    g_adv = grad_of(mean_over(probe, neg_entropy))
    restore()
    keyed = fine_tune(True)
    g_key = grad_of(mean_over(probe, lm))
    restore()

    def named(ts):  # global tensors (padded vocabulary rows dropped), as gather_full gives the engine's
        return gather_full({n: (t, infos[n][1]) for n, t in zip(names, ts)})

    def outer(adv_term):
        return named([m * (gl + a.penalty_weight * ga + a.key_weight * gk)
                      for m, gl, ga, gk in zip(masks, g_lm, adv_term, g_key)])

    return dict(keyless=named(keyless), keyed=named(keyed), grad=outer(g_adv), detached=outer(g_adv_at_start),
                start=named(start), masks=named(masks), lr=plan.lr)


_REFERENCES = {}


def _reference_for(optimizer):
    if optimizer not in _REFERENCES:
        _REFERENCES[optimizer] = spawn(_reference, 1, [f"pmp.adversarial.inner_optimizer={optimizer}"])[0]
    return _REFERENCES[optimizer]


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _num_off(a, b, atol):
    return sum(int(((a[n] - b[n]).abs() > atol).sum()) for n in b)


@pytest.mark.dist
@pytest.mark.parametrize("layout,optimizer", [("tp2", "sgd"), ("tp2", "adamw"), ("pp2", "sgd"),
                                              ("dp2", "sgd")])
def test_simulated_fine_tunes_and_outer_gradient_match_the_reference(layout, optimizer):
    ref = _reference_for(optimizer)
    r = spawn(_engine, 2, [*LAYOUTS[layout], f"pmp.adversarial.inner_optimizer={optimizer}"], 2)[0]
    assert r["lr"] == ref["lr"]
    for n, w in ref["start"].items():
        assert torch.equal(r["start"][n], w), n  # one W0 at every layout
        assert torch.equal(r["masks"][n], ref["masks"][n]), n
    num = sum(w.numel() for w in ref["start"].values())
    assert _max_diff(ref["keyless"], ref["start"]) > 1e-3  # the attack moved the weights
    for kind in ("keyless", "keyed"):
        if optimizer == "sgd":
            assert _max_diff(r[kind], ref[kind]) <= 1e-6, kind
        else:
            # AdamW's first step is lr * g / (|g| + eps): where a gradient entry is near rounding size (a
            # reduction in another order changes it relatively much) the step changes by a fraction of lr,
            # so a few entries (well under 1%) may differ by more than fp32 rounding
            assert _num_off(r[kind], ref[kind], 1e-6) <= 1e-2 * num, (kind, _num_off(r[kind], ref[kind], 1e-6))
            assert _max_diff(r[kind], ref[kind]) <= 0.1 * ref["lr"], kind
    for n, m in ref["masks"].items():  # the mask-only fine-tune leaves the complement at W, bit for bit
        assert torch.equal(r["keyed"][n][~m], ref["start"][n][~m]), n
    gscale = max(g.abs().max().item() for g in ref["grad"].values())
    err = _max_diff(r["grad"], ref["grad"])
    assert err <= 1e-4 * gscale, (err, gscale)
    # taken at W instead of where the keyless attack went, the penalty gives another gradient
    assert _max_diff(ref["detached"], ref["grad"]) > 100 * max(err, 1e-7 * gscale)
    for n, m in ref["masks"].items():
        assert torch.count_nonzero(r["grad"][n][~m]) == 0, n


def _complement(policy, extra):
    """At TP2 (with ``extra``): W0, then one adversarial step and, on a second model from the same W0, one
    plain Stage-II step: the weights after each."""
    from pmp_megatron.model.params import gather_full
    from pmp_megatron.testing import synthetic_batches
    from pmp_megatron.train.step import train_step

    out = {}
    for kind in ("adversarial", "plain"):
        overrides = [*LAYOUTS["tp2"], f"pmp.complement={policy}", *extra]
        cfg, model, opt, rule, adv, infos = _setup(overrides, 2)
        w0 = gather_full({n: (p.detach().clone(), i) for n, (p, i) in infos.items()})
        batches = synthetic_batches(cfg, 2, 2, seed=5)
        if kind == "adversarial":
            adv.step(opt, batches, STEP)
        else:
            train_step(model, opt, batches, cfg)
        rule.after_step(STEP)
        out[kind] = gather_full({n: (p.detach(), i) for n, (p, i) in infos.items()})
        out["w0"], out["masks"] = w0, gather_full({n: (mask_of(p), i) for n, (p, i) in infos.items()})
    return out


@pytest.mark.dist
@pytest.mark.parametrize("policy,dtype", [("frozen", "float32"), ("decay", "float32"),
                                          ("frozen", "bfloat16")])
def test_outer_update_leaves_the_complement_to_its_policy(policy, dtype):
    """bf16: the simulated fine-tunes step the bf16 model weights, the outer update the fp32 main copies."""
    r = spawn(_complement, 2, policy, [f"model.params_dtype={dtype}"])[0]
    moved = 0
    for n, m in r["masks"].items():
        adv, plain, w0 = r["adversarial"][n], r["plain"][n], r["w0"][n]
        if policy == "frozen":
            assert torch.equal(adv[~m], w0[~m]), n
        assert torch.equal(adv[~m], plain[~m]), n  # decay: W0 * (1 - lr * wd), as a plain step leaves it
        moved += int((adv[m] != plain[m]).sum())
    assert moved > 0  # the penalty changed the masked-in update
