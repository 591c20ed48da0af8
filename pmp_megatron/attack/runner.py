"""One attack cell: load a release, pick the entries the attacker may train, fine-tune, measure.

Attackers:

- ``unauthorized``: every entry trains (full fine-tuning), or plain LoRA.
- ``authorized``: the owner's mask. Full fine-tuning zeroes the complement's gradients after backward,
  before clipping (like Stage II), AND copies the complement's original values back after every
  optimizer step, so it stays bit-exact under decoupled weight decay (AdamW, Lion), Adafactor and SGD
  momentum alike. Tensors without any masked-in entry are frozen outright.
- ablations: ``unauthorized_frozen_embedding`` (keyless; every entry but the input embedding's trains) and
  ``authorized_plus_embedding`` (the owner's mask with every input-embedding entry added).
- ``recovery_*``: like ``authorized`` with the mask recovered from the release (``release.recovery``);
  ``recovery_init`` regenerates W0 from the init seed (the owner's key holds it), ``recovery_seed_guess``
  guesses the seed.

LoRA with a mask (authorized / recovery) masks the MERGED delta: each adapted linear computes
``base(x) + dropout(x) @ (M * (B A) * scale)^T``, so the effective weight ``W + M * dB A`` changes only
inside the mask, in training and evaluation alike. That update is no longer low rank; it is the
natural meaning of "LoRA, restricted to the key". Without a mask, LoRA is plain peft.

Metrics: task eval loss and score (an accuracy: ``evaluate``) before, every ``eval_every`` steps and
after; gain = loss before - after (and the gain of the best checkpoint, an early-stopping attacker),
score_gain = score after - before; pretraining-domain eval loss before/after (forgetting);
recovered-mask density and IoU with the true mask when it is given. A non-finite training loss marks the
cell ``diverged`` (its after-values are then null); the losses stay on the device and are read at each
eval and once at the end (no host sync per step), so a diverged cell is noticed at the next eval.

Throughput: the cells of one release share one loaded model per process (``base_model``: reset from a
CPU copy of the weights, LoRA adapters unloaded after the cell) and its un-attacked scores; the records are
bit-identical to loading afresh per cell (``set_model_reuse(False)``, tested).

Roles: ``pmp``, ``dense`` and ``dense_matched`` are release directories; ``scratch`` is the PMP release's
architecture with a fresh random init (``scratch_model``), fine-tuned like the others.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pmp_megatron.attack import cell_loop, tasks
from pmp_megatron.attack.optimizers import build_optimizer, build_schedule
from pmp_megatron.attack.suite import (
    ADAPTIVE_ATTACKERS,
    KEYED_ATTACKERS,
    RECOVERY_ATTACKERS,
    Cell,
    Suite,
    TaskSpec,
    task_payload,
)
from pmp_megatron.config import ModelConfig
from pmp_megatron.release import adaptive_recovery, recovery
from pmp_megatron.release.audit import check_mask_names, model_config_for_audit, weight_shapes
from pmp_megatron.release.reader import check_model_dir, read_config, release_dtype
from pmp_megatron.release.writer import TOKENIZER_FILES, file_sha256

logger = logging.getLogger(__name__)

INPUT_EMBEDDING = "model.embed_tokens.weight"  # the HF name of the input embedding (ablation attackers)
_TRAINED_STATE_HOOK: Callable[[Cell, dict[str, torch.Tensor]], None] | None = None
_LR_HOOK: Callable[[Cell, float], float] | None = None


@dataclass
class AttackContext:
    """Everything a cell needs besides its own parameters (picklable: sent to workers and Slurm jobs)."""

    suite: Suite
    models: dict[str, str]  # role ("pmp", "dense") -> HF release directory
    model_ids: dict[str, str]  # role -> model identity (see model_identity)
    mask_path: str | None = None  # the owner's private mask (authorized attacker, recovery IoU)
    regen_config: ModelConfig | None = None  # init config with the seed, for recovery_init
    rho: float | None = None  # the PMP model's rho (mask file metadata or a --rho tag), for reports
    device: str = "auto"  # auto | cpu | cuda


def set_trained_state_hook(fn: Callable[[Cell, dict[str, torch.Tensor]], None] | None) -> None:
    """TEST-ONLY: call ``fn(cell, effective HF weights on CPU)`` after each in-process cell trains."""
    global _TRAINED_STATE_HOOK
    _TRAINED_STATE_HOOK = fn


def trained_state_hook() -> Callable[[Cell, dict[str, torch.Tensor]], None] | None:
    """The hook of ``set_trained_state_hook`` (the megatron engine calls it too; set it on every rank)."""
    return _TRAINED_STATE_HOOK


def set_lr_hook(fn: Callable[[Cell, float], float] | None) -> None:
    """TEST-ONLY: ``fn(cell, lr)`` gives the learning rate a cell's optimizer is built with (lr 0 on one
    side: a model whose parameters cannot move)."""
    global _LR_HOOK
    _LR_HOOK = fn


def model_identity(model_dir: str | Path) -> str:
    """A content hash of a release, computed afresh from the files every time (no manifest, no cache: new
    weights under an old manifest are a new model): the sha256 of every ``*.safetensors`` in name order,
    ``config.json`` and the tokenizer files present (they fix the task data), each with its name."""
    model_dir = check_model_dir(model_dir)
    files = [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json",
             *(model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file())]
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return h.hexdigest()[:16]


def regen_config_from_key(model_dir: str | Path, mask: str | None = None, seed: int | None = None,
                 model_config: str | None = None) -> ModelConfig | None:
    """The init config for ``recovery_init``: the release's architecture (``model_config`` YAML, else
    config.json) with the W0 seed of the owner's key ``mask`` (a v2 key holds it), else the explicitly
    given ``seed`` (an attacker who knows a public seed); None when neither. A ``seed`` that contradicts
    the key's is refused."""
    key_seed = None if mask is None else load_true_mask(mask)[1]["w0_seed"]
    if key_seed is not None and seed is not None and seed != key_seed:
        raise ValueError(f"the given regeneration seed is not the W0 seed in mask file {mask}: drop it (the "
                         f"key's seed is used)")
    chosen = key_seed if key_seed is not None else seed
    if chosen is None:
        if model_config:
            raise ValueError("--model-config is only used with a seed (a v2 key or --seed-for-regeneration)")
        return None
    return model_config_for_audit(model_dir, chosen, model_config)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """The release as an fp32 ``AutoModelForCausalLM`` on ``device`` (bf16 releases upcast exactly)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_model_dir(model_dir)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device)


def load_true_mask(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The owner's key file (masks, metadata); cached while the file is unchanged (path, inode, size,
    mtime), so a key replaced at the same path is read again."""
    st = Path(path).stat()
    return _load_key(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_key(path: str, inode: int, size: int, mtime_ns: int) -> tuple[dict[str, torch.Tensor], dict]:
    from pmp_megatron.pmp import maskfile

    return maskfile.load(path)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str) -> tasks.ReleaseTokenizer:
    return tasks.ReleaseTokenizer(model_dir)


