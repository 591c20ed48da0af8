"""Per-cell statistics over seeds for the attack report: intervals, paired differences, ratios, the
defender's worst case, and the headline statistics of attack evaluation v2.

Inputs are plain: lists of per-seed scores (position ``i`` of every list is seed ``i``: the same attack
data order, so differences between models are PAIRED by seed), grouped by adversary
(``{label: [score per seed]}``) and by model role. ``group_records`` builds them from the runner's
result records.

Intervals (all two-sided, default 95 %):

- ``mean_interval``: Student t over ``n`` seeds: ``mean +- t(1 - a/2, n - 1) * sd / sqrt(n)`` (``sd``
  with ``n - 1``). One seed gives an unbounded interval (nothing is known about the spread).
- ``difference_interval``: paired (default): the t interval of the per-seed differences; unpaired:
  Welch's t with Welch-Satterthwaite degrees of freedom.
- ``ratio_interval``: Fieller's interval for ``mean(num) / mean(den)`` with the covariance of the
  per-seed pairs, ``n - 1`` degrees of freedom. Unbounded when the denominator's own interval reaches 0
  (the ratio is then not bounded at that confidence).
- ``budget_to_threshold``: the t interval of the per-seed attack tokens (low clipped at 0); a seed that
  never reaches the threshold counts with the tokens it ran (a lower bound) and makes the high end
  unbounded, so censoring can only understate the budget, never overstate it.

The t quantile is computed here (regularized incomplete beta + bisection; no scipy at run time) and
checked against ``scipy.stats.t`` in the tests.

Orientation: every score comes with ``higher_is_better``. Differences and gains are ORIENTED: > 0 means
the first model is better on the metric (accuracy up, or loss down). So ``final_vs_dense`` > 0 means the
attack took the PMP release further than the dense one, whatever the metric.

The defender's worst case: for each model and budget the attacker picks the adversary (learning rate,
optimizer, ...) with the best MEAN over seeds, and that adversary's per-seed scores carry on into every
statistic. Picking the max of several noisy means favours the attacker (winner's curse): conservative
for a resistance claim.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95

STATISTICS: dict[str, str] = {
    "final_vs_dense": "best-attack score on PMP minus best-attack score on the dense release "
                      "(oriented, paired)",
    "final_vs_dense_matched": "best-attack score on PMP minus on the dense model with a matched start "
                              "(oriented, paired)",
    "final_vs_scratch": "best-attack score on PMP minus training from scratch with the same budget "
                        "(oriented, paired)",
    "gain_vs_dense_matched": "PMP's best keyless gain minus the dense-matched best gain (oriented, paired)",
    "budget_to_threshold": "attack tokens for the best keyless adversary on PMP to reach the dense "
                           "release's un-attacked score (censored seeds: lower bound, high end unbounded)",
    "key_advantage": "best authorized score minus best keyless score on PMP (oriented, paired)",
    "trainability": "authorized gain / dense-matched gain (ratio of means, Fieller)",
}

ROLES = ("pmp", "authorized", "dense", "dense_matched", "scratch")


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval over ``n`` seeds."""

    estimate: float  # nan when undefined (e.g. a ratio with a zero mean denominator)
    low: float  # -inf when unbounded
    high: float  # +inf when unbounded
    n: int  # seeds
    method: str  # t | paired-t | welch-t | fieller | t-censored
    confidence: float = CONFIDENCE
    censored: int = 0  # budget_to_threshold: seeds that never reached the threshold

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def to_dict(self) -> dict:
        """JSON-safe: infinite or nan values become None."""
        def clean(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high),
                "n": self.n, "method": self.method, "confidence": self.confidence,
                "censored": self.censored}


@dataclass(frozen=True)
class BestAttack:
    """The adversary an attacker picks for one model and budget, and its per-seed scores."""

    adversary: str
    scores: tuple[float, ...]
    interval: Interval


# ----------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- intervals


def _floats(values: Iterable[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what}: no values")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite values {bad}")
    return out


def _mean_var(x: list[float]) -> tuple[float, float]:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / (len(x) - 1) if len(x) > 1 else math.nan
    return mean, var


def _critical(confidence: float, df: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return t_quantile(0.5 + confidence / 2.0, df)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, method: str = "t") -> Interval:
    """Mean over seeds with its Student t interval (unbounded for one seed)."""
    x = _floats(values, "mean_interval")
    mean, var = _mean_var(x)
    if len(x) < 2:
        return Interval(mean, -math.inf, math.inf, 1, method, confidence)
    half = _critical(confidence, len(x) - 1) * math.sqrt(var / len(x))
    return Interval(mean, mean - half, mean + half, len(x), method, confidence)


