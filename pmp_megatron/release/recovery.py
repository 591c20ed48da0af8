"""Mask-recovery attackers: guess the private mask from the released weights alone.

The PMP complement (entries outside the mask) is never trained: it stays at ``W0`` (``complement:
frozen``), or at ``c * W0`` with one scalar ``c`` -- decoupled weight decay multiplies every entry by the
same ``1 - lr * wd`` each step and the projection rescales the whole complement by one factor. Four
attackers exploit this:

- ``recovery_global``: the entries with the largest ``|w|`` over the whole model (one exact global
  top-k, like the owner's Stage-I ranking) at density ``rho``. Works when the projection shrank the
  complement (~100x at 1.1B scale with R = 2).
- ``recovery_per_tensor``: the same top-k of ``|w|`` inside every tensor separately.
- ``recovery_init``: regenerate ``W0`` from the seed (``model.w0.w0_tensor``, mapped to HF names with
  ``release.hf_llama.to_hf``); per tensor fit ``c`` as the MODE of ``w / w0`` (the complement ratios all
  equal ``c`` up to rounding, trained entries spread out; a median would fail once rho > 0.5); the
  recovered mask is where ``|w - c w0| > tol |c w0|`` (``init_rule: threshold``; ``tol`` defaults to
  the release dtype's rounding: 1e-4 fp32, 1e-2 bf16, 2e-3 fp16), or the global top-k of that relative
  residual at density rho (``init_rule: topk``). A tensor without a ratio cluster (every entry trained)
  is recovered as all True.
- ``recovery_seed_guess``: ``recovery_init`` without being told the seed. It guesses W0 seeds
  ``0..seed_guesses`` plus every integer ``seed:`` of the shipped ``configs/`` recipes (the attacker has the
  repo), scores each guess by the correlation (Pearson, or of signs, whichever is larger) between a prefix
  of one released tensor (layer 0's ``o_proj``) and that seed's W0 draw of it, and runs ``recovery_init``
  with the best guess when its z-score (``sqrt(n) * correlation``) reaches ``SEED_FOUND_Z``. Otherwise
  the seed was not found and it knows nothing beyond the density: its mask is a uniformly random one at
  that density (IoU at chance). A secret 128-bit seed (the trainer's default) defeats it; a small public
  seed does not.

Density (for the |w| attackers): the suite's ``recovery.density`` (an attacker may assume the published
rho), else an estimate: Otsu's threshold on a sample of ``log10 |w|`` (the shrunk complement and the
trained entries form two modes; the estimate is the share above the valley). Without a shrunk
complement |w| is not bimodal and the estimate is unreliable -- then so is this attacker, by design.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from pmp_megatron.config import ModelConfig
from pmp_megatron.model.w0 import name_seed, w0_tensor
from pmp_megatron.release.hf_llama import canonical_shapes, to_hf
from pmp_megatron.resources import shipped

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
MIN_CLUSTER_FRACTION = 0.01  # a ratio cluster smaller than this is no complement
_FIT_SAMPLE = 1 << 20
DEFAULT_SEED_GUESSES = 10_000
SEED_FOUND_Z = 7.0  # a wrong seed's best z among ~1e4 guesses is ~4.5; P(z > 7) per guess ~1e-12
_PROBE = ("decoder.layers.0.self_attention.linear_proj.weight", "model.layers.0.self_attn.o_proj.weight")
_PROBE_MAX = 1 << 14
CONFIGS = shipped("configs")  # the recipes shipped with the package (checkout or wheel)


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of True entries over all tensors."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(1, total)


def overlap(pred: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per tensor, the (intersection, union) entry counts of two full masks with the same names and shapes
    (the sharded, distributed IoU of Stage I is ``pmp.select.iou``)."""
    if set(pred) != set(true):
        raise ValueError(f"masks differ in tensor names: {sorted(set(pred) ^ set(true))[:5]}")
    out = {}
    for name, p in pred.items():
        t = true[name].to(p.device)
        out[name] = (int((p & t).sum()), int((p | t).sum()))
    return out


