"""Benchmark the cost of PMP's Stage II against the dense baseline, and of the Stage-I selection.

One invocation, everything measured in the same run on ``--tp`` x ``--dp`` gloo processes
(``pmp_megatron.testing.spawn``, TP = ``--tp``, DP = ``--dp``, PP = 1; ``--overrides
parallel.use_distributed_optimizer=true`` for the distributed optimizer), per model size (``--sizes``:
``debug`` = configs/model/debug.yaml with its trainer defaults, ``50m`` = a ~50M-parameter model on the
same base config):

- **Stage-II step, PMP vs dense.** Two trainer states (``Trainer.build``) from the same W0 in the same
  processes: a dense one and a PMP one (masks from a real Stage-I selection at ``--rho``, passed to
  ``build(masks=...)``; ``MaskedUpdate`` with ``--complement``). One step is the Trainer loop's body:
  ``train_step`` (zero the gradients, ``forward_backward`` over the microbatches, ``optimizer.step`` with
  clipping inside), ``scheduler.step`` and, for PMP, the gradient masking inside ``finalize_model_grads``
  plus ``after_step``. The two variants run in alternating blocks of ``--block`` steps (ABBA order) after
  ``--warmup`` steps each, so machine noise hits both equally; each step starts after a barrier and the
  slower rank counts. The ratio PMP/dense is paired: each PMP block against the dense block next to it
  (the same round), the geometric mean of those block ratios with a 95% t-interval over the pairs (on
  their logarithms), so slow drifts of the machine cancel. Medians per variant are reported too, of
  wall-clock time (the headline) and of process CPU time (less sensitive to other jobs on a shared
  machine).
- **Data.** Every step gets fresh random tokens (step ``k``'s batch is the same for both variants). One
  batch repeated every step would be memorised, by the dense model faster, which then stops clipping its
  gradients (a pass over them) while PMP still clips. The steps clipped per variant are printed.
- **Full Trainer step.** ``Trainer.train`` itself, fed synthetic batches through its batch source (no
  checkpoints, no eval), for both variants with the same states, again in alternating blocks. Its
  ``on_step`` callback stamps the end of each iteration, so one timed iteration is exactly one pass of
  the loop: the step, the record, the (rare) log line and the preemption check. Each block runs one
  untimed iteration first (it also counts the parameters and opens the batch stream).
- **Where the PMP overhead goes.** ``MaskedUpdate.after_step`` is timed on every PMP step, and
  ``MaskedUpdate.mask_grads`` by running it once more after each PMP step (idempotent: the gradients are
  masked already); each Stage-II step is also split by call (zero + forward-backward, optimizer step,
  scheduler step, after_step), and the ``optimizer.step`` of one more step per variant is profiled op by
  op at the end (the three ops with the largest PMP-dense difference are printed). On CPU, for example,
  ``aten::sqrt`` is several times slower on exact zeros, and the masked complement's Adam second moments
  are exactly zero.
- **Mask storage, measured.** The bytes of mask storage the PMP build leaves alive in the process: every
  live bool or uint8 tensor (the packed masks of ``pmp/bitmask.py`` are uint8) is found through the
  garbage collector after ``build`` (each storage once), less those alive before it (the selection's own
  mask dict left out and dropped after the build, as the Trainer drops Stage I's), per local parameter
  (summed over ranks), and in bits. A bool mask dict kept beside the parameters' masks would show here as
  8 more bits.
- **Selection vs backward.** ``global_topk_masks`` over the ``main_grad`` right after a forward-backward
  (the Stage-I selection at ``--rho``) against that forward-backward's time (forward + backward +
  ``finalize_model_grads``).

A table goes to stdout, then (with ``--peak-tflops``) one ``mfu_dense`` / ``mfu_pmp`` line per size
(Megatron-LM's FLOPs formula, ``megatron_flops``, over the median Stage-II step, against the stated peak),
then the last line: ``step_ratio=<f> mask_bits_per_param=<f> select_over_backward=<f> ci_high=<f>`` for
the debug model (or the first size given): the Stage-II wall-clock ratio PMP/dense, the measured mask bits
per parameter, the selection/forward-backward ratio, and the upper end of the ratio's 95% interval.

On CUDA (``tools/gpu_check.sh``) every timed span ends with ``torch.cuda.synchronize`` (``_now``), so it
covers the GPU work; ``--overrides`` adds config overrides (bf16, the Transformer Engine spec, FP8) to every
size, and the ``1b`` size has TinyLlama-1.1B's shapes.
Progress goes to stderr.

``--adversarial`` measures adversarial Stage II (``pmp.adversarial``, ``train/adversarial.py``) instead:
``Trainer.train`` iterations of plain PMP and of PMP with every step adversarial (``--inner-steps``
simulated steps per attack, AdamW attacker, a synthetic proxy of ``--inner-batch`` rows per step), the
same masks and W0, in alternating blocks. Last line: ``adversarial_step_ratio=<f> ci=<lo>-<hi>
amortized_ratio=<f>``: adversarial/plain wall-clock per step, its 95% interval, and the mean cost per
step with an adversarial step every ``--interval`` steps (1 + (ratio - 1) / interval).

    python tools/bench_pmp.py                       # debug and 50m: a few minutes on 2 cores
    python tools/bench_pmp.py --sizes 50m --tp 1 --dp 2 --steps 160 --block 4 \
        --overrides parallel.use_distributed_optimizer=true   # issue #14's +-2% bench (quiet cores)
    python tools/bench_pmp.py --steps 2 --warmup 1 --sizes debug
    python tools/bench_pmp.py --adversarial --sizes debug --steps 6
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

# Model sizes: overrides on top of configs/model/debug.yaml (the debug model keeps its trainer defaults:
# 8 microbatches of 4 x 64 tokens at DP=1), and caps on the default --steps / --warmup and on the
# selection repeats that keep the 50M model (seconds per step on 2 cores) within a few minutes (a --steps
# or --warmup given explicitly is used as given).
SIZES = {
    "debug": dict(overrides=[], caps=dict(steps=None, warmup=None, select=None)),
    "50m": dict(overrides=["model.num_layers=13", "model.hidden_size=512", "model.num_attention_heads=8",
                           "model.num_query_groups=8", "model.ffn_hidden_size=1408", "model.vocab_size=8000",
                           "model.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=4"],
                caps=dict(steps=8, warmup=2, select=3)),
    # TinyLlama-1.1B's shapes (configs/model/tinyllama-1.1b.yaml), 8 microbatches of 1 x 2048 tokens: for a
    # GPU (tools/gpu_check.sh adds bf16, the Transformer Engine spec and FP8 with --overrides)
    "1b": dict(overrides=["model.num_layers=22", "model.hidden_size=2048", "model.num_attention_heads=32",
                          "model.num_query_groups=4", "model.ffn_hidden_size=5632", "model.vocab_size=32000",
                          "model.seq_length=2048", "train.micro_batch_size=1", "train.global_batch_size=8"],
               caps=dict(steps=None, warmup=None, select=5)),
}
VARIANTS = ("dense", "pmp")
# The calls of one Stage-II step, in order (after_step: PMP only, nothing for dense).
PARTS = ("zero + fwd_bwd (PMP: + mask_grads)", "optimizer.step (clip inside)",
         "scheduler.step", "after_step")
_T0 = time.time()


def _log(msg: str) -> None:
    print(f"[bench_pmp {time.time() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _now() -> float:
    """``perf_counter`` once the device's queued work is done (CUDA: ``synchronize``), so a timed span
    covers its GPU kernels too, as CUDA events around it would."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _clock() -> tuple[float, float]:
    """(wall, CPU time of this process, all threads)."""
    return _now(), time.process_time()