def difference_interval(a: Sequence[float], b: Sequence[float], paired: bool = True,
                        confidence: float = CONFIDENCE) -> Interval:
    """``mean(a) - mean(b)``: paired t over per-seed differences, or Welch's t when ``paired=False``."""
    a, b = _floats(a, "difference_interval a"), _floats(b, "difference_interval b")
    if paired:
        if len(a) != len(b):
            raise ValueError(f"a paired difference needs one value per seed on both sides, got {len(a)} "
                             f"and {len(b)}")
        return mean_interval([x - y for x, y in zip(a, b, strict=True)], confidence, "paired-t")
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    n = min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Interval(ma - mb, -math.inf, math.inf, n, "welch-t", confidence)
    sa, sb = va / len(a), vb / len(b)
    se2 = sa + sb
    if se2 == 0.0:
        return Interval(ma - mb, ma - mb, ma - mb, n, "welch-t", confidence)
    df = se2 ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
    half = _critical(confidence, df) * math.sqrt(se2)
    return Interval(ma - mb, ma - mb - half, ma - mb + half, n, "welch-t", confidence)


def ratio_interval(num: Sequence[float], den: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Fieller's interval for ``mean(num) / mean(den)`` from per-seed PAIRS (their covariance counts).

    The set of ratios r with ``(mean(num) - r mean(den))^2 <= t^2 var(mean(num) - r mean(den))``: bounded
    when the denominator differs from 0 at this confidence (``mean(den)^2 > t^2 var(mean(den))``),
    otherwise (-inf, inf).
    """
    x, y = _floats(num, "ratio_interval num"), _floats(den, "ratio_interval den")
    if len(x) != len(y):
        raise ValueError(f"a ratio interval needs one (num, den) pair per seed, got {len(x)} and {len(y)}")
    n = len(x)
    (a, vx), (b, vy) = _mean_var(x), _mean_var(y)
    estimate = a / b if b != 0 else math.nan
    if n < 2:
        return Interval(estimate, -math.inf, math.inf, n, "fieller", confidence)
    cov = sum((u - a) * (v - b) for u, v in zip(x, y, strict=True)) / (n - 1)
    v11, v22, v12 = vx / n, vy / n, cov / n
    t2 = _critical(confidence, n - 1) ** 2
    qa = b * b - t2 * v22
    if qa <= 0:
        return Interval(estimate, -math.inf, math.inf, n, "fieller", confidence)
    qb = a * b - t2 * v12
    disc = max(qb * qb - qa * (a * a - t2 * v11), 0.0)
    root = math.sqrt(disc)
    return Interval(estimate, (qb - root) / qa, (qb + root) / qa, n, "fieller", confidence)


# ----------------------------------------------------------------------------- scores and gains


def oriented(delta: float, higher_is_better: bool) -> float:
    """A difference in the metric's sense: > 0 means better."""
    return delta if higher_is_better else -delta


def gains(before: Sequence[float], after: Sequence[float], higher_is_better: bool) -> list[float]:
    """Per-seed oriented gains (> 0: the attack improved the model on the metric)."""
    if len(before) != len(after):
        raise ValueError(f"gains need one before and one after value per seed, got {len(before)} and "
                         f"{len(after)}")
    return [oriented(y - x, higher_is_better) for x, y in zip(before, after, strict=True)]


def best_attack(per_adversary: Mapping[str, Sequence[float]], higher_is_better: bool,
                confidence: float = CONFIDENCE) -> BestAttack:
    """The defender's worst case: the adversary with the best mean score (ties: first label in sorted
    order), with its own interval."""
    if not per_adversary:
        raise ValueError("best_attack: no adversaries")
    best = None
    for label in sorted(per_adversary):
        scores = tuple(_floats(per_adversary[label], f"best_attack {label!r}"))
        key = oriented(sum(scores) / len(scores), higher_is_better)
        if best is None or key > best[0]:
            best = (key, label, scores)
    _, label, scores = best
    return BestAttack(label, scores, mean_interval(scores, confidence))


def _oriented_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool,
                         confidence: float) -> Interval:
    return difference_interval([oriented(v, higher_is_better) for v in a],
                               [oriented(v, higher_is_better) for v in b], True, confidence)


def final_score_difference(pmp: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]],
                           higher_is_better: bool, confidence: float = CONFIDENCE) -> Interval:
    """Best attack on PMP minus best attack on ``reference`` (oriented, paired by seed)."""
    return _oriented_difference(best_attack(pmp, higher_is_better).scores,
                                best_attack(reference, higher_is_better).scores, higher_is_better, confidence)


def gain_difference(pmp_before: Sequence[float], pmp_after: Mapping[str, Sequence[float]],
                    ref_before: Sequence[float], ref_after: Mapping[str, Sequence[float]],
                    higher_is_better: bool, confidence: float = CONFIDENCE) -> Interval:
    """Best gain on PMP minus best gain on the reference (e.g. dense-matched), paired by seed."""
    pmp = gains(pmp_before, best_attack(pmp_after, higher_is_better).scores, higher_is_better)
    ref = gains(ref_before, best_attack(ref_after, higher_is_better).scores, higher_is_better)
    return difference_interval(pmp, ref, True, confidence)