_RECOVERED: dict[tuple, tuple[dict[str, torch.Tensor], dict]] = {}


def attacker_mask(cell: Cell, ctx: AttackContext, model: torch.nn.Module) -> tuple[dict | None, dict]:
    """The trainable-entry mask of the cell's attacker on the HF ``model`` (None: everything), and recovery
    metrics."""
    params = dict(model.named_parameters())
    return release_mask(cell, ctx, weight_shapes(params), lambda: {n: p.detach() for n, p in params.items()},
                        next(iter(params.values())).device)


def release_mask(cell: Cell, ctx: AttackContext, shapes: dict[str, tuple[int, ...]],
                 weights: Callable[[], dict[str, torch.Tensor]],
                 device: torch.device) -> tuple[dict | None, dict]:
    """The attacker's mask (HF name -> bool tensor on ``device``; None: every entry trains) and recovery
    metrics, from the release's tensor ``shapes`` and its fp32 ``weights`` (called only by the recovery
    attackers): what ``attacker_mask`` gives for a loaded model, for engines that hold none."""
    if cell.attacker == "unauthorized":
        return None, {}
    if cell.attacker == "unauthorized_frozen_embedding":
        masks = {n: torch.full(shape, n != INPUT_EMBEDDING, dtype=torch.bool, device=device)
                 for n, shape in shapes.items()}
        return masks, {"mask_density": recovery.mask_density(masks)}
    true = None
    if ctx.mask_path is not None:
        true = {n: m.to(device) for n, m in load_true_mask(ctx.mask_path)[0].items()}
        check_mask_names(true, shapes, f"mask file {ctx.mask_path}")
    if cell.attacker in KEYED_ATTACKERS:
        if true is None:
            raise ValueError(f"attacker {cell.attacker!r} needs the owner's mask file")
        if cell.attacker == "authorized_plus_embedding":
            true = {**true, INPUT_EMBEDDING: torch.ones_like(true[INPUT_EMBEDDING])}
        return true, {"mask_density": recovery.mask_density(true)}
    assert cell.attacker in RECOVERY_ATTACKERS, cell.attacker
    spec = ctx.suite.recovery
    key = (ctx.model_ids[cell.role], cell.attacker, spec,
           None if ctx.regen_config is None else dataclasses.astuple(ctx.regen_config))
    if key not in _RECOVERED:
        start = time.time()
        w0 = arch = candidates = None
        if cell.attacker == "recovery_init":
            if ctx.regen_config is None:
                raise ValueError("attacker 'recovery_init' needs the init seed (the owner's key via --mask, "
                                 "or --seed-for-regeneration) and the model config")
            w0 = recovery.iter_w0(ctx.regen_config)
        if cell.attacker == "recovery_seed_guess":
            arch = ctx.regen_config or model_config_for_audit(ctx.models[cell.role], None)
            candidates = recovery.seed_candidates(spec.seed_guesses)
        if cell.attacker in ADAPTIVE_ATTACKERS:  # the attacker's own data and passes, never the owner's
            batches = adaptive_recovery.attacker_batches(ctx.models[cell.role], spec.adaptive_batches)
            masks, info = adaptive_recovery.recover_adaptive(
                cell.attacker, ctx.models[cell.role], batches, spec.density, spec.adaptive_batches,
                spec.stage1_steps, device=str(device))
        else:
            dtype = release_dtype(read_config(ctx.models[cell.role]))
            masks, info = recovery.recover(cell.attacker, weights(), spec.density, w0, dtype, spec.init_rule,
                                           spec.init_tolerance, model_cfg=arch, candidates=candidates)
        info["recovery_s"] = round(time.time() - start, 3)
        if true is not None:
            info["iou"] = recovery.iou(masks, true)
            info["true_density"] = recovery.mask_density(true)
        logger.info("%s on %s: density %.4f, IoU %s (%.1fs)", cell.attacker, cell.role,
                    info["recovered_density"], info.get("iou"), info["recovery_s"])
        _RECOVERED[key] = (masks, info)
    masks, info = _RECOVERED[key]
    return masks, {**info, "mask_density": info["recovered_density"]}