def _since(t0: tuple[float, float], t1: tuple[float, float] | None = None) -> tuple[float, float]:
    t1 = t1 or _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def _mask_storage_bytes(skip=()) -> int:
    """Bytes of every bool or uint8 tensor storage alive in this process (found through the garbage
    collector, each storage once, on any device), leaving out the storages of the tensors in ``skip``."""
    import gc

    import torch

    gc.collect()

    def key(t):
        return t.device, t.untyped_storage().data_ptr()

    skipped = {key(t) for t in skip}
    sizes = {}
    for obj in gc.get_objects():
        if (isinstance(obj, torch.Tensor) and obj.dtype in (torch.bool, torch.uint8)
                and obj.layout == torch.strided):
            if key(obj) not in skipped:
                sizes[key(obj)] = obj.untyped_storage().nbytes()
    return sum(sizes.values())


def _optimizer_state(optimizer, model_params) -> dict:
    """What the optimizer holds beyond the model's parameters, measured after it has stepped: bytes of its
    state tensors (Adam's moments) and of the tensors it steps that are not the model's parameters (fp32
    main copies or shares), each storage once; and how many of the second-moment entries are exactly zero
    (PMP's complement: never a nonzero gradient, so no information a compacted state would need)."""
    import torch

    own = {p.untyped_storage().data_ptr() for p in model_params}
    storages, zero, total = {}, 0, 0
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = leaf.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in own:
                    storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
                for key, t in inner.state.get(p, {}).items():
                    if isinstance(t, torch.Tensor) and t.numel() > 1:
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                        if key == "exp_avg_sq":
                            zero += int((t == 0).sum())
                            total += t.numel()
    return dict(bytes=sum(storages.values()), zero_second_moments=zero, second_moments=total)


def _interleave(run_block, steps: int, warmup: int, block: int,
                variants: tuple[str, str] = VARIANTS) -> dict[str, list[tuple[float, float]]]:
    """Per-step (wall, CPU) times of both variants: ``warmup`` untimed steps each, then alternating
    blocks of ``block`` steps in ABBA order until each has ``steps``."""
    for v in variants:
        if warmup:
            run_block(v, warmup)
    times: dict[str, list] = {v: [] for v in variants}
    r = 0
    while any(len(times[v]) < steps for v in variants):
        for v in variants if r % 2 == 0 else variants[::-1]:
            n = min(block, steps - len(times[v]))
            if n > 0:
                times[v] += run_block(v, n)
        r += 1
    return times