def key_advantage(authorized: Mapping[str, Sequence[float]], keyless: Mapping[str, Sequence[float]],
                  higher_is_better: bool, confidence: float = CONFIDENCE) -> Interval:
    """Best authorized score minus best keyless score on the PMP release (oriented, paired)."""
    return final_score_difference(authorized, keyless, higher_is_better, confidence)


def trainability(pmp_before: Sequence[float], authorized: Mapping[str, Sequence[float]],
                 ref_before: Sequence[float], ref_after: Mapping[str, Sequence[float]],
                 higher_is_better: bool, confidence: float = CONFIDENCE) -> Interval:
    """Authorized gain / dense-matched gain (best adversary each), Fieller over per-seed pairs."""
    auth = gains(pmp_before, best_attack(authorized, higher_is_better).scores, higher_is_better)
    ref = gains(ref_before, best_attack(ref_after, higher_is_better).scores, higher_is_better)
    return ratio_interval(auth, ref, confidence)


# ----------------------------------------------------------------------------- budget to threshold

Curve = Sequence[tuple[float, float]]  # (attack tokens, score), tokens ascending


def tokens_to_threshold(curve: Curve, threshold: float, higher_is_better: bool) -> float | None:
    """Attack tokens at which ``curve`` first reaches ``threshold`` (linear interpolation between the two
    points around the crossing); None when it never does."""
    points = sorted((float(t), float(s)) for t, s in curve)
    if not points:
        raise ValueError("tokens_to_threshold: empty curve")
    margin = [oriented(s - threshold, higher_is_better) for _, s in points]  # >= 0: reached
    if margin[0] >= 0:
        return points[0][0]
    for i in range(1, len(points)):
        if margin[i] >= 0:
            (t0, _), (t1, _) = points[i - 1], points[i]
            return t0 + (t1 - t0) * (-margin[i - 1]) / (margin[i] - margin[i - 1])
    return None


def budget_interval(curves: Sequence[Curve], threshold: float, higher_is_better: bool,
                    confidence: float = CONFIDENCE) -> Interval:
    """Tokens to reach ``threshold`` over seeds (one curve per seed); see the module docstring."""
    values, censored = [], 0
    for curve in curves:
        tokens = tokens_to_threshold(curve, threshold, higher_is_better)
        if tokens is None:
            censored += 1
            tokens = max(float(t) for t, _ in curve)
        values.append(tokens)
    base = mean_interval(values, confidence)
    if not censored:
        return Interval(base.estimate, max(base.low, 0.0), base.high, base.n, "t", confidence)
    return Interval(base.estimate, max(base.low, 0.0), math.inf, base.n, "t-censored", confidence, censored)


def best_budget(per_adversary: Mapping[str, Sequence[Curve]], threshold: float, higher_is_better: bool,
                confidence: float = CONFIDENCE) -> tuple[str, Interval]:
    """The adversary that reaches ``threshold`` with the fewest tokens (fewest censored seeds first, then
    the smallest mean), and its interval."""
    if not per_adversary:
        raise ValueError("best_budget: no adversaries")
    scored = [(label, budget_interval(per_adversary[label], threshold, higher_is_better, confidence))
              for label in sorted(per_adversary)]
    return min(scored, key=lambda item: (item[1].censored, item[1].estimate))


# ----------------------------------------------------------------------------- headline


def headline(after: Mapping[str, Mapping[str, Sequence[float]]], before: Mapping[str, Sequence[float]],
             higher_is_better: bool, curves: Mapping[str, Sequence[Curve]] | None = None,
             threshold: float | None = None, confidence: float = CONFIDENCE) -> dict[str, Interval]:
    """Every headline statistic the inputs allow, name -> interval (names: ``STATISTICS``).

    ``after[role][adversary]``: per-seed attacked scores at ONE budget, roles from ``ROLES`` (``pmp`` =
    the keyless attackers on the PMP release; ``authorized`` = the owner's key on it; ``dense``,
    ``dense_matched``, ``scratch`` = the references). ``before[role]``: per-seed un-attacked scores
    (``authorized`` defaults to ``pmp``'s). ``curves[adversary]``: per-seed (tokens, score) curves of the
    keyless attackers on PMP and ``threshold`` (the dense release's un-attacked score) give
    ``budget_to_threshold``. A statistic whose inputs are missing is left out.
    """
    unknown = sorted(set(after) - set(ROLES)) + sorted(set(before) - set(ROLES))
    if unknown:
        raise ValueError(f"headline: unknown roles {unknown}; known: {', '.join(ROLES)}")
    before = dict(before)
    if "pmp" in before:
        before.setdefault("authorized", before["pmp"])
    hib, conf, out = higher_is_better, confidence, {}
    if "pmp" in after:
        for ref in ("dense", "dense_matched", "scratch"):
            if ref in after:
                out[f"final_vs_{ref}"] = final_score_difference(after["pmp"], after[ref], hib, conf)
        if "dense_matched" in after and {"pmp", "dense_matched"} <= set(before):
            out["gain_vs_dense_matched"] = gain_difference(
                before["pmp"], after["pmp"], before["dense_matched"], after["dense_matched"], hib, conf)
        if "authorized" in after:
            out["key_advantage"] = key_advantage(after["authorized"], after["pmp"], hib, conf)
    if "authorized" in after and "dense_matched" in after and {"authorized", "dense_matched"} <= set(before):
        out["trainability"] = trainability(before["authorized"], after["authorized"], before["dense_matched"],
                                           after["dense_matched"], hib, conf)
    if curves and threshold is not None:
        out["budget_to_threshold"] = best_budget(curves, threshold, hib, conf)[1]
    return out


