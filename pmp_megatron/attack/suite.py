"""The attack suite: a YAML grid of fine-tuning adversaries, validated into dataclasses and expanded into
cells (one fine-tuning run each).

A suite file (see ``configs/attacks/smoke.yaml``, ``results-cpu.yaml`` and ``full.yaml``)::

    name: full
    tasks:
      - {source: builtin:code_test, max_docs: 200}        # kind lm: token blocks, token top-1 accuracy
      - {kind: synthetic, source: copy, length: 8}        # copy | reverse | recall, exact match
      - {kind: classify, name: stdlib_family}             # stdlib test-file family, accuracy
      - {kind: lm_eval, source: pmp_stdlib_family, train: stdlib_family}  # scored by lm-eval
    pretraining_eval: {source: builtin:prose, max_docs: 200}    # forgetting / base quality
    seq_length: 256            # tokens per block
    eval_blocks: 64            # held-out task blocks (and pretraining-eval blocks)
    eval_batch_size: 8
    eval_every: 100            # task loss checkpoints along the way (0: before/after only)
    seeds: [0, 1]
    attackers: [unauthorized, authorized, recovery_global, recovery_per_tensor, recovery_init,
                recovery_seed_guess]
    recovery: {density: null, init_rule: threshold, init_tolerance: null, seed_guesses: 10000}
    scratch: true              # control: the same architecture from a fresh random init, same budget
    decision:                  # pre-registered rule (attack.decision), in accuracy points
      resists: {final_vs_dense: {below: -0.05}}
      does_not_resist: {final_vs_dense: {above: 0.0}}
    adversaries:               # groups; every list-valued field of a group is a grid axis
      - method: full
        optimizer: [adamw, lion]
        lr: {start: 1.0e-6, stop: 1.0e-4, num: 5}     # log-spaced, 3 significant digits
        steps: 1000
        batch_size: 8
      - method: lora
        optimizer: adamw
        lr: [1.0e-4, 1.0e-3]
        lora: {rank: [8, 64], alpha: null, target_modules: [q_proj, v_proj]}

Task kinds (``kind``, default ``lm``): ``lm`` (documents -> token blocks; keys source, name, max_docs,
max_chars, json_key), ``synthetic`` (``data.synthetic``: source copy | reverse | recall; keys length,
num_train, num_eval), ``classify`` (``attack.classify``: num_train / num_eval paragraphs per family) and
``lm_eval`` (source: an lm-eval task of ``configs/evals`` or lm-eval's registry; ``train``: the suite task
whose training split the attack trains on; ``metric`` (default acc); ``num_eval``: lm-eval's limit). A key
that does not belong to the task's kind is refused by name. Every task has one primary score, an accuracy
(higher is better): token top-1 accuracy (lm), exact match (synthetic), label accuracy (classify), the
lm-eval metric (lm_eval); the task loss is reported beside it.

An *adversary* is one point of a group's grid (method, optimizer, lr, steps, batch size, weight decay,
schedule, LoRA shape). A *cell* is (model role, attacker, adversary, task, seed); every cell runs once per
seed of ``seeds`` (the data order and the LoRA init). On the PMP release every attacker runs every
adversary; on the references (``dense``, ``dense_matched``: other releases; ``scratch``: built from the
PMP release's config.json with a fresh random init, never the owner's W0) only ``unauthorized`` runs.

``engine`` says who fine-tunes: ``hf`` (the default: one process per cell holding a full Hugging Face model,
``attack.runner``) or ``megatron`` (the release loaded once per job into megatron-core chunks at the layout
of ``megatron:``, every cell fine-tuned by the project's engine: ``attack.megatron_engine``)::

    engine: megatron
    megatron: {tensor_model_parallel_size: 2, pipeline_model_parallel_size: 1, micro_batch_size: null}

The engine enters the ids of megatron cells only (hf ids stay what they were); the layout enters no id
(any layout gives one cell's numbers to a stated tolerance). What the megatron engine does not run is
refused at load with the adversary, attacker or task named: LoRA (peft is HF-only), the Lion and Adafactor
optimizers (megatron-core has AdamW and SGD), the adaptive key attackers (their own HF passes over the
whole model) and ``lm_eval`` tasks (scored through an HF model).

``decision`` is parsed by ``attack.decision.parse_rule`` at load time (unknown keys or statistics are
named); ``pmp-attack report`` applies it to ``attack.stats.headline`` per task.

Unknown keys raise ``ValueError`` naming the key (with a close-match hint); so do bad values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from pmp_megatron.resources import recipe

TASK_KINDS = ("lm", "synthetic", "classify", "lm_eval")
TASK_KEYS = {  # the keys each task kind accepts (besides kind)
    "lm": ("source", "name", "max_docs", "max_chars", "json_key"),
    "synthetic": ("source", "name", "length", "num_train", "num_eval"),
    "classify": ("source", "name", "num_train", "num_eval"),
    "lm_eval": ("source", "name", "train", "metric", "num_eval"),
}
_V1_TASK_FIELDS = ("source", "name", "max_docs", "max_chars", "json_key")  # the only fields of v1 cell ids
CLASSIFY_SOURCE = "stdlib_family"
ROLES = ("pmp", "dense", "dense_matched", "scratch")
METHODS = ("full", "lora")
OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "cosine", "linear")
# The adaptive key attackers (release/adaptive_recovery.py) run forward/backward passes of their own, so a
# suite names them explicitly; a suite without an ``attackers`` list gets DEFAULT_ATTACKERS. (Spelled out
# here so that parsing a suite imports no torch; a test holds it equal to adaptive_recovery's.)
ADAPTIVE_ATTACKERS = ("recovery_gradient", "recovery_stage1")
DEFAULT_ATTACKERS = ("unauthorized", "authorized", "recovery_global", "recovery_per_tensor", "recovery_init",
                     "recovery_seed_guess")
# Mechanism ablations (named explicitly, never defaults): a keyless attacker that leaves the input embedding
# at its released values, and the owner's key widened by the whole input embedding. The first is keyless (it
# counts among the keyless attacks); the second holds the key, and is reported apart from every headline.
ABLATION_ATTACKERS = ("unauthorized_frozen_embedding", "authorized_plus_embedding")
KEYED_ATTACKERS = ("authorized", "authorized_plus_embedding")  # need the owner's mask
ATTACKERS = DEFAULT_ATTACKERS + ADAPTIVE_ATTACKERS + ABLATION_ATTACKERS
RECOVERY_ATTACKERS = ("recovery_global", "recovery_per_tensor", "recovery_init", "recovery_seed_guess",
                      *ADAPTIVE_ATTACKERS)
_ADAPTIVE_KEYS = ("adaptive_batches", "stage1_steps")  # RecoverySpec fields only the adaptive ids carry
DENSE_ATTACKERS = ("unauthorized",)
INIT_RULES = ("threshold", "topk")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("hf", "megatron")
MEGATRON_OPTIMIZERS = ("adamw", "sgd")  # the grid's optimizers megatron-core steps (attack.megatron_engine)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task (or the pretraining-eval set): where its documents come from."""

    source: str  # builtin:<domain>, a bare builtin domain name, or a JSONL file ({"text": ...} per line)
    name: str = ""  # label in results and reports (default: the domain or the file stem)
    max_docs: int | None = None  # cap on documents read
    max_chars: int | None = None  # cut every document to this many characters
    json_key: str = "text"  # key of the text in a JSONL line
    kind: str = "lm"  # lm | synthetic | classify | lm_eval
    length: int = 8  # synthetic: content tokens (copy, reverse) or key-value pairs (recall)
    num_train: int | None = None  # synthetic: train examples (default 2000); classify: per family (None: all)
    num_eval: int | None = None  # synthetic: eval examples (256); classify: per family (50); lm_eval: limit
    train: str | None = None  # lm_eval: name of the suite task whose training split the attack trains on
    metric: str | None = None  # lm_eval: the lm-eval metric scored (default acc)


