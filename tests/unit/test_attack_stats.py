"""Attack evaluation v2 statistics and the pre-registered decision rule: intervals against scipy and hand
computations, the worst-case choice, budget-to-threshold, and verdicts on two extreme releases."""

import math

import pytest

from pmp_megatron.attack import decision, stats
from pmp_megatron.attack.stats import Interval

# ----------------------------------------------------------------------------- intervals


def test_t_quantile_matches_a_table_and_scipy():
    # hand table: t(0.975, df) for df 1, 2, 4, 9, 30
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 40, 1000):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.025):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_mean_interval_by_hand_and_one_seed_is_unbounded():
    iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5 / 5)  # t(0.975, 4) * sd / sqrt(n)
    assert (iv.estimate, iv.n, iv.method) == (3.0, 5, "t")
    assert iv.low == pytest.approx(3.0 - half, abs=1e-6) and iv.high == pytest.approx(3.0 + half, abs=1e-6)
    one = stats.mean_interval([0.7])
    assert one.estimate == 0.7 and one.low == -math.inf and one.high == math.inf and not one.bounded
    assert one.to_dict()["low"] is None


def test_differences_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.61, 0.55, 0.70, 0.64], [0.50, 0.52, 0.58, 0.49]
    paired = stats.difference_interval(a, b)
    ref = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((ref.low, ref.high), rel=1e-9)
    welch = stats.difference_interval(a, b, paired=False)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (welch.low, welch.high) == pytest.approx((ref.low, ref.high), rel=1e-9)
    iv = stats.mean_interval(a, confidence=0.9)
    ref = scipy_stats.t.interval(0.9, len(a) - 1, loc=sum(a) / 4, scale=scipy_stats.sem(a))
    assert (iv.low, iv.high) == pytest.approx(ref, rel=1e-9)


def test_identical_inputs_give_a_difference_interval_containing_zero():
    a = [0.31, 0.35, 0.29]
    for paired in (True, False):
        iv = stats.difference_interval(a, list(a), paired=paired)
        assert iv.estimate == 0.0 and iv.contains(0.0)
    with pytest.raises(ValueError, match="one value per seed"):
        stats.difference_interval(a, a[:2])


def test_fieller_ends_are_where_the_paired_t_test_of_num_minus_r_den_reaches_the_critical_value():
    num, den = [1.0, 2.0, 4.0, 3.5, 2.2], [2.0, 2.5, 3.9, 5.0, 3.1]
    iv = stats.ratio_interval(num, den)
    assert iv.estimate == pytest.approx(sum(num) / sum(den))
    crit = stats.t_quantile(0.975, len(num) - 1)
    for r in (iv.low, iv.high):
        d = stats.mean_interval([x - r * y for x, y in zip(num, den, strict=True)])
        se = (d.high - d.estimate) / crit
        assert abs(d.estimate / se) == pytest.approx(crit, rel=1e-9)
    assert iv.low < iv.estimate < iv.high
    # a denominator whose interval reaches 0 leaves the ratio unbounded
    wide = stats.ratio_interval([1.0, 1.1, 0.9], [0.5, -0.4, 0.1])
    assert wide.low == -math.inf and wide.high == math.inf
    # a constant denominator: the interval is the numerator's divided by it
    const = stats.ratio_interval(num, [2.0] * 5)
    ref = stats.mean_interval([x / 2.0 for x in num])
    assert (const.low, const.high) == pytest.approx((ref.low, ref.high))


# ----------------------------------------------------------------------------- worst case and budget


def test_best_attack_takes_the_best_mean_in_the_metric_direction():
    per = {"lr=1e-4": [0.5, 0.6], "lr=1e-3": [0.7, 0.65], "lr=1e-2": [0.2, 0.1]}
    best = stats.best_attack(per, higher_is_better=True)
    assert best.adversary == "lr=1e-3" and best.scores == (0.7, 0.65)
    assert best.interval == stats.mean_interval([0.7, 0.65])
    assert stats.best_attack(per, higher_is_better=False).adversary == "lr=1e-2"  # a loss: lowest wins


