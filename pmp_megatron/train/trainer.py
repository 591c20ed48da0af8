"""The Trainer: PMP pretraining (Stage I discover -> rewind -> Stage II masked) or the dense baseline on
megatron-core, resumable after any interruption and at another TP/PP/DP layout.

``Trainer(cfg).run()`` under torchrun or srun:

1. distributed setup (gloo on CPU with the shim, NCCL on GPUs) and megatron's TP/PP/DP groups;
2. data: the tokenizer and GPTDataset splits/blends of ``data.data_path``;
3. resume from the newest valid checkpoint in ``checkpoint.dir``, or start: in PMP mode run Stage I
   (``pmp.discovery``) and rewind to W0; iteration 0 (W0 + masks) is saved in PMP mode and, with
   ``checkpoint.save_init``, in dense mode. Stage I reads the first batches of the training stream and
   Stage II starts that stream again from its beginning: the rewind resets the data as well as W0;
4. the loop: forward-backward through megatron's schedules, the PMP update rule around the optimizer step,
   LR schedule, periodic eval, logging (step, loss, lr, grad norm, tokens/s, TFLOP/s, memory, ETA;
   ``metrics.jsonl`` and optional tensorboard), checkpoints, and preemption (save, exit 42).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config, config_to_dict, save_config
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.pmp.discovery import discover
from pmp_megatron.pmp.update import MaskedUpdate
from pmp_megatron.train import checkpoint, signals
from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
from pmp_megatron.train.step import forward_backward, wrap_ddp

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self._tb = None
        if cfg.checkpoint.async_save:
            raise ValueError("checkpoint.async_save is not supported yet: saves are synchronous")

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import torch.distributed as dist

        mcore.init_distributed()
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.cfg.validate(self.world)
        p = self.cfg.parallel
        mcore.init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  p.virtual_pipeline_model_parallel_size, self.cfg.model.seed)
        self.num_micro = self.cfg.num_microbatches(self.world)
        signals.install()
        if self.rank == 0 and self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        self._build_data()

    def _build_data(self) -> None:
        from pmp_megatron.data.datasets import build_datasets
        from pmp_megatron.data.tokenizer import Tokenizer

        d, t = self.cfg.data, self.cfg.train
        if not d.data_path:
            raise ValueError("data.data_path is required: preprocess a corpus with tools/preprocess_data.py")
        if not d.tokenizer_model:
            raise ValueError("data.tokenizer_model is required (the sentencepiece .model of the data)")
        tokenizer = Tokenizer(d.tokenizer_model)
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

    def _microbatches(self, dataset, consumed: int):
        """Yield this DP rank's list of microbatches per global step, starting at ``consumed`` samples."""
        from pmp_megatron.data.datasets import build_dataloader

        loader = build_dataloader(dataset, self.cfg.train.micro_batch_size, mcore.dp_rank(), mcore.dp_size(),
                                  consumed_samples=consumed)
        it = iter(loader)
        while True:
            yield [next(it) for _ in range(self.num_micro)]

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        """Train to ``train.train_steps``; return the process exit code (0, or 42 after preemption)."""
        self.setup()
        cfg = self.cfg
        root = self.run_dir
        start = checkpoint.latest_valid(root) if root else None
        masks = None
        if start is None and cfg.pmp.mode == "pmp":
            batches = self._microbatches(self.train_ds, 0)
            result = discover(cfg, lambda step: next(batches))
            masks = result.masks
            self._write_metrics([dict(stage="discovery", **h) for h in result.history])
        # Stage II (or dense) from W0: the rewind is a fresh build from the seed.
        chunks = build_model(cfg)
        if masks is not None:
            pmp_masks.attach(chunks, cfg.model.vocab_size, masks)
        model = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        iteration = 0
        if start is not None:
            common = checkpoint.load(root, start, model, optimizer, cfg)
            scheduler.load_state_dict(common["scheduler"])
            iteration = common["iteration"]
            logger.info("resumed from %s", checkpoint.iter_dir(root, start))
        elif root and (cfg.pmp.mode == "pmp" or cfg.checkpoint.save_init):
            self._save(0, model, optimizer, scheduler)
        rule = MaskedUpdate(model, optimizer, cfg) if cfg.pmp.mode == "pmp" else None
        if rule is not None:
            logger.info("Stage II: PMP with %.4f of the parameters trainable (complement: %s%s)",
                        pmp_masks.density(chunks, cfg.model.vocab_size), cfg.pmp.complement,
                        ", projected" if cfg.pmp.projection else "")
        return self._loop(model, optimizer, scheduler, rule, iteration)

    def _loop(self, model, optimizer, scheduler, rule, iteration: int) -> int:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        flops_per_step = 6 * self._num_params(model) * tokens_per_step
        data = self._microbatches(self.train_ds, iteration * t.global_batch_size)
        window, t_start, first = [], time.perf_counter(), iteration
        while iteration < t.train_steps:
            t0 = time.perf_counter()
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            loss = forward_backward(model, next(data), cfg)
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(1)
            iteration += 1
            extra = rule.after_step(iteration) if rule is not None else {}
            dt = time.perf_counter() - t0
            window.append((loss, dt))
            record = dict(stage="train", step=iteration, loss=loss, grad_norm=grad_norm,
                          lr=optimizer.param_groups[0]["lr"], skipped=not ok, **extra)
            if iteration % cfg.logging.log_interval == 0 or iteration == t.train_steps:
                mean_dt = sum(w[1] for w in window) / len(window)
                eta = (time.perf_counter() - t_start) / (iteration - first) * (t.train_steps - iteration)
                record.update(tokens_per_s=tokens_per_step / mean_dt,
                              tflops_per_gpu=flops_per_step / mean_dt / self.world / 1e12)
                logger.info("step %d/%d | loss %.4f | lr %.3g | grad norm %.3f | %.0f tok/s | "
                            "%.3f TFLOP/s/rank | mem %s | ETA %s", iteration, t.train_steps,
                            sum(w[0] for w in window) / len(window), record["lr"], grad_norm,
                            record["tokens_per_s"], record["tflops_per_gpu"], _memory(), _hms(eta))
                window = []
            if t.eval_interval and iteration % t.eval_interval == 0:
                record["valid_loss"] = self.evaluate(model)
                logger.info("step %d | valid loss %.4f", iteration, record["valid_loss"])
            self._write_metrics([record])
            stop = signals.stop_agreed()
            if self.run_dir and (stop or iteration % cfg.checkpoint.save_interval == 0
                                 or iteration == t.train_steps):
                self._save(iteration, model, optimizer, scheduler)
            if stop:
                logger.warning("preempted at step %d: checkpoint saved, exiting %d for requeue", iteration,
                               signals.REQUEUE_EXIT_CODE)
                return signals.REQUEUE_EXIT_CODE
        return 0

    def evaluate(self, model) -> float:
        """Mean token loss over ``train.eval_steps`` global batches of the validation split."""
        data = self._microbatches(self.valid_ds, 0)
        losses = [forward_backward(model, next(data), self.cfg, forward_only=True)
                  for _ in range(self.cfg.train.eval_steps)]
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------- helpers
    def _save(self, iteration, model, optimizer, scheduler) -> None:
        consumed = iteration * self.cfg.train.global_batch_size
        common = dict(scheduler=scheduler.state_dict(), config=config_to_dict(self.cfg),
                      consumed_samples=consumed, pmp_mode=self.cfg.pmp.mode)
        checkpoint.save(self.run_dir, iteration, model, optimizer, self.cfg, common,
                        self.cfg.checkpoint.keep_last)

    def _write_metrics(self, records: list[dict]) -> None:
        """Rank 0: append to ``metrics.jsonl`` in the run dir and, if configured, tensorboard scalars."""
        if self.rank != 0:
            return
        if self.run_dir:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        if self.cfg.logging.tensorboard_dir:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.cfg.logging.tensorboard_dir)
            for r in records:
                for key, value in r.items():
                    if key not in ("step", "stage") and isinstance(value, int | float):
                        self._tb.add_scalar(f"{r['stage']}/{key}", value, r["step"])
            self._tb.flush()

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