@dataclass(frozen=True)
class Adversary:
    """One fine-tuning recipe of the grid."""

    method: str
    optimizer: str
    lr: float
    steps: int
    batch_size: int
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_grad: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_dropout: float = 0.0

    @property
    def label(self) -> str:
        parts = [self.method, self.optimizer, f"lr={self.lr:g}", f"s={self.steps}", f"b={self.batch_size}"]
        if self.weight_decay:
            parts.append(f"wd={self.weight_decay:g}")
        if self.schedule != "constant":
            parts.append(f"{self.schedule}(w{self.warmup_steps})")
        if self.clip_grad != 1.0:
            parts.append(f"clip={self.clip_grad:g}")
        if self.method == "lora":
            parts.append(f"r={self.lora_rank}")
            if self.lora_alpha != 2 * self.lora_rank:
                parts.append(f"alpha={self.lora_alpha:g}")
            if self.lora_dropout:
                parts.append(f"drop={self.lora_dropout:g}")
        return "/".join(parts)


@dataclass(frozen=True)
class RecoverySpec:
    """How the mask-recovery attackers work (they see the release, never the mask)."""

    density: float | None = None  # assumed kept fraction (e.g. a published rho); None: estimate it
    init_rule: str = "threshold"  # recovery_init: relative-residual threshold, or global top-k at density
    init_tolerance: float | None = None  # relative residual counted as "moved"; None: by release dtype
    seed_guesses: int = 10_000  # recovery_seed_guess: W0 seeds 0..N tried (plus the repo's recipe seeds)
    adaptive_batches: int = 16  # recovery_gradient: batches of the attacker's own pretraining-like data
    stage1_steps: int = 8  # recovery_stage1: Stage-I steps the attacker replicates from its own init


