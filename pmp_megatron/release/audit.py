"""Leakage audit of a release: how much of the private mask can an attacker recover from the weights alone?

The owner runs the mask-recovery attackers of ``release.recovery`` on the released tensors and scores each
recovered mask against the true one (the private key file) by intersection over union, per tensor type
(embed, q, k, v, o, gate, up, down, norms, lm_head) and over the whole model:

- ``recovery_global``: global top-|w| at the mask's density (the attacker is assumed to know rho);
- ``recovery_per_tensor``: the same inside every tensor;
- ``recovery_init``: regenerate W0 from the init seed and find the entries that left ``c * W0``; the seed
  is the KEY's (a v2 key holds it), or one given explicitly for a v1 key -- never a default;
- ``recovery_seed_guess``: the same without the seed: guess it among small integers and the repo's recipe
  seeds (a secret 128-bit seed defeats it);
- ``recovery_gradient`` and ``recovery_stage1`` (``release.adaptive_recovery``): adaptive attackers that
  run the release (gradient stationarity over the attacker's own batches) or Stage I from the attacker's
  own init. They cost forward/backward passes, so they run only when asked: ``audit_release(...,
  adaptive=AdaptiveAudit())`` (its fields set the batch counts, small by default; ``AdaptiveAudit(
  attackers=("recovery_gradient",))`` runs one) or ``audit(..., extra_attackers=...)``. The report's
  ``adaptive`` says whether they ran.

A random guess at density ``d`` scores ``d / (2 - d)`` (the ``chance_iou`` of the report). An overall IoU
above ``warn_level`` (default 0.5) logs a loud WARNING: the release gives the mask away, and with it the
protection (an attacker fine-tunes only the recovered entries, like the authorized owner).

The audit refuses a key that does not fit the release: other tensor names or shapes, a W0 seed whose
fingerprint differs from the one the owner's release manifest recorded, or a release the manifest says is
dense. The report holds numbers only -- never the mask, its path, its hash or the seed -- and is written to
the OWNER's directory (``release_audit.json`` beside ``release_manifest.json``), not into the release.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from pmp_megatron.config import ModelConfig
from pmp_megatron.release import adaptive_recovery, reader, recovery
from pmp_megatron.release.hf_llama import check_architecture, model_config_from_hf

logger = logging.getLogger(__name__)

TENSOR_TYPES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norms", "lm_head")
_SUFFIX_TYPES = (("embed_tokens.weight", "embed"), ("q_proj.weight", "q"), ("k_proj.weight", "k"),
                 ("v_proj.weight", "v"), ("o_proj.weight", "o"), ("gate_proj.weight", "gate"),
                 ("up_proj.weight", "up"), ("down_proj.weight", "down"), ("layernorm.weight", "norms"),
                 ("model.norm.weight", "norms"), ("lm_head.weight", "lm_head"))
DEFAULT_WARN_LEVEL = 0.5
# What W0 depends on besides the seed (``model.w0``): the parameter shapes and the init std.
_W0_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "vocab_size", "untie_embeddings", "init_method_std")


def tensor_type(hf_name: str) -> str:
    """The audit's tensor type of an HF Llama parameter name."""
    for suffix, kind in _SUFFIX_TYPES:
        if hf_name.endswith(suffix):
            return kind
    raise ValueError(f"tensor {hf_name!r} is not a parameter of the HF Llama model")


def check_mask_names(masks: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                     what: str = "mask file") -> None:
    """ValueError unless ``masks`` has exactly the release's tensor names (``shapes``: HF name -> shape),
    with the same shapes."""
    missing, extra = sorted(set(shapes) - set(masks)), sorted(set(masks) - set(shapes))
    if missing or extra:
        raise ValueError(f"{what} does not match the release names: missing {missing[:5]}, not in the "
                         f"release {extra[:5]} (a mask of another model?)")
    for name, shape in shapes.items():
        if tuple(masks[name].shape) != tuple(shape):
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(masks[name].shape)}, the release "
                             f"{tuple(shape)}")