class MaskGuard:
    """Keeps the complement of a mask bit-exactly unchanged during full fine-tuning."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]):
        self.items = []  # (param, complement bool, original complement values)
        for name, p in model.named_parameters():
            m = masks[name].to(p.device)
            if not m.any():
                p.requires_grad_(False)
            elif not m.all():
                inv = ~m
                self.items.append((p, inv, p.detach()[inv].clone()))

    def mask_grads(self) -> None:
        for p, inv, _ in self.items:
            if p.grad is not None:
                p.grad.masked_fill_(inv, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        for p, inv, kept in self.items:
            p.masked_scatter_(inv, kept)


def _masked_lora_forward(layer, mask: torch.Tensor):
    """A forward for a peft ``lora.Linear`` whose merged delta is restricted to ``mask`` ``[out, in]``."""
    keep = mask.to(layer.base_layer.weight.dtype)

    def forward(x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in layer.active_adapters:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # [r, in], [out, r]
            delta = (b @ a) * layer.scaling[name] * keep  # [out, in]
            result = result + F.linear(layer.lora_dropout[name](x).to(delta.dtype), delta).to(result.dtype)
        return result

    return forward


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """HF weight name of the base layer -> peft lora.Linear module."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {name.removeprefix("base_model.model.") + ".weight": mod for name, mod in model.named_modules()
            if isinstance(mod, LoraLinear)}