def test_tokens_to_threshold_interpolates_and_censors():
    curve = [(0, 4.0), (100, 3.5), (200, 2.5), (300, 2.0)]
    assert stats.tokens_to_threshold(curve, 3.0, higher_is_better=False) == pytest.approx(150.0)
    assert stats.tokens_to_threshold(curve, 4.5, higher_is_better=False) == 0.0
    assert stats.tokens_to_threshold(curve, 1.0, higher_is_better=False) is None
    acc = [(0, 0.1), (50, 0.3), (100, 0.5)]
    assert stats.tokens_to_threshold(acc, 0.4, higher_is_better=True) == pytest.approx(75.0)
    reached = stats.budget_interval([curve, [(0, 4.0), (200, 3.0), (300, 2.0)]], 3.0, False)
    assert reached.estimate == pytest.approx(175.0) and reached.censored == 0 and reached.low >= 0
    censored = stats.budget_interval([curve, [(0, 4.0), (300, 3.2)]], 3.0, False)
    assert censored.censored == 1 and censored.high == math.inf and censored.estimate == pytest.approx(225.0)
    slow = [[(0, 4.0), (300, 3.2)]] * 2
    label, best = stats.best_budget({"slow": slow, "fast": [curve, curve]}, 3.0, False)
    assert label == "fast" and best.estimate == pytest.approx(150.0)


# ----------------------------------------------------------------------------- headline + decision

SEEDS = 4
RULE = {
    "resists": {"final_vs_dense": {"below": -0.05}, "final_vs_dense_matched": {"below": -0.05},
                "final_vs_scratch": {"below": 0.0}, "gain_vs_dense_matched": {"below": -0.05},
                "key_advantage": {"above": 0.05}},
    "does_not_resist": {"final_vs_dense": {"above": -0.01}, "gain_vs_dense_matched": {"above": -0.01}},
}


def _jitter(base: float, scale: float = 0.01) -> list[float]:
    return [base + scale * ((i * 7) % 5 - 2) / 2 for i in range(SEEDS)]


def test_a_release_attacked_against_an_identical_copy_never_resists():
    before = _jitter(0.30)
    after = {"lr=1e-4": _jitter(0.55), "lr=1e-3": _jitter(0.62)}
    copy = {k: list(v) for k, v in after.items()}
    numbers = stats.headline({"pmp": after, "dense": copy, "dense_matched": copy, "scratch": copy,
                              "authorized": copy}, {"pmp": before, "dense_matched": list(before)},
                             higher_is_better=True)
    for name in ("final_vs_dense", "final_vs_dense_matched", "final_vs_scratch", "gain_vs_dense_matched",
                 "key_advantage"):
        assert numbers[name].contains(0.0), name
    verdict = decision.evaluate(RULE, numbers)
    assert verdict.verdict in (decision.DOES_NOT_RESIST, decision.INCONCLUSIVE)
    assert verdict.verdict == decision.DOES_NOT_RESIST  # [0, 0] lies above -0.01
    assert {r.statistic for r in verdict.reasons if r.outcome == decision.MET} >= {"final_vs_dense"}


def test_a_model_that_cannot_move_resists():
    base = _jitter(0.25)
    frozen = {"lr=1e-4": list(base), "lr=1e-3": list(base)}  # the attack changes nothing, every seed
    numbers = stats.headline(
        {"pmp": frozen, "authorized": {"lr=1e-4": _jitter(0.70)},
         "dense": {"lr=1e-4": _jitter(0.72), "lr=1e-3": _jitter(0.78)},
         "dense_matched": {"lr=1e-4": _jitter(0.66), "lr=1e-3": _jitter(0.74)},
         "scratch": {"lr=1e-3": _jitter(0.40)}},
        {"pmp": base, "dense": _jitter(0.5), "dense_matched": _jitter(0.26), "scratch": _jitter(0.1)},
        higher_is_better=True,
        curves={"lr=1e-3": [[(0, s), (1000, s)] for s in base]}, threshold=0.5)
    assert numbers["trainability"].low > 0.8 and numbers["budget_to_threshold"].censored == SEEDS
    verdict = decision.evaluate(decision.parse_rule(RULE), numbers)
    assert verdict.verdict == decision.RESISTS, verdict
    assert [r.outcome for r in verdict.reasons[:5]] == [decision.MET] * 5
    assert verdict.to_dict()["verdict"] == "resists"