def _worker(name: str, overrides: list[str], tp: int, dp: int, rho: float, complement: str, steps: int,
            warmup: int, block: int, select_steps: int, t0: float) -> dict:
    """One rank: build the dense and the PMP trainer state, run every measurement, return the raw times."""
    global _T0
    _T0 = t0  # progress lines count from the parent's start
    import itertools

    import torch
    import torch.distributed as dist

    from pmp_megatron import mcore
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.pmp import masks as pmp_masks
    from pmp_megatron.pmp.select import global_topk_masks
    from pmp_megatron.testing import debug_config, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.step import forward_backward, gather_reduced_grads, train_step, zero_grads
    from pmp_megatron.train.trainer import Trainer

    world = tp * dp
    base = [*overrides, f"parallel.tensor_model_parallel_size={tp}"]
    cfgs = {"dense": init_debug_parallel(base, world),
            "pmp": debug_config([*base, "pmp.mode=pmp", f"pmp.rho={rho}", f"pmp.complement={complement}"],
                                world).validate(world)}
    for cfg in cfgs.values():
        cfg.train.train_steps = 10**6  # the LR schedule's horizon: far beyond any step of this run
        cfg.train.eval_interval = 0
        cfg.logging.log_interval = 10**9
        cfg.checkpoint.dir = None

    def log(msg):
        if dist.get_rank() == 0:
            _log(f"{name}: {msg}")

    cfg_dense = cfgs["dense"]
    vocab = cfg_dense.model.vocab_size
    num_micro, mbs = cfg_dense.num_microbatches(world), cfg_dense.train.micro_batch_size
    gbs = cfg_dense.train.global_batch_size

    def step_batches(step: int) -> list[dict]:
        """This DP rank's microbatches of global step ``step``: fresh random tokens every step, the same
        for both variants (a batch repeated every step is memorised, and the dense model, which learns
        it faster, then stops clipping its gradients while PMP still clips: work the variants would not
        share in real training)."""
        every = synthetic_batches(cfg_dense, num_micro * mcore.dp_size(), mbs, seed=step)
        return every[mcore.dp_rank()::mcore.dp_size()]

    def fresh_batches(split, consumed):
        return (step_batches(step) for step in itertools.count(consumed // gbs))

    batches = step_batches(0)
    trainers = {v: Trainer(cfg, batches=fresh_batches) for v, cfg in cfgs.items()}
    dense = trainers["dense"].build()
    infos = shard_infos(dense.model, vocab)
    n_params = torch.tensor([sum(i.numel() for _, i in infos.values() if i.counted)], dtype=torch.float64)
    n_params = int(mcore.all_reduce(n_params, group=mcore.model_parallel_group()).item())
    log(f"{n_params:,} parameters, {num_micro} microbatches of {mbs}x{cfg_dense.model.seq_length} tokens")

    # --- Stage-I selection vs forward-backward, on the dense model at W0 (no optimizer step).
    log(f"Stage-I selection vs forward-backward ({warmup} warmup + {select_steps} timed)")
    sel_t, fb_t = [], []
    masks = None
    for i in range(warmup + select_steps):
        zero_grads(dense.model, dense.optimizer)
        mcore.barrier()
        t0 = _now()
        forward_backward(dense.model, batches, cfg_dense)
        gather_reduced_grads(dense.optimizer)  # under the distributed optimizer, as Stage I does
        t1 = _now()
        masks, _ = global_topk_masks({n: (p.main_grad, inf) for n, (p, inf) in infos.items()}, rho,
                                     split_group=mcore.dp_group() if mcore.dp_size() > 1 else None)
        t2 = _now()
        if i >= warmup:
            fb_t.append(t1 - t0)
            sel_t.append(t2 - t1)

    # --- The PMP state: the same W0 (a fresh build from the seed), masks from the selection above. Its
    # mask storage is what the build adds to the live boolean tensors, once the selection's dict is gone.
    before = _mask_storage_bytes(skip=masks.values())
    pmp = trainers["pmp"].build(masks=masks)
    del masks
    states = {"dense": dense, "pmp": pmp}
    local = [p for c in pmp.model for p in mcore.unwrap(c).parameters()]
    storage = dict(
        mask_bytes=_mask_storage_bytes() - before,
        extra_bytes=sum(v.element_size() * v.numel() for v in pmp.rule.frozen_values or []),
        local_params=sum(p.numel() for p in local),
    )
    density = pmp_masks.density(pmp.model, vocab)

    # --- Stage-II step: the Trainer loop's body (train_step, scheduler.step, after_step), called here so
    # each step can also be split into its calls (PARTS), to see where a difference comes from. The
    # gradient mask runs inside finalize_model_grads (in forward_backward); it is timed on its own by
    # running it once more after each PMP step (idempotent: the gradients are masked already).
    parts: dict[str, dict[str, list]] = {v: {k: [] for k in PARTS} for v in VARIANTS}
    grad_norms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    mask_t: list[float] = []
    stamps: list[tuple[float, float]] = []

    def stamp():
        stamps.append(_clock())

    def step_once(variant, mark):
        """One Stage-II step of ``variant`` on its next batch (the Trainer loop's body), calling ``mark()``
        at its start (after a barrier), once the gradients are reduced and masked, after ``train_step``,
        after ``scheduler.step`` and after ``after_step``."""
        state, cfg = states[variant], cfgs[variant]
        data = step_batches(state.iteration)
        mcore.barrier()
        mark()
        result = train_step(state.model, state.optimizer, data, cfg, after_backward=mark)
        mark()
        state.scheduler.step(1)
        mark()
        state.iteration += 1
        if state.rule is not None:
            state.rule.after_step(state.iteration)
        mark()
        return result

    def stage2_block(variant, n):
        state = states[variant]
        out = []
        for _ in range(n):
            stamps.clear()
            result = step_once(variant, stamp)
            out.append(_since(stamps[0], stamps[-1]))
            grad_norms[variant].append(float(result.grad_norm))
            for k, a, b in zip(PARTS, stamps, stamps[1:], strict=False):
                parts[variant][k].append(_since(a, b))
            if state.rule is not None:
                t0 = _now()
                state.rule.mask_grads()
                mask_t.append(_now() - t0)
        return out

    log(f"Stage-II step, dense vs PMP ({warmup} warmup + {steps} timed each, blocks of {block})")
    stage2 = _interleave(stage2_block, steps, warmup, block)
    hooks = {"mask_grads": mask_t[-steps:],
             "after_step": [wall for wall, _ in parts["pmp"]["after_step"][-steps:]]}
    parts = {v: {k: ts[-steps:] for k, ts in by_part.items()} for v, by_part in parts.items()}
    clip = cfg_dense.optim.clip_grad
    clipped = {v: sum(g > clip for g in norms[-steps:]) if clip > 0 else 0 for v, norms in grad_norms.items()}

    # --- The Trainer's own loop (Trainer.train), the same states, synthetic data, no checkpoints or eval.
    # ``on_step`` stamps the end of every iteration; a block runs one iteration more than it times, so
    # the first (which also counts the parameters and opens the batch stream) is only a start mark.
    def trainer_block(variant, n):
        state = states[variant]
        ends: list[tuple[float, float]] = []
        mcore.barrier()
        trainers[variant].train(state, steps=state.iteration + n + 1,
                                on_step=lambda record: ends.append(_clock()))
        assert len(ends) == n + 1, (len(ends), n)
        return [_since(a, b) for a, b in zip(ends, ends[1:], strict=False)]

    # No separate warmup: the models are warm from the Stage-II steps above.
    log(f"Trainer.train, dense vs PMP ({steps} timed each, blocks of {block})")
    trainer = _interleave(trainer_block, steps, 0, block)

    # --- The optimizer.step of one more real step per variant (its next batch), profiled op by op (self CPU
    # time), to attribute a difference in optimizer.step to its ops. Nothing is timed after it.
    log("profiling the optimizer.step of one more step per variant")
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" error line on CPU
    opt_ops = {}
    for variant in states:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        # step_once's marks: start, gradients reduced (and masked), train_step done, ...: the optimizer.step
        marks = iter([lambda: None, prof.start, prof.stop, lambda: None, lambda: None])
        step_once(variant, lambda marks=marks: next(marks)())
        opt_ops[variant] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    log("measurements done")
    optimizer_state = {v: _optimizer_state(state.optimizer, [p for c in state.model for p in c.parameters()])
                       for v, state in states.items()}

    return dict(params=n_params, num_micro=num_micro, mbs=mbs, seq=cfg_dense.model.seq_length,
                flops=megatron_flops(cfg_dense, cfg_dense.train.global_batch_size), world=world,
                device=str(mcore.device()),
                density=density, select=sel_t, fwd_bwd=fb_t, stage2=stage2, trainer=trainer, hooks=hooks,
                parts=parts, opt_ops=opt_ops, optimizer_state=optimizer_state, clipped=clipped,
                clip_grad=cfg_dense.optim.clip_grad,
                **storage)


def _adversarial_worker(name: str, overrides: list[str], tp: int, rho: float, steps: int, warmup: int,
                        block: int, inner_steps: int, inner_batch: int, t0: float) -> dict:
    """One rank: plain PMP and adversarial PMP trainer states from one W0 and one random mask (``rho``),
    ``Trainer.train`` iterations of each in alternating blocks; per-step (wall, CPU) times."""
    global _T0
    _T0 = t0
    import itertools

    import torch

    from pmp_megatron import mcore
    from pmp_megatron.data.proxy import load_proxy
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.testing import debug_config, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    base = [*overrides, f"parallel.tensor_model_parallel_size={tp}", "pmp.mode=pmp", f"pmp.rho={rho}"]
    adversarial = ["pmp.adversarial.enabled=true", f"pmp.adversarial.inner_steps={inner_steps}",
                   f"pmp.adversarial.inner_batch_size={inner_batch}",
                   "pmp.adversarial.proxy=[synthetic:reverse:8]",
                   "pmp.adversarial.evaluation_tasks=[synthetic:copy]"]
    cfgs = {"plain": init_debug_parallel(base, tp), "adversarial": debug_config([*base, *adversarial], tp)}
    for cfg in cfgs.values():
        cfg.train.train_steps, cfg.train.eval_interval = 10**6, 0
        cfg.logging.log_interval, cfg.checkpoint.dir = 10**9, None
    cfg = cfgs["plain"]
    vocab = cfg.model.vocab_size
    batches = synthetic_batches(cfg, cfg.num_microbatches(tp), cfg.train.micro_batch_size, seed=0)
    gen = torch.Generator().manual_seed(0)
    masks = {n: i.to_local(torch.rand(i.global_shape, generator=gen) < rho, p.shape)
             for n, (p, i) in sorted(shard_infos(build_model(cfg), vocab).items())}
    proxy = load_proxy(cfgs["adversarial"].pmp.adversarial.proxy, 512, vocab, cfg.model.seq_length)
    trainers = {v: Trainer(c, batches=lambda split, consumed: itertools.repeat(batches), proxy=proxy)
                for v, c in cfgs.items()}
    states = {v: t.build(masks=masks) for v, t in trainers.items()}

    def block_of(variant, n):
        state = states[variant]
        ends: list[tuple[float, float]] = []
        mcore.barrier()
        trainers[variant].train(state, steps=state.iteration + n + 1, on_step=lambda r: ends.append(_clock()))
        return [_since(a, b) for a, b in zip(ends, ends[1:], strict=False)]

    if mcore.tp_rank() == 0:
        _log(f"{name}: plain vs adversarial PMP ({warmup} warmup + {steps} timed each, blocks of {block})")
    times = _interleave(block_of, steps, warmup, block, variants=("plain", "adversarial"))
    return dict(times=times, num_micro=len(batches), mbs=cfg.train.micro_batch_size, seq=cfg.model.seq_length,
                proxy_width=proxy.tokens.shape[1] - 1)


def adversarial_main(args, sizes) -> int:
    from pmp_megatron.testing import spawn

    name = sizes[0]
    caps = SIZES[name]["caps"]
    steps, warmup = _capped(args.steps, caps["steps"]), _capped(args.warmup, caps["warmup"])
    ranks = spawn(_adversarial_worker, args.tp, name, SIZES[name]["overrides"], args.tp, args.rho, steps,
                  warmup, args.block, args.inner_steps, args.inner_batch, _T0, timeout=3600.0)
    r0 = ranks[0]
    plain = _max_over_ranks([[t[0] for t in r["times"]["plain"]] for r in ranks])
    adv = _max_over_ranks([[t[0] for t in r["times"]["adversarial"]] for r in ranks])
    ratio = statistics.median(adv) / statistics.median(plain)
    lo, hi = _ratio_ci(plain, adv)
    amortized = 1 + (ratio - 1) / args.interval
    print(f"Adversarial Stage II benchmark: {name}, TP={args.tp} (gloo, CPU), rho={args.rho}; training batch "
          f"{r0['num_micro']} x {r0['mbs']} x {r0['seq']} tokens; each adversarial step: {args.inner_steps} "
          f"keyless + {args.inner_steps} mask-only simulated AdamW steps on {args.inner_batch} proxy rows of "
          f"{r0['proxy_width']} tokens, 2 probe passes; plain and adversarial interleaved in blocks of "
          f"{args.block} (ABBA), medians of the slower rank, 95% bootstrap interval")
    print(f"{'Trainer.train iteration, wall':<40}{'plain ms':>10}{'adv ms':>10}{'adv/plain':>11}"
          f"{'95% interval':>16}")
    print(f"{'':<40}{_median_ms(plain):>10.2f}{_median_ms(adv):>10.2f}{ratio:>11.4f}{f'{lo:.3f}-{hi:.3f}':>16}")
    print(f"mean cost per step with pmp.adversarial.interval={args.interval}: {amortized:.4f} x plain PMP")
    print("extra memory during an adversarial step (train/adversarial.py): 4 fp32 copies of the local "
          "parameters with an AdamW attacker (weights to restore, outer gradient, 2 moments), 2 with SGD")
    if not (math.isfinite(ratio) and ratio > 0):
        raise SystemExit(f"bench_pmp: adversarial_step_ratio={ratio} is not a finite positive number")
    print(f"adversarial_step_ratio={ratio:.4f} ci={lo:.4f}-{hi:.4f} amortized_ratio={amortized:.4f}",
          flush=True)
    return 0


# ------------------------------------------------------------------------------------------ reporting
def _max_over_ranks(lists):
    return [max(vals) for vals in zip(*lists, strict=True)]


def _median_ms(xs) -> float:
    return 1e3 * statistics.median(xs)


def _iqr_ms(xs) -> str:
    if len(xs) < 2:
        return "-"
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return f"{1e3 * q[0]:.1f}-{1e3 * q[2]:.1f}"


def _paired_ratio(dense, pmp, block: int) -> tuple[float, float, float]:
    """PMP/dense over paired blocks (``_interleave``'s rounds: block i of each variant): the geometric mean
    of the per-pair ratios of mean step time, and its 95% t-interval (over the pairs, on the logs)."""
    from pmp_megatron.attack.stats import mean_interval

    logs = [math.log(statistics.fmean(pmp[i: i + block]) / statistics.fmean(dense[i: i + block]))
            for i in range(0, min(len(dense), len(pmp)), block)]
    i = mean_interval(logs)
    return math.exp(i.estimate), math.exp(i.low), math.exp(i.high)


def _ratio_ci(dense, pmp, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of median(pmp) / median(dense) (steps resampled independently)."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(pmp, k=len(pmp)))
                    / statistics.median(rng.choices(dense, k=len(dense))) for _ in range(resamples))
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def summarize(name: str, ranks: list[dict], steps: int, warmup: int, block: int) -> dict:
    """Per-step times combined over ranks (the slower rank per step), medians and paired ratios."""
    r0 = ranks[0]
    out = dict(name=name, steps=steps, warmup=warmup,
               **{k: r0[k] for k in ("params", "num_micro", "mbs", "seq", "density", "flops", "world",
                                     "device", "clipped", "clip_grad")})
    local_params = sum(r["local_params"] for r in ranks)
    out["mask_bytes_per_param"] = sum(r["mask_bytes"] for r in ranks) / local_params
    out["mask_bits_per_param"] = 8 * out["mask_bytes_per_param"]
    out["extra_bytes_per_param"] = sum(r["extra_bytes"] for r in ranks) / local_params
    for v in VARIANTS:
        state_bytes = sum(r["optimizer_state"][v]["bytes"] for r in ranks)
        out[f"optimizer_bytes_per_param_{v}"] = state_bytes / local_params
    moments = sum(r["optimizer_state"]["pmp"]["second_moments"] for r in ranks)
    out["pmp_zero_second_moment_fraction"] = (
        sum(r["optimizer_state"]["pmp"]["zero_second_moments"] for r in ranks) / moments if moments else 0.0)
    for kind in ("stage2", "trainer"):
        for v in VARIANTS:
            for i, clock in enumerate(("wall", "cpu")):
                out[f"{kind}_{v}_{clock}"] = _max_over_ranks([[t[i] for t in r[kind][v]] for r in ranks])
        for clock in ("wall", "cpu"):
            d, p = out[f"{kind}_dense_{clock}"], out[f"{kind}_pmp_{clock}"]
            out[f"{kind}_median_ratio_{clock}"] = statistics.median(p) / statistics.median(d)
            ratio, lo, hi = _paired_ratio(d, p, block)
            out[f"{kind}_ratio_{clock}"], out[f"{kind}_ci_{clock}"] = ratio, (lo, hi)
    out["step_ratio"] = out["stage2_ratio_wall"]
    out["select"] = _max_over_ranks([r["select"] for r in ranks])
    out["fwd_bwd"] = _max_over_ranks([r["fwd_bwd"] for r in ranks])
    out["select_over_backward"] = statistics.median(out["select"]) / statistics.median(out["fwd_bwd"])
    for hook in ("mask_grads", "after_step"):
        out[hook] = _max_over_ranks([r["hooks"][hook] for r in ranks])
    for v in VARIANTS:
        for k in PARTS:
            for i, clock in enumerate(("wall", "cpu")):
                per_rank = [[t[i] for t in r["parts"][v][k]] for r in ranks]
                out[f"part_{v}_{k}_{clock}"] = _max_over_ranks(per_rank)
    ops = {v: {} for v in VARIANTS}  # op -> self CPU seconds, mean over ranks
    for r in ranks:
        for v in VARIANTS:
            for op, t in r["opt_ops"][v].items():
                ops[v][op] = ops[v].get(op, 0.0) + t / len(ranks)
    names = set(ops["dense"]) | set(ops["pmp"])
    out["opt_ops"] = sorted(((op, ops["dense"].get(op, 0.0), ops["pmp"].get(op, 0.0)) for op in names
                             if not op.startswith("Optimizer.step")), key=lambda x: x[1] - x[2])[:3]
    # The ratio if the PMP step differed from the dense one by its two hooks only.
    out["hook_ratio"] = 1 + ((statistics.median(out["mask_grads"]) + statistics.median(out["after_step"]))
                             / statistics.median(out["stage2_dense_wall"]))
    return out


def print_table(results: list[dict], args) -> None:
    device = results[0]["device"] if results else "cpu"
    backend = "gloo processes, CPU" if device == "cpu" else f"processes, NCCL, {device}"
    extra = f", overrides {' '.join(args.overrides)}" if args.overrides else ""
    print(f"PMP benchmark: TP={args.tp} DP={args.dp} ({args.tp * args.dp} {backend}{extra}), rho={args.rho}, "
          f"complement={args.complement}; dense and PMP interleaved in blocks of {args.block} steps (ABBA); "
          "medians over steps of the slower rank; PMP/dense = geometric mean over paired blocks with its "
          "95% t-interval (median ratio in brackets); IQR in ms")
    w = 46
    for r in results:
        print()
        print(f"== {r['name']}: {r['params']:,} parameters ({r['params'] / 1e6:.1f}M), {r['num_micro']} "
              f"microbatches x {r['mbs']} x {r['seq']} tokens per step, mask density {r['density']:.4f}, "
              f"{r['warmup']} warmup + {r['steps']} timed steps per variant")
        print(f"{'measurement':<{w}}{'dense ms':>10}{'PMP ms':>10}{'PMP/dense':>11}{'95% interval':>16}"
              "   IQR dense | PMP")
        for kind, label in (("stage2", "Stage-II step (= trainer loop body)"),
                            ("trainer", "Trainer.train iteration")):
            for clock, clock_label in (("wall", "wall"), ("cpu", "CPU time")):
                d, p = r[f"{kind}_dense_{clock}"], r[f"{kind}_pmp_{clock}"]
                lo, hi = r[f"{kind}_ci_{clock}"]
                print(f"{f'{label}, {clock_label}':<{w}}{_median_ms(d):>10.2f}{_median_ms(p):>10.2f}"
                      f"{r[f'{kind}_ratio_{clock}']:>11.4f}{f'{lo:.3f}-{hi:.3f}':>16}   "
                      f"{_iqr_ms(d)} | {_iqr_ms(p)}   [{r[f'{kind}_median_ratio_{clock}']:.4f}]")
        pmp_step = _median_ms(r["stage2_pmp_wall"])
        mg, af = _median_ms(r["mask_grads"]), _median_ms(r["after_step"])
        for hook, t in (("mask_grads (timed alone)", mg), ("after_step", af)):
            print(f"{'  PMP hook ' + hook:<{w}}{'':>10}{t:>10.3f}{t / pmp_step:>11.2%}   of the PMP step")
        delta = pmp_step - _median_ms(r["stage2_dense_wall"])
        lo, hi = r["stage2_ci_wall"]
        hooks = (f"the PMP hooks take {mg + af:.2f} ms (mask_grads {mg:.2f}, after_step {af:.2f}), i.e. "
                 f"ratio {r['hook_ratio']:.4f} if nothing else differed")
        if r["step_ratio"] > 1.01:
            verdict = ("within the noise: the 95% interval contains the hooks' ratio"
                       if lo <= r["hook_ratio"] <= hi else "beyond the noise: the 95% interval excludes "
                       "the hooks' ratio")
            print(f"  PMP overhead: ratio {r['step_ratio']:.4f} > 1.01, {delta:+.2f} ms per step; {hooks}; "
                  f"the other {delta - mg - af:.2f} ms are outside the hooks, {verdict}")
        else:
            print(f"  PMP overhead: ratio {r['step_ratio']:.4f} <= 1.01 ({delta:+.2f} ms per step); {hooks}")
        print(f"{'  Stage-II step by call (medians, slower rank)':<{w}}{'dense ms':>10}{'PMP ms':>10}"
              f"{'PMP-dense':>11}{'CPU dense':>11}{'CPU PMP':>10}{'CPU diff':>10}")
        for k in PARTS:
            dw, pw, dc, pc = (_median_ms(r[f"part_{v}_{k}_{c}"]) for c in ("wall", "cpu") for v in VARIANTS)
            print(f"{'    ' + k:<{w}}{dw:>10.2f}{pw:>10.2f}{pw - dw:>+11.2f}"
                  f"{dc:>11.2f}{pc:>10.2f}{pc - dc:>+10.2f}")
        top = ", ".join(f"{op} {1e3 * d:.1f} -> {1e3 * p:.1f} ({1e3 * (p - d):+.1f})"
                        for op, d, p in r["opt_ops"])
        print(f"    optimizer.step ops, largest PMP-dense difference (1 profiled step, self CPU ms): {top}")
        if r["clip_grad"] > 0:
            print(f"    steps clipped (global grad norm > optim.clip_grad={r['clip_grad']:g}; the clip is a "
                  f"pass over the gradients): dense {r['clipped']['dense']}/{r['steps']}, PMP "
                  f"{r['clipped']['pmp']}/{r['steps']}")
        sel, fb = _median_ms(r["select"]), _median_ms(r["fwd_bwd"])
        print(f"{f'Stage-I selection (global_topk_masks) [n={len(r["select"])}]':<{w}}{'':>10}{sel:>10.2f}"
              f"   / forward+backward {fb:.2f} ms = {r['select_over_backward']:.4f}")
        print(f"{'mask storage (live bool/uint8 tensors)':<{w}}{'':>20}   {r['mask_bytes_per_param']:.4f} "
              f"bytes/param = {r['mask_bits_per_param']:.4f} bits/param")
        print(f"{'optimizer state (moments + main copies)':<{w}}"
              f"{r['optimizer_bytes_per_param_dense']:>10.2f}{r['optimizer_bytes_per_param_pmp']:>10.2f}"
              f"   bytes/param; PMP second moments exactly zero: {r['pmp_zero_second_moment_fraction']:.4f}")
        if r["extra_bytes_per_param"]:
            print(f"{'frozen-complement copy (MaskedUpdate)':<{w}}{'':>20}   "
                  f"{r['extra_bytes_per_param']:.4f} bytes/param")
    print()
    print("The Stage-II step is the Trainer loop body (the same calls); the Trainer.train rows run the "
          "Trainer's own loop. step_ratio below = Stage-II wall-clock PMP/dense.")


def megatron_flops(cfg, num_sequences: int) -> float:
    """Floating-point operations of one training step over ``num_sequences`` sequences (forward and
    backward), by Megatron-LM's formula (``num_floating_point_operations``: GQA attention with the s x s
    score and value products, SwiGLU MLP (x1.5 for the gate), logits over the padded vocabulary)."""
    m = cfg.model
    h, s_len, layers = m.hidden_size, m.seq_length, m.num_layers
    vocab = m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
    per_layer = ((1 + m.num_query_groups / m.num_attention_heads + s_len / h)
                 + (m.ffn_hidden_size / h) * 1.5 + vocab / (2 * layers * h))
    return 12 * num_sequences * s_len * layers * h * h * per_layer


def _capped(value: int, cap: int | None) -> int:
    return value if cap is None else min(value, cap)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant and measurement (default 20; 50m: 8; the 50m selection: "
                         "at most 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per variant first (default 3; 50m: 2)")
    ap.add_argument("--block", type=int, default=2, help="steps per block when alternating the variants")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size (processes: TP x DP)")
    ap.add_argument("--sizes", default="debug,50m", help=f"comma-separated, of {sorted(SIZES)}")
    ap.add_argument("--rho", type=float, default=0.5, help="mask density (Stage-I top-k fraction)")
    ap.add_argument("--complement", default="decay", choices=["decay", "frozen"])
    ap.add_argument("--overrides", nargs="*", default=[],
                    help="config overrides for every size, e.g. model.params_dtype=bfloat16 "
                         "model.transformer_impl=transformer_engine model.fp8=hybrid")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the stated per-device peak (TFLOP/s) to report MFU against, e.g. 989 for an H100 "
                         "or H200 SXM in bf16 (dense)")
    ap.add_argument("--adversarial", action="store_true",
                    help="measure adversarial Stage II against plain PMP instead (first size only)")
    ap.add_argument("--inner-steps", type=int, default=4, help="--adversarial: simulated steps per attack")
    ap.add_argument("--inner-batch", type=int, default=8, help="--adversarial: proxy rows per simulated step")
    ap.add_argument("--interval", type=int, default=4,
                    help="--adversarial: steps per adversarial step for the amortized ratio")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        ap.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    explicit = dict(steps=args.steps, warmup=args.warmup)
    args.steps = 20 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or args.block < 1 or args.tp < 1 or args.dp < 1:
        ap.error("--steps, --block, --tp and --dp must be >= 1, --warmup >= 0")
    if args.inner_steps < 1 or args.inner_batch < 1 or args.interval < 1:
        ap.error("--inner-steps, --inner-batch and --interval must be >= 1")
    if args.adversarial:
        return adversarial_main(args, sizes)

    from pmp_megatron.testing import spawn

    results = []
    for name in sizes:
        caps = SIZES[name]["caps"]
        steps = explicit["steps"] or _capped(args.steps, caps["steps"])
        warmup = explicit["warmup"]
        warmup = _capped(args.warmup, caps["warmup"]) if warmup is None else warmup
        select = _capped(args.steps, caps["select"])
        _log(f"{name}: spawning {args.tp * args.dp} processes")
        t0 = _now()
        ranks = spawn(_worker, args.tp * args.dp, name, [*SIZES[name]["overrides"], *args.overrides], args.tp,
                      args.dp, args.rho, args.complement, steps, warmup, args.block, select, _T0,
                      timeout=3 * 3600.0)
        _log(f"{name}: done in {_now() - t0:.0f} s")
        results.append(summarize(name, ranks, steps, warmup, args.block))
    print_table(results, args)
    head = next((r for r in results if r["name"] == "debug"), results[0])
    for key in ("step_ratio", "mask_bits_per_param", "select_over_backward"):
        if not (math.isfinite(head[key]) and head[key] > 0):
            raise SystemExit(f"bench_pmp: {key}={head[key]} is not a finite positive number")
    if args.peak_tflops:
        for r in results:
            peak = args.peak_tflops * 1e12 * r["world"]
            mfu = {v: r["flops"] / statistics.median(r[f"stage2_{v}_wall"]) / peak for v in VARIANTS}
            print(f"{r['name']}: mfu_dense={mfu['dense']:.4f} mfu_pmp={mfu['pmp']:.4f} (Megatron's FLOPs "
                  f"formula, {r['flops']:.4e} FLOP per step, stated peak {args.peak_tflops:g} "
                  f"TFLOP/s per device)")
    ci_high = head["stage2_ci_wall"][1]
    print(f"step_ratio={head['step_ratio']:.4f} mask_bits_per_param={head['mask_bits_per_param']:.4f} "
          f"select_over_backward={head['select_over_backward']:.4f} ci_high={ci_high:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
