"""Typed run configuration for pmp_megatron.

A run is described by one ``Config`` made of nested dataclasses (model, parallel, pmp, data, optim,
train, checkpoint, logging). Values are merged lingua-style: dataclass defaults <- YAML file(s)
(with recursive ``include:`` lists) <- dotted CLI overrides such as ``model.num_layers=4``.
Every value is type-checked against its field annotation and the whole config is cross-checked by
``Config.validate``; each problem raises one ``ValueError`` that names the dotted field.
Stdlib + PyYAML only: this module must stay importable without torch or megatron.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.resources import recipe

__all__ = [
    "ModelConfig", "ParallelConfig", "DiscoveryConfig", "AdversarialConfig", "PMPConfig", "DataConfig",
    "OptimConfig", "TrainConfig", "CheckpointConfig", "ReleaseConfig", "LoggingConfig", "Config",
    "load_config", "config_from_dict", "config_to_dict", "save_config", "apply_overrides", "load_yaml",
    "parse_split", "resume_differences", "RESUME_FIXED",
]


@dataclass
class ModelConfig:
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # GQA groups = number of KV heads
    ffn_hidden_size: int = 176  # SwiGLU intermediate size
    vocab_size: int = 512  # the tokenizer's real vocabulary size (unpadded)
    make_vocab_size_divisible_by: int = 128  # embedding rows are padded to a multiple of this * TP
    seq_length: int = 64  # training sequence length (also the RoPE max positions)
    rotary_base: float = 10000.0  # RoPE theta
    norm_epsilon: float = 1e-5  # RMSNorm epsilon
    init_method_std: float = 0.02  # std of the normal weight init
    untie_embeddings: bool = True  # separate input embedding and output projection
    transformer_impl: Literal["local", "transformer_engine"] = "local"  # megatron layer spec backend
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter / compute dtype
    fp8: Literal["hybrid", "e4m3"] | None = None  # FP8 format (needs transformer_engine)
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"  # FP8 scaling recipe
    recompute_granularity: Literal["full", "selective"] | None = None  # activation recomputation
    recompute_num_layers: int = 1  # layers per recompute chunk (granularity "full")
    # W0 seed. None (default): SECRET -- the Trainer draws a 128-bit seed from OS entropy at the start of a
    # run and keeps it only in the checkpoints (config.yaml says null); anyone holding it regenerates W0,
    # and with W0 the mask. An int is a PUBLIC seed (tests, reproductions); resumed runs take the
    # checkpoint's seed.
    seed: int | None = None
    # A file (mode 0600) holding a SECRET W0 seed as a decimal integer, for runs that must share one W0
    # (a PMP run and its dense controls); exclusive with ``seed``. The seed is treated like a drawn one.
    seed_file: str | None = None

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (megatron rule)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP degree
    pipeline_model_parallel_size: int = 1  # PP degree
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per PP rank (interleaving)
    sequence_parallel: bool = False  # megatron sequence parallelism (needs TP > 1)
    use_distributed_optimizer: bool = False  # ZeRO-1 style sharded optimizer state
    overlap_grad_reduce: bool = False  # overlap DP grad reduce-scatter/all-reduce with backward
    overlap_param_gather: bool = False  # overlap distributed-optimizer param all-gather with forward
    data_parallel_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"  # ckpt format


@dataclass
class DiscoveryConfig:
    max_steps: int = 500  # upper bound on mask-discovery steps
    iou_threshold: float = 0.99  # mask IoU between checks that counts as "stable"
    patience: int = 5  # consecutive stable checks needed to stop discovery
    lr: float = 2e-5  # learning rate during discovery (peak, after warmup_steps)
    warmup_steps: int = 0  # linear warm-up of the Stage-I learning rate, in Stage-I steps
    adam_beta1: float | None = None  # Stage-I AdamW beta1 (None: optim.adam_beta1)
    adam_beta2: float | None = None  # Stage-I AdamW beta2 (None: optim.adam_beta2; the reference uses 0.999)
    clip_grad: float = 1.0  # gradient-norm clip during discovery
    # what is ranked: one step's |g| (the reference) | the sum of |g_t| over the Stage-I steps so far |
    # an EMA of g^2 (ema_beta); the IoU stop rule compares consecutive masks of the ranked score
    score: Literal["grad", "accumulated", "ema"] = "grad"
    ema_beta: float = 0.99  # decay of the g^2 EMA (score: ema)
    # the batch whose gradient is ranked and trained on each Stage-I step: the global batch, or ONE
    # micro-batch per data-parallel rank (the reference: one 4 x 256 micro-batch at DP 1)
    batch: Literal["global", "micro"] = "global"
    # one ranking over the whole model (the reference), or exactly floor(rho * n) entries per tensor
    quota: Literal["global", "per_tensor"] = "global"
    # the input embedding ranked like any tensor (the reference), or always trainable (all True; the top-k
    # then runs over the other parameters with k = floor(rho * their count))
    embedding: Literal["masked", "trainable"] = "masked"
    save_interval: int = 50  # Stage-I steps between Stage-I checkpoints (0: only on preemption)


@dataclass
class AdversarialConfig:
    """Stage II against simulated keyless fine-tuning (``train/adversarial.py``; off by default). Every
    ``interval`` steps the outer gradient is the language-modelling gradient plus ``penalty_weight`` * the
    gradient of ``objective`` after ``inner_steps`` simulated steps of KEYLESS full fine-tuning on the proxy
    data, plus ``key_weight`` * the gradient of the proxy loss after as many steps of a MASK-ONLY fine-tune
    (the owner's key stays useful). First-order: each term's gradient is taken at the weights the simulated
    fine-tune reached. The outer update is masked like any Stage-II step."""

    enabled: bool = False
    interval: int = 1  # Stage-II steps between adversarial steps (the others are plain PMP steps)
    inner_steps: int = 4  # K: steps of each simulated fine-tune
    inner_optimizer: Literal["adamw", "sgd"] = "adamw"  # the simulated attacker's optimizer (no weight decay)
    inner_lr: list[float] = field(default_factory=lambda: [1e-4, 1e-3])  # [low, high]: log-uniform draw
    inner_batch_size: int = 8  # proxy rows per simulated step (global: split over data-parallel ranks)
    inner_clip_grad: float = 1.0  # the simulated attacker's gradient-norm clip (0: none)
    # what the keyless term rewards after the simulated attack: the entropy of the next-token distribution
    # (TAR's bounded choice) | the proxy loss, capped at log(vocab_size)
    objective: Literal["entropy", "loss"] = "entropy"
    penalty_weight: float = 1.0  # weight of the keyless term
    key_weight: float = 1.0  # weight of the mask-only term (0: no simulated owner fine-tune)
    # the simulated attacker's data: builtin:<domain>, a JSONL file, or synthetic:<copy|reverse|recall>[:len]
    proxy: list[str] = field(default_factory=list)
    proxy_rows: int = 2000  # proxy rows (blocks or examples) drawn from
    # every task the release will be evaluated on (the same spelling; classify:<name> for a classification
    # task): the proxy must be apart from all of them
    evaluation_tasks: list[str] = field(default_factory=list)


@dataclass
class PMPConfig:
    mode: Literal["pmp", "dense"] = "pmp"  # private-mask pre-training or plain dense baseline
    rho: float | None = None  # fraction of weights in the private mask; required (0, 1] for mode pmp
    # treatment of weights outside the mask: decayed by AdamW (the reference) | kept at W0 bit for bit |
    # replaced every redraw_interval steps by a fresh secret draw matched, per tensor, to the |w| quantiles
    # of the trained (masked-in) entries, so complement magnitudes carry no signal (needs a secret W0 seed)
    complement: Literal["decay", "frozen", "redraw"] = "decay"
    redraw_interval: int = 100  # steps between complement redraws (complement: redraw)
    projection: bool = False  # periodically project complement weights into a ball
    # the ball's radius: projection_radius (R, absolute: the reference's 2.0) | projection_rms * sqrt(number
    # of complement entries) (a per-entry RMS, size-free) | projection_shrink * the complement's L2 norm at
    # the start of Stage II (a shrink factor of W0's complement, size-free)
    projection_target: Literal["radius", "rms", "shrink"] = "radius"
    projection_radius: float = 2.0  # projection radius R (projection_target: radius)
    projection_rms: float = 1e-4  # per-entry complement RMS after a projection (projection_target: rms)
    projection_shrink: float = 0.01  # radius / W0's complement norm (projection_target: shrink)
    projection_interval: int = 400  # projection period tau, in steps
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # mask discovery phase
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)  # resistance by construction


@dataclass
class DataConfig:
    # the tokenizer the data were made with (required to train): a sentencepiece .model, a Hugging Face
    # tokenizer directory (or its tokenizer.json), or megatron's tiktoken vocabulary .json
    tokenizer_model: str | None = None
    tokenizer_type: Literal["sentencepiece", "huggingface", "tiktoken"] = "sentencepiece"  # how to read it
    tiktoken_pattern: Literal["v1", "v2"] = "v2"  # megatron's text-splitting regex (tokenizer_type tiktoken)
    tiktoken_num_special_tokens: int = 1000  # control ids before the vocabulary (tokenizer_type tiktoken)
    data_path: list[str | float] | None = None  # megatron prefixes or weight/prefix pairs (required to train)
    split: str = "98,1,1"  # train,valid,test shares of each prefix's documents ("98,2,0"; valid > 0 to eval)
    num_workers: int = 2  # DataLoader worker processes per rank (0: load batches in the training process)
    cache_dir: str | None = None  # where megatron's sample/shuffle index files go (None: beside the data)


@dataclass
class OptimConfig:
    lr: float = 2e-5  # peak learning rate
    min_lr: float = 0.0  # final learning rate after decay
    weight_decay: float = 0.1  # AdamW weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 disables)
    lr_warmup_steps: int = 2000  # linear warmup steps
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # schedule after warmup
    loss_scale: float | None = None  # static loss scale for fp16 (None: dynamic)


@dataclass
class TrainConfig:
    micro_batch_size: int = 4  # sequences per micro-batch per DP rank
    global_batch_size: int = 32  # sequences per optimizer step across all DP ranks
    train_steps: int = 20000  # optimizer steps
    eval_interval: int = 1000  # steps between evaluations (0: no evaluation)
    eval_steps: int = 10  # global batches per evaluation
    seed: int = 42  # seed for data order and dropout


@dataclass
class CheckpointConfig:
    dir: str | None = None  # checkpoint directory (None: no checkpointing)
    save_interval: int = 1000  # steps between saves
    keep_last: int = 2  # number of recent checkpoints kept (0: keep all)
    save_init: bool = False  # also save the step-0 (initial) weights
    # model.* / pmp.* fields a resumed run may change on purpose (dotted names, e.g.
    # [pmp.projection_interval]); any other difference from the checkpoint's config is refused
    allow_changes: list[str] = field(default_factory=list)
    # weights-only start (dense runs): a checkpoint directory, e.g. pmp-import-hf's output, whose newest valid
    # iteration's model weights replace the random init at iteration 0 (any TP/PP layout; fresh optimizer
    # and schedule); ignored once checkpoint.dir holds a checkpoint to resume
    init_from: str | None = None


@dataclass
class ReleaseConfig:
    """What ``pmp-release`` writes into the release's model card (``release/model_card.py``)."""

    license: str = "other"  # SPDX id or Hugging Face license tag, e.g. apache-2.0, llama3, other
    model_name: str | None = None  # the card's title (None: the release directory's name)


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between log lines
    tensorboard_dir: str | None = None  # TensorBoard event dir (None: disabled); needs the tensorboard extra
    wandb_project: str | None = None  # Weights & Biases project, rank 0 writes (None: disabled); wandb extra
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under WANDB_DIR only, sync by hand
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"  # python logging level


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # model/data parallel layout
    pmp: PMPConfig = field(default_factory=PMPConfig)  # private-mask pre-training
    data: DataConfig = field(default_factory=DataConfig)  # indexed datasets and tokenizer
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # batch sizes and step counts
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving
    release: ReleaseConfig = field(default_factory=ReleaseConfig)  # the release's model card
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # logging

    def data_parallel_size(self, world_size: int) -> int:
        """DP degree = world_size / (TP * PP); ValueError if it does not divide."""
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        if world_size < 1 or world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size * "
                f"parallel.pipeline_model_parallel_size = {mp}")
        return world_size // mp

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def validate(self, world_size: int | None = None) -> Config:
        """Cross-field checks; raises one ValueError naming the offending field(s). Returns self."""
        m, p, pmp, t = self.model, self.parallel, self.pmp, self.train
        _check(m.seed is None or m.seed_file is None,
               "model.seed and model.seed_file exclude each other (a public seed, or a secret one in a file)")
        _check(self.logging.wandb_project is None or bool(self.logging.wandb_project.strip()),
               "logging.wandb_project must be a project name, or null for no wandb")
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        vpp = p.virtual_pipeline_model_parallel_size
        for name in ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
                     "model.num_query_groups", "model.ffn_hidden_size", "model.vocab_size",
                     "model.make_vocab_size_divisible_by", "model.seq_length", "model.recompute_num_layers",
                     "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                     "train.micro_batch_size", "train.global_batch_size", "logging.log_interval",
                     "checkpoint.save_interval", "pmp.projection_interval", "pmp.discovery.patience",
                     "data.tiktoken_num_special_tokens"):
            _check(_get(self, name) >= 1, f"{name} must be >= 1, got {_get(self, name)}")
        _check(m.num_attention_heads % m.num_query_groups == 0,
               f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
               f"model.num_query_groups ({m.num_query_groups})")
        _check(m.hidden_size % m.num_attention_heads == 0,
               f"model.hidden_size ({m.hidden_size}) must be divisible by "
               f"model.num_attention_heads ({m.num_attention_heads})")
        for name in ("num_attention_heads", "num_query_groups"):
            value = getattr(m, name)
            _check(value % tp == 0,
                   f"parallel.tensor_model_parallel_size ({tp}) must divide model.{name} ({value})")
        _check(m.num_layers % pp == 0,
               f"parallel.pipeline_model_parallel_size ({pp}) must divide model.num_layers ({m.num_layers})")
        if vpp is not None:
            _check(vpp >= 1, f"parallel.virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
            _check(pp > 1, "parallel.virtual_pipeline_model_parallel_size requires "
                           f"parallel.pipeline_model_parallel_size > 1, got {pp}")
            _check(m.num_layers % (pp * vpp) == 0,
                   f"model.num_layers ({m.num_layers}) must be divisible by "
                   f"parallel.pipeline_model_parallel_size * parallel.virtual_pipeline_model_parallel_size "
                   f"({pp} * {vpp})")
        _check(not p.sequence_parallel or tp > 1,
               "parallel.sequence_parallel requires parallel.tensor_model_parallel_size > 1")
        _check(m.fp8 is None or m.transformer_impl == "transformer_engine",
               f"model.fp8={m.fp8!r} requires model.transformer_impl='transformer_engine'")
        _check(t.global_batch_size % t.micro_batch_size == 0,
               f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
               f"train.micro_batch_size ({t.micro_batch_size})")
        if world_size is not None:
            dp = self.data_parallel_size(world_size)
            _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                   f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                   f"train.micro_batch_size * data-parallel size ({t.micro_batch_size} * {dp})")
            inner = pmp.adversarial.inner_batch_size
            _check(not pmp.adversarial.enabled or inner % (t.micro_batch_size * dp) == 0,
                   f"pmp.adversarial.inner_batch_size ({inner}) must be divisible by "
                   f"train.micro_batch_size * data-parallel size ({t.micro_batch_size} * {dp})")
        _check(pmp.mode != "pmp" or pmp.rho is not None, "pmp.rho is required when pmp.mode is 'pmp'")
        _check(pmp.rho is None or 0.0 < pmp.rho <= 1.0, f"pmp.rho must be in (0, 1], got {pmp.rho}")
        _check(self.optim.lr_warmup_steps < t.train_steps or self.optim.lr_decay_style == "constant",
               f"optim.lr_warmup_steps ({self.optim.lr_warmup_steps}) must be < train.train_steps "
               f"({t.train_steps})")
        self._validate_pmp()
        self._validate_adversarial()
        self._validate_init_from()
        self._validate_numbers()
        return self

    def _validate_pmp(self) -> None:
        """PMP options that cannot combine, before any compute."""
        pmp, d = self.pmp, self.pmp.discovery
        for name in ("pmp.projection_radius", "pmp.projection_rms", "pmp.projection_shrink"):
            _check(_get(self, name) > 0, f"{name} must be > 0, got {_get(self, name)}")
        _check(0.0 < d.iou_threshold <= 1.0,
               f"pmp.discovery.iou_threshold must be in (0, 1], got {d.iou_threshold}")
        _check(d.max_steps >= 0, f"pmp.discovery.max_steps must be >= 0, got {d.max_steps}")
        _check(d.warmup_steps >= 0, f"pmp.discovery.warmup_steps must be >= 0, got {d.warmup_steps}")
        _check(pmp.redraw_interval >= 1, f"pmp.redraw_interval must be >= 1, got {pmp.redraw_interval}")
        for name in ("pmp.discovery.adam_beta1", "pmp.discovery.adam_beta2", "pmp.discovery.ema_beta"):
            value = _get(self, name)
            _check(value is None or 0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        _check(pmp.complement != "redraw" or pmp.mode == "pmp", "pmp.complement=redraw needs pmp.mode=pmp")
        steps = self.train.train_steps
        _check(pmp.complement != "redraw" or pmp.mode != "pmp" or steps % pmp.redraw_interval == 0,
               f"pmp.complement=redraw: train.train_steps ({steps}) must be a multiple of "
               f"pmp.redraw_interval ({pmp.redraw_interval}), so the released complement is a fresh draw")
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        _check(pmp.mode != "pmp" or d.batch != "micro" or vpp is None,
               "pmp.discovery.batch=micro trains Stage I on one micro-batch per step, and the interleaved "
               "schedule of parallel.virtual_pipeline_model_parallel_size needs at least one per pipeline "
               "stage: use pmp.discovery.batch=global or drop the virtual pipeline")
        _check(pmp.complement != "redraw" or not pmp.projection,
               "pmp.complement=redraw and pmp.projection exclude each other (a redraw matches the trained "
               "entries' magnitudes; a projection would shrink them again)")
        if pmp.mode == "pmp" and pmp.rho is not None and d.embedding == "trainable":
            _check(pmp.rho < 1.0, "pmp.discovery.embedding=trainable with pmp.rho=1 masks nothing; drop one")
        half = self.model.params_dtype != "float32"
        _check(pmp.mode != "pmp" or pmp.complement != "redraw" or not half
               or not self.parallel.use_distributed_optimizer,
               f"pmp.complement=redraw with model.params_dtype={self.model.params_dtype} and "
               "parallel.use_distributed_optimizer=true: the redraw draws from whole tensors, and the "
               "distributed optimizer's fp32 main copies hold a share of each; set "
               "parallel.use_distributed_optimizer=false or model.params_dtype=float32")

    def _validate_init_from(self) -> None:
        """``checkpoint.init_from``: dense runs only (a PMP W0 must be secret)."""
        _check(self.checkpoint.init_from is None or self.pmp.mode == "dense",
               "checkpoint.init_from starts dense runs only (pmp.mode=dense): PMP's W0 must be secret, and "
               "weights from elsewhere (a public base model) would give the mask away, since the masked-in "
               "entries stay near them and the complement does not")

    def _validate_adversarial(self) -> None:
        """``pmp.adversarial``: where it can run, its numbers, and a proxy apart from the evaluation."""
        a = self.pmp.adversarial
        if not a.enabled:
            return
        _check(self.pmp.mode == "pmp", "pmp.adversarial.enabled needs pmp.mode=pmp (it shapes the masked-in "
                                       "entries against keyless fine-tuning)")
        _check(not self.parallel.use_distributed_optimizer,
               "pmp.adversarial.enabled simulates full fine-tunes, which need every gradient entry on every "
               "rank; the distributed optimizer reduce-scatters them: set "
               "parallel.use_distributed_optimizer=false")
        for name in ("pmp.adversarial.interval", "pmp.adversarial.inner_steps",
                     "pmp.adversarial.inner_batch_size", "pmp.adversarial.proxy_rows"):
            _check(_get(self, name) >= 1, f"{name} must be >= 1, got {_get(self, name)}")
        for name in ("pmp.adversarial.inner_clip_grad", "pmp.adversarial.penalty_weight",
                     "pmp.adversarial.key_weight"):
            _check(_get(self, name) >= 0, f"{name} must be >= 0, got {_get(self, name)}")
        _check(len(a.inner_lr) == 2 and all(math.isfinite(x) for x in a.inner_lr)
               and 0 < a.inner_lr[0] <= a.inner_lr[1],
               f"pmp.adversarial.inner_lr must be [low, high] with 0 < low <= high, got {a.inner_lr}")
        _check(bool(a.proxy), "pmp.adversarial.proxy is empty: name the simulated attacker's data")
        _check(bool(a.evaluation_tasks), "pmp.adversarial.evaluation_tasks is empty: list every task the "
                                         "release will be evaluated on, so the proxy is kept apart from them")
        evaluated = {task_identity(t): t for t in a.evaluation_tasks}
        for source in a.proxy:
            same = evaluated.get(task_identity(source))
            _check(same is None, f"pmp.adversarial.proxy {source!r} overlaps "
                                 f"pmp.adversarial.evaluation_tasks {same!r}: the simulated attacks must not "
                                 "train on an evaluated task")

    def _validate_numbers(self) -> None:
        """Optimizer, evaluation, data and checkpoint values that would otherwise fail mid-run."""
        for name, value in _floats(self, ""):
            _check(math.isfinite(value), f"{name} must be a finite number, got {value}")
        o, t = self.optim, self.train
        for name in ("optim.lr", "optim.min_lr", "pmp.discovery.lr", "optim.weight_decay", "optim.clip_grad",
                     "pmp.discovery.clip_grad", "optim.lr_warmup_steps", "train.eval_interval",
                     "checkpoint.keep_last", "data.num_workers", "pmp.discovery.save_interval"):
            _check(_get(self, name) >= 0, f"{name} must be >= 0, got {_get(self, name)}")
        _check(o.min_lr <= o.lr, f"optim.min_lr ({o.min_lr}) must be <= optim.lr ({o.lr})")
        for name in ("optim.adam_beta1", "optim.adam_beta2"):
            _check(0.0 <= _get(self, name) < 1.0, f"{name} must be in [0, 1), got {_get(self, name)}")
        _check(o.adam_eps > 0, f"optim.adam_eps must be > 0, got {o.adam_eps}")
        _check(o.loss_scale is None or o.loss_scale > 0, f"optim.loss_scale must be > 0, got {o.loss_scale}")
        shares = parse_split(self.data.split)
        if t.eval_interval:
            _check(t.eval_steps >= 1, f"train.eval_steps must be >= 1 when train.eval_interval > 0 "
                                      f"(evaluation on), got {t.eval_steps}; set train.eval_interval=0 "
                                      "to turn evaluation off")
            _check(shares[1] > 0, f"data.split {self.data.split!r} gives the validation split no documents, "
                                  "but train.eval_interval > 0 evaluates on it; set train.eval_interval=0 "
                                  "or give it a share")
        known = _resume_fields()
        for name in self.checkpoint.allow_changes:
            _check(name in known, f"checkpoint.allow_changes: {name!r} is not a model.* or pmp.* field "
                                  f"compared on resume (e.g. 'pmp.projection_interval')")
            _check(name not in RESUME_FIXED, f"checkpoint.allow_changes: {name} cannot change on resume "
                                             f"({RESUME_FIXED.get(name)}); start a new checkpoint.dir")


_DOMAIN = re.compile(r"^[a-z_]+$")


def task_identity(source: str) -> str:
    """What a task source names, for overlap checks: ``builtin:<domain>`` (a bare domain name is one),
    ``synthetic:<task>`` (any length), ``classify:<name>``, or a file's resolved path."""
    kind, _, rest = source.partition(":")
    if kind in ("builtin", "classify"):
        return f"{kind}:{rest}"
    if kind == "synthetic":
        return f"synthetic:{rest.split(':')[0]}"
    if _DOMAIN.match(source) and not Path(source).exists():
        return f"builtin:{source}"
    return str(Path(source).resolve())


# ----------------------------------------------------------------------------- resume compatibility

# A resumed run compares every model.* and pmp.* field with its checkpoint's config (``resume_differences``),
# except this one, which only says how often Stage I is checkpointed.
_RESUME_IGNORED = frozenset({"pmp.discovery.save_interval"})
_SHAPES = "the checkpoint's tensors have the old shapes"
# Fields no resume may change, not even through ``checkpoint.allow_changes`` (why, for the error).
RESUME_FIXED = {
    "pmp.mode": "a PMP checkpoint resumed dense would train the complement freely; a dense one has no mask",
    "pmp.rho": "the mask's density was fixed by Stage I; the exported key would state another rho",
    "model.seed": "W0 is the checkpoint's",
    "model.init_method_std": "W0 is the checkpoint's",
    **{f"model.{name}": _SHAPES for name in ("num_layers", "hidden_size", "num_attention_heads",
                                              "num_query_groups", "ffn_hidden_size", "vocab_size",
                                              "untie_embeddings")},
}


def _leaves(a: Any, b: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, a's value, b's value) of every leaf field of two config dataclasses of one type."""
    for f in dataclasses.fields(a):
        x, y, name = getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(x):
            yield from _leaves(x, y, f"{name}.")
        else:
            yield name, x, y


def _resume_fields() -> set[str]:
    """The dotted names ``resume_differences`` compares."""
    cfg = Config()
    return {name for section in ("model", "pmp")
            for name, _, _ in _leaves(getattr(cfg, section), getattr(cfg, section), f"{section}.")
            } - _RESUME_IGNORED


def resume_differences(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted name, checkpoint's value, ``cfg``'s value) of every model.* / pmp.* field in which ``cfg``
    differs from a checkpoint's saved config dict (``config_to_dict`` form; fields it predates take their
    defaults). ``model.seed: None`` in ``cfg`` matches any seed: the run takes the checkpoint's."""
    old = _build(Config, saved, "")
    out = []
    for section in ("model", "pmp"):
        for name, a, b in _leaves(getattr(old, section), getattr(cfg, section), f"{section}."):
            if name in _RESUME_IGNORED or (name == "model.seed" and b is None):
                continue
            if a != b:
                out.append((name, a, b))
    return out


_SPLIT_SHARE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")


def parse_split(split: str) -> tuple[float, float, float]:
    """``"98,1,1"`` -> ``(98.0, 1.0, 1.0)``: the train/valid/test shares (missing trailing ones are 0).

    Megatron reads the numbers out of the string with a regex and would silently misread anything
    else (``"abc"`` -> nothing, a division by zero later), so only plain non-negative numbers separated
    by commas are accepted, at least one of them positive. ValueError names ``data.split``.
    """
    parts = split.split(",")
    if len(parts) > 3 or not all(_SPLIT_SHARE.fullmatch(p) for p in parts):
        raise ValueError(f"data.split must be up to three comma-separated non-negative numbers "
                         f"(train,valid,test, e.g. '98,1,1'), got {split!r}")
    shares = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(shares) <= 0:
        raise ValueError(f"data.split must give some share to at least one split, got {split!r}")
    return shares[0], shares[1], shares[2]


def _floats(obj: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """(dotted name, value) of every float in a config tree."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{name}.")
        elif isinstance(value, float):
            yield name, value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- YAML I/O


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does, and refuses a key given
    twice in one mapping (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ValueError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} "
                                 f"(first given at line {seen[key]})")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``include:`` (paths relative to the file) before its own keys.
    A ``configs/...`` path that is not on disk is the recipe shipped with the package (``resources.recipe``).
    """
    path = recipe(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ValueError(f"config include cycle: {chain}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        bad = raw[err.start]
        raise ValueError(f"config file {path}:{line}: not valid UTF-8 (byte 0x{bad:02x})") from None
    loader = _Loader(text)
    loader.name = str(path)  # YAML error marks name the file
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping, got {type(data).__name__}")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, load_yaml(path.parent / inc, (*_stack, path)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML; a leading ``--`` is allowed)."""
    out = dict(data)
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r} must look like 'section.field=value'")
        *parents, leaf = key.strip().split(".")
        value = _parse_value(text)
        out = _deep_merge(out, _nest(parents, leaf, value))
    return out


def _nest(parents: list[str], leaf: str, value: Any) -> dict:
    node = {leaf: value}
    for part in reversed(parents):
        node = {part: node}
    return node


# ----------------------------------------------------------------------------- typed construction


class _Mismatch(Exception):
    pass


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{_describe(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value]
    if tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = type(value) is bool
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        ok = isinstance(value, float)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config annotation {tp!r}")
    if not ok:
        raise _Mismatch
    return value


# Removed fields -> the value every config saved before the removal holds. Such a config (a checkpoint's,
# a run dir's config.yaml) still loads: that value is dropped. Any other value is refused.
_RETIRED = {
    "data.corpus": ("builtin:prose", "it was never read; preprocess a corpus with pmp-preprocess "
                                     "and give data.data_path"),
    "checkpoint.async_save": (False, "checkpoints are saved synchronously"),
}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"config section '{prefix}'" if prefix else "config"
        raise ValueError(f"{where} expects a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in _RETIRED:
            old_default, why = _RETIRED[dotted]
            if value == old_default:
                continue
            raise ValueError(f"config field '{dotted}' was removed ({why}); got {value!r}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config field '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise ValueError(f"config field '{dotted}' expects {_describe(tp)}, "
                             f"got {type(value).__name__} {value!r}") from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------- public API


def config_from_dict(d: dict | None, world_size: int | None = None) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict; missing keys take defaults."""
    return _build(Config, {} if d is None else d, "").validate(world_size)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of every field (inverse of ``config_from_dict``)."""
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike | Sequence[str | os.PathLike] | None,
                overrides: Sequence[str] = (), world_size: int | None = None) -> Config:
    """defaults <- YAML file(s) (merged in order, with includes) <- dotted overrides; then validate."""
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    data: dict = {}
    for p in paths:
        data = _deep_merge(data, load_yaml(p))
    return config_from_dict(apply_overrides(data, overrides), world_size)


def config_yaml(cfg: Config) -> str:
    """The YAML text of the fully resolved config, as ``save_config`` writes it."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    return "# resolved pmp_megatron config\n" + body


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved config as YAML (loadable again with ``load_config``), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, config_yaml(cfg))