def test_a_crossing_interval_or_a_missing_statistic_is_inconclusive():
    rule = decision.parse_rule({"resists": {"final_vs_dense": {"below": -0.05},
                                            "trainability": {"above": 0.5}}})
    crossing = Interval(-0.06, -0.1, -0.02, 3, "paired-t")
    ok = Interval(-0.2, -0.3, -0.1, 3, "paired-t")
    trainable = Interval(0.9, 0.8, 1.0, 3, "fieller")
    crossed = decision.evaluate(rule, {"final_vs_dense": crossing, "trainability": trainable})
    assert crossed.verdict == "inconclusive" and crossed.reasons[0].outcome == decision.CROSSES
    assert decision.evaluate(rule, {"final_vs_dense": ok, "trainability": trainable}).verdict == "resists"
    missing = decision.evaluate(rule, {"final_vs_dense": ok})
    assert missing.verdict == "inconclusive" and missing.reasons[1].outcome == decision.MISSING
    one_seed = decision.evaluate(rule, {"final_vs_dense": stats.mean_interval([-0.3]),
                                        "trainability": trainable})
    assert one_seed.verdict == "inconclusive"


def test_rule_errors_name_every_unknown_in_one_line():
    with pytest.raises(ValueError) as err:
        decision.parse_rule({"resist": {},
                             "resists": {"final_vs_dens": {"below": 0}, "key_advantage": {"abov": 1}},
                             "does_not_resist": {"trainability": {"above": "x"}}})
    message = str(err.value)
    assert "\n" not in message
    for named in ("'resist'", "'final_vs_dens'", "final_vs_dense", "'abov'", "trainability.above"):
        assert named in message, named
    with pytest.raises(ValueError, match="unknown statistics 'gain'"):
        decision.evaluate(RULE, {"gain": Interval(0, 0, 0, 2, "t")})
    with pytest.raises(ValueError, match="confidence 0.95.*final_vs_dense"):
        decision.evaluate(RULE, {"final_vs_dense": stats.mean_interval([1.0, 2.0], confidence=0.9)})


def test_group_records_builds_headline_inputs_from_runner_records():
    def rec(role, attacker, adversary, seed, before, after, status="ok", curve=None):
        return {"role": role, "attacker": attacker, "adversary": adversary, "task": "t", "seed": seed,
                "task_loss_before": before, "task_loss_after": after, "status": status, "tokens": 4 * 2 * 8,
                "adv_steps": 4, "adv_batch_size": 2, "curve": curve or [[0, before], [4, after or before]]}

    records = []
    for seed in (0, 1):
        records += [rec("pmp", "unauthorized", "full/lr=1", seed, 4.0, 3.9 - seed * 0.01),
                    rec("pmp", "recovery_global", "full/lr=1", seed, 4.0, None, status="diverged"),
                    rec("pmp", "authorized", "full/lr=1", seed, 4.0, 3.0),
                    rec("dense", "unauthorized", "full/lr=1", seed, 3.8, 3.1)]
    records.append(rec("dense", "unauthorized", "full/lr=2", 0, 3.8, 2.0))  # lacks seed 1: dropped
    g = stats.group_records(records, "t", seq_length=8)
    assert g.seeds == [0, 1] and list(g.after) == [64]
    roles = g.after[64]
    assert roles["pmp"] == {"recovery_global:full/lr=1": [4.0, 4.0], "unauthorized:full/lr=1": [3.9, 3.89]}
    assert list(roles["dense"]) == ["unauthorized:full/lr=1"] and roles["authorized"]
    assert g.before == {"pmp": [4.0, 4.0], "authorized": [4.0, 4.0], "dense": [3.8, 3.8]}
    assert g.curves["unauthorized:full/lr=1"][0] == [(0.0, 4.0), (64.0, 3.9)]
    numbers = stats.headline(roles, g.before, higher_is_better=False, curves=g.curves, threshold=3.95)
    assert numbers["final_vs_dense"].estimate == pytest.approx(-(3.895 - 3.1))  # loss: oriented, PMP worse
    assert numbers["key_advantage"].estimate == pytest.approx(0.895)
    assert numbers["budget_to_threshold"].estimate == pytest.approx((64 * 0.05 / 0.1 + 64 * 0.05 / 0.11) / 2)
