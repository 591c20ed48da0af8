"""Training data: megatron-core ``GPTDataset`` splits and weighted blends over indexed datasets, the batch
format the trainer consumes, and a resumable Megatron-LM style micro-batch sampler.

``build_datasets`` wraps ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``. Its index files (document,
sample and shuffle indices; blend indices) go to ``cache_dir``. With a process group initialised,
megatron builds them on global rank 0 while the other ranks wait at a barrier, then the others load
them, so ``cache_dir`` must be shared by all ranks; with ``node_local_cache=True`` it may instead be a
per-node directory: the first rank of each host builds its node's copy first. Every rank must call
``build_datasets`` (it holds collective barriers). Samples carry no attention mask (the model is causal).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.data.indexed import quiet_rank_warnings, read_meta

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def parse_data_path(data_path: Sequence[str | float | os.PathLike]) -> tuple[list[str], list[float] | None]:
    """``[p1, p2]`` -> ``([p1, p2], None)``; ``[w1, p1, w2, p2]`` -> ``([p1, p2], [w1, w2])``.

    Weights may be numbers or numeric strings (as on a command line); they need not sum to one.
    """
    items = list(data_path)
    if not items:
        raise ValueError("data_path is empty")

    def as_weight(item) -> float | None:
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
        try:
            return float(item)
        except (TypeError, ValueError):
            return None

    weights = [as_weight(x) for x in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = [str(x) for x in items[1::2]]
        if any(as_weight(p) is not None for p in prefixes) or any(w <= 0 for w in weights):
            raise ValueError(f"data_path {items} must alternate positive weights and dataset prefixes")
        return prefixes, weights
    if any(as_weight(x) is not None for x in items):
        raise ValueError(f"data_path {items} mixes weights and prefixes; give prefixes only, or "
                         "weight, prefix pairs")
    return [str(x) for x in items], None


def build_datasets(data_path: Sequence[str | float | os.PathLike], split: str, seq_length: int,
                   num_samples: tuple[int | None, int | None, int | None], seed: int, tokenizer,
                   cache_dir: str | os.PathLike | None, *, is_built_on_rank: Callable[[], bool] | None = None,
                   node_local_cache: bool = False, eod_mask_loss: bool = False,
                   reset_position_ids: bool = False, reset_attention_mask: bool = False,
                   ) -> tuple[mcore.GPTDataset | None, mcore.GPTDataset | None, mcore.GPTDataset | None]:
    """Build the (train, valid, test) datasets; a split is None when its ``split`` weight is 0.

    ``data_path``: prefixes (``PREFIX.bin``/``.idx``) or weight, prefix pairs, see ``parse_data_path``.
    ``split``: e.g. ``"98,1,1"``, the document ranges of every prefix that go to each split.
    ``num_samples``: samples wanted per split (None: one epoch; required when weights are given).
    One prefix gives a ``GPTDataset`` of whole epochs, at least ``n`` samples. With weights a split is a
    megatron ``BlendedDataset`` of exactly ``sum(ceil(n * w_i))`` samples, ``ceil(n * w_i)`` drawn from
    dataset ``i`` (weights normalised); its samples also carry ``dataset_id``.
    ``tokenizer``: needs ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (``Tokenizer``).
    ``cache_dir``: where the index files go (None: megatron's default, ``PREFIX/cache/``).
    ``is_built_on_rank``: when it returns False a rank gets None (default: every rank builds); it must
    return True on global rank 0, which builds the cache.
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        _check_prefix(prefix, tokenizer)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples}")
    if weights is not None and any(n is None for n in num_samples):
        raise ValueError(f"weighted data_path needs a sample count for every split, got {num_samples}")
    sizes = list(num_samples)
    on_rank = is_built_on_rank or (lambda: True)
    with quiet_rank_warnings():
        config = mcore.GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(prefixes, weights),
            split=split,
            path_to_cache=None if cache_dir is None else str(cache_dir),
            mmap_bin_files=True,
            tokenizer=tokenizer,
            reset_position_ids=reset_position_ids,
            reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss,
            create_attention_mask=False,
        )
        if node_local_cache and cache_dir is not None and dist.is_initialized():
            if dist.get_rank() in _first_rank_per_host():
                with _process_group_hidden():  # build this node's cache as if alone
                    mcore.BlendedMegatronDatasetBuilder(mcore.GPTDataset, sizes, on_rank, config).build()
            mcore.barrier()
        builder = mcore.BlendedMegatronDatasetBuilder(mcore.GPTDataset, sizes, on_rank, config)
        train, valid, test = builder.build()
    return train, valid, test


