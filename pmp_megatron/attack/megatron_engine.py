"""Attack cells on the megatron-core engine (suite ``engine: megatron``): fine-tunes of releases too large
for one process holding a full Hugging Face model with fp32 AdamW.

Every rank of a job (torchrun / srun; one process works too) calls ``run_cells``. The job's processes hold
ONE megatron model at the suite's TP/PP layout (``suite.megatron``; data-parallel over what the world size
leaves); each release is read once per process, one global tensor at a time (``release.reader
.TensorReader``, HF -> canonical by ``release.hf_llama.canonical_tensor``, placed with
``ShardInfo.to_local``), and every further cell of that release starts from a copy of this rank's shards.

A cell is what ``attack.runner`` runs, on the project's engine (``train.step.train_step``):

- keyless attackers train every entry (dense); keyed and recovered-mask attackers attach the attacker's
  mask (``runner.release_mask``, HF names -> canonical, ``pmp.masks.attach``) and train under
  ``pmp.update.MaskedUpdate`` with ``complement: frozen``: every complement entry stays bit-identical;
- the same task batches (``tasks.train_batches``, the cell's seed), eval points, divergence rule and
  record keys (``attack.cell_loop``); the same optimizer: AdamW (betas 0.9/0.999, eps 1e-8) or SGD
  (momentum 0.9, L2 decay), weight decay on every parameter, clipping of the global gradient norm, and
  the lr of ``optimizers.lr_factor`` set before each step;
- the same loss. HF's is the mean over the batch's non-ignored label tokens. Here the loss function
  returns each micro-batch's token-loss SUM and token count, and the model's ``calculate_per_token_loss``
  makes megatron divide the gradients once by the step's total token count (summed over micro-batches and
  data-parallel ranks) instead of averaging per-micro-batch means: the gradient of HF's batch mean under
  any split into micro-batches and DP ranks, and the reported loss is the same ratio;
- the same metrics: task loss and token_acc / exact_match / accuracy over label ids, from vocab-parallel
  logits with the padded vocabulary masked out (``attack.vocab_parallel``), and the pretraining-domain loss.

Precision: ``fp32`` (and ``auto`` without CUDA) keeps fp32 parameters; ``bf16`` (``auto`` on GPUs) trains
bf16 parameters with megatron's fp32 main copies (not HF's autocast over fp32 parameters). The scratch
control starts from the project's W0 (``model.w0``) seeded ``runner.SCRATCH_SEED + seed``, not from HF's
init. A record's ``device`` names the engine and layout (``megatron tp2 pp1 dp1 cuda``).

Preemption (SIGTERM / SIGUSR2, ``train.signals``): the ranks agree at the next step boundary, save the
cell's state (``attack.cell_checkpoint``) and ``run_cells`` returns ``signals.REQUEUE_EXIT_CODE``; the
requeued job resumes that cell from its saved step and writes its record once.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.attack import cell_checkpoint, cell_loop, runner, tasks, vocab_parallel
from pmp_megatron.attack.execute import append_record, done_ids
from pmp_megatron.attack.optimizers import lr_factor
from pmp_megatron.attack.suite import Cell, MegatronLayout, task_payload
from pmp_megatron.config import Config, ModelConfig, OptimConfig, ParallelConfig, PMPConfig, TrainConfig
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import gather_full, shard_infos
from pmp_megatron.model.w0 import w0_tensor
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.pmp.update import MaskedUpdate
from pmp_megatron.release.hf_llama import canonical_tensor, hf_shapes, model_config_from_hf, to_hf
from pmp_megatron.release.reader import TensorReader, read_config, read_weights
from pmp_megatron.train import signals
from pmp_megatron.train.optimizer import build_optimizer
from pmp_megatron.train.step import train_step, wrap_ddp

logger = logging.getLogger(__name__)

_OPTIMIZERS = {"adamw": "adam", "sgd": "sgd"}  # the grid's name -> megatron-core's
_MAX_RELEASES = 2  # releases whose local shards a process keeps (least recently used goes)
_STEP_HOOK = None


def set_step_hook(fn) -> None:
    """TEST-ONLY: ``fn(cell, step)`` after each training step (before the preemption check)."""
    global _STEP_HOOK
    _STEP_HOOK = fn


def is_main() -> bool:
    """Whether this process writes the results (global rank 0; True outside a process group)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ----------------------------------------------------------------------------- the model, once per process