def iou(pred: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> float:
    """Intersection over union of two masks over the whole model (same names and shapes)."""
    counts = overlap(pred, true).values()
    union = sum(u for _, u in counts)
    return sum(i for i, _ in counts) / union if union else 1.0


def kth_largest(tensors: Iterable[torch.Tensor], k: int) -> float:
    """The exact k-th largest ``|x|`` over all entries of ``tensors`` taken together (as float32).

    Non-negative float32 values order like their int32 bit patterns, so two histogram passes (high 16
    bits, then low 16 bits inside the chosen bin) find it with extra memory of one tensor at a time.
    """
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).abs().contiguous().view(torch.int32).reshape(-1)

    hi_counts = torch.zeros(1 << 15, dtype=torch.int64)
    for t in tensors:
        hi_counts += torch.bincount(bits(t) >> 16, minlength=1 << 15).cpu()
    from_top = hi_counts.flip(0).cumsum(0)  # [j] = count with high bits >= 32767 - j
    j = int(torch.searchsorted(from_top, torch.tensor([k])))
    hi = (1 << 15) - 1 - j
    above = int(from_top[j] - hi_counts[hi])
    lo_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors:
        b = bits(t)
        lo_counts += torch.bincount(b[(b >> 16) == hi] & 0xFFFF, minlength=1 << 16).cpu()
    jl = int(torch.searchsorted(lo_counts.flip(0).cumsum(0), torch.tensor([k - above])))
    value = (hi << 16) | ((1 << 16) - 1 - jl)
    return torch.tensor([value], dtype=torch.int32).view(torch.float32).item()