def weight_shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of loaded tensors (or a model's ``named_parameters``), for ``check_mask_names``."""
    return {n: tuple(w.shape) for n, w in weights.items()}


def iou_by_type(pred: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """IoU of a recovered mask against the true one per tensor type (types present) and ``overall``."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for name, (i, u) in recovery.overlap(pred, true).items():
        kind = tensor_type(name)
        inter[kind] = inter.get(kind, 0) + i
        union[kind] = union.get(kind, 0) + u
    out = {k: inter[k] / union[k] if union[k] else 1.0 for k in TENSOR_TYPES if k in inter}
    total = sum(union.values())
    out["overall"] = sum(inter.values()) / total if total else 1.0
    return out


def density_by_type(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of True entries per tensor type (types present) and ``overall``."""
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, m in masks.items():
        kind = tensor_type(name)
        kept[kind] = kept.get(kind, 0) + int(m.sum())
        total[kind] = total.get(kind, 0) + m.numel()
    out = {k: kept[k] / total[k] for k in TENSOR_TYPES if k in kept}
    out["overall"] = recovery.mask_density(masks)
    return out


def chance_iou(density: float) -> float:
    """Expected IoU of a uniformly random guess at ``density`` against a true mask of that density."""
    return density / (2.0 - density) if density > 0 else 0.0


def audit(weights: Mapping[str, torch.Tensor], true_masks: Mapping[str, torch.Tensor],
          w0: Iterable[tuple[str, torch.Tensor]] | None = None, release_dtype: str = "float32",
          warn_level: float = DEFAULT_WARN_LEVEL, model_cfg: ModelConfig | None = None,
          seed_guesses: int = recovery.DEFAULT_SEED_GUESSES,
          extra_attackers: Mapping[str, Callable[[], tuple[dict, dict]]] | None = None) -> dict:
    """Run the recovery attackers on ``weights`` (HF name -> tensor) and score them against
    ``true_masks``; ``w0`` (HF name, W0) pairs enable the init-regeneration attacker, ``model_cfg`` (W0's
    shapes and std) the seed-guessing one (``seed_guesses`` small seeds). ``extra_attackers``: name -> a
    call returning ``(masks, info)`` like ``recovery.recover`` (the adaptive attackers), scored alike, one
    at a time. Returns the report."""
    check_mask_names(true_masks, weight_shapes(weights))
    true = {n: m.to(torch.bool) for n, m in true_masks.items()}
    density = recovery.mask_density(true)
    runs: dict[str, Callable[[], tuple[dict, dict]]] = {}
    for name in ("recovery_global", "recovery_per_tensor", "recovery_init", "recovery_seed_guess"):
        if (name == "recovery_init" and w0 is None) or (name == "recovery_seed_guess" and model_cfg is None):
            continue
        candidates = recovery.seed_candidates(seed_guesses) if name == "recovery_seed_guess" else None
        runs[name] = functools.partial(recovery.recover, name, weights, density=density, w0=w0,
                                       release_dtype=release_dtype, model_cfg=model_cfg,
                                       candidates=candidates)
    runs.update(extra_attackers or {})
    attackers: dict[str, dict] = {}
    for name, run in runs.items():
        recovered, info = run()
        check_mask_names(recovered, weight_shapes(weights), f"the mask of attacker {name}")
        attackers[name] = {"iou": iou_by_type(recovered, true),
                           **{k: v for k, v in info.items() if isinstance(v, int | float)}}
        del recovered
    worst = max(attackers, key=lambda a: attackers[a]["iou"]["overall"])
    max_iou = attackers[worst]["iou"]["overall"]
    report = {
        "mask_density": density,
        "mask_density_by_type": density_by_type(true),
        "chance_iou": chance_iou(density),
        "num_parameters": sum(w.numel() for w in weights.values()),
        "release_dtype": release_dtype,
        "attackers": attackers,
        "max_iou": max_iou,
        "max_iou_attacker": worst,
        "warn_level": warn_level,
        "warning": None,
        "adaptive": any(name in adaptive_recovery.ADAPTIVE_ATTACKERS for name in attackers),
    }
    if max_iou > warn_level:
        report["warning"] = (f"MASK LEAK: attacker {worst} recovers the private mask from the release alone "
                             f"with IoU {max_iou:.3f} > warn level {warn_level} (chance: "
                             f"{report['chance_iou']:.3f}); fine-tuning resistance cannot be relied on")
        logger.warning("!" * 20 + " %s " + "!" * 20, report["warning"])
    else:
        logger.info("release audit: best mask recovery IoU %.3f (%s), chance %.3f, warn level %.2f",
                    max_iou, worst, report["chance_iou"], warn_level)
    return report


def read_owner_manifest(model_dir: str | Path, owner_dir: str | Path | None = None) -> dict | None:
    """The owner's ``release_manifest.json`` of the release in ``model_dir`` (in ``owner_dir``, default the
    sibling ``<release>.owner``); None when the default has none. ValueError when a given ``owner_dir``
    has none, or when the manifest's file hashes are not the release's (it describes another release)."""
    from pmp_megatron.release.writer import MANIFEST, default_owner_dir, file_sha256

    path = (default_owner_dir(model_dir) if owner_dir is None else Path(owner_dir)) / MANIFEST
    if not path.is_file():
        if owner_dir is not None:
            raise ValueError(f"owner directory {str(owner_dir)!r} has no {MANIFEST}")
        return None
    manifest = json.loads(path.read_text())
    for name, digest in manifest.get("files", {}).items():
        if name == "config.json" or name.endswith(".safetensors"):
            target = Path(model_dir) / name
            if not target.is_file() or file_sha256(target) != digest:
                raise ValueError(f"owner manifest {str(path)!r} does not describe the release in "
                                 f"{str(model_dir)!r} ({name} differs): pass the release's owner directory")
    return manifest


def check_key_fits(meta: Mapping, source: Mapping, what: str) -> None:
    """ValueError when the owner's record ``source`` (a release manifest's, or a checkpoint's common state
    in the same spelling) says the key ``meta`` cannot belong to it: a dense run, or another W0 seed."""
    from pmp_megatron.pmp import maskfile

    if source.get("pmp_mode") == "dense" or source.get("has_masks") is False:
        raise ValueError(f"{what} is a dense run (pmp.mode=dense, no masks): no mask file belongs to it")
    recorded = source.get("w0_seed_sha256")
    if recorded is not None and meta.get("w0_seed") is not None \
            and maskfile.seed_fingerprint(meta["w0_seed"]) != recorded:
        raise ValueError(f"the mask file is the key of another run: its W0 seed is not the one of {what}")


def audit_release(model_dir: str | Path, mask_path: str | Path, model_cfg: ModelConfig | None = None,
                  warn_level: float = DEFAULT_WARN_LEVEL, init_attack: bool = True,
                  owner_dir: str | Path | None = None,
                  seed_guesses: int = recovery.DEFAULT_SEED_GUESSES,
                  adaptive: adaptive_recovery.AdaptiveAudit | None = None) -> dict:
    """Audit the release in ``model_dir`` against the private key file ``mask_path``.

    The init-regeneration attacker uses the key's W0 seed (``init_attack``); a ``model_cfg`` gives W0's
    architecture and std (default: from config.json) and, for a v1 key without a seed, the seed in ``seed``
    (a seed that contradicts the key's is refused). The owner's release manifest (``owner_dir``, default
    ``<release>.owner``) is checked against the key when present (``check_key_fits``). ``adaptive``
    also runs the adaptive attackers it names (None: skipped; they run the model on the attacker's data).
    """
    from pmp_megatron.pmp import maskfile

    if not Path(mask_path).is_file():
        raise ValueError(f"mask file {str(mask_path)!r} does not exist")
    manifest = read_owner_manifest(model_dir, owner_dir)
    weights, hf_cfg = reader.read_weights(model_dir)
    true, meta = maskfile.load(mask_path)
    check_mask_names(true, weight_shapes(weights), f"mask file {str(mask_path)!r}")
    if manifest is not None:
        check_key_fits(meta, manifest.get("source", {}), f"the release in {str(model_dir)!r}")
    given = None if model_cfg is None else model_cfg.seed
    if given is not None and meta["w0_seed"] is not None and given != meta["w0_seed"]:
        raise ValueError(f"the given init seed is not the W0 seed in mask file {str(mask_path)!r}: drop it "
                         f"(the key's seed is used)")
    seed = meta["w0_seed"] if meta["w0_seed"] is not None else given
    arch = model_cfg if model_cfg is not None else model_config_for_audit(model_dir, None)
    w0 = None
    if init_attack and seed is not None:
        w0 = recovery.iter_w0(dataclasses.replace(arch, seed=seed))
    elif init_attack:
        logger.warning("mask file %s holds no W0 seed (a v1 key) and none was given: the init-regeneration "
                       "attacker does not run", mask_path)
    extra = None
    if adaptive is not None:
        extra = adaptive_recovery.run_for_audit(model_dir, adaptive, recovery.mask_density(true))
    report = audit(weights, true, w0=w0, release_dtype=reader.release_dtype(hf_cfg), warn_level=warn_level,
                   model_cfg=arch, seed_guesses=seed_guesses, extra_attackers=extra)
    report["rho"] = meta["rho"]
    report["init_seed_known"] = w0 is not None
    return report


def model_config_for_audit(model_dir: str | Path, seed: int | None,
                           model_config: str | Path | None = None) -> ModelConfig:
    """The init config of a release for ``recovery_init`` (the audit's and the attack suite's): the model
    section of ``model_config`` (a YAML recipe, whose architecture must be the release's) if given, else
    what W0 depends on from the release's config.json -- shapes, tying, init std = ``initializer_range``
    -- with the other fields at their defaults (the config enters attack cell ids: W0's alone); ``seed``
    is the init seed (None: the architecture alone, for the seed-guessing attacker)."""
    hf = model_config_from_hf(reader.read_config(model_dir))
    if model_config is None:
        return ModelConfig(**{f: getattr(hf, f) for f in _W0_FIELDS}, seed=seed)
    from pmp_megatron.config import config_from_dict, load_yaml

    section = load_yaml(model_config).get("model", {})  # only the model section matters here
    model = config_from_dict({"model": section, "pmp": {"mode": "dense"}}).model
    check_architecture(model, hf, f"--model-config {model_config}:")
    return dataclasses.replace(model, seed=seed)


def markdown_table(report: Mapping) -> str:
    """The report as a markdown table: one row per attacker, IoU per tensor type and overall (a type the
    true mask leaves out entirely scores 0 against any non-empty guess), after the true mask's density."""
    kinds = [k for k in TENSOR_TYPES if any(k in a["iou"] for a in report["attackers"].values())]
    cols = ["attacker", "overall", *kinds, "recovered density"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    dens = report["mask_density_by_type"]
    lines.append("| (true mask density) | " + " | ".join(f"{dens[k]:.4f}" if k in dens else "-"
                                                         for k in ("overall", *kinds)) + " | |")
    for name, a in report["attackers"].items():
        cells = [name, f"{a['iou']['overall']:.4f}", *(f"{a['iou'][k]:.4f}" if k in a["iou"] else "-"
                                                       for k in kinds), f"{a['recovered_density']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mask density {report['mask_density']:.4f}; a random guess scores IoU "
                 f"{report['chance_iou']:.4f}; warn level {report['warn_level']}")
    if report.get("warning"):
        lines.append(f"WARNING: {report['warning']}")
    return "\n".join(lines)


def write_report(report: Mapping, path: str | Path) -> Path:
    """Write the report (numbers only, no mask) as JSON, atomically, mode 0600 (it belongs to the owner)."""
    from pmp_megatron.atomic import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n", mode=0o600)
    return path
