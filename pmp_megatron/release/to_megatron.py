"""Hugging Face Llama directory -> megatron dist checkpoint ``DIR/iter_0000000`` (+ ``latest``), TP=1/PP=1.

The reverse of ``pmp-release``: the HF tensors are merged back to canonical megatron tensors
(``hf_llama.from_hf``: q/k/v -> interleaved ``linear_qkv``, gate/up -> ``linear_fc1``), copied into a model
built in this one process (padded vocabulary rows zero) and saved with ``train.checkpoint.save``. The
common state mirrors what ``Trainer._save`` writes for iteration 0: the run's ``config``, a fresh LR
``scheduler`` state, ``consumed_samples`` 0, ``pmp_mode``, ``has_masks`` False, ``iteration`` 0; there is
no optimizer state. A config without ``model.seed`` (the default) gets a secret 128-bit W0 seed, like a
run the Trainer starts: kept in the checkpoint's common state only (``w0_seed_secret``), ``config.yaml``
says null.

Being a dist checkpoint it loads at any layout with ``train.checkpoint.load`` (weights resharded), and
``pmp-release`` turns it back into the same HF tensors bit for bit. ``checkpoint.load`` asks no
iteration-0 checkpoint for optimizer state (W0 comes before any step), so ``pmp-pretrain`` with
``checkpoint.dir`` set to it continues from it with a fresh optimizer. It carries no PMP masks, so it is a
starting point for dense training only: a PMP run in that directory would resume from it instead of
running Stage I, and find no masks to train under (``pmp_mode`` is ``dense`` unless the given config says
otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
import shutil
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config, ParallelConfig, PMPConfig, config_to_dict, save_config
from pmp_megatron.release.hf_llama import check_architecture, from_hf, model_config_from_hf
from pmp_megatron.release.reader import read_weights

logger = logging.getLogger(__name__)


def _prepare_target(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint output {str(root)!r} exists and is not a directory")
    old = sorted(root.glob("iter_*")) + ([root / "latest"] if (root / "latest").exists() else [])
    if old and not overwrite:
        raise ValueError(f"checkpoint output {str(root)!r} already holds checkpoints (pass overwrite=True "
                         f"to replace them)")
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    root.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def to_megatron(hf_dir: str | Path, out_dir: str | Path, config: Config | None = None,
                overwrite: bool = False, parallel: ParallelConfig | None = None) -> Path:
    """Convert an HF Llama directory to ``out_dir/iter_0000000`` (TP=1, PP=1); return that folder.

    ``config`` is the run the checkpoint is meant for (its model section must match the HF architecture).
    The tensors are written at TP=PP=1 and reshard on load at any layout; ``config.yaml`` records the
    config's layout, or ``parallel`` (validated against the architecture), for training to use. Default:
    the model of config.json, ``pmp.mode=dense``, the other sections at their defaults, and
    ``data.tokenizer_model`` = the directory's ``tokenizer.model`` when it has one, else the directory
    itself (``data.tokenizer_type`` huggingface) when it holds a ``tokenizer.json``.
    """
    import torch.distributed as dist

    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.train import checkpoint
    from pmp_megatron.train.optimizer import build_scheduler

    hf_dir, root = Path(hf_dir), Path(out_dir)
    tensors, hf_cfg = read_weights(hf_dir)
    hf_model = model_config_from_hf(hf_cfg)
    if config is None:
        config = Config(model=hf_model, pmp=PMPConfig(mode="dense"))
        if (hf_dir / "tokenizer.model").is_file():
            config.data.tokenizer_model = str((hf_dir / "tokenizer.model").resolve())
        elif (hf_dir / "tokenizer.json").is_file():
            config.data.tokenizer_model = str(hf_dir.resolve())
            config.data.tokenizer_type = "huggingface"
    else:
        check_architecture(config.model, hf_model)
    cfg = copy.deepcopy(config)
    public = copy.deepcopy(cfg)  # what config.yaml may say: the layout training will use
    if parallel is not None:
        public.parallel = copy.deepcopy(parallel)
    public.validate()
    cfg.parallel = ParallelConfig()  # TP=PP=1, no virtual stages: the layout this checkpoint is saved at
    cfg.validate()
    secret = cfg.model.seed is None
    if secret:  # the checkpoint's W0 seed (a rewind goes there): secret, as the Trainer draws one
        cfg.model = dataclasses.replace(cfg.model, seed=secrets.randbits(128))
    canonical = from_hf(tensors, cfg.model)  # validates names and shapes against the architecture
    del tensors

    mcore.init_distributed()
    if dist.get_world_size() != 1:
        raise ValueError(f"to_megatron runs in one process, got a world of {dist.get_world_size()}")
    _prepare_target(root, overwrite)
    mcore.setup_parallel(rng_seed=cfg.train.seed)  # an RNG seed (a 128-bit W0 seed is no torch seed)
    chunks = build_model(cfg)
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        full = canonical.pop(name)
        param.copy_(info.to_local(full.to(param.dtype), param.shape).to(param.device))
    assert not canonical, f"HF tensors without a parameter: {sorted(canonical)}"

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # the schedule's state only
    common = dict(scheduler=build_scheduler(dummy, cfg).state_dict(), config=config_to_dict(cfg),
                  consumed_samples=0, pmp_mode=cfg.pmp.mode, w0_seed_secret=secret)
    folder = checkpoint.save(root, 0, chunks, None, cfg, common)
    save_config(public, root / "config.yaml")
    logger.info("converted %s to the megatron checkpoint %s (TP=1, PP=1)", hf_dir, folder)
    return folder
