"""One attack cell: load a release, pick the entries the attacker may train, fine-tune, measure.

Attackers:

- ``unauthorized``: every entry trains (full fine-tuning), or plain LoRA.
- ``authorized``: the owner's mask. Full fine-tuning zeroes the complement's gradients after backward,
  before clipping (like Stage II), AND copies the complement's original values back after every
  optimizer step, so it stays bit-exact under decoupled weight decay (AdamW, Lion), Adafactor and SGD
  momentum alike. Tensors without any masked-in entry are frozen outright.
- ``recovery_*``: like ``authorized`` with the mask recovered from the release (``release.recovery``);
  ``recovery_init`` regenerates W0 from the init seed (the owner's key holds it), ``recovery_seed_guess``
  guesses the seed.

LoRA with a mask (authorized / recovery) masks the MERGED delta: each adapted linear computes
``base(x) + dropout(x) @ (M * (B A) * scale)^T``, so the effective weight ``W + M * dB A`` changes only
inside the mask, in training and evaluation alike. That update is no longer low rank; it is the
natural meaning of "LoRA, restricted to the key". Without a mask, LoRA is plain peft.

Metrics: task eval loss before, every ``eval_every`` steps and after; gain = before - after (and the gain
of the best checkpoint, an early-stopping attacker); pretraining-domain eval loss before/after
(forgetting); recovered-mask density and IoU with the true mask when it is given. A non-finite training
loss stops the cell and marks it ``diverged`` (its after-losses are then null).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pmp_megatron.attack import tasks
from pmp_megatron.attack.optimizers import build_optimizer, build_schedule
from pmp_megatron.attack.suite import RECOVERY_ATTACKERS, Cell, Suite, TaskSpec
from pmp_megatron.config import ModelConfig
from pmp_megatron.release import recovery
from pmp_megatron.release.audit import check_mask_names, model_config_for_audit, weight_shapes
from pmp_megatron.release.reader import check_model_dir, read_config, release_dtype
from pmp_megatron.release.writer import TOKENIZER_FILES, file_sha256

logger = logging.getLogger(__name__)

_TRAINED_STATE_HOOK: Callable[[Cell, dict[str, torch.Tensor]], None] | None = None


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


@functools.lru_cache(maxsize=8)
def _task(model_dir: str, spec: TaskSpec, seq_length: int, eval_blocks: int) -> tasks.TaskData:
    return tasks.load_task(spec, _tokenizer(model_dir), seq_length, eval_blocks)


_RECOVERED: dict[tuple, tuple[dict[str, torch.Tensor], dict]] = {}


def attacker_mask(cell: Cell, ctx: AttackContext, model: torch.nn.Module) -> tuple[dict | None, dict]:
    """The trainable-entry mask of the cell's attacker (None: everything), and recovery metrics."""
    if cell.attacker == "unauthorized":
        return None, {}
    true = None
    if ctx.mask_path is not None:
        true = {n: m.to(next(model.parameters()).device) for n, m in load_true_mask(ctx.mask_path)[0].items()}
        check_mask_names(true, weight_shapes(dict(model.named_parameters())), f"mask file {ctx.mask_path}")
    if cell.attacker == "authorized":
        if true is None:
            raise ValueError("attacker 'authorized' needs the owner's mask file")
        return true, {"mask_density": recovery.mask_density(true)}
    assert cell.attacker in RECOVERY_ATTACKERS, cell.attacker
    spec = ctx.suite.recovery
    key = (ctx.model_ids[cell.role], cell.attacker, spec,
           None if ctx.regen_config is None else dataclasses.astuple(ctx.regen_config))
    if key not in _RECOVERED:
        start = time.time()
        weights = {n: p.detach() for n, p in model.named_parameters()}
        w0 = arch = candidates = None
        if cell.attacker == "recovery_init":
            if ctx.regen_config is None:
                raise ValueError("attacker 'recovery_init' needs the init seed (the owner's key via --mask, "
                                 "or --seed-for-regeneration) and the model config")
            w0 = recovery.iter_w0(ctx.regen_config)
        if cell.attacker == "recovery_seed_guess":
            arch = ctx.regen_config or model_config_for_audit(ctx.models[cell.role], None)
            candidates = recovery.seed_candidates(spec.seed_guesses)
        dtype = release_dtype(read_config(ctx.models[cell.role]))
        masks, info = recovery.recover(cell.attacker, weights, spec.density, w0, dtype, spec.init_rule,
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
def evaluate(model, blocks: torch.Tensor, batch_size: int, device: torch.device, amp) -> float:
    """Mean next-token loss over ``blocks`` ``[n, s]`` (every block has the same token count)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i: i + batch_size].to(device)
        with amp():
            total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
    model.train(was_training)
    return total / blocks.shape[0]


def _amp(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_cell(cell: Cell, ctx: AttackContext) -> dict:
    """Run one cell; return its result record (one JSON line)."""
    start = time.time()
    suite, adv = ctx.suite, cell.adversary
    device = resolve_device(ctx.device)
    model_dir = ctx.models[cell.role]
    torch.manual_seed(cell.seed)
    model = load_model(model_dir, device)
    masks, mask_info = attacker_mask(cell, ctx, model)
    task = _task(model_dir, cell.task, suite.seq_length, suite.eval_blocks)
    pre = None if suite.pretraining_eval is None else _task(
        model_dir, suite.pretraining_eval, suite.seq_length, suite.eval_blocks)
    amp = _amp(suite.precision, device)

    def task_loss() -> float:
        return evaluate(model, task.eval, suite.eval_batch_size, device, amp)

    before = task_loss()
    pre_before = None if pre is None else evaluate(model, pre.eval, suite.eval_batch_size, device, amp)
    num_base = sum(p.numel() for p in model.parameters())
    guard = None
    if adv.method == "lora":
        model = apply_lora(model, cell, masks)
    elif masks is not None:
        guard = MaskGuard(model, masks)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params) if masks is None or adv.method == "lora" else sum(
        int(m.sum()) for m in masks.values())
    optimizer = build_optimizer(adv.optimizer, params, adv.lr, adv.weight_decay)
    schedule = build_schedule(optimizer, adv.schedule, adv.warmup_steps, adv.steps)
    model.train()
    curve, train_losses, diverged, step = [[0, before]], [], False, 0
    for step, batch in enumerate(tasks.train_batches(task, adv.batch_size, adv.steps, cell.seed), start=1):
        x = batch.to(device)
        with amp():
            loss = model(input_ids=x, labels=x).loss
        if not torch.isfinite(loss):
            diverged = True
            logger.warning("cell %s diverged at step %d (loss %s)", cell.id, step, float(loss))
            break
        loss.backward()
        if guard is not None:
            guard.mask_grads()
        if adv.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, adv.clip_grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if guard is not None:
            guard.restore()
        train_losses.append(float(loss.detach()))
        if suite.eval_every and step % suite.eval_every == 0 and step < adv.steps:
            curve.append([step, task_loss()])
    after = pre_after = None
    if not diverged:
        after = task_loss()
        if not math.isfinite(after):
            diverged, after = True, None
        else:
            curve.append([adv.steps, after])
            pre_after = None if pre is None else evaluate(model, pre.eval, suite.eval_batch_size, device, amp)
    if _TRAINED_STATE_HOOK is not None:
        _TRAINED_STATE_HOOK(cell, effective_state(model, masks))
    finite = [loss for _, loss in curve if math.isfinite(loss)]
    return {
        "id": cell.id, "status": "diverged" if diverged else "ok",
        "role": cell.role, "model": str(model_dir), "model_id": ctx.model_ids[cell.role],
        "rho": ctx.rho if cell.role == "pmp" else None, "suite": suite.name,
        "task": cell.task.name, "attacker": cell.attacker, "adversary": adv.label,
        **{f"adv_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(adv).items()},
        "seed": cell.seed, "tokens": step * adv.batch_size * suite.seq_length,
        "task_loss_before": before, "task_loss_after": after,
        "gain": None if after is None else before - after,
        "gain_best_checkpoint": None if diverged else before - min(finite),
        "curve": curve, "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "pretrain_loss_before": pre_before, "pretrain_loss_after": pre_after,
        "forgetting": None if pre_after is None else pre_after - pre_before,
        "trainable_fraction": trainable / num_base,
        "iou": mask_info.get("iou"), "mask_density": mask_info.get("mask_density"),
        "true_density": mask_info.get("true_density"), "density_estimate": mask_info.get("density_estimate"),
        "recovery_s": mask_info.get("recovery_s"),
        "device": str(device), "wall_s": round(time.time() - start, 3), "finished": time.time(),
    }