def _sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` evenly strided entries of ``t`` (deterministic), as fp32 on t's device."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= n:
        return flat.float()
    idx = torch.linspace(0, flat.numel() - 1, n, device=flat.device).long()
    return flat[idx].float()


def estimate_density(weights: Mapping[str, torch.Tensor], sample: int = _FIT_SAMPLE,
                     ignore_zeros: bool = False) -> float:
    """Otsu's two-class split of ``log10 |w|`` on a strided sample: the share of the upper class.
    ``ignore_zeros``: exact zeros (a score that carries no information) join the lower class without
    entering the split."""
    total = sum(w.numel() for w in weights.values())
    parts = [_sample(w, max(1, math.ceil(sample * w.numel() / total))).cpu() for w in weights.values()]
    x = torch.cat(parts).abs()
    nonzero = 1.0
    if ignore_zeros:
        nonzero = float((x > 0).float().mean())
        x = x[x > 0]
        if x.numel() == 0:
            return 0.0
    x = x.clamp_min(1e-30).log10()
    hist = torch.histc(x, bins=256, min=float(x.min()), max=float(x.max())).double()
    centers = torch.linspace(float(x.min()), float(x.max()), 257, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    p = hist / hist.sum()
    w_low = p.cumsum(0)
    mu_low = (p * centers).cumsum(0)
    between = (mu_low[-1] * w_low - mu_low) ** 2 / (w_low * (1 - w_low)).clamp_min(1e-12)
    cut = int(between[:-1].argmax())
    density = float(1.0 - w_low[cut]) * nonzero
    logger.info("estimated mask density %.4f (Otsu split of log10|w| at %.3f)", density, float(centers[cut]))
    return density


def recover_global(weights: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The exact global top-``density`` of ``|w|`` over every tensor."""
    total = sum(w.numel() for w in weights.values())
    k = max(1, min(total, round(density * total)))
    thr = kth_largest(weights.values(), k)
    return {n: w.detach().abs().float() >= thr for n, w in weights.items()}


def recover_per_tensor(weights: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The top-``density`` of ``|w|`` inside each tensor."""
    out = {}
    for n, w in weights.items():
        a = w.detach().abs().float().reshape(-1)
        k = max(1, min(a.numel(), round(density * a.numel())))
        thr = a.kthvalue(a.numel() - k + 1).values
        out[n] = (a >= thr).reshape(w.shape)
    return out


def iter_w0(model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, W0) of every release tensor, regenerated from ``model_cfg.seed`` one at a time."""
    if model_cfg.seed is None:
        raise ValueError("regenerating W0 needs the init seed (model.seed is None)")
    for name, shape in canonical_shapes(model_cfg).items():
        yield from to_hf(name, w0_tensor(name, shape, model_cfg.seed, model_cfg.init_method_std), model_cfg)


def fit_scale(w: torch.Tensor, w0: torch.Tensor, tolerance: float) -> tuple[float, float]:
    """The complement scale ``c`` (mode of ``w / w0``) and the share of entries in that mode's cluster.

    The cluster is the densest window ``[r, r + tolerance |r|]`` of the sorted ratios; ``c`` is its
    median. Returns ``(nan, share)`` when the densest cluster holds under ``MIN_CLUSTER_FRACTION``.
    """
    w_s, w0_s = _sample(w, _FIT_SAMPLE), _sample(w0.to(w.device), _FIT_SAMPLE)
    keep = w0_s != 0
    r = (w_s[keep] / w0_s[keep]).sort().values
    if r.numel() == 0:
        return float("nan"), 0.0
    ends = torch.searchsorted(r, r + tolerance * r.abs() + 1e-30, right=True)
    counts = ends - torch.arange(r.numel(), device=r.device)
    i = int(counts.argmax())
    share = float(counts[i]) / r.numel()
    if share < MIN_CLUSTER_FRACTION:
        return float("nan"), share
    return float(r[i: int(ends[i])].median()), share


def recover_init(weights: Mapping[str, torch.Tensor], w0: Iterable[tuple[str, torch.Tensor]],
                 tolerance: float, rule: str = "threshold",
                 density: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Init-regeneration recovery; returns (masks, info with the per-tensor scales ``c``)."""
    masks: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name, w0_t in w0:
        if name not in weights:
            raise ValueError(f"regenerated W0 tensor {name!r} is not a parameter of the release "
                             f"(wrong --model-config?)")
        w = weights[name].detach().float()
        if tuple(w0_t.shape) != tuple(w.shape):
            raise ValueError(f"regenerated W0 of {name!r} has shape {tuple(w0_t.shape)}, the release "
                             f"{tuple(w.shape)} (wrong --model-config?)")
        w0_t = w0_t.to(w.device)
        c, _ = fit_scale(w, w0_t, tolerance)
        scales[name] = c
        if math.isnan(c):
            score = torch.full_like(w, float("inf"))
        else:
            score = (w - c * w0_t).abs() / (c * w0_t).abs()  # 0/0 -> nan: never moved
            score = torch.nan_to_num(score, nan=0.0)
        masks[name] = score > tolerance
        if rule == "topk":
            scores[name] = score
    missing = sorted(set(weights) - set(masks))
    if missing:
        raise ValueError(f"release tensors without a regenerated W0: {missing[:5]} (wrong --model-config?)")
    if rule == "topk":
        total = sum(s.numel() for s in scores.values())
        d = mask_density(masks) if density is None else density
        k = max(1, min(total, round(d * total)))
        thr = kth_largest((s.clamp_max(torch.finfo(torch.float32).max) for s in scores.values()), k)
        masks = {n: (s >= thr) if thr > 0 else (s > 0) for n, s in scores.items()}  # never select ties at 0
    elif rule != "threshold":
        raise ValueError(f"unknown init_rule {rule!r}; known: threshold, topk")
    finite = [c for c in scales.values() if not math.isnan(c)]
    info = {"scale_median": float(torch.tensor(finite).median()) if finite else float("nan"),
            "num_unfit_tensors": len(scales) - len(finite)}
    return masks, info


def config_seeds(configs_dir: str | Path | None = None) -> list[int]:
    """Every integer ``seed:`` value (at any depth) of the YAML recipes under ``configs_dir`` (default: the
    shipped ``configs/``; none when it is absent) -- the seeds an attacker with the repo tries first."""
    import yaml

    root = Path(CONFIGS if configs_dir is None else configs_dir)
    found: set[int] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "seed" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        try:
            walk(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
    return sorted(found)


def seed_candidates(num_guesses: int = DEFAULT_SEED_GUESSES,
                    configs_dir: str | Path | None = None) -> list[int]:
    """``0..num_guesses`` and the recipes' seeds, each once."""
    return list(dict.fromkeys([*range(num_guesses + 1), *config_seeds(configs_dir)]))


def probe_length(numel: int, limit: int = _PROBE_MAX) -> int:
    """How many leading entries of a W0 draw of ``numel`` entries a draw of only that many reproduces:
    torch fills normals 16 at a time and redraws the last 16 of a length that is no multiple of 16."""
    usable = numel if numel % 16 == 0 else numel - 16
    return max(0, min(limit, usable // 16 * 16))


def probe_w0(seed: int, name: str, n: int) -> torch.Tensor:
    """The first ``n`` entries (``probe_length``) of the flattened W0 of canonical ``name`` (unit std)."""
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(n).normal_(0.0, 1.0, generator=gen)


def guess_seed(weights: Mapping[str, torch.Tensor], candidates: Iterable[int], batch: int = 256) -> dict:
    """Score every candidate W0 seed against the released probe tensor; return the best guess:
    ``{"seed", "z", "num_guesses"}`` (``z``: the correlation times sqrt(probe length))."""
    canonical, hf = _PROBE
    if hf not in weights:
        raise ValueError(f"the seed-guessing attacker needs the release tensor {hf!r}")
    w = weights[hf].detach().reshape(-1).float().cpu()
    n = probe_length(w.numel())
    if n < 256:
        raise ValueError(f"release tensor {hf!r} is too small ({w.numel()} entries) to score seed guesses")
    w = w[:n]
    w_centred = (w - w.mean()) / ((w - w.mean()).norm() + 1e-30)  # [n]
    w_sign = w.sign()  # [n]
    draws = torch.empty(batch, n)  # [batch, n]
    best = {"seed": None, "z": -math.inf, "num_guesses": 0}
    chunk: list[int] = []

    def score() -> None:
        x = draws[: len(chunk)]
        x_centred = x - x.mean(dim=1, keepdim=True)
        pearson = (x_centred @ w_centred) / (x_centred.norm(dim=1) + 1e-30)  # [len(chunk)]
        signs = (x.sign() @ w_sign) / n
        z = math.sqrt(n) * torch.maximum(pearson, signs)
        i = int(z.argmax())
        if float(z[i]) > best["z"]:
            best.update(seed=chunk[i], z=float(z[i]))
        best["num_guesses"] += len(chunk)
        chunk.clear()

    for seed in candidates:
        gen = torch.Generator().manual_seed(name_seed(seed, canonical))
        draws[len(chunk)].normal_(0.0, 1.0, generator=gen)  # == probe_w0(seed, canonical, n)
        chunk.append(seed)
        if len(chunk) == batch:
            score()
    if chunk:
        score()
    return best


def random_mask(weights: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """A uniformly random mask at ``density`` (what an attacker who knows only the density can do), drawn
    from a generator seeded by the release's own bytes (deterministic, and independent of any seed of
    ours)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    gen = torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") >> 1)
    return {n: (torch.rand(w.shape, generator=gen) < density).to(w.device) for n, w in weights.items()}


def recover_seed_guess(weights: Mapping[str, torch.Tensor], model_cfg: ModelConfig, tolerance: float,
                       rule: str = "threshold", density: float | None = None,
                       candidates: Iterable[int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Guess the W0 seed (``guess_seed``), then ``recover_init`` with it; a random mask at ``density``
    (estimated when None) when no guess is significant. ``model_cfg`` gives W0's shapes and std (its seed
    is ignored). Info: ``seed_found``, ``seed_z``, ``num_guesses`` -- never the seed."""
    guess = guess_seed(weights, seed_candidates() if candidates is None else candidates)
    info = {"seed_found": guess["z"] >= SEED_FOUND_Z, "seed_z": guess["z"],
            "num_guesses": guess["num_guesses"]}
    logger.info("seed guessing: best of %d guesses has z %.1f (found at z >= %.0f: %s)",
                guess["num_guesses"], guess["z"], SEED_FOUND_Z, info["seed_found"])
    if info["seed_found"]:
        w0 = iter_w0(dataclasses.replace(model_cfg, seed=guess["seed"]))
        masks, init_info = recover_init(weights, w0, tolerance, rule, density)
        return masks, {**init_info, **info}
    if density is None:
        density = estimate_density(weights)
        info["density_estimate"] = density
    return random_mask(weights, density), info


def recover(attacker: str, weights: Mapping[str, torch.Tensor], density: float | None = None,
            w0: Iterable[tuple[str, torch.Tensor]] | None = None, release_dtype: str = "float32",
            init_rule: str = "threshold", init_tolerance: float | None = None,
            model_cfg: ModelConfig | None = None, candidates: Iterable[int] | None = None
            ) -> tuple[dict, dict]:
    """Run one recovery attacker; returns (HF name -> bool mask, info). ``recovery_init`` needs ``w0``;
    ``recovery_seed_guess`` needs ``model_cfg`` (the release's architecture and init std)."""
    info: dict = {}
    tol = init_tolerance if init_tolerance is not None else DEFAULT_TOLERANCE.get(release_dtype, 1e-2)
    if attacker == "recovery_init":
        if w0 is None:
            raise ValueError("recovery_init needs the regenerated W0 (the init seed and model config)")
        masks, info = recover_init(weights, w0, tol, init_rule, density)
        info["tolerance"] = tol
    elif attacker == "recovery_seed_guess":
        if model_cfg is None:
            raise ValueError("recovery_seed_guess needs the release's model config (shapes, init std)")
        masks, info = recover_seed_guess(weights, model_cfg, tol, init_rule, density, candidates)
        info["tolerance"] = tol
    elif attacker in ("recovery_global", "recovery_per_tensor"):
        if density is None:
            density = estimate_density(weights)
            info["density_estimate"] = density
        fn = recover_global if attacker == "recovery_global" else recover_per_tensor
        masks = fn(weights, density)
    else:
        raise ValueError(f"{attacker!r} is not a recovery attacker")
    info["recovered_density"] = mask_density(masks)
    return masks, info
