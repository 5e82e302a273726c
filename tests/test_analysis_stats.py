"""The statistics against independent references: statsmodels, scipy, closed forms and hand sums."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import statsmodels.api as sm
from abrec.analysis import sequential
from abrec.analysis.decision import Guardrail, decide
from abrec.analysis.power import users_needed
from abrec.analysis.stats import (
    ArmStats,
    adjust_p_values,
    analyze,
    compare,
    ctr_variance,
    fieller_interval,
    naive_impression_p_value,
    srm_test,
    winsor_cap,
    winsorize,
)
from abrec.analysis.synthetic import Population, draw_users
from abrec.analysis.timeviews import Snapshot, cumulative_lift, daily_ctr, lift_by_exposure_day
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportions_ztest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

Z95 = sps.norm.ppf(0.975)


def users(seed: int, n: int, lift: float = 0.0):
    return draw_users(np.random.default_rng(seed), (n,), Population(), lift)


# ---------------------------------------------------------------- sufficient statistics


def test_arm_stats_from_arrays_sums_every_term_and_round_trips_through_a_dict() -> None:
    x, y = np.array([1, 0, 2]), np.array([2, 1, 3])
    px, py = np.array([0, 1, 1]), np.array([1, 4, 2])
    s = ArmStats.from_arrays(x, y, px, py)
    assert (s.n, s.sum_x, s.sum_y, s.sum_x2, s.sum_y2, s.sum_xy) == (3, 3, 6, 5, 14, 8)
    assert (s.sum_px, s.sum_py, s.sum_px2, s.sum_py2, s.sum_pxpy) == (2, 7, 2, 21, 6)
    assert (s.sum_x_px, s.sum_x_py, s.sum_y_px, s.sum_y_py) == (2, 5, 4, 12)
    assert ArmStats.from_sums(s.to_dict()) == s
    assert ArmStats.from_sums({**ArmStats.from_arrays(x, y).to_dict(), "sum_px": None}).sum_px == 0.0


def test_from_sums_names_the_missing_terms() -> None:
    with pytest.raises(ValueError, match="sum_xy"):
        ArmStats.from_sums({"n": 3, "sum_x": 1, "sum_y": 2, "sum_x2": 1, "sum_y2": 2})


def test_ctr_variance_matches_a_hand_computed_case() -> None:
    # R = 3/6; x - R y = (0, -0.5, 0.5), sample variance 0.25; mean y = 2 -> 0.25 / (3 * 4)
    s = ArmStats.from_arrays(np.array([1, 0, 2]), np.array([2, 1, 3]))
    assert s.ctr == 0.5
    assert ctr_variance(s) == pytest.approx(1 / 48)


def _impression_rows(u) -> tuple[np.ndarray, np.ndarray]:
    """One row per impression: (clicked 0/1, user id)."""
    user = np.repeat(np.arange(u.impressions.size), u.impressions)
    first = np.concatenate([[0], np.cumsum(u.impressions)[:-1]])
    rank = np.arange(user.size) - first[user]
    return (rank < u.clicks[user]).astype(float), user


def test_delta_method_equals_statsmodels_cluster_robust_ols_by_user() -> None:
    """Regressing impression-level clicks on the arm with SEs clustered by user is the delta method.

    statsmodels without small-sample correction gives sum_i (x_i - R y_i)^2 / (sum y)^2 per arm;
    the delta method with sample variances (ddof 1) is that times n / (n - 1).
    """
    n = 1500
    c, t = users(1, n), users(2, n, lift=0.2)
    yc, gc = _impression_rows(c)
    yt, gt = _impression_rows(t)
    endog = np.concatenate([yc, yt])
    exog = sm.add_constant(np.concatenate([np.zeros(yc.size), np.ones(yt.size)]))
    groups = np.concatenate([gc, gt + n])
    fit = sm.OLS(endog, exog).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False, "df_correction": False}
    )
    sc, st = c.stats(pre=False), t.stats(pre=False)
    result = compare(sc, st)
    assert result.abs_lift == pytest.approx(fit.params[1], rel=1e-12)
    assert result.abs_lift_se**2 == pytest.approx(fit.bse[1] ** 2 * n / (n - 1), rel=1e-9)
    assert ctr_variance(sc) == pytest.approx(fit.bse[0] ** 2 * n / (n - 1), rel=1e-9)


def test_one_impression_per_user_reduces_to_statsmodels_two_sample_z() -> None:
    rng = np.random.default_rng(3)
    xc, xt = rng.binomial(1, 0.1, 800), rng.binomial(1, 0.13, 900)
    result = compare(ArmStats.from_arrays(xc, np.ones(800)), ArmStats.from_arrays(xt, np.ones(900)))
    cm = CompareMeans(DescrStatsW(xt), DescrStatsW(xc))
    lo, hi = cm.zconfint_diff(usevar="unequal")
    assert result.abs_lift_ci == pytest.approx((lo, hi), rel=1e-10)
    assert result.abs_p_value == pytest.approx(cm.ztest_ind(usevar="unequal")[1], rel=1e-10)


def test_relative_lift_matches_its_hand_computed_delta_method() -> None:
    c = ArmStats.from_arrays(np.array([1, 0, 2, 1]), np.array([2, 1, 3, 4]))
    t = ArmStats.from_arrays(np.array([2, 1, 0, 3]), np.array([3, 2, 1, 4]))
    rc, rt = 4 / 10, 6 / 10
    vc = np.var(np.array([1, 0, 2, 1]) - rc * np.array([2, 1, 3, 4]), ddof=1) / (4 * 2.5**2)
    vt = np.var(np.array([2, 1, 0, 3]) - rt * np.array([3, 2, 1, 4]), ddof=1) / (4 * 2.5**2)
    result = compare(c, t)
    assert result.rel_lift == pytest.approx(0.5)
    se = math.sqrt(vt / rc**2 + rt**2 * vc / rc**4)
    assert result.rel_lift_se == pytest.approx(se)
    assert result.rel_lift_ci == pytest.approx((0.5 - Z95 * se, 0.5 + Z95 * se))
    assert result.p_value == pytest.approx(2 * sps.norm.sf(0.5 / se))
    assert result.abs_p_value == pytest.approx(2 * sps.norm.sf(0.2 / math.sqrt(vt + vc)))


def test_fieller_interval_is_the_set_its_definition_describes() -> None:
    mt, vt, mc, vc = 0.055, 0.002**2, 0.05, 0.0018**2
    # relative lift = (mt - mc) / mc; Var(mt - mc) = vt + vc, Cov(mt - mc, mc) = -vc
    lo, hi = fieller_interval(mt - mc, vt + vc, mc, vc, -vc)

    def inside(r: np.ndarray) -> np.ndarray:
        return np.abs(mt - (1 + r) * mc) <= Z95 * np.sqrt(vt + (1 + r) ** 2 * vc)

    grid = np.linspace(-0.5, 0.8, 200001)
    members = grid[inside(grid)]
    assert members.min() == pytest.approx(lo, abs=1e-5)
    assert members.max() == pytest.approx(hi, abs=1e-5)
    # Skewed to the right of the delta-method interval, which is symmetric around 0.1.
    assert hi - 0.1 > 0.1 - lo


def test_fieller_converges_to_the_delta_method_and_is_unbounded_near_a_zero_control() -> None:
    mt, mc = 0.055, 0.05
    vt, vc = 1e-5**2, 1e-5**2
    se = math.sqrt(vt / mc**2 + mt**2 * vc / mc**4)
    delta_ci = (0.1 - Z95 * se, 0.1 + Z95 * se)
    assert fieller_interval(mt - mc, vt + vc, mc, vc, -vc) == pytest.approx(delta_ci, rel=1e-4)
    assert fieller_interval(0.01, 0.001, 0.001, 0.01) == (-math.inf, math.inf)


def test_naive_per_impression_test_is_statsmodels_pooled_two_proportion_z() -> None:
    c, t = users(4, 2000).stats(pre=False), users(5, 2000, lift=0.1).stats(pre=False)
    _, p = proportions_ztest([t.sum_x, c.sum_x], [t.sum_y, c.sum_y])
    assert naive_impression_p_value(c, t) == pytest.approx(p, rel=1e-10)


def test_naive_test_is_narrower_than_the_user_level_one_when_clicks_cluster() -> None:
    # Same data: the delta method sees that clicks come in bunches per user, the naive test does not.
    c, t = users(6, 3000).stats(pre=False), users(7, 3000, lift=0.1).stats(pre=False)
    result = compare(c, t)
    assert result.naive_p_value < result.abs_p_value


# ---------------------------------------------------------------- SRM and multiple arms


def test_srm_matches_a_hand_computed_chi_square() -> None:
    # 5000 vs 5200 with 50/50: expected 5100 each, chi2 = 2 * 100^2 / 5100
    srm = srm_test({"a": 5000, "b": 5200})
    assert srm.chi2 == pytest.approx(2 * 100**2 / 5100)
    assert srm.p_value == pytest.approx(sps.chi2.sf(2 * 100**2 / 5100, 1))
    assert srm.p_value == pytest.approx(0.0477, abs=1e-4)
    assert not srm.alert
    assert srm_test({"a": 5000, "b": 5500}).alert  # p ~ 1e-6


def test_srm_uses_the_configured_weights() -> None:
    srm = srm_test({"a": 6670, "b": 3330}, {"a": 2, "b": 1})
    assert srm.expected == pytest.approx({"a": 10000 * 2 / 3, "b": 10000 / 3})
    assert not srm.alert
    assert srm_test({"a": 6670, "b": 3330}).alert  # against equal weights it is a glaring mismatch
    with pytest.raises(ValueError, match="weights name arms"):
        srm_test({"a": 1, "b": 2}, {"a": 1, "c": 1})


def test_srm_without_users_is_no_test_and_no_alert() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's chi-square would divide 0 by 0
        srm = srm_test({"a": 0, "b": 0}, {"a": 1, "b": 3})
    assert math.isnan(srm.chi2) and math.isnan(srm.p_value) and not srm.alert
    assert srm.expected == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize(("method", "reference"), [("holm", "holm"), ("bh", "fdr_bh")])
def test_p_value_adjustment_matches_statsmodels(method: str, reference: str) -> None:
    rng = np.random.default_rng(8)
    for size in (1, 2, 3, 7, 20):
        p = rng.uniform(0, 0.2, size) ** 2
        p[: size // 3] = p[0]  # ties
        assert adjust_p_values(p, method) == pytest.approx(multipletests(p, method=reference)[1])


def test_analyze_compares_every_arm_with_the_control_and_adjusts_p_values() -> None:
    arms = {"sasrec": users(9, 4000), "tron": users(10, 4000, lift=0.15), "gru": users(11, 4000, lift=0.02)}
    analysis = analyze({k: u.stats() for k, u in arms.items()}, "sasrec", correction="holm")
    assert set(analysis.comparisons) == {"tron", "gru"}
    raw = [float(analysis.comparisons[a].p_value) for a in ("tron", "gru")]
    assert [analysis.adjusted_p_values[a] for a in ("tron", "gru")] == pytest.approx(
        multipletests(raw, method="holm")[1]
    )
    assert all(c.cuped for c in analysis.comparisons.values())  # pre-period present -> CUPED
    out = analysis.to_dict()
    assert out["arms"]["sasrec"]["rel_lift"] is None and out["arms"]["sasrec"]["users"] == 4000
    assert out["arms"]["tron"]["rel_lift_ci"][0] < out["arms"]["tron"]["rel_lift"]
    with pytest.raises(ValueError, match="control arm"):
        analyze({k: u.stats() for k, u in arms.items()}, "nope")


def test_to_dict_turns_undefined_lifts_into_null() -> None:
    zero = ArmStats.from_arrays(np.zeros(50), np.ones(50))
    out = analyze({"a": zero, "b": zero}, "a").to_dict()
    assert out["arms"]["b"]["rel_lift"] is None and out["arms"]["b"]["p_value"] is None


# ---------------------------------------------------------------- winsorisation


def test_winsorisation_caps_every_arm_at_the_pooled_percentile() -> None:
    a, b = np.arange(100.0), np.concatenate([np.arange(99.0), [10_000.0]])
    cap = winsor_cap([a, b], 99)
    assert cap == pytest.approx(np.percentile(np.concatenate([a, b]), 99))
    wa, wb = winsorize([a, b], 99)
    assert wb.max() == cap and wa.max() == cap and wb[:98].tolist() == b[:98].tolist()
    with pytest.raises(ValueError):
        winsor_cap([a], 0)


# ---------------------------------------------------------------- sequential


def test_rho_and_multiplier_match_gbstats_formulas() -> None:
    alpha, n_star = 0.05, 10_000
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / n_star
    assert sequential.rho_squared(alpha, n_star) == pytest.approx(rho2)
    for n, var in [(500, 1e-4), (10_000, 3e-6), (80_000, 4e-7)]:
        # gbstats: sqrt(s2) * sqrt(2 (n rho2 + 1) / (n^2 rho2) * log(sqrt(n rho2 + 1) / alpha)), s2 = var * n
        s2 = var * n
        log_term = math.log(math.sqrt(n * rho2 + 1) / alpha)
        gb = math.sqrt(s2) * math.sqrt(2 * (n * rho2 + 1) / (n**2 * rho2) * log_term)
        lo, hi = sequential.interval(0.01, var, n, n_star, alpha)
        assert (hi - lo) / 2 == pytest.approx(gb, rel=1e-12)


def test_sequential_half_width_at_n_star_is_at_most_1_6_times_the_fixed_one() -> None:
    m = float(sequential.multiplier(1000, 1000))
    assert m == pytest.approx(3.0353, abs=1e-4)
    assert m / Z95 == pytest.approx(1.5487, abs=1e-4) and m / Z95 <= 1.6
    # Wider than the fixed interval everywhere, tightest relative to it near N*.
    ratios = [float(sequential.multiplier(n, 1000)) / Z95 for n in (100, 500, 1000, 2000, 20_000)]
    assert min(ratios) > 1 and ratios.index(min(ratios)) in (2, 3)


def test_sequential_p_value_is_below_alpha_exactly_when_the_interval_excludes_zero() -> None:
    rng = np.random.default_rng(12)
    est, var = rng.normal(0, 0.02, 5000), rng.uniform(1e-5, 2e-4, 5000)
    n, n_star = rng.integers(200, 20_000, 5000), 8000
    lo, hi = sequential.interval(est, var, n, n_star)
    p = sequential.p_value(est, var, n, n_star)
    assert np.array_equal(p < 0.05, (lo > 0) | (hi < 0))
    assert np.all((p > 0) & (p <= 1))
    assert np.all(p >= 2 * sps.norm.sf(np.abs(est) / np.sqrt(var)))  # never below the fixed p-value


def test_sequential_intervals_are_wider_and_fieller_sequential_agrees_with_the_absolute_test() -> None:
    c, t = users(13, 3000).stats(), users(14, 3000, lift=0.12).stats()
    r = compare(c, t, sequential_tuning=10_000, fieller=True)
    assert r.rel_lift_ci_sequential[0] < r.rel_lift_ci[0] and r.rel_lift_ci_sequential[1] > r.rel_lift_ci[1]
    assert r.abs_lift_ci_sequential[0] < r.abs_lift_ci[0]
    abs_rejects = r.abs_lift_ci_sequential[0] > 0 or r.abs_lift_ci_sequential[1] < 0
    fieller_rejects = r.rel_lift_ci_sequential_fieller[0] > 0 or r.rel_lift_ci_sequential_fieller[1] < 0
    assert abs_rejects == fieller_rejects


# ---------------------------------------------------------------- CUPED


def test_cuped_with_one_impression_per_user_equals_ancova_ols() -> None:
    """With y = py = 1 the ratio form is plain CUPED: OLS of clicks on the arm and the pre-period clicks."""
    rng = np.random.default_rng(15)
    n = 3000
    p = rng.beta(1, 9, 2 * n)
    pre = rng.binomial(1, p).astype(float)
    post = rng.binomial(1, np.minimum(1, p * np.r_[np.ones(n), np.full(n, 1.2)])).astype(float)
    ones = np.ones(n)
    c = ArmStats.from_arrays(post[:n], ones, pre[:n], ones)
    t = ArmStats.from_arrays(post[n:], ones, pre[n:], ones)
    result = compare(c, t, cuped=True)
    exog = sm.add_constant(np.column_stack([np.r_[np.zeros(n), ones], pre]))
    fit = sm.OLS(post, exog).fit(cov_type="HC0")
    assert result.abs_lift == pytest.approx(fit.params[1], rel=1e-10)
    assert result.cuped_theta == pytest.approx(fit.params[2], rel=1e-10)
    # Same variance up to the sampling error of theta, which OLS accounts for and CUPED ignores.
    assert result.abs_lift_se == pytest.approx(fit.bse[1], rel=0.01)


def test_cuped_without_a_useful_covariate_changes_nothing_much() -> None:
    c, t = users(16, 5000), users(17, 5000, lift=0.1)
    rng = np.random.default_rng(18)
    # Shuffling the pre-period across users keeps its distribution but breaks its link to the user.
    pre = [rng.permutation(np.c_[u.pre_clicks, u.pre_impressions]).T for u in (c, t)]
    sc = ArmStats.from_arrays(c.clicks, c.impressions, *pre[0])
    st = ArmStats.from_arrays(t.clicks, t.impressions, *pre[1])
    plain, adjusted = compare(sc, st), compare(sc, st, cuped=True)
    assert abs(adjusted.cuped_theta) < 0.1
    assert adjusted.abs_lift_se == pytest.approx(plain.abs_lift_se, rel=0.01)


def test_cuped_needs_pre_period_data() -> None:
    with pytest.raises(ValueError, match="pre-period"):
        compare(users(19, 100).stats(pre=False), users(20, 100).stats(pre=False), cuped=True)


# ---------------------------------------------------------------- power


def test_power_reduces_to_the_textbook_formula_for_one_impression_per_user() -> None:
    p, mde, n = 0.1, 0.1, 200_000
    base = ArmStats(n=n, sum_x=p * n, sum_y=n, sum_x2=p * n, sum_y2=n, sum_xy=p * n)
    fixed = users_needed(base, mde, sequential_test=False, daily_users=10_000)
    sigma2 = p * (1 - p) * n / (n - 1)
    expected = (Z95 + sps.norm.ppf(0.8)) ** 2 * sigma2 / p**2 * (1.1 + 1.1**2) / mde**2
    assert fixed.users_per_arm == math.ceil(expected)
    assert fixed.days == pytest.approx(2 * fixed.users_per_arm / 10_000)
    seq = users_needed(base, mde)
    assert seq.critical_value == pytest.approx(float(sequential.multiplier(1, 1)))
    assert 1.8 < seq.users_per_arm / fixed.users_per_arm < 2.0  # ((3.04 + 0.84) / (1.96 + 0.84))^2 = 1.92


def test_power_from_impressions_understates_users_needed_when_clicks_cluster() -> None:
    base = users(21, 20_000).stats(pre=False)
    need = users_needed(base, 0.05, sequential_test=False)
    p = float(base.ctr)
    impressions = (Z95 + sps.norm.ppf(0.8)) ** 2 * 2 * p * (1 - p) / (p * 0.05) ** 2
    naive_users = impressions / (base.sum_y / base.n)
    assert need.users_per_arm > 1.5 * naive_users


# ---------------------------------------------------------------- time views


def _daily_snapshots() -> tuple[list[Snapshot], dict[str, list]]:
    rng = np.random.default_rng(22)
    per_user = {arm: [] for arm in ("control", "tron")}
    # 3 days, per-user cumulative totals; users 0..k enter over time (late ones have zeros).
    snaps = []
    for arm, lift in (("control", 0.0), ("tron", 0.2)):
        daily = [draw_users(rng, (2000,), lift=lift) for _ in range(3)]
        x = np.cumsum([d.clicks for d in daily], axis=0)
        y = np.cumsum([d.impressions for d in daily], axis=0)
        for day in range(3):
            snaps.append(Snapshot(day, arm, ArmStats.from_arrays(x[day], y[day])))
            per_user[arm].append((x[day], y[day]))
    return snaps, per_user


def test_daily_ctr_comes_from_differences_of_cumulative_snapshots() -> None:
    snaps, per_user = _daily_snapshots()
    days = [d for d in daily_ctr(snaps) if d.arm == "tron"]
    assert [d.key for d in days] == [0, 1, 2]
    x, y = per_user["tron"][1][0] - per_user["tron"][0][0], per_user["tron"][1][1] - per_user["tron"][0][1]
    assert days[1].clicks == x.sum() and days[1].ctr == pytest.approx(x.sum() / y.sum())


def test_cumulative_lift_on_each_date_is_the_comparison_of_per_user_totals() -> None:
    snaps, per_user = _daily_snapshots()
    points = cumulative_lift(snaps, "control", sequential_tuning=4000)
    assert [p.key for p in points] == [0, 1, 2]
    control, tron = (ArmStats.from_arrays(*per_user[arm][2]) for arm in ("control", "tron"))
    direct = compare(control, tron, 0.05, 4000)
    assert points[2].rel_lift == pytest.approx(float(direct.rel_lift))
    assert points[2].rel_lift_ci_sequential == pytest.approx(direct.rel_lift_ci_sequential)
    # CIs narrow as data accumulates.
    widths = [p.rel_lift_ci[1] - p.rel_lift_ci[0] for p in points]
    assert widths[0] > widths[1] > widths[2]


def test_lift_by_exposure_day_shows_a_decaying_novelty_effect() -> None:
    rng = np.random.default_rng(23)
    cohorts = []
    for k, lift in enumerate((0.5, 0.25, 0.0, 0.0)):
        cohorts.append(Snapshot(k, "control", draw_users(rng, (20_000,)).stats(pre=False)))
        cohorts.append(Snapshot(k, "tron", draw_users(rng, (20_000,), lift=lift).stats(pre=False)))
    points = lift_by_exposure_day(cohorts, "control")
    assert [p.key for p in points] == [0, 1, 2, 3]
    assert points[0].rel_lift_ci[0] > 0.3 and points[3].rel_lift_ci[0] < 0 < points[3].rel_lift_ci[1]
    with pytest.raises(ValueError, match="control"):
        lift_by_exposure_day(cohorts, "sasrec")


# ---------------------------------------------------------------- decision


def _decide(ci=(0.01, 0.05), srm=0.5, guardrails=(), days=10, users=50_000, clicks=5000, planned=28, **kw):
    return decide(ci, srm, list(guardrails), days, users, clicks, planned, **kw)


def test_decision_ships_only_when_everything_holds() -> None:
    assert _decide().verdict == "ship"
    ok = Guardrail("fallback rate", 0.001, 0.01)
    assert _decide(guardrails=[ok]).verdict == "ship"
    assert _decide(days=5).verdict == "keep running"  # under the weekly minimum
    assert _decide(users=500).verdict == "keep running"
    assert _decide(clicks=50).verdict == "keep running"
    srm = _decide(srm=1e-5)
    assert srm.verdict == "keep running" and "sample-ratio" in srm.reasons[0]


def test_decision_rolls_back_on_harm_or_a_failed_guardrail_at_any_time() -> None:
    assert _decide(ci=(-0.05, -0.01), days=2).verdict == "rollback"
    bad = _decide(guardrails=[Guardrail("p99 latency ms", 400, 250)], days=1)
    assert bad.verdict == "rollback" and "p99 latency ms" in bad.reasons[0]
    # ... but not on the lift of a handful of clicks, where the interval cannot be trusted.
    assert _decide(ci=(-0.9, -0.1), clicks=10).verdict == "keep running"


def test_decision_is_inconclusive_at_the_planned_end() -> None:
    end = _decide(ci=(-0.01, 0.02), days=28)
    assert end.verdict == "inconclusive" and "planned end" in end.reasons[0]
    assert _decide(ci=(-0.01, 0.02), days=14).verdict == "keep running"
    assert _decide(ci=(0.01, 0.02), srm=1e-6, days=30).verdict == "inconclusive"


def test_arms_without_users_or_impressions_give_nulls_not_errors():
    """A new arm with no traffic yet must not break the nightly report: its figures are null."""
    import json
    import warnings

    from abrec.analysis.stats import ArmStats, analyze

    traffic = ArmStats(n=10, sum_x=3, sum_y=30, sum_x2=3, sum_y2=100, sum_xy=10)
    no_impressions = ArmStats(n=5, sum_x=0, sum_y=0, sum_x2=0, sum_y2=0, sum_xy=0)
    nobody = ArmStats(n=0, sum_x=0, sum_y=0, sum_x2=0, sum_y2=0, sum_xy=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        one_idle = analyze({"c": traffic, "t": no_impressions}, control="c").to_dict()
        empty = analyze({"c": nobody, "t": nobody}, control="c").to_dict()
    assert one_idle["arms"]["t"]["ctr"] is None and one_idle["arms"]["t"]["rel_lift"] is None
    assert one_idle["arms"]["c"]["ctr"] == 0.1
    assert empty["arms"]["c"]["users"] == 0 and empty["arms"]["t"]["p_value"] is None
    json.dumps(one_idle, allow_nan=False)
    json.dumps(empty, allow_nan=False)