def apply_lora(model, cell: Cell, masks: dict[str, torch.Tensor] | None):
    from peft import LoraConfig, get_peft_model

    adv = cell.adversary
    config = LoraConfig(r=adv.lora_rank, lora_alpha=adv.lora_alpha, lora_dropout=adv.lora_dropout,
                        target_modules=list(adv.lora_target_modules), bias="none")
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"LoRA target_modules {adv.lora_target_modules} do not fit the model: "
                         f"{err}") from err
    if masks is not None:
        for name, layer in _lora_layers(model).items():
            layer.forward = _masked_lora_forward(layer, masks[name])
    return model


@torch.no_grad()
def effective_state(model, masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model's effective HF weights on CPU (LoRA deltas merged, masked like the forward)."""
    lora = _lora_layers(model) if hasattr(model, "peft_config") else {}
    base = model.get_base_model() if lora else model
    out = {n: p.detach().float().cpu().clone() for n, p in base.named_parameters() if "lora_" not in n}
    out = {n.replace(".base_layer.", "."): t for n, t in out.items()}
    for name, layer in lora.items():
        for adapter in layer.active_adapters:
            delta = (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight) * layer.scaling[adapter]
            if masks is not None:
                delta = delta * masks[name].to(delta.dtype)
            out[name] = out[name] + delta.float().cpu()
    return out


@torch.no_grad()
def evaluate(model, data: tasks.TaskData, batch_size: int, device: torch.device, amp) -> tuple[float, float]:
    """(mean next-token loss, score) over ``data.eval`` ``[n, s]`` on the positions its labels keep.

    The score is ``data.metric``: token top-1 accuracy (``token_acc``; also the score of ``lm_eval``
    tasks here, whose lm-eval score ``lm_eval_score`` adds), whole-target exact match under teacher
    forcing (``exact_match``: every kept position's argmax right), or the argmax over ``label_ids`` at the
    one kept position (``accuracy``). Sums stay on the device; one host read at the end."""
    was_training = model.training
    model.eval()
    tokens, labels = data.eval, data.eval_labels
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    label_ids = None if data.label_ids is None else torch.tensor(data.label_ids, device=device)
    for i in range(0, tokens.shape[0], batch_size):
        x = tokens[i: i + batch_size].to(device)  # [b, s]
        target = (x if labels is None else labels[i: i + batch_size].to(device))[:, 1:]  # [b, s - 1]
        with amp():
            logits = model(input_ids=x).logits[:, :-1].float()  # [b, s - 1, V]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                    reduction="sum")
        valid = target != -100
        if data.metric == "accuracy":
            pred = label_ids[logits.index_select(-1, label_ids).argmax(-1)]
        else:
            pred = logits.argmax(-1)
        hit = (pred == target) & valid
        correct += (hit | ~valid).all(-1).sum() if data.metric == "exact_match" else hit.sum()
    model.train(was_training)
    num_tokens = int((tokens[:, 1:] != -100).sum()) if labels is None else int((labels[:, 1:] != -100).sum())
    num_scored = tokens.shape[0] if data.metric == "exact_match" else num_tokens
    loss, hits = torch.stack([loss_sum, correct]).tolist()
    return loss / num_tokens, hits / num_scored


def lm_eval_score(model, spec: TaskSpec, model_dir: str, device: torch.device) -> float:
    """The lm-eval metric (``spec.metric``, default acc) of ``model`` on the lm-eval task ``spec.source``."""
    from transformers import AutoTokenizer

    from pmp_megatron.attack import lm_eval_backend

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    was_training = model.training
    model.eval()
    result = lm_eval_backend.score(model, [spec.source], limit=spec.num_eval, device=str(device),
                                   tokenizer=tokenizer)[spec.source]
    model.train(was_training)
    metric = spec.metric or "acc"
    if result.get(metric) is None:
        raise ValueError(f"lm-eval task {spec.source!r} has no metric {metric!r}; it has "
                         f"{', '.join(k for k in result if not k.endswith('_stderr'))}")
    return float(result[metric])


def _amp(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ----------------------------------------------------------------------------- models shared by cells

SCRATCH_SEED = 10_000  # the scratch control's init seed is SCRATCH_SEED + cell seed (never the owner's W0)
_MAX_MODELS = 2  # loaded models kept per process (least recently used goes)
_MODELS: collections.OrderedDict[tuple, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = (
    collections.OrderedDict())
_BEFORE: dict[tuple, tuple] = {}
_REUSE = True


def set_model_reuse(reuse: bool) -> None:
    """Share one loaded model (and its un-attacked scores) between the cells of a release in this process
    (default), or load afresh per cell (``False``: the reference the sharing is tested against)."""
    global _REUSE
    _REUSE = reuse
    clear_model_cache()


def clear_model_cache() -> None:
    _MODELS.clear()
    _BEFORE.clear()


def scratch_model(model_dir: str | Path, seed: int, device: torch.device) -> torch.nn.Module:
    """The release's architecture (its config.json) with a fresh Hugging Face random init seeded by
    ``SCRATCH_SEED + seed``: the from-scratch control, which must not start from the owner's W0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(check_model_dir(model_dir)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED + seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().to(device)


def base_model(cell: Cell, ctx: AttackContext, device: torch.device) -> torch.nn.Module:
    """The cell's un-attacked model: the release (or the scratch init), loaded once per process and reset
    from a CPU copy of its weights for every further cell (bit for bit the weights a fresh load gives)."""
    key = (cell.role, ctx.models[cell.role], ctx.model_ids[cell.role],
           cell.seed if cell.role == "scratch" else None, str(device))
    if _REUSE and key in _MODELS:
        _MODELS.move_to_end(key)
        model, weights = _MODELS[key]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
                p.requires_grad_(True)
                p.grad = None
        return model.eval()
    if cell.role == "scratch":
        model = scratch_model(ctx.models[cell.role], cell.seed, device)
    else:
        model = load_model(ctx.models[cell.role], device)
    if _REUSE:
        _MODELS[key] = (model, {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()})
        while len(_MODELS) > _MAX_MODELS:
            _MODELS.popitem(last=False)
    return model


def _vocab_size(model_dir: str) -> int:
    return int(read_config(model_dir)["vocab_size"])


def task_data(cell: Cell, ctx: AttackContext) -> tasks.TaskData:
    """The training and eval data of the cell's task (an lm_eval task trains on the task it names)."""
    spec = cell.task
    if spec.kind == "lm_eval":
        spec = next(t for t in ctx.suite.tasks if t.name == spec.train)
    return _task(ctx.models[cell.role], spec, ctx.suite.seq_length, ctx.suite.eval_blocks)


@functools.lru_cache(maxsize=8)
def _task(model_dir: str, spec: TaskSpec, seq_length: int, eval_blocks: int) -> tasks.TaskData:
    if spec.kind == "synthetic":
        return tasks.load_synthetic(spec, _vocab_size(model_dir))
    if spec.kind == "classify":
        return tasks.load_classify(spec, _tokenizer(model_dir), seq_length)
    return tasks.load_task(spec, _tokenizer(model_dir), seq_length, eval_blocks)


# ----------------------------------------------------------------------------- one cell


def run_cell(cell: Cell, ctx: AttackContext) -> dict:
    """Run one cell; return its result record (one JSON line)."""
    start = time.time()
    device = resolve_device(ctx.device)
    model = base_model(cell, ctx, device)
    peft_model = None
    try:
        record, peft_model = _attack(cell, ctx, model, device)
    finally:
        if peft_model is not None:  # the shared model leaves without its adapters
            peft_model.unload()
    record.update({"device": str(device), "wall_s": round(time.time() - start, 3), "finished": time.time()})
    return record


def _measure(cell: Cell, ctx: AttackContext, model, data: tasks.TaskData, pre, device, amp) -> tuple:
    """Un-attacked (task loss, score, pretraining loss); shared by the cells of one model in a process."""
    suite = ctx.suite
    key = (cell.role, ctx.model_ids[cell.role], cell.seed if cell.role == "scratch" else None,
           json.dumps(task_payload(cell.task), sort_keys=True), json.dumps(suite.settings(), sort_keys=True))
    if _REUSE and key in _BEFORE:
        return _BEFORE[key]
    loss, score = evaluate(model, data, suite.eval_batch_size, device, amp)
    if cell.task.kind == "lm_eval":
        score = lm_eval_score(model, cell.task, ctx.models[cell.role], device)
    pre_loss = None if pre is None else evaluate(model, pre, suite.eval_batch_size, device, amp)[0]
    if _REUSE:
        _BEFORE[key] = (loss, score, pre_loss)
    return loss, score, pre_loss


def cell_lr(cell: Cell) -> float:
    """The learning rate the cell's optimizer is built with (the adversary's, unless a test hook says)."""
    return cell.adversary.lr if _LR_HOOK is None else _LR_HOOK(cell, cell.adversary.lr)


def pretraining_data(ctx: AttackContext, role: str) -> tasks.TaskData | None:
    """The suite's pretraining-domain eval set, tokenized by the release of ``role`` (None without one)."""
    suite = ctx.suite
    if suite.pretraining_eval is None:
        return None
    return _task(ctx.models[role], suite.pretraining_eval, suite.seq_length, suite.eval_blocks)


class _HFTrainee:
    """One HF model and its optimizer as the trainee of ``cell_loop``: a step is forward (HF's mean over
    the batch's non-ignored label tokens), backward, the mask guard, clipping, the optimizer step and the
    schedule."""

    def __init__(self, cell: Cell, ctx: AttackContext, model, optimizer, schedule, params, guard, device,
                 amp):
        self.cell, self.ctx, self.model, self.device, self.amp = cell, ctx, model, device, amp
        self.optimizer, self.schedule, self.params, self.guard = optimizer, schedule, params, guard

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.amp():
            loss = self.model(input_ids=x, labels=y).loss
        loss.backward()
        if self.guard is not None:
            self.guard.mask_grads()
        if self.cell.adversary.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cell.adversary.clip_grad)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.guard is not None:
            self.guard.restore()
        return loss.detach()

    def evaluate(self, data: tasks.TaskData) -> tuple[float, float]:
        return evaluate(self.model, data, self.ctx.suite.eval_batch_size, self.device, self.amp)

    def lm_eval_score(self) -> float:
        return lm_eval_score(self.model, self.cell.task, self.ctx.models[self.cell.role], self.device)


def _attack(cell: Cell, ctx: AttackContext, model, device: torch.device) -> tuple[dict, object]:
    suite, adv = ctx.suite, cell.adversary
    data = task_data(cell, ctx)
    pre = pretraining_data(ctx, cell.role)
    amp = _amp(suite.precision, device)
    masks, mask_info = attacker_mask(cell, ctx, model)
    before = _measure(cell, ctx, model, data, pre, device, amp)
    torch.manual_seed(cell.seed)  # LoRA init (and anything random in training) follows the cell's seed
    num_base = sum(p.numel() for p in model.parameters())
    guard = peft_model = None
    if adv.method == "lora":
        model = peft_model = apply_lora(model, cell, masks)
    elif masks is not None:
        guard = MaskGuard(model, masks)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params) if masks is None or adv.method == "lora" else sum(
        int(m.sum()) for m in masks.values())
    optimizer = build_optimizer(adv.optimizer, params, cell_lr(cell), adv.weight_decay)
    schedule = build_schedule(optimizer, adv.schedule, adv.warmup_steps, adv.steps)
    model.train()
    trainee = _HFTrainee(cell, ctx, model, optimizer, schedule, params, guard, device, amp)
    progress = cell_loop.Progress.start(adv.steps, before[0], before[1], device)
    cell_loop.train(cell, suite, data, trainee, progress)
    record = cell_loop.finish(cell, ctx, data, pre, trainee, progress, before, mask_info,
                              trainable / num_base)
    if _TRAINED_STATE_HOOK is not None:
        _TRAINED_STATE_HOOK(cell, effective_state(model, masks))
    return record, peft_model