def model_config(model_dir: str, precision: str) -> ModelConfig:
    """The release's architecture (config.json) as the engine builds it: parameters in fp32, or bf16 with
    ``precision`` bf16 (``auto``: bf16 on GPUs); Transformer Engine layers when available."""
    m = model_config_from_hf(read_config(model_dir))
    bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available())
    return dataclasses.replace(m, params_dtype="bfloat16" if bf16 else "float32",
                               transformer_impl="transformer_engine" if mcore.HAVE_TE else "local")


def _config(m: ModelConfig, layout: MegatronLayout, world: int, cell: Cell | None = None,
            mask_density: float | None = None) -> Config:
    """The engine's Config: the model and layout; with ``cell``, its optimizer settings and batch split;
    with ``mask_density``, PMP mode with a frozen complement."""
    parallel = ParallelConfig(tensor_model_parallel_size=layout.tensor_model_parallel_size,
                              pipeline_model_parallel_size=layout.pipeline_model_parallel_size)
    cfg = Config(model=m, parallel=parallel, pmp=PMPConfig(mode="dense"))
    dp = cfg.data_parallel_size(world)
    if cell is not None:
        adv = cell.adversary
        if adv.batch_size % dp:
            raise ValueError(f"adversary {adv.label}: batch_size {adv.batch_size} is not divisible by the "
                             f"data-parallel size {dp} (world {world} / TP x PP)")
        mbs = layout.micro_batch_size or adv.batch_size // dp
        if (adv.batch_size // dp) % mbs:
            raise ValueError(f"adversary {adv.label}: a data-parallel rank's {adv.batch_size // dp} rows are "
                             f"not divisible by suite.megatron.micro_batch_size {mbs}")
        cfg.optim = OptimConfig(lr=runner.cell_lr(cell), min_lr=0.0, weight_decay=adv.weight_decay,
                                adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=adv.clip_grad,
                                lr_warmup_steps=0, lr_decay_style="constant")
        cfg.train = TrainConfig(micro_batch_size=mbs, global_batch_size=adv.batch_size, train_steps=adv.steps,
                                eval_interval=0)
    if mask_density is not None:
        cfg.pmp = PMPConfig(mode="pmp", rho=mask_density, complement="frozen")
    try:
        return cfg.validate(world)
    except ValueError as err:
        raise ValueError(f"suite.megatron layout for this release: {err}") from None


def wrap_per_token(chunks: list, cfg: Config) -> list:
    """megatron DDP around ``chunks`` with per-token loss: gradients divided once by the step's token count
    over every micro-batch and DP rank (set on the one TransformerConfig all chunks share, before DDP reads
    it)."""
    chunks[0].config.calculate_per_token_loss = True
    return wrap_ddp(chunks, cfg)


class _Engine:
    """This process's megatron model and the local shards of the releases it has read."""

    def __init__(self):
        self.arch: tuple | None = None
        self.cfg: Config | None = None
        self.chunks: list = []
        self.model: list = []
        self.shards: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.before: dict[tuple, tuple] = {}

    def setup(self, layout: MegatronLayout) -> None:
        """megatron's groups at ``layout`` (kept when this process already has them)."""
        tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
        mcore.init_distributed()
        world = torch.distributed.get_world_size()
        if world % (tp * pp):
            raise ValueError(f"suite.megatron: the job's {world} processes are not a multiple of "
                             f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}")
        if not mcore.model_parallel_is_initialized() or (mcore.tp_size(), mcore.pp_size()) != (tp, pp):
            mcore.setup_parallel(tp, pp, rng_seed=0)
            self.__init__()  # a model of another layout is gone with its groups

    def model_for(self, cell: Cell, ctx: runner.AttackContext) -> None:
        """Build the model for the cell's release architecture (once per architecture) and put the
        release's weights (or the scratch init) into it."""
        suite = ctx.suite
        m = model_config(ctx.models[cell.role], suite.precision)
        if self.arch != dataclasses.astuple(m):
            world = torch.distributed.get_world_size()
            self.cfg = _config(m, suite.megatron, world)
            self.chunks = build_model(self.cfg, init_w0=False)
            self.model = wrap_per_token(self.chunks, self.cfg)
            self.arch, self.shards = dataclasses.astuple(m), collections.OrderedDict()
            self.before = {}
        key = (cell.role, ctx.model_ids[cell.role], cell.seed if cell.role == "scratch" else None)
        infos = shard_infos(self.chunks, m.vocab_size)
        if key not in self.shards:
            self.shards[key] = self._read(cell, ctx, infos)
            while len(self.shards) > _MAX_RELEASES:
                self.shards.popitem(last=False)
        self.shards.move_to_end(key)
        with torch.no_grad():
            for name, (param, _) in infos.items():
                param.copy_(self.shards[key][name])

    @torch.no_grad()
    def _read(self, cell: Cell, ctx: runner.AttackContext, infos) -> dict[str, torch.Tensor]:
        """This rank's shards of the release (or of the scratch init), on the CPU in the params' dtype."""
        model_dir, m = ctx.models[cell.role], self.cfg.model
        start = time.time()
        out = {}
        if cell.role == "scratch":
            for name, (param, info) in infos.items():
                full = w0_tensor(name, info.global_shape, runner.SCRATCH_SEED + cell.seed, m.init_method_std)
                out[name] = info.to_local(full, param.shape).to(param.dtype)
        else:
            with TensorReader(model_dir) as reader:
                for name, (param, info) in infos.items():
                    full = canonical_tensor(name, reader.get, m)
                    out[name] = info.to_local(full.to(param.dtype), param.shape)
        logger.info("read %s (%s) into the megatron model at TP%d PP%d (%.1fs)", cell.role, model_dir,
                    mcore.tp_size(), mcore.pp_size(), time.time() - start)
        return out


_ENGINE = _Engine()


# ----------------------------------------------------------------------------- batches and metrics


def microbatch(x: torch.Tensor, y: torch.Tensor) -> dict:
    """HF rows (tokens ``[b, s]``, labels ``[b, s]``: -100 = ignored, position t scored against t + 1)
    -> megatron's microbatch: labels shifted to the position that predicts them, the last one unscored."""
    b, s = x.shape
    target = torch.cat([y[:, 1:], torch.full((b, 1), -100, dtype=y.dtype)], dim=1)  # [b, s]
    valid = target != -100
    return {"tokens": x, "labels": target.clamp(min=0), "loss_mask": valid.float(),
            "position_ids": torch.arange(s).expand(b, s).contiguous(), "row": torch.ones(b)}


def _loss(batch: dict, logits: torch.Tensor, *, vocab_size: int):
    """Token-loss sum and count of a micro-batch (per-token loss; see the module docstring)."""
    losses = vocab_parallel.token_losses(logits, batch["labels"], vocab_size)  # [b, s]
    mask = batch["loss_mask"]
    loss_sum = (losses * mask).sum()
    return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


@torch.no_grad()
def _eval_sums(batch: dict, logits: torch.Tensor, *, vocab_size: int, metric: str, label_ids):
    """(loss sum, hits) of a micro-batch under ``runner.evaluate``'s metric."""
    valid = batch["loss_mask"].bool()
    if metric == "accuracy":
        pred = vocab_parallel.label_argmax(logits, label_ids, vocab_size)
    else:
        pred = vocab_parallel.argmax(logits, vocab_size)
    hit = (pred == batch["labels"]) & valid
    if metric == "exact_match":
        hits = ((hit | ~valid).all(dim=-1) & batch["row"].bool()).sum()
    else:
        hits = hit.sum()
    loss_sum = (vocab_parallel.token_losses(logits, batch["labels"], vocab_size) * batch["loss_mask"]).sum()
    sums = torch.stack([loss_sum.double(), hits.double()])
    return loss_sum, batch["loss_mask"].sum().to(torch.int), {"eval": sums}


def train_forward_step(vocab_size: int):
    """The forward_step_func of a training step: per-token loss over the real vocabulary."""
    return partial(_forward_step, partial(_loss, vocab_size=vocab_size))


def _forward_step(loss_fn, data_iterator, model):
    """megatron's forward_step_func: logits of one micro-batch (the last stage's ``[b, s, V_pad / TP]``),
    and ``loss_fn(batch on the device, logits)``."""
    batch = {k: v.to(mcore.device()) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, partial(loss_fn, batch)


class MegatronTrainee:
    """The megatron model and one cell's optimizer as the trainee of ``cell_loop``."""

    def __init__(self, cell: Cell, ctx: runner.AttackContext, cfg: Config, model: list, optimizer,
                 rule: MaskedUpdate | None):
        self.cell, self.ctx, self.cfg, self.model = cell, ctx, cfg, model
        self.optimizer, self.rule = optimizer, rule
        adv = cell.adversary
        self.factor = lr_factor(adv.schedule, adv.warmup_steps, adv.steps)
        self.lr = cfg.optim.lr
        self.vocab_size = cfg.model.vocab_size
        self.forward = train_forward_step(self.vocab_size)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        share = x.shape[0] // mcore.dp_size()  # this DP rank's rows, cut into micro-batches
        mine = slice(mcore.dp_rank() * share, (mcore.dp_rank() + 1) * share)
        x, y, mbs = x[mine], y[mine], self.cfg.train.micro_batch_size
        micro = [microbatch(x[i: i + mbs], y[i: i + mbs]) for i in range(0, share, mbs)]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.factor(step - 1)
        result = train_step(self.model, self.optimizer, micro, self.cfg, forward_step_func=self.forward)
        if self.rule is not None:
            self.rule.after_step(step)
        return result.loss

    def evaluate(self, data: tasks.TaskData) -> tuple[float, float]:
        return evaluate(self.model, data, self.ctx.suite.eval_batch_size, self.vocab_size)

    def lm_eval_score(self) -> float:
        raise AssertionError("lm_eval tasks are refused for engine megatron at suite load")


@torch.no_grad()
def evaluate(model: list, data: tasks.TaskData, batch_size: int, vocab_size: int) -> tuple[float, float]:
    """``runner.evaluate`` on the megatron model: (mean next-token loss, score) over ``data.eval``. Rows go
    to the DP ranks in micro-batches of ``batch_size`` (the last padded with unscored rows)."""
    tokens = data.eval
    labels = tokens if data.eval_labels is None else data.eval_labels
    n, dp = tokens.shape[0], mcore.dp_size()
    chunks = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    per_rank = math.ceil(len(chunks) / dp)
    micro = []
    for j in range(per_rank):
        k = j * dp + mcore.dp_rank()
        rows = chunks[k] if k < len(chunks) else slice(0, 0)
        batch = microbatch(tokens[rows], labels[rows])
        pad = batch_size - batch["tokens"].shape[0]
        if pad:
            blank = microbatch(torch.zeros(pad, tokens.shape[1], dtype=tokens.dtype),
                           torch.full((pad, tokens.shape[1]), -100, dtype=labels.dtype))
            blank["row"].zero_()
            batch = {key: torch.cat([batch[key], blank[key]]) for key in batch}
        micro.append(batch)
    label_ids = None if data.label_ids is None else torch.tensor(data.label_ids, device=mcore.device())
    step = partial(_forward_step, partial(_eval_sums, vocab_size=vocab_size, metric=data.metric,
                                          label_ids=label_ids))
    iters = [iter(micro) for _ in model]
    reduced = mcore.get_forward_backward_func()(
        forward_step_func=step, data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0], num_microbatches=len(micro),
        seq_length=tokens.shape[1], micro_batch_size=batch_size, forward_only=True)
    total = torch.zeros(2, dtype=torch.float64)
    for item in reduced or []:
        total += item["eval"].double().cpu()
    mcore.all_reduce(total, group=mcore.pp_group())
    mcore.all_reduce(total, group=mcore.dp_group())
    num_tokens = int((labels[:, 1:] != -100).sum())  # what runner.evaluate divides by
    num_scored = tokens.shape[0] if data.metric == "exact_match" else num_tokens
    loss, hits = total.tolist()
    return loss / num_tokens, hits / num_scored


# ----------------------------------------------------------------------------- one cell


def _measure(cell: Cell, ctx: runner.AttackContext, data, pre, vocab_size: int) -> tuple:
    """Un-attacked (task loss, score, pretraining loss); shared by the cells of one release."""
    suite = ctx.suite
    key = (cell.role, ctx.model_ids[cell.role], cell.seed if cell.role == "scratch" else None,
           json.dumps(task_payload(cell.task), sort_keys=True), json.dumps(suite.settings(), sort_keys=True))
    if key not in _ENGINE.before:
        loss, score = evaluate(_ENGINE.model, data, suite.eval_batch_size, vocab_size)
        pre_loss = None if pre is None else evaluate(_ENGINE.model, pre, suite.eval_batch_size, vocab_size)[0]
        _ENGINE.before[key] = (loss, score, pre_loss)
    return _ENGINE.before[key]


def _attacker_masks(cell: Cell, ctx: runner.AttackContext, m: ModelConfig, infos):
    """The attacker's mask as this rank's local masks per canonical name (None: dense), the mask info and
    the trainable fraction of the release's parameters."""
    model_dir = ctx.models[cell.role]
    shapes = hf_shapes(m)

    def weights():
        return {n: t.float() for n, t in read_weights(model_dir)[0].items()}

    masks, info = runner.release_mask(cell, ctx, shapes, weights, torch.device("cpu"))
    if masks is None:
        return None, info, 1.0
    local = {name: info_.to_local(canonical_tensor(name, masks.__getitem__, m), param.shape)
             for name, (param, info_) in infos.items()}
    num_base = sum(math.prod(s) for s in shapes.values())
    return local, info, sum(int(t.sum()) for t in masks.values()) / num_base


def run_cell(cell: Cell, ctx: runner.AttackContext, checkpoints: Path | None = None) -> dict:
    """Run one cell on every rank (collective); return its record. ``checkpoints``: where an interrupted
    cell's state is saved and found again (None: not preemptible)."""
    start = time.time()
    _ENGINE.model_for(cell, ctx)
    engine, m = _ENGINE, _ENGINE.cfg.model
    world = torch.distributed.get_world_size()
    data = runner.task_data(cell, ctx)
    pre = runner.pretraining_data(ctx, cell.role)
    infos = shard_infos(engine.chunks, m.vocab_size)
    local_masks, mask_info, trainable = _attacker_masks(cell, ctx, m, infos)
    before = _measure(cell, ctx, data, pre, m.vocab_size)
    rho = None if local_masks is None else min(max(mask_info["mask_density"], 1e-12), 1.0)  # (validated)
    cfg = _config(m, ctx.suite.megatron, world, cell, rho)
    tcfg = engine.chunks[0].config
    finalize = tcfg.finalize_model_grads_func
    optimizer = build_optimizer(engine.model, cfg, decay_every_param=True,
                                optimizer=_OPTIMIZERS[cell.adversary.optimizer])
    progress = cell_loop.Progress.start(cell.adversary.steps, before[0], before[1])
    cell_dir = None if checkpoints is None else checkpoints / cell.id
    if cell_dir is not None and cell_checkpoint.exists(cell_dir):
        progress = cell_checkpoint.load(cell_dir, cell, engine.chunks, m.vocab_size, optimizer)
    rule = None
    try:
        if local_masks is not None:
            pmp_masks.attach(engine.chunks, m.vocab_size, local_masks)
            rule = MaskedUpdate(engine.model, optimizer, cfg, iteration=progress.ran)
        trainee = MegatronTrainee(cell, ctx, cfg, engine.model, optimizer, rule)

        def after_step(p: cell_loop.Progress) -> None:
            if _STEP_HOOK is not None:
                _STEP_HOOK(cell, p.ran)
            if cell_dir is not None and signals.stop_agreed():
                cell_checkpoint.save(cell_dir, cell, p, engine.chunks, m.vocab_size, optimizer)
                raise cell_loop.Preempted(f"cell {cell.id} preempted at step {p.ran}",
                                          signals.REQUEUE_EXIT_CODE)

        cell_loop.train(cell, ctx.suite, data, trainee, progress, after_step)
        record = cell_loop.finish(cell, ctx, data, pre, trainee, progress, before, mask_info, trainable)
        hook = runner.trained_state_hook()
        if hook is not None:
            hook(cell, _hf_state(engine.chunks, m))
    finally:
        tcfg.finalize_model_grads_func = finalize  # MaskedUpdate wrapped it for this cell only
        if rule is not None:
            rule.close()
        pmp_masks.detach(engine.chunks)
    record.update({"device": f"megatron tp{mcore.tp_size()} pp{mcore.pp_size()} dp{mcore.dp_size()} "
                             f"{mcore.device().type}",
                   "wall_s": round(time.time() - start, 3), "finished": time.time()})
    return record


def _hf_state(chunks, m: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights as HF tensors on the CPU (gathered from every rank: tests, small models)."""
    full = gather_full(shard_infos(chunks, m.vocab_size))
    return {hf: t.float() for name, tensor in full.items() for hf, t in to_hf(name, tensor, m)}


# ----------------------------------------------------------------------------- the grid


def run_cells(cells: list[Cell], ctx: runner.AttackContext, results_path: str | Path) -> int:
    """Run every pending cell of ``cells`` on this job's ranks (every rank calls it); global rank 0 appends
    each record to ``results_path``. Returns 0, or ``signals.REQUEUE_EXIT_CODE`` when a preemption signal
    stopped the grid (the interrupted cell's state saved under ``<results>.cells/``)."""
    assert ctx.suite.engine == "megatron", ctx.suite.engine
    results_path = Path(results_path).resolve()
    _ENGINE.setup(ctx.suite.megatron)
    signals.install()
    checkpoints = results_path.with_name(results_path.name + ".cells")
    done = mcore.broadcast_object(sorted(done_ids(results_path)) if is_main() else None)
    if is_main():
        cell_checkpoint.remove_finished(checkpoints, set(done))
    todo = [c for c in cells if c.id not in set(done)]
    logger.info("%d cells, %d already in %s, %d to run on the megatron engine", len(cells),
                len(cells) - len(todo), results_path, len(todo))
    for i, cell in enumerate(todo, start=1):
        try:
            record = run_cell(cell, ctx, checkpoints)
        except cell_loop.Preempted as stop:
            logger.warning("%s: exiting %d for requeue", stop, signals.REQUEUE_EXIT_CODE)
            return signals.requeue_exit(checkpoints)
        if is_main():
            append_record(results_path, record)
            cell_checkpoint.remove(checkpoints / cell.id)
        mcore.barrier()
        what = record["status"] if record.get("gain") is None else f"gain {record['gain']:.4f}"
        logger.info("cell %d/%d %s %s %s %s seed=%d: %s", i, len(todo), cell.role, cell.attacker,
                    cell.task_name, cell.adversary.label, cell.seed, what)
    return 0
