"""The Trainer: PMP pretraining (Stage I discover -> rewind -> Stage II masked) or the dense baseline on
megatron-core, resumable after any interruption and at another TP/PP/DP layout.

``Trainer(cfg).run()`` under torchrun or srun is ``setup()``, ``build()``, ``train(state)``:

1. ``setup``: distributed setup (gloo on CPU with the shim, NCCL on GPUs) and megatron's TP/PP/DP groups;
   the resume point (``train.resume``: the newest valid checkpoint at or below ``latest``, else a Stage-I
   checkpoint), refusing a config whose ``model.*``/``pmp.*`` settings differ from it before anything is
   written; the W0 seed (the checkpoint's, else a fresh SECRET one when ``model.seed`` is None, which
   only the checkpoints keep: ``config.yaml`` says null); data: the tokenizer and GPTDataset splits/blends
   of ``data.data_path``;
2. ``build``: resume from that checkpoint (falling back to older valid ones when a load fails), or start:
   in PMP mode run Stage I (``discover``: preemptible, checkpointed under ``run_dir/stage1``, resumed from
   there) and rewind to W0; iteration 0 (W0 + masks) is saved in PMP mode and, with
   ``checkpoint.save_init``, in dense mode, and the Stage-I checkpoints are then removed. Stage I reads the
   first batches of the training stream and Stage II starts that stream again from its beginning: the
   rewind resets the data as well as W0;
3. ``train``: the loop: ``train.step.train_step`` (forward-backward through megatron's schedules, the PMP
   gradient mask inside it, the optimizer step) or, every ``pmp.adversarial.interval`` steps when it is on,
   ``train.adversarial.Adversary.step`` (the same step against simulated keyless fine-tuning), LR schedule,
   the PMP complement policy, periodic eval,
   logging (step, loss, lr, grad norm, tokens/s, TFLOP/s, memory, ETA; ``metrics.jsonl`` and optional
   tensorboard and wandb: ``tracking``), checkpoints, and preemption (save, exit 42).

``run`` does all three and also exits 42 when a preemption signal stops Stage I.

Benchmarks and tests drive the same pieces: a batch source given to the constructor replaces the datasets,
``build(masks=...)`` skips Stage I, and ``train(state, steps, on_step=...)`` runs a given number of steps
and reports each one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.config import Config, config_to_dict, save_config
from pmp_megatron.data.proxy import ProxyRows, load_proxy
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.pmp.update import MaskedUpdate
from pmp_megatron.train import checkpoint, resume, signals, tracking
from pmp_megatron.train.adversarial import Adversary
from pmp_megatron.train.discovery import DiscoveryResult, discover
from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
from pmp_megatron.train.step import forward_backward, train_step, wrap_ddp

logger = logging.getLogger(__name__)

# (split, consumed samples) -> this DP rank's microbatches, one list per global step, from that position.
# ``split`` is "train" or "valid". The default reads the datasets of ``data.data_path``.
BatchSource = Callable[[str, int], Iterator[list[dict]]]


@dataclass
class TrainState:
    """What the loop trains, and how far it has got."""

    model: list  # this rank's DDP-wrapped model chunks
    optimizer: Any  # megatron optimizer over ``model``
    scheduler: Any  # LR / weight-decay schedule of ``optimizer``
    rule: MaskedUpdate | None  # the PMP update rule; None in dense mode
    iteration: int = 0  # optimizer steps taken
    adversary: Adversary | None = None  # adversarial Stage II (pmp.adversarial); None when off


class Preempted(Exception):
    """A preemption signal stopped Stage I inside ``build`` (its state is checkpointed; ``run`` exits 42)."""


class Trainer:
    def __init__(self, cfg: Config, batches: BatchSource | None = None, proxy: ProxyRows | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self._source = batches
        self._proxy = proxy  # adversarial Stage II's proxy rows (built from pmp.adversarial.proxy if None)
        self._trackers = tracking.Trackers(cfg.logging, self.run_dir.name if self.run_dir else None)
        self._start: resume.Start | None = None  # the checkpoint to resume from (``_resolve_start``)
        self._resolved = False
        self.seed_secret = cfg.model.seed is None  # whether W0's seed is secret (set by ``_resolve_start``)

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Process and run setup: torch.distributed and megatron's groups (the RNG tracker seeded with
        ``train.seed``, never the W0 seed), the preemption handlers, the resume point and W0 seed (a config
        that may not continue the checkpoint raises ValueError here, before anything is written), the run
        dir with the resolved ``config.yaml`` (a secret seed as null), and the datasets unless a batch
        source was given."""
        tracking.check(self.cfg.logging)  # a missing tracker package fails here, on every rank
        mcore.init_distributed()  # first on its own: the config is validated against the world size
        self.cfg.validate(self.world)
        p = self.cfg.parallel
        mcore.setup_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                             p.virtual_pipeline_model_parallel_size, rng_seed=self.cfg.train.seed)
        signals.install()
        self._resolve_start()
        if self.rank == 0 and self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(resume.public_config(self.cfg, self.seed_secret), self.run_dir / "config.yaml")
        if self._source is None:
            self._build_data()
        if self.cfg.pmp.mode == "pmp" and self.cfg.pmp.adversarial.enabled and self._proxy is None:
            self._proxy = self._build_proxy()

    def _resolve_start(self) -> None:
        """Once: the resume point, its compatibility with this config, and the W0 seed (collective)."""
        if self._resolved:
            return
        self._start = resume.find_start(self.run_dir) if self.run_dir else None
        if self._start is not None:
            resume.check_compatible(self.cfg, self._start)
        self.seed_secret = resume.resolve_seed(self.cfg, self._start)
        if self.cfg.pmp.mode == "pmp" and self.cfg.pmp.complement == "redraw" and not self.seed_secret:
            # here, not in Config.validate: a run's resolved config holds its secret seed as model.seed too
            raise ValueError("pmp.complement=redraw draws the complement from the secret W0 seed: it needs "
                             "model.seed null (a drawn secret) or model.seed_file, not a public model.seed")
        self._resolved = True

    def _build_data(self) -> None:
        from pmp_megatron.data.datasets import build_datasets
        from pmp_megatron.data.library_tokenizer import tokenizer_of

        d, t = self.cfg.data, self.cfg.train
        if not d.data_path:
            raise ValueError("data.data_path is required: preprocess a corpus with pmp-preprocess")
        tokenizer = tokenizer_of(d)
        if tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({tokenizer.vocab_size}) in {d.tokenizer_model}")
        gbs = t.global_batch_size
        steps = max(t.train_steps, self.cfg.pmp.discovery.max_steps if self.cfg.pmp.mode == "pmp" else 0)
        num_evals = t.train_steps // t.eval_interval + 1 if t.eval_interval else 0
        self.train_ds, self.valid_ds, _ = build_datasets(
            d.data_path, d.split, self.cfg.model.seq_length,
            (steps * gbs, max(num_evals * t.eval_steps * gbs, gbs), 0),
            t.seed, tokenizer, d.cache_dir)

    def _build_proxy(self) -> ProxyRows:
        from pmp_megatron.data.library_tokenizer import tokenizer_of

        a, d = self.cfg.pmp.adversarial, self.cfg.data
        tokenizer = tokenizer_of(d) if d.tokenizer_model else None
        return load_proxy(a.proxy, a.proxy_rows, self.cfg.model.vocab_size, self.cfg.model.seq_length,
                          tokenizer)

    def batches(self, split: str, consumed: int) -> Iterator[list[dict]]:
        """This DP rank's list of microbatches per global step of ``split`` ("train" or "valid"), starting
        at ``consumed`` samples: from the batch source if one was given, else from the datasets."""
        if self._source is not None:
            return self._source(split, consumed)
        return self._dataset_batches(self.train_ds if split == "train" else self.valid_ds, consumed)

    def _dataset_batches(self, dataset, consumed: int) -> Iterator[list[dict]]:
        from pmp_megatron.data.datasets import build_dataloader

        loader = build_dataloader(dataset, self.cfg.train.micro_batch_size, mcore.dp_rank(), mcore.dp_size(),
                                  consumed_samples=consumed, num_workers=self.cfg.data.num_workers)
        num_micro = self.cfg.num_microbatches(self.world)
        it = iter(loader)
        while True:
            yield [next(it) for _ in range(num_micro)]

    # ---------------------------------------------------------------- build
    def build(self, masks: dict[str, torch.Tensor] | None = None) -> TrainState:
        """The state training starts from: the checkpoint found by ``setup`` (an older valid one when it
        fails to load); else W0 with, in PMP mode, the masks of Stage I (``discover``; ``Preempted`` if a
        preemption signal stops it), or ``masks`` (this rank's local mask per canonical parameter name)
        instead of running Stage I. Once the masks are attached this call holds no reference to the dict
        (Stage I's is freed; a caller's own reference to ``masks`` is the caller's to drop). A fresh start
        saves iteration 0 in PMP mode and, with ``checkpoint.save_init``, in dense mode, then removes the
        Stage-I checkpoints. Needs megatron's parallel groups (``setup``)."""
        cfg = self.cfg
        self._resolve_start()
        start = self._start
        if start is not None and not start.stage1:
            return self._resume(start)
        if cfg.pmp.mode == "pmp" and masks is None:
            result = self.discover()
            if result.preempted:
                raise Preempted(f"preempted at stage I step {result.steps}")
            masks = result.masks
            del result
        # Stage II (or dense) from W0: the rewind is a fresh build from the seed; a dense run may start from
        # checkpoint.init_from's weights instead.
        chunks = build_model(cfg, init_w0=cfg.checkpoint.init_from is None)
        if cfg.checkpoint.init_from is not None:
            resume.init_weights(cfg, chunks)
        if cfg.pmp.mode == "pmp":
            pmp_masks.attach(chunks, cfg.model.vocab_size, masks)
        # Each parameter holds its own mask now: Stage I's dict (another byte per parameter) goes before
        # the optimizer state is allocated, not at the end of this call.
        del masks
        model = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(model, cfg)
        state = TrainState(model, optimizer, build_scheduler(optimizer, cfg), rule=None)
        if self.run_dir and (cfg.pmp.mode == "pmp" or cfg.checkpoint.save_init):
            self._save(state)
        if self.run_dir and self.rank == 0:
            shutil.rmtree(self.run_dir / resume.STAGE1_DIR, ignore_errors=True)  # iteration 0 supersedes it
        self._start = None
        return self._with_rule(state)

    def _resume(self, start: resume.Start) -> TrainState:
        """The state of checkpoint ``start``, or of an older valid one if it fails to load."""
        cfg = self.cfg

        def make():
            model = wrap_ddp(build_model(cfg, init_w0=False), cfg)  # every weight comes from the checkpoint
            return model, build_optimizer(model, cfg)

        loaded, model, optimizer = resume.load_with_fallback(cfg, start, make)
        scheduler = build_scheduler(optimizer, cfg)
        scheduler.load_state_dict(loaded.common["scheduler"])
        state = TrainState(model, optimizer, scheduler, rule=None, iteration=loaded.common["iteration"])
        logger.info("resumed from %s", checkpoint.iter_dir(loaded.root, loaded.iteration))
        return self._with_rule(state)

    def _with_rule(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        if cfg.pmp.mode == "pmp":
            state.rule = MaskedUpdate(state.model, state.optimizer, cfg,
                                      secret_seed=cfg.model.seed if self.seed_secret else None,
                                      iteration=state.iteration)
            logger.info("Stage II: PMP with %.4f of the parameters trainable (complement: %s%s)",
                        pmp_masks.density(state.model, cfg.model.vocab_size), cfg.pmp.complement,
                        ", projected" if cfg.pmp.projection else "")
            if cfg.pmp.adversarial.enabled:
                if self._proxy is None:
                    raise ValueError("pmp.adversarial.enabled: the Trainer has no proxy rows (setup builds "
                                     "them from pmp.adversarial.proxy, or pass proxy=)")
                state.adversary = Adversary(state.model, state.rule, self._proxy, cfg)
        return state

    def discover(self) -> DiscoveryResult:
        """Stage I from W0, or from the Stage-I checkpoint found by ``setup``; checkpointed under
        ``run_dir/stage1`` (every ``pmp.discovery.save_interval`` steps and on preemption). Its history
        goes to the metrics step by step."""
        start = self._start if self._start is not None and self._start.stage1 else None
        gbs = self.cfg.train.global_batch_size
        stream = {}

        def microbatches(step: int) -> list[dict]:
            if "it" not in stream:  # the training stream from this step's position (Stage I's own)
                stream["it"] = self.batches("train", step * gbs)
            return next(stream["it"])

        root = self.run_dir / resume.STAGE1_DIR if self.run_dir else None
        return discover(self.cfg, microbatches, root=root, resume=start,
                        common=dict(w0_seed_secret=self.seed_secret),
                        on_step=lambda r: self._write_metrics([dict(stage="discovery", **r)]))

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        """Train to ``train.train_steps``; return the process exit code (0, or 42 after preemption, in
        Stage I or Stage II)."""
        self.setup()
        try:
            state = self.build()
        except Preempted:
            return self._requeue_exit(None)
        return self.train(state)

    def train(self, state: TrainState, steps: int | None = None,
              on_step: Callable[[dict], None] | None = None) -> int:
        """Train ``state`` until iteration ``steps`` (default ``train.train_steps``). Each step writes its
        metrics record, logs every ``logging.log_interval`` steps and at the end, evaluates, checkpoints and
        checks for preemption, then calls ``on_step(record)``. Returns the exit code: 0, or
        ``signals.REQUEUE_EXIT_CODE`` after a preemption (the checkpoint is saved first)."""
        cfg, t = self.cfg, self.cfg.train
        end = t.train_steps if steps is None else steps
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        flops_per_step = 6 * self._num_params(state.model) * tokens_per_step
        data = self.batches("train", state.iteration * t.global_batch_size)
        window, t_start, first = [], time.perf_counter(), state.iteration
        while state.iteration < end:
            t0 = time.perf_counter()
            if state.adversary is not None and state.adversary.due(state.iteration + 1):
                result, adversarial = state.adversary.step(state.optimizer, next(data), state.iteration + 1)
            else:
                result, adversarial = train_step(state.model, state.optimizer, next(data), cfg), {}
            state.scheduler.step(1)
            state.iteration += 1
            iteration = state.iteration
            extra = state.rule.after_step(iteration) if state.rule is not None else {}
            dt = time.perf_counter() - t0
            window.append((result.loss, dt))
            record = dict(stage="train", step=iteration, loss=result.loss, grad_norm=result.grad_norm,
                          lr=state.optimizer.param_groups[0]["lr"], skipped=not result.ok, **adversarial,
                          **extra)
            if iteration % cfg.logging.log_interval == 0 or iteration == end:
                mean_dt = sum(w[1] for w in window) / len(window)
                eta = (time.perf_counter() - t_start) / (iteration - first) * (end - iteration)
                record.update(tokens_per_s=tokens_per_step / mean_dt,
                              tflops_per_gpu=flops_per_step / mean_dt / self.world / 1e12)
                logger.info("step %d/%d | loss %.4f | lr %.3g | grad norm %.3f | %.0f tok/s | "
                            "%.3f TFLOP/s/rank | mem %s | ETA %s", iteration, end,
                            sum(w[0] for w in window) / len(window), record["lr"], result.grad_norm,
                            record["tokens_per_s"], record["tflops_per_gpu"], _memory(), _hms(eta))
                window = []
            if t.eval_interval and iteration % t.eval_interval == 0:
                record["valid_loss"] = self.evaluate(state.model)
                logger.info("step %d | valid loss %.4f", iteration, record["valid_loss"])
            self._write_metrics([record])
            stop = signals.stop_agreed()
            if self.run_dir and (stop or iteration % cfg.checkpoint.save_interval == 0 or iteration == end):
                self._save(state)
            if on_step is not None:
                on_step(record)
            if stop:
                return self._requeue_exit(iteration)
        return 0

    def _requeue_exit(self, iteration: int | None) -> int:
        """After a preemption checkpoint: the requeue marker and exit code (``signals.requeue_exit``)."""
        where = f"step {iteration}" if iteration is not None else "stage I"
        logger.warning("preempted at %s: checkpoint saved, exiting %d for requeue", where,
                       signals.REQUEUE_EXIT_CODE)
        return signals.requeue_exit(self.run_dir, iteration)

    def evaluate(self, model: list) -> float:
        """Mean token loss over ``train.eval_steps`` global batches of the validation split."""
        data = self.batches("valid", 0)
        losses = [forward_backward(model, next(data), self.cfg, forward_only=True)
                  for _ in range(self.cfg.train.eval_steps)]
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------- helpers
    def _save(self, state: TrainState) -> None:
        consumed = state.iteration * self.cfg.train.global_batch_size
        # The config holds the W0 seed: the checkpoint is the one place a secret seed is kept.
        common = dict(scheduler=state.scheduler.state_dict(), config=config_to_dict(self.cfg),
                      consumed_samples=consumed, pmp_mode=self.cfg.pmp.mode, w0_seed_secret=self.seed_secret)
        checkpoint.save(self.run_dir, state.iteration, state.model, state.optimizer, self.cfg, common,
                        self.cfg.checkpoint.keep_last)

    def _write_metrics(self, records: list[dict]) -> None:
        """Rank 0: append to ``metrics.jsonl`` in the run dir and the configured trackers' scalars
        (tensorboard, wandb: ``train/tracking.py``)."""
        if self.rank != 0:
            return
        if self.run_dir:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        self._trackers.write(records)

    def close(self) -> None:
        """Close the trackers (the wandb run is finished); the trainer may not write metrics after."""
        self._trackers.close()

    def _num_params(self, model) -> int:
        n = torch.tensor([sum(i.numel() for _, i in shard_infos(model, self.cfg.model.vocab_size).values()
                              if i.counted)], dtype=torch.float64)
        mcore.all_reduce(n, group=mcore.model_parallel_group())
        return int(n.item())


def _memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    import psutil

    return f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB RSS"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(cfg: Config) -> None:
    """Run the trainer and exit with its code (42 = preempted, requeue)."""
    sys.exit(Trainer(cfg).run())
