"""Read a training checkpoint's weights in ONE process, whatever TP/PP/VPP layout saved it, and write the
Hugging Face release (``pmp-release``) -- without building the model or launching the original world.

A checkpoint (``train.checkpoint``) is a megatron dist checkpoint: every parameter is one global tensor
under its sharded-state key, reassembled from any layout by dist_checkpointing (torch_dist). On disk:

- ``embedding.word_embeddings.weight`` and ``output_layer.weight``: ``[padded vocab, h]`` (the padding
  depends on the TP of the run; rows past ``model.vocab_size`` are no parameters and are dropped);
- the decoder layers STACKED along a leading layer axis: ``decoder.layers.self_attention.linear_qkv.weight``
  ``[num_layers, (n_heads + 2 n_groups) d, h]``, ``...linear_qkv.layer_norm_weight`` ``[num_layers, h]``,
  ``decoder.layers.mlp.linear_fc1.weight`` ``[num_layers, 2 ffn, h]`` (``[gate; up]`` globally), ...
  (checkpoints saved with megatron's ``non_homogeneous_layers`` use ``decoder.layers.{i}.<name>`` keys;
  both spellings are read);
- ``decoder.final_layernorm.weight``; ``pmp_mask.<key>`` (the private masks) and ``optimizer.*`` keys.

``iter_canonical_tensors`` loads one group at a time (the embedding, then each layer's slice of the stacked
tensors, then the final norm and the output layer) with full-tensor ``ShardedTensor`` templates, so peak
memory is about one layer plus the embedding. It never asks for a ``pmp_mask.*`` or ``optimizer.*`` key:
a release built from this stream cannot contain a mask.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config
from pmp_megatron.release.hf_llama import canonical_shapes, hf_shapes, to_hf
from pmp_megatron.release.model_card import CardInfo
from pmp_megatron.release.tokenizer import TokenizerSpec, check_exists
from pmp_megatron.release.writer import owner_dir_of, write_release
from pmp_megatron.train import checkpoint

logger = logging.getLogger(__name__)

AUDIT_FILE = "release_audit.json"  # in the owner directory (``writer.owner_dir_of``), never in the release
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


def _locate(name: str, shape: tuple[int, ...], metadata: dict, num_layers: int, folder: Path):
    """(checkpoint key, layer index into a stacked tensor or None) of canonical ``name``."""
    match = _LAYER.match(name)
    candidates = [(name, None)]
    if match:
        candidates.append((f"decoder.layers.{match.group(2)}", int(match.group(1))))
    for key, layer in candidates:
        if key not in metadata:
            continue
        stored = tuple(metadata[key].global_shape)
        want = shape if layer is None else (num_layers, *shape)
        rows_ok = stored[0] >= want[0] if name.endswith(("word_embeddings.weight", "output_layer.weight")) \
            else stored[0] == want[0]
        if len(stored) != len(want) or not rows_ok or stored[1:] != want[1:]:
            raise ValueError(f"checkpoint {str(folder)!r}: tensor {key!r} has global shape {stored}, "
                             f"expected {want} from the checkpoint's model config")
        return key, layer
    raise ValueError(f"checkpoint {str(folder)!r} has no tensor for parameter {name!r} "
                     f"(looked for {[k for k, _ in candidates]})")


def _template(key: str, meta, layer: int | None):
    """A full-tensor (or one-layer) ShardedTensor to load ``key`` into, in its stored dtype."""
    shape = tuple(meta.global_shape)
    if layer is None:
        return mcore.ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), replica_id=0)
    # Layer ``layer`` of the stacked tensor as a [1, ...] block (no prepended axis: megatron then reads
    # it through torch DCP's general resharding, which needs no other rank to hold the other layers).
    return mcore.ShardedTensor.from_rank_offsets(key, torch.empty((1, *shape[1:]), dtype=meta.dtype),
                                                 (0, layer, shape[0]), replica_id=0)


def _groups(names: list[str]) -> list[list[str]]:
    """Canonical names in load order: one group before the layers, one per layer, one after."""
    groups: dict[str, list[str]] = {}
    seen_layer = False
    for name in names:
        match = _LAYER.match(name)
        if match:
            seen_layer = True
            group = f"layer {int(match.group(1))}"
        else:
            group = "after" if seen_layer else "before"
        groups.setdefault(group, []).append(name)
    return list(groups.values())


def iter_canonical_tensors(ckpt_root: str | Path, iteration: int | None = None
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, full unpadded fp32 tensor) of every parameter of a checkpoint.

    Reads any TP/PP/VPP layout in this one process (torch.distributed is initialised as a world of one
    if needed); loads one layer at a time; never reads masks or optimizer state.
    """
    iteration = checkpoint.resolve_iteration(ckpt_root, iteration)
    cfg, _ = checkpoint.checkpoint_config(ckpt_root, iteration)
    folder = checkpoint.iter_dir(ckpt_root, iteration)
    metadata = mcore.dist_checkpointing.load_tensors_metadata(str(folder))
    shapes = canonical_shapes(cfg.model)
    where = {n: _locate(n, s, metadata, cfg.model.num_layers, folder) for n, s in shapes.items()}
    for group in _groups(list(shapes)):
        state = {n: _template(where[n][0], metadata[where[n][0]], where[n][1]) for n in group}
        # One layer's slice of the stacked tensors does not cover them: skip the whole-tensor access check.
        loaded = mcore.dist_checkpointing.load(state, str(folder), validate_access_integrity=False)
        for name in group:
            t = loaded.pop(name)
            if where[name][1] is not None:
                t = t[0]
            if t.shape[0] != shapes[name][0]:  # padded vocabulary rows: not parameters of the real model
                t = t[: shapes[name][0]].clone()
            yield name, t.to(torch.float32)
        del loaded, state


