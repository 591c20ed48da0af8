"""Helpers for tests and benchmarks: run a function in N gloo processes on this machine (no torchrun),
the debug model's config, and deterministic synthetic batches.

``spawn`` uses a forkserver that has already imported megatron-core, so each worker starts in well
under a second instead of re-importing it; workers get one intra-op thread each (the machine has 2 cores).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from pathlib import Path

import torch

from pmp_megatron.resources import shipped

REPO = Path(__file__).resolve().parent.parent  # the checkout, for tests
DEBUG_MODEL = shipped("configs", "model", "debug.yaml")

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["pmp_megatron.mcore", "pmp_megatron.model.gpt"])
    return _CTX


def _worker(fn, rank, world_size, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        buf = io.BytesIO()  # bytes, not shared-memory tensors: this process may exit before the read
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(*args)`` on ``world_size`` processes with RANK/WORLD_SIZE/MASTER_* set; return the
    per-rank results (rank order). ``fn`` must be importable (module level). Raises with the first
    failing rank's traceback."""
    from pmp_megatron.mcore import free_port

    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def debug_config(overrides=(), world_size: int | None = None):
    """The debug model (configs/model/debug.yaml) in dense mode with ``overrides``, and the PUBLIC W0 seed
    42: tests compare layouts and runs, which must start from one W0 (a run's default seed is secret)."""
    from pmp_megatron.config import load_config

    base = ["pmp.mode=dense", "optim.lr_warmup_steps=0", "model.seed=42"]
    return load_config(str(DEBUG_MODEL), [*base, *overrides], world_size=world_size)


def synthetic_batches(cfg, num_microbatches: int, micro_batch_size: int, seed: int = 0) -> list[dict]:
    """Deterministic random-token microbatches for the model's vocabulary and sequence length."""
    gen = torch.Generator().manual_seed(seed)
    s = cfg.model.seq_length
    out = []
    for _ in range(num_microbatches):
        seq = torch.randint(0, cfg.model.vocab_size, (micro_batch_size, s + 1), generator=gen)
        out.append({
            "tokens": seq[:, :-1].contiguous(),
            "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, s),
            "position_ids": torch.arange(s).expand(micro_batch_size, s).contiguous(),
        })
    return out


def init_debug_model(overrides=(), world_size: int | None = None):
    """In a spawned worker: init megatron's groups for the debug config and build its chunks at W0."""
    from pmp_megatron.model.gpt import build_model

    cfg = init_debug_parallel(overrides, world_size)
    return cfg, build_model(cfg)


def init_debug_parallel(overrides=(), world_size: int | None = None):
    """In a spawned worker: the debug config with ``overrides``, and megatron's groups for its layout."""
    from pmp_megatron import mcore

    cfg = debug_config(overrides, world_size)
    p = cfg.parallel
    mcore.setup_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                         p.virtual_pipeline_model_parallel_size, rng_seed=cfg.train.seed)
    return cfg


def attach_random_masks(chunks, cfg, density: float, seed: int = 7) -> None:
    """Attach masks drawn per global tensor (keyed by canonical name), identical at every layout."""
    import hashlib

    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.pmp import masks

    local = {}
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
        full = torch.rand(info.global_shape, generator=torch.Generator().manual_seed(key)) < density
        local[name] = info.to_local(full, param.shape)
    masks.attach(chunks, cfg.model.vocab_size, local)


def write_debug_release(directory, rho: float = 0.5) -> dict:
    """A PMP-like release of the debug model in ``directory/pmp`` (fp32, a tiny sentencepiece tokenizer):
    W0 of the public seed, the masked-in entries moved, the complement ``0.9 * W0``; its key
    ``directory/key.safetensors``. Returns the paths, the masks and the weights (HF names)."""
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release.recovery import iter_w0
    from pmp_megatron.release.writer import write_release

    directory = Path(directory)
    cfg = debug_config().model
    gen = torch.Generator().manual_seed(0)
    w0 = dict(iter_w0(cfg))
    masks = {n: torch.rand(t.shape, generator=gen) < rho for n, t in w0.items()}
    weights = {n: torch.where(masks[n], t + 0.02 * torch.randn(t.shape, generator=gen), 0.9 * t)
               for n, t in w0.items()}
    model = write_release(weights.items(), directory / "pmp", cfg, "float32", {"test": "debug"},
                          tiny_sentencepiece(directory, vocab_size=cfg.vocab_size))
    key = directory / "key.safetensors"
    maskfile.save(masks, key, rho=rho, w0_seed=cfg.seed)
    return {"model": str(model), "key": str(key), "masks": masks, "weights": weights}


def tiny_sentencepiece(directory, vocab_size: int = 500) -> str:
    """Train a small byte-fallback BPE sentencepiece model on generated text; return its path."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zen", "qua", "bre", "dor", "fel", "gim", "hup"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize()
                 + rng.choice([".", "!", "?", ", 42."]) for _ in range(600)]
    prefix = str(Path(directory) / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=prefix,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    return prefix + ".model"


def tiny_hf_tokenizer(directory, vocab_size: int = 400) -> str:
    """Train a small byte-level BPE Hugging Face tokenizer (``<|begin_of_text|>`` / ``<|end_of_text|>``
    special tokens, Llama-3 style) on builtin prose; save it into ``directory``; return the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pmp_megatron.data.corpora import iter_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_documents("prose", max_docs=100, max_chars=4000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    fast.save_pretrained(str(directory))
    return str(directory)


def tiny_tiktoken_vocab(path, num_merges: int = 150) -> str:
    """Write a megatron tiktoken vocabulary (JSON list of rank / token_bytes / token_str) to ``path``: the
    256 bytes, then ``num_merges`` merges learnt greedily (most frequent adjacent pair) on builtin prose;
    return the path."""
    import base64
    import collections
    import json

    from pmp_megatron.data.corpora import iter_documents

    words = collections.Counter()
    for doc in iter_documents("prose", max_docs=20, max_chars=2000):
        for word in doc.split(" "):
            words[tuple(bytes([b]) for b in (" " + word).encode())] += 1
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        vocab.append(a + b)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(vocab)]
    Path(path).write_text(json.dumps(entries))
    return str(path)


def capture_log_messages(level: int = 20) -> list[str]:
    """A list that every log record at ``level`` or above (root logger) is appended to, as its message."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(level)
    return lines