# ----------------------------------------------------------------------------- from runner records


@dataclass
class Grouped:
    """Runner records of one task as ``headline`` inputs, per budget (attack tokens)."""

    seeds: list[int]
    after: dict[int, dict[str, dict[str, list[float]]]]  # budget -> role -> adversary -> per seed
    before: dict[str, list[float]]  # role -> per seed
    curves: dict[str, list[list[tuple[float, float]]]]  # keyless PMP adversary -> per seed curve


def record_role(record: dict) -> str | None:
    """``authorized`` for the owner's attacker on PMP, ``pmp`` for every keyless attacker on PMP, else
    the record's own role (``dense``, ``dense_matched``, ``scratch``); None for a keyed ablation
    (``authorized_plus_embedding``: it holds the key, so it is no keyless attack, and it is not the owner's
    fine-tune either), which no headline statistic uses."""
    if record["role"] == "pmp":
        if record["attacker"] == "authorized_plus_embedding":
            return None
        return "authorized" if record["attacker"] == "authorized" else "pmp"
    return record["role"]


def group_records(records: Iterable[dict], task: str, score_key: str = "task_loss_after",
                  before_key: str = "task_loss_before", seq_length: int | None = None,
                  curve_key: str = "curve") -> Grouped:
    """Group the runner's records of ``task`` by budget, role, adversary and seed.

    Adversary labels are ``attacker:adversary`` (an attacker never reuses another's numbers). A diverged
    cell scores its un-attacked value (the attacker falls back to the release). The budget of a cell is
    ``adv_steps * adv_batch_size * seq_length`` tokens with ``seq_length`` (the suite's), else the largest
    ``tokens`` among its adversary's records. With ``seq_length`` the keyless PMP cells' ``curve``
    (steps, task LOSS; ``curve_key`` names another, e.g. ``score_curve``) becomes (tokens, value) curves
    for ``budget_to_threshold``. An adversary that lacks
    a seed some other cell has is dropped (logged): pairing needs every seed.
    """
    records = [r for r in records if r.get("task") == task]
    if not records:
        raise ValueError(f"group_records: no records of task {task!r}")
    seeds = sorted({int(r["seed"]) for r in records})
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    before: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        role = record_role(r)
        if role is None:
            continue
        cells[(role, f"{r['attacker']}:{r['adversary']}")][int(r["seed"])] = r
        before[role][int(r["seed"])] = float(r[before_key])
    after: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    grouped = Grouped(seeds, {}, {}, {})
    for role, by_seed in before.items():
        if sorted(by_seed) == seeds:
            grouped.before[role] = [by_seed[s] for s in seeds]
    for (role, label), by_seed in sorted(cells.items()):
        if sorted(by_seed) != seeds:
            logger.warning("group_records: %s %s lacks seeds %s; left out", role, label,
                           sorted(set(seeds) - set(by_seed)))
            continue
        rows = [by_seed[s] for s in seeds]
        if seq_length is None:
            budget = max(int(r["tokens"]) for r in rows)
        else:
            budget = int(rows[0]["adv_steps"]) * int(rows[0]["adv_batch_size"]) * seq_length
        after[budget][role][label] = [float(r[before_key] if r.get(score_key) is None else r[score_key])
                                      for r in rows]
        if role == "pmp" and seq_length is not None and all(r.get(curve_key) for r in rows):
            per_step = int(rows[0]["adv_batch_size"]) * seq_length
            grouped.curves[label] = [[(float(step) * per_step, float(value)) for step, value in r[curve_key]
                                      if value is not None] for r in rows]
    grouped.after = {b: {role: dict(a) for role, a in roles.items()} for b, roles in sorted(after.items())}
    return grouped