def check_release_target(ckpt_root: str | Path, out_dir: str | Path) -> None:
    """ValueError unless ``out_dir`` lies apart from the checkpoint ``ckpt_root``: a release written (or
    overwritten) over, around or inside the checkpoint would replace the run and the owner's secrets."""
    ckpt, out = Path(ckpt_root).resolve(), Path(out_dir).resolve()
    if out == ckpt or ckpt.is_relative_to(out) or out.is_relative_to(ckpt):
        raise ValueError(f"release output {str(out_dir)!r} is, contains or is inside the checkpoint "
                         f"directory {str(ckpt_root)!r}: choose an --out apart from the checkpoint")


def key_record(cfg: Config, common: dict) -> dict:
    """What the owner's records say about the key of a checkpoint (``audit.check_key_fits``): its pmp mode,
    whether it has masks, and a fingerprint of its W0 seed -- never the seed itself."""
    from pmp_megatron.pmp.maskfile import seed_fingerprint

    return {"pmp_mode": common.get("pmp_mode"), "has_masks": bool(common.get("has_masks")),
            "w0_seed_secret": bool(common.get("w0_seed_secret", False)),
            "w0_seed_sha256": None if cfg.model.seed is None else seed_fingerprint(cfg.model.seed)}


def release(ckpt_root: str | Path, out_dir: str | Path, iteration: int | None = None, dtype: str = "float32",
            tokenizer_model: str | None = None, tokenizer_type: str | None = None, overwrite: bool = False,
            mask: str | Path | None = None,
            audit_seed: int | None = None, init_attack: bool = True, warn_level: float = 0.5,
            max_shard_bytes: int = 2 * 1024**3, owner_dir: str | Path | None = None,
            license: str | None = None, model_name: str | None = None) -> Path:
    """Write the dense Hugging Face release of a checkpoint; return its directory. Never includes a mask.

    The release directory gets the public files only; the manifest (checkpoint path, pmp mode, tensor
    hashes) goes to ``owner_dir`` (default ``<out>.owner``, mode 0700). ``out_dir`` may not be, contain or
    lie inside the checkpoint, nor hold a key file. ``tokenizer_model`` / ``tokenizer_type`` default to the
    run's ``data.tokenizer_model`` / ``data.tokenizer_type``. With ``mask`` (the owner's private key file,
    which must belong to this PMP checkpoint) the leakage audit (``release.audit``) runs on the written
    release and its report goes to ``OWNER/release_audit.json``; the init-regeneration attacker uses the
    key's W0 seed (``audit_seed`` only for a v1 key without one) unless ``init_attack`` is False. The
    model card takes its license and name from the run's ``release.*`` unless ``license`` / ``model_name``
    are given.
    """
    from pmp_megatron.release import audit

    iteration = checkpoint.resolve_iteration(ckpt_root, iteration)
    cfg, common = checkpoint.checkpoint_config(ckpt_root, iteration)
    check_release_target(ckpt_root, out_dir)
    owner = owner_dir_of(owner_dir, out_dir)
    record = key_record(cfg, common)
    seed = None
    if mask is not None:  # fail before the conversion, not after it
        from pmp_megatron.pmp import maskfile

        if not Path(mask).is_file():
            raise ValueError(f"mask file {str(mask)!r} does not exist")
        masks, meta = maskfile.load(mask)
        audit.check_key_fits(meta, record, f"checkpoint {str(ckpt_root)!r}")
        audit.check_mask_names(masks, hf_shapes(cfg.model), f"mask file {str(mask)!r}")
        del masks
        if meta["w0_seed"] is not None and audit_seed is not None and audit_seed != meta["w0_seed"]:
            raise ValueError(f"audit_seed is not the W0 seed in mask file {str(mask)!r}: drop it (the key's "
                             f"seed is used)")
        seed = meta["w0_seed"] if meta["w0_seed"] is not None else audit_seed
        if init_attack and seed is None:
            logger.warning("mask file %s holds no W0 seed (a v1 key) and no audit seed was given: the "
                           "init-regeneration attacker does not run", mask)
    spec = None
    if tokenizer_model is None and cfg.data.tokenizer_model is None:
        logger.warning("the checkpoint's config names no data.tokenizer_model: the release has no tokenizer")
    elif tokenizer_model is None:
        spec = TokenizerSpec.of(cfg.data, kind=tokenizer_type)
        try:
            check_exists(spec)
        except ValueError as err:
            raise ValueError(f"the checkpoint's tokenizer does not load here: {err}; pass tokenizer_model "
                             f"(--tokenizer-model)") from None
    else:
        spec = TokenizerSpec.of(cfg.data, model=tokenizer_model, kind=tokenizer_type)
        check_exists(spec)
    p = cfg.parallel
    source = {
        "checkpoint": str(Path(ckpt_root).resolve()),
        "iteration": iteration,
        **record,
        "saved_layout": {"tensor_model_parallel_size": p.tensor_model_parallel_size,
                         "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                         "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size},
    }
    stream = (pair for name, t in iter_canonical_tensors(ckpt_root, iteration)
              for pair in to_hf(name, t, cfg.model))
    num = sum(math.prod(s) for s in canonical_shapes(cfg.model).values())
    card = CardInfo(name=model_name or cfg.release.model_name or Path(out_dir).resolve().name,
                    license=license or cfg.release.license, dtype=dtype, pmp=cfg.pmp.mode == "pmp",
                    steps=iteration, tokens=iteration * cfg.train.global_batch_size * cfg.model.seq_length,
                    num_parameters=num)
    out = write_release(stream, out_dir, cfg.model, dtype, source, tokenizer_model=spec,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite, owner_dir=owner, card=card)
    logger.info("released %s iteration %d (%d parameters, %s) to %s; owner files in %s", ckpt_root, iteration,
                num, dtype, out, owner)
    if mask is not None:
        model_cfg = dataclasses.replace(cfg.model, seed=seed)
        report = audit.audit_release(out, mask, model_cfg=model_cfg, warn_level=warn_level,
                                     init_attack=init_attack and seed is not None, owner_dir=owner)
        audit.write_report(report, owner / AUDIT_FILE)
    return out