def _check_prefix(prefix: str, tokenizer) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ValueError(f"dataset {prefix}{suffix} does not exist")
    meta = read_meta(prefix)
    sha = getattr(tokenizer, "sha256", None)
    if meta is not None and sha is not None and meta.get("tokenizer_sha256") != sha:
        raise ValueError(f"dataset {prefix} was tokenized with another tokenizer "
                         f"(sha256 {meta.get('tokenizer_sha256')}, given {sha})")


def _first_rank_per_host() -> set[int]:
    hosts: list[str] = mcore.all_gather_object(socket.gethostname())
    first: dict[str, int] = {}
    for rank, host in enumerate(hosts):
        first.setdefault(host, rank)
    return set(first.values())


@contextlib.contextmanager
def _process_group_hidden() -> Iterator[None]:
    """megatron's dataset code builds (and writes the cache) itself when no process group is visible."""
    with mock.patch.object(torch.distributed, "is_initialized", return_value=False):
        yield


def batch_from_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``GPTDataset`` samples into the trainer's batch: tokens/labels/position_ids LongTensor
    ``[b, s]`` and loss_mask FloatTensor ``[b, s]``. ``labels[:, i]`` is the token after ``tokens[:, i]``.
    Other sample keys (a blend's ``dataset_id``) are dropped."""
    if not samples:
        raise ValueError("batch_from_samples needs at least one sample")
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),  # [b, s]
        "labels": torch.stack([s["labels"] for s in samples]).long(),  # [b, s]
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),  # [b, s]
        "position_ids": torch.stack([s["position_ids"] for s in samples]).long(),  # [b, s]
    }


class MicroBatchSampler:
    """Megatron-LM's pretraining batch sampler: sample indices in order, one micro-batch per call.

    Indices ``consumed_samples ..`` are cut into blocks of ``micro_batch_size * data_parallel_size``;
    data-parallel rank ``r`` gets slice ``r`` of each block (the last, incomplete block is dropped).
    A global step consumes ``micro * dp * num_micro_batches`` samples; restart with ``consumed_samples``
    = steps done * global batch size and the run continues exactly where it stopped.
    Usable as a ``torch.utils.data.DataLoader`` ``batch_sampler``.
    """

    def __init__(self, dataset_len: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, consumed_samples: int = 0):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= dataset_len:
            raise ValueError(f"consumed_samples {consumed_samples} not in [0, dataset_len={dataset_len}]")
        self.dataset_len = dataset_len
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        return (self.dataset_len - self.consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro_batch_size * self.data_parallel_size
        start = self.data_parallel_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.dataset_len - block + 1, block):
            yield list(range(first + start, first + start + self.micro_batch_size))


def build_dataloader(dataset, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                     consumed_samples: int = 0, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` yielding this rank's micro-batches in the trainer's batch format."""
    sampler = MicroBatchSampler(len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size,
                                consumed_samples)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=batch_from_samples,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       worker_init_fn=quiet_preemption_signals)


def quiet_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker outlives Slurm's SIGUSR2 / SIGTERM, which reach every
    process of the step, instead of running the trainer's inherited handlers (``train/signals.py``).

    The training process alone checkpoints on them; a worker that died of one would make the DataLoader
    raise in the training process before the checkpoint. SIGUSR2 is ignored. SIGTERM is blocked and
    taken by a thread that ends the worker only when the signal comes from its own parent: that is
    ``Process.terminate``, on which the parent's exit then waits (ignored, it would hang the exit)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), name="sigterm-from-parent",
                     daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)