@dataclass(frozen=True)
class MegatronLayout:
    """How ``engine: megatron`` lays a release out over a job's processes (the data-parallel size is what
    the world size leaves: world / (TP * PP))."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int | None = None  # rows per micro-batch per DP rank (None: the DP rank's whole share)


@dataclass
class Suite:
    """A validated attack suite."""

    name: str = "suite"
    tasks: list[TaskSpec] = field(default_factory=list)
    pretraining_eval: TaskSpec | None = None
    seq_length: int = 256
    eval_blocks: int = 64
    eval_batch_size: int = 8
    eval_every: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    attackers: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKERS))
    precision: str = "auto"
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    adversaries: list[Adversary] = field(default_factory=list)
    scratch: bool = False  # run the from-scratch control (role ``scratch``)
    decision: Any = None  # attack.decision.Rule, or None (the report then gives no verdict)
    engine: str = "hf"  # hf | megatron: who fine-tunes each cell
    megatron: MegatronLayout | None = None  # engine megatron: the layout (default TP = PP = 1)

    def settings(self) -> dict:
        """The suite-level values every cell's numbers depend on (part of every cell id)."""
        return {"seq_length": self.seq_length, "eval_blocks": self.eval_blocks,
                "eval_batch_size": self.eval_batch_size, "eval_every": self.eval_every,
                "precision": self.precision,
                "pretraining_eval": (dataclasses.asdict(self.pretraining_eval)
                                     if self.pretraining_eval else None)}


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run: an attacker applying one adversary to one model on one task with one seed."""

    role: str  # pmp | dense | dense_matched | scratch
    attacker: str
    adversary: Adversary
    task: TaskSpec
    seed: int
    id: str  # stable hash of everything above + suite settings + model identity (+ key identity)

    @property
    def task_name(self) -> str:
        return self.task.name


# ----------------------------------------------------------------------------- validation helpers


def _check_keys(data: Any, allowed: list[str], where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown key '{key}' in {where}{hint}; allowed keys: {', '.join(allowed)}")
    return data


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number(value: Any, where: str, kind: type, minimum: float | None = None, strict: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ValueError(f"{where} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{where} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return kind(value)


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def log_spaced(start: float, stop: float, num: int) -> list[float]:
    """``num`` log-spaced values from ``start`` to ``stop`` inclusive, rounded to 3 significant digits."""
    if start <= 0 or stop <= 0:
        raise ValueError(f"log-spaced lr range needs start > 0 and stop > 0, got {start}, {stop}")
    if num == 1:
        return [float(f"{start:.3g}")]
    ratio = math.log(stop / start) / (num - 1)
    return [float(f"{start * math.exp(ratio * i):.3g}") for i in range(num)]


def _lrs(value: Any, where: str) -> list[float]:
    if isinstance(value, dict):
        _check_keys(value, ["start", "stop", "num"], where)
        missing = [k for k in ("start", "stop", "num") if k not in value]
        if missing:
            raise ValueError(f"{where} needs start, stop and num; missing {missing}")
        num = _number(value["num"], f"{where}.num", int, 1)
        return log_spaced(_number(value["start"], f"{where}.start", float),
                          _number(value["stop"], f"{where}.stop", float), num)
    lrs = [_number(v, where, float, 0.0, strict=True) for v in _as_list(value)]
    if not lrs:
        raise ValueError(f"{where} is empty")
    return lrs


def _task(value: Any, where: str) -> TaskSpec:
    if isinstance(value, str):
        kind, sep, rest = value.partition(":")
        short = sep and kind in ("synthetic", "classify")  # synthetic:copy, classify:stdlib_family
        value = {"kind": kind, "source": rest} if short else {"source": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a task name or a mapping, got {value!r}")
    kind = _choice(value.get("kind", "lm"), TASK_KINDS, f"{where}.kind")
    data = _check_keys(value, ["kind", *TASK_KEYS[kind]], f"{where} (kind {kind})")
    if kind == "classify":
        data = {"source": CLASSIFY_SOURCE, **data}
        if data["source"] != CLASSIFY_SOURCE:
            raise ValueError(f"{where}.source of a classify task must be {CLASSIFY_SOURCE}, got "
                             f"{data['source']!r}")
    if not isinstance(data.get("source"), str) or not data["source"]:
        raise ValueError(f"{where}.source must be a non-empty string (builtin:<domain> or a JSONL path; the "
                         f"synthetic task; the lm-eval task)")
    source = data["source"]
    if kind == "synthetic":
        from pmp_megatron.data.synthetic import TASKS

        _choice(source, TASKS, f"{where}.source")
    if kind == "lm_eval" and not isinstance(data.get("train"), str):
        raise ValueError(f"{where}.train must name the suite task whose training split the attack trains on")
    name = data.get("name") or source.removeprefix("builtin:")
    if "/" in name or name.endswith((".jsonl", ".json")):
        name = os.path.splitext(os.path.basename(name))[0]

    def count(key: str, minimum: int = 1) -> int | None:
        return None if data.get(key) is None else _number(data[key], f"{where}.{key}", int, minimum)

    return TaskSpec(
        source=source, name=str(name), max_docs=count("max_docs"), max_chars=count("max_chars"),
        json_key=str(data.get("json_key", "text")), kind=kind,
        length=_number(data.get("length", 8), f"{where}.length", int, 1),
        num_train=count("num_train"), num_eval=count("num_eval"), train=data.get("train"),
        metric=None if data.get("metric") is None else str(data["metric"]))


def task_payload(task: TaskSpec) -> dict:
    """The task's part of a cell id: the v1 fields, plus every v2 field that differs from its default (so
    the ids of v1 tasks stay what they were)."""
    defaults = TaskSpec(source="")
    return {k: v for k, v in dataclasses.asdict(task).items()
            if k in _V1_TASK_FIELDS or v != getattr(defaults, k)}


_GROUP_KEYS = ["method", "optimizer", "lr", "steps", "batch_size", "weight_decay", "schedule",
               "warmup_steps", "clip_grad", "lora"]
_LORA_KEYS = ["rank", "alpha", "target_modules", "dropout"]


def _group(data: Any, where: str) -> list[Adversary]:
    """Expand one adversary group (list-valued fields are axes) into adversaries."""
    _check_keys(data, _GROUP_KEYS, where)
    for key in ("method", "optimizer", "lr", "steps", "batch_size"):
        if key not in data:
            raise ValueError(f"{where} is missing '{key}'")
    methods = [_choice(v, METHODS, f"{where}.method") for v in _as_list(data["method"])]
    optimizers = [_choice(v, OPTIMIZERS, f"{where}.optimizer") for v in _as_list(data["optimizer"])]
    lrs = _lrs(data["lr"], f"{where}.lr")
    steps = [_number(v, f"{where}.steps", int, 1) for v in _as_list(data["steps"])]
    batches = [_number(v, f"{where}.batch_size", int, 1) for v in _as_list(data["batch_size"])]
    decays = [_number(v, f"{where}.weight_decay", float, 0.0)
              for v in _as_list(data.get("weight_decay", 0.0))]
    schedules = [_choice(v, SCHEDULES, f"{where}.schedule")
                 for v in _as_list(data.get("schedule", "constant"))]
    warmup = _number(data.get("warmup_steps", 0), f"{where}.warmup_steps", int, 0)
    clip = _number(data.get("clip_grad", 1.0), f"{where}.clip_grad", float, 0.0)
    lora = _check_keys(data.get("lora", {}) or {}, _LORA_KEYS, f"{where}.lora")
    if "lora" in data and "lora" not in methods:
        raise ValueError(f"{where}.lora is given but no method of the group is 'lora'")
    ranks = [_number(v, f"{where}.lora.rank", int, 1) for v in _as_list(lora.get("rank", 8))]
    alphas = [None if v is None else _number(v, f"{where}.lora.alpha", float, 0.0, strict=True)
              for v in _as_list(lora.get("alpha", None))]
    targets = lora.get("target_modules", list(LLAMA_LINEARS))
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.lora.target_modules must be a non-empty list of module names")
    dropout = _number(lora.get("dropout", 0.0), f"{where}.lora.dropout", float, 0.0)
    out = []
    for method, opt, lr, n, b, wd, sched in itertools.product(
            methods, optimizers, lrs, steps, batches, decays, schedules):
        if method == "full":
            out.append(Adversary(method, opt, lr, n, b, wd, sched, warmup, clip))
            continue
        for rank, alpha in itertools.product(ranks, alphas):
            out.append(Adversary(method, opt, lr, n, b, wd, sched, warmup, clip, rank,
                                 float(2 * rank if alpha is None else alpha), tuple(targets), dropout))
    return out


_SUITE_KEYS = [f.name for f in dataclasses.fields(Suite)]


def suite_from_dict(data: dict) -> Suite:
    """Validate a suite mapping and expand its adversary groups."""
    _check_keys(data, _SUITE_KEYS, "suite")
    tasks = [_task(t, f"tasks[{i}]") for i, t in enumerate(_as_list(data.get("tasks", [])))]
    if not tasks:
        raise ValueError("suite.tasks is empty: name at least one downstream task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"suite.tasks has duplicate task names {names}; give each a distinct 'name'")
    attackers = [_choice(a, ATTACKERS, "suite.attackers")
                 for a in _as_list(data.get("attackers", DEFAULT_ATTACKERS))]
    rec = _check_keys(data.get("recovery", {}) or {}, [f.name for f in dataclasses.fields(RecoverySpec)],
                      "suite.recovery")
    density = rec.get("density")
    if density is not None and not 0 < _number(density, "suite.recovery.density", float) <= 1:
        raise ValueError(f"suite.recovery.density must be in (0, 1], got {density}")
    tol = rec.get("init_tolerance")
    recovery = RecoverySpec(
        density=None if density is None else float(density),
        init_rule=_choice(rec.get("init_rule", "threshold"), INIT_RULES, "suite.recovery.init_rule"),
        init_tolerance=None if tol is None else _number(tol, "suite.recovery.init_tolerance", float, 0.0,
                                                        strict=True),
        seed_guesses=_number(rec.get("seed_guesses", RecoverySpec.seed_guesses),
                             "suite.recovery.seed_guesses", int, 0),
        adaptive_batches=_number(rec.get("adaptive_batches", RecoverySpec.adaptive_batches),
                                 "suite.recovery.adaptive_batches", int, 2),
        stage1_steps=_number(rec.get("stage1_steps", RecoverySpec.stage1_steps),
                             "suite.recovery.stage1_steps", int, 1))
    groups = data.get("adversaries") or []
    if not isinstance(groups, list) or not groups:
        raise ValueError("suite.adversaries must be a non-empty list of adversary groups")
    adversaries = list(dict.fromkeys(a for i, g in enumerate(groups) for a in _group(g, f"adversaries[{i}]")))
    seeds = [_number(s, "suite.seeds", int) for s in _as_list(data.get("seeds", [0]))]
    pre = data.get("pretraining_eval")
    by_name = {t.name: t for t in tasks}
    for t in tasks:
        if t.kind == "lm_eval" and (t.train not in by_name or by_name[t.train].kind == "lm_eval"):
            raise ValueError(f"task {t.name!r}: train {t.train!r} must name another suite task that is not "
                             f"lm_eval; tasks: {', '.join(names)}")
    decision = None
    if data.get("decision") is not None:
        from pmp_megatron.attack.decision import parse_rule

        decision = parse_rule(data["decision"])
    scratch = data.get("scratch", False)
    if not isinstance(scratch, bool):
        raise ValueError(f"suite.scratch must be true or false, got {scratch!r}")
    engine = _choice(data.get("engine", "hf"), ENGINES, "suite.engine")
    layout = None
    if engine == "megatron":
        layout = _layout(data.get("megatron") or {})
    elif data.get("megatron") is not None:
        raise ValueError("suite.megatron is given but suite.engine is hf: set engine: megatron or drop it")
    suite = Suite(
        name=str(data.get("name", "suite")), tasks=tasks,
        pretraining_eval=None if pre is None else _task(pre, "suite.pretraining_eval"),
        seq_length=_number(data.get("seq_length", 256), "suite.seq_length", int, 2),
        eval_blocks=_number(data.get("eval_blocks", 64), "suite.eval_blocks", int, 1),
        eval_batch_size=_number(data.get("eval_batch_size", 8), "suite.eval_batch_size", int, 1),
        eval_every=_number(data.get("eval_every", 0), "suite.eval_every", int, 0),
        seeds=seeds or [0], attackers=list(dict.fromkeys(attackers)),
        precision=_choice(data.get("precision", "auto"), PRECISIONS, "suite.precision"),
        recovery=recovery, adversaries=adversaries, scratch=scratch, decision=decision, engine=engine,
        megatron=layout)
    if engine == "megatron":
        _check_megatron(suite)
    return suite


def _layout(data: Any) -> MegatronLayout:
    _check_keys(data, [f.name for f in dataclasses.fields(MegatronLayout)], "suite.megatron")
    mbs = data.get("micro_batch_size")
    return MegatronLayout(
        tensor_model_parallel_size=_number(data.get("tensor_model_parallel_size", 1),
                                           "suite.megatron.tensor_model_parallel_size", int, 1),
        pipeline_model_parallel_size=_number(data.get("pipeline_model_parallel_size", 1),
                                             "suite.megatron.pipeline_model_parallel_size", int, 1),
        micro_batch_size=None if mbs is None else _number(mbs, "suite.megatron.micro_batch_size", int, 1))


def _check_megatron(suite: Suite) -> None:
    """Refuse what ``engine: megatron`` does not run, naming it (one line each)."""
    for adv in suite.adversaries:
        if adv.method == "lora":
            raise ValueError(f"adversary {adv.label}: LoRA is HF-only (peft) and does not run on engine "
                             "megatron; drop it from the suite or use engine: hf")
        if adv.optimizer not in MEGATRON_OPTIMIZERS:
            raise ValueError(f"adversary {adv.label}: optimizer {adv.optimizer} is not on the megatron "
                             f"engine (it steps {', '.join(MEGATRON_OPTIMIZERS)}); drop it or use engine: hf")
    for attacker in suite.attackers:
        if attacker in ADAPTIVE_ATTACKERS:
            raise ValueError(f"attacker {attacker} runs its own Hugging Face passes over the whole model "
                             "and does not run on engine megatron; drop it from suite.attackers or use "
                             "engine: hf")
    for task in suite.tasks:
        if task.kind == "lm_eval":
            raise ValueError(f"task {task.name!r} (kind lm_eval) is scored by lm-evaluation-harness through "
                             "a Hugging Face model, not on engine megatron; drop it or use engine: hf")


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite YAML file (a ``configs/...`` path not on disk: the shipped suite)."""
    path = recipe(path)
    if not os.path.isfile(path):
        raise ValueError(f"suite file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    try:
        return suite_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- grid expansion


def _cell_id(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_cells(suite: Suite, model_ids: dict[str, str], mask_sha256: str | None = None,
                 regen_id: str | None = None, attackers: list[str] | None = None) -> list[Cell]:
    """All cells of the suite, in role order (pmp, dense, dense_matched, scratch), a fixed order.

    ``model_ids`` maps role (``pmp``, optionally ``dense``, ``dense_matched``, ``scratch``) to the model
    identity; ``mask_sha256`` and ``regen_id`` identify the owner's key and the regeneration seed + init
    config (they enter the ids of the cells that use them). ``attackers`` restricts the suite's attackers.
    The role enters the ids of the new roles, and of ``dense`` only when it is the PMP model itself (an
    identical copy attacked against itself must not share cell ids); older ids stay what they were.
    """
    chosen = suite.attackers if attackers is None else [a for a in suite.attackers if a in attackers]
    if "pmp" not in model_ids:
        raise ValueError("expand_cells needs the PMP model's identity (role 'pmp')")
    unknown = sorted(set(model_ids) - set(ROLES))
    if unknown:
        raise ValueError(f"expand_cells: unknown roles {unknown}; known: {', '.join(ROLES)}")
    for keyed in KEYED_ATTACKERS:
        if keyed in chosen and mask_sha256 is None:
            raise ValueError(f"attacker {keyed!r} needs the owner's mask (--mask FILE), or drop it with "
                             "--attackers")
    if "recovery_init" in chosen and regen_id is None:
        raise ValueError("attacker 'recovery_init' needs the init seed (the owner's key via --mask, or "
                         "--seed-for-regeneration N), or drop it with --attackers")
    settings = suite.settings()
    cells = []
    for role in ROLES:
        if role not in model_ids:
            continue
        role_attackers = chosen if role == "pmp" else list(DENSE_ATTACKERS)
        for task, attacker, adv, seed in itertools.product(suite.tasks, role_attackers, suite.adversaries,
                                                           suite.seeds):
            payload = {"model": model_ids[role], "attacker": attacker, "adversary": dataclasses.asdict(adv),
                       "task": task_payload(task), "seed": seed, "settings": settings}
            self_copy = role == "dense" and model_ids[role] == model_ids["pmp"]
            if role in ("dense_matched", "scratch") or self_copy:
                payload["role"] = role
            if task.kind == "lm_eval":  # the training data's definition is part of the cell
                payload["train_task"] = task_payload(next(t for t in suite.tasks if t.name == task.train))
            if attacker in KEYED_ATTACKERS:
                payload["mask"] = mask_sha256
            if attacker in RECOVERY_ATTACKERS:  # a knob enters only its own attacker's ids (older ids stay)
                payload["recovery"] = {k: v for k, v in dataclasses.asdict(suite.recovery).items()
                                       if (k != "seed_guesses" or attacker == "recovery_seed_guess")
                                       and (k not in _ADAPTIVE_KEYS or attacker in ADAPTIVE_ATTACKERS)}
            if attacker == "recovery_init":
                payload["regen"] = regen_id
            if suite.engine != "hf":  # hf ids stay what they were
                payload["engine"] = suite.engine
            cells.append(Cell(role, attacker, adv, task, seed, _cell_id(payload)))
    return cells
