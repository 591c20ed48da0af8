"""``pmp-export-mask``: read the masks of a PMP checkpoint (saved at any TP/PP layout) in ONE process and
write the private key file keyed by the release's Hugging Face names (``pmp.maskfile``): the mask and the
W0 seed of the run (``model.seed`` of the checkpoint's common state; a secret one when the run drew it).

The masks are resharded to TP=1/PP=1 by dist_checkpointing (their sharded state mirrors the weights'),
then converted tensor by tensor with the release adapter, so the key lines up with the released weights
entry for entry (q/k/v and gate/up splits included).
"""

from __future__ import annotations

import logging

import torch

from pmp_megatron import mcore
from pmp_megatron.config import config_from_dict
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp import maskfile
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.release.hf_llama import to_hf
from pmp_megatron.train import checkpoint

logger = logging.getLogger(__name__)


def single_process_config(common: dict):
    """The checkpoint's config, re-laid out for one process (TP=PP=1, no virtual stages)."""
    d = checkpoint.saved_config_dict(common)
    d["parallel"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                         virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
                         use_distributed_optimizer=False, overlap_param_gather=False)
    d["train"].update(global_batch_size=d["train"]["micro_batch_size"])
    return config_from_dict(d, world_size=1)


def load_global_masks(root, iteration: int | None = None):
    """(canonical name -> full bool mask, config) of a checkpoint, in this single process."""
    mcore.init_distributed()
    iteration = checkpoint.resolve_iteration(root, iteration)
    common = checkpoint.read_common(root, iteration)
    if not common.get("has_masks"):
        raise ValueError(f"checkpoint {checkpoint.iter_dir(root, iteration)} has no PMP masks "
                         f"(pmp.mode={common.get('pmp_mode')})")
    cfg = single_process_config(common)
    mcore.setup_parallel(rng_seed=cfg.train.seed)  # an RNG seed (a 128-bit W0 seed is no torch seed)
    chunks = build_model(cfg)
    template = pmp_masks.sharded_state_dict(chunks, empty=True)
    loaded = mcore.dist_checkpointing.load({"pmp_masks": template},
                                           str(checkpoint.iter_dir(root, iteration)))
    pmp_masks.attach_loaded(loaded["pmp_masks"], template)
    full = {}
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        full[name] = torch.zeros(info.global_shape, dtype=torch.bool)
        for lo, gl in info.local_slices():  # drops padded rows; at TP=1 fc1 is still [gate; up]
            full[name][gl] = pmp_masks.mask_of(param)[lo].cpu()
    return full, cfg


def export_mask(root, out, iteration: int | None = None, force: bool = False) -> str:
    """Write the key of checkpoint ``root`` to ``out`` (mode 0600); return its sha256."""
    full, cfg = load_global_masks(root, iteration)
    hf = {}
    for name, mask in full.items():
        hf.update(to_hf(name, mask, cfg.model))
    if cfg.model.seed is None:
        raise ValueError(f"checkpoint {str(root)!r} has no model.seed in its common state: the key needs "
                         f"the W0 seed")
    digest = maskfile.save(hf, out, rho=cfg.pmp.rho, w0_seed=cfg.model.seed, force=force)
    logger.info("exported the private key (mask + W0 seed) of %s (%d tensors) to %s", root, len(hf), out)
    return digest
