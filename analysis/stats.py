"""CTR lift statistics from per-arm sufficient statistics: pure functions over frozen dataclasses.

The randomisation unit is the user, so CTR = sum(clicks) / sum(impressions) is a ratio of two
per-user means and its variance comes from the delta method (Deng, Knoblich, Lu, "Applying the
Delta Method in Metric Analytics", KDD 2018), never from treating impressions as independent.
Every figure is computable from the sums in `ArmStats`, which is what the nightly snapshots
store; per-user arrays are only needed for winsorisation caps.

All functions also work elementwise when the `ArmStats` fields are numpy arrays (one entry per
simulated experiment), which is how the simulations check the error rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from abrec.analysis import sequential
from scipy import special, stats

Number = float | np.ndarray

SRM_ALERT_P = 0.001


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: sums over its users of x = clicks, y = impressions.

    The `p*` terms are the same user's clicks (px) and impressions (py) in a pre-period before
    first exposure, used by CUPED; they are 0 when there is no pre-period data.
    """

    n: Number
    sum_x: Number
    sum_y: Number
    sum_x2: Number
    sum_y2: Number
    sum_xy: Number
    sum_px: Number = 0.0
    sum_py: Number = 0.0
    sum_px2: Number = 0.0
    sum_py2: Number = 0.0
    sum_pxpy: Number = 0.0
    sum_x_px: Number = 0.0
    sum_x_py: Number = 0.0
    sum_y_px: Number = 0.0
    sum_y_py: Number = 0.0

    def __post_init__(self) -> None:
        # numpy scalars, not Python floats: an arm without users or impressions then yields
        # nan/inf statistics (reported as null) instead of raising ZeroDivisionError.
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, np.asarray(value, dtype=float)[()])

    @classmethod
    def from_arrays(
        cls,
        clicks: np.ndarray,
        impressions: np.ndarray,
        pre_clicks: np.ndarray | None = None,
        pre_impressions: np.ndarray | None = None,
    ) -> ArmStats:
        """Sums over the last axis of per-user arrays (shape (users,) or (experiments, users))."""
        x = np.asarray(clicks, dtype=float)
        y = np.asarray(impressions, dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"clicks and impressions differ in shape: {x.shape} vs {y.shape}")
        sums: dict[str, Any] = dict(
            n=float(x.shape[-1]) if x.ndim == 1 else np.full(x.shape[:-1], float(x.shape[-1])),
            sum_x=x.sum(-1),
            sum_y=y.sum(-1),
            sum_x2=(x * x).sum(-1),
            sum_y2=(y * y).sum(-1),
            sum_xy=(x * y).sum(-1),
        )
        if pre_clicks is not None or pre_impressions is not None:
            if pre_clicks is None or pre_impressions is None:
                raise ValueError("give both pre_clicks and pre_impressions, or neither")
            px = np.asarray(pre_clicks, dtype=float)
            py = np.asarray(pre_impressions, dtype=float)
            if px.shape != x.shape or py.shape != x.shape:
                raise ValueError("pre-period arrays must have the shape of clicks and impressions")
            sums.update(
                sum_px=px.sum(-1),
                sum_py=py.sum(-1),
                sum_px2=(px * px).sum(-1),
                sum_py2=(py * py).sum(-1),
                sum_pxpy=(px * py).sum(-1),
                sum_x_px=(x * px).sum(-1),
                sum_x_py=(x * py).sum(-1),
                sum_y_px=(y * px).sum(-1),
                sum_y_py=(y * py).sum(-1),
            )
        if x.ndim == 1:
            sums = {k: float(v) for k, v in sums.items()}
        return cls(**sums)

    @classmethod
    def from_sums(cls, row: Mapping[str, Any]) -> ArmStats:
        """From a mapping with the field names (a SQL row, a stored snapshot); other keys are ignored.

        Missing pre-period terms count as 0; NULLs (a SQL SUM over no rows) count as 0.
        """
        names = [f.name for f in fields(cls)]
        missing = [k for k in names[:6] if k not in row]
        if missing:
            raise ValueError(f"sufficient statistics lack {', '.join(missing)}")
        return cls(**{k: float(row[k] or 0) for k in names if k in row})

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @property
    def ctr(self) -> Number:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.divide(self.sum_x, self.sum_y)

    @property
    def has_pre(self) -> bool:
        return bool(np.all(np.asarray(self.sum_py) > 0))


def _cov(n: Number, sum_ab: Number, sum_a: Number, sum_b: Number) -> Number:
    """Sample covariance (ddof = 1) of two per-user quantities from their sums."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sum_ab - sum_a * sum_b / n) / (n - 1)


def ctr_variance(s: ArmStats) -> Number:
    """Delta-method variance of CTR = sum_x / sum_y with users as the unit.

    Var(x̄/ȳ) ≈ (s_x² - 2 R s_xy + R² s_y²) / (n ȳ²): the sample variance of the linearised
    per-user value (x - R y) / ȳ, divided by n.
    """
    r = s.ctr
    var_x = _cov(s.n, s.sum_x2, s.sum_x, s.sum_x)
    var_y = _cov(s.n, s.sum_y2, s.sum_y, s.sum_y)
    cov_xy = _cov(s.n, s.sum_xy, s.sum_x, s.sum_y)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_y = s.sum_y / s.n
        return (var_x - 2 * r * cov_xy + r * r * var_y) / (s.n * mean_y * mean_y)


@dataclass(frozen=True)
class _Cuped:
    """Per-arm moments of the linearised post (u) and pre (v) CTRs that CUPED needs."""

    var_u: Number
    var_v: Number
    cov_uv: Number
    pre_ctr: Number


def _cuped_moments(s: ArmStats) -> _Cuped:
    """u = (x - R y) / mean(y) and v = (px - Rp py) / mean(py): the CTRs' per-user linearisations."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r, rp = s.ctr, s.sum_px / s.sum_py
        mean_y, mean_py = s.sum_y / s.n, s.sum_py / s.n
        var_px = _cov(s.n, s.sum_px2, s.sum_px, s.sum_px)
        var_py = _cov(s.n, s.sum_py2, s.sum_py, s.sum_py)
        cov_pxpy = _cov(s.n, s.sum_pxpy, s.sum_px, s.sum_py)
        var_v = (var_px - 2 * rp * cov_pxpy + rp * rp * var_py) / (mean_py * mean_py)
        cov_uv = (
            _cov(s.n, s.sum_x_px, s.sum_x, s.sum_px)
            - rp * _cov(s.n, s.sum_x_py, s.sum_x, s.sum_py)
            - r * _cov(s.n, s.sum_y_px, s.sum_y, s.sum_px)
            + r * rp * _cov(s.n, s.sum_y_py, s.sum_y, s.sum_py)
        ) / (mean_y * mean_py)
    return _Cuped(var_u=s.n * ctr_variance(s), var_v=var_v, cov_uv=cov_uv, pre_ctr=rp)


@dataclass(frozen=True)
class Comparison:
    """Treatment versus control on CTR. Lifts: absolute = ctr_t - ctr_c, relative = ctr_t / ctr_c - 1.

    control_ctr and treatment_ctr are the observed CTRs; with `cuped` the lifts are adjusted.

    `p_value` belongs to the relative lift, `abs_p_value` to the absolute one. The sequential
    intervals and `p_value_sequential` (relative lift) are always valid under daily looks; with
    few clicks per arm (under about 100) the delta-method relative intervals are skewed and
    the absolute-lift or Fieller intervals are the safer basis for a decision.
    `naive_p_value` is the per-impression two-proportion z-test: a labelled diagnostic only, it
    ignores that clicks cluster by user and over-rejects.
    """

    control_ctr: Number
    treatment_ctr: Number
    abs_lift: Number
    abs_lift_se: Number
    abs_lift_ci: tuple[Number, Number]
    abs_p_value: Number
    abs_lift_ci_sequential: tuple[Number, Number]
    rel_lift: Number
    rel_lift_se: Number
    rel_lift_ci: tuple[Number, Number]
    p_value: Number
    rel_lift_ci_sequential: tuple[Number, Number]
    p_value_sequential: Number
    rel_lift_ci_fieller: tuple[Number, Number] | None
    rel_lift_ci_sequential_fieller: tuple[Number, Number] | None
    naive_p_value: Number
    cuped: bool
    cuped_theta: Number
    sequential_tuning: Number


def _two_sided_p(estimate: Number, variance: Number) -> Number:
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(estimate) / np.sqrt(variance)
    return 2 * special.ndtr(-z)


def fieller_interval(
    num: Number,
    var_num: Number,
    den: Number,
    var_den: Number,
    cov: Number = 0.0,
    multiplier: Number = 1.959963984540054,
) -> tuple[Number, Number]:
    """Fieller's interval for the ratio num / den of two jointly normal estimates.

    It is the set of r with |num - r den| <= multiplier sqrt(var_num - 2 r cov + r² var_den)
    (multiplier = z for a fixed-horizon interval, the sequential multiplier for an always-valid
    one). For the relative lift num = the absolute lift and den = the control CTR, so the
    interval excludes 0 exactly when the absolute-lift test rejects. When the denominator is not
    clearly away from 0 the set is unbounded and (-inf, inf) is returned.
    """
    m2 = np.square(multiplier)
    a = den * den - m2 * var_den
    b = num * den - m2 * cov
    c = num * num - m2 * var_num
    disc = b * b - a * c
    bounded = (a > 0) & (disc >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.where(bounded, disc, 0.0))
        lo = np.where(bounded, (b - root) / a, -np.inf)
        hi = np.where(bounded, (b + root) / a, np.inf)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


@np.errstate(divide="ignore", invalid="ignore")
def naive_impression_p_value(control: ArmStats, treatment: ArmStats) -> Number:
    """Per-impression pooled two-proportion z-test (statsmodels' proportions_ztest). Diagnostic only."""
    pooled = (control.sum_x + treatment.sum_x) / (control.sum_y + treatment.sum_y)
    var = pooled * (1 - pooled) * (1 / control.sum_y + 1 / treatment.sum_y)
    return _two_sided_p(treatment.ctr - control.ctr, var)


@np.errstate(divide="ignore", invalid="ignore")
def compare(
    control: ArmStats,
    treatment: ArmStats,
    alpha: float = 0.05,
    sequential_tuning: Number | None = None,
    cuped: bool = False,
    fieller: bool = False,
) -> Comparison:
    """Absolute and relative CTR lift of `treatment` over `control` with CIs and p-values.

    sequential_tuning: N* of the confidence sequence, the planned total users of the experiment
    (both arms); None uses the users seen so far, i.e. treats this look as the final one.
    cuped: adjust with the pre-period CTR (ratio-metric CUPED: the absolute lift minus theta times
    the pre-period CTR difference, one theta for both arms that minimises the variance; the
    relative lift divides that by the control CTR); needs pre-period sums in both arms.
    fieller: also compute Fieller's interval for the relative lift.
    """
    z = stats.norm.ppf(1 - alpha / 2)
    n_total = control.n + treatment.n
    tuning = n_total if sequential_tuning is None else sequential_tuning
    mean_c, mean_t = control.ctr, treatment.ctr
    var_c, var_t = ctr_variance(control), ctr_variance(treatment)
    theta: Number = 0.0
    if cuped:
        if not (control.has_pre and treatment.has_pre):
            raise ValueError("CUPED needs pre-period impressions in both arms")
        mc, mt = _cuped_moments(control), _cuped_moments(treatment)
        theta = (mc.cov_uv / control.n + mt.cov_uv / treatment.n) / (
            mc.var_v / control.n + mt.var_v / treatment.n
        )
        abs_lift = mean_t - mean_c - theta * (mt.pre_ctr - mc.pre_ctr)
        abs_var = (mt.var_u - 2 * theta * mt.cov_uv + theta**2 * mt.var_v) / treatment.n + (
            mc.var_u - 2 * theta * mc.cov_uv + theta**2 * mc.var_v
        ) / control.n
        cov_lift_c = -var_c + theta * mc.cov_uv / control.n
    else:
        abs_lift = mean_t - mean_c
        abs_var = var_t + var_c
        cov_lift_c = -var_c
    # Relative lift = absolute lift / control CTR, by the delta method on that pair; without
    # CUPED this is the familiar var_t / ctr_c² + ctr_t² var_c / ctr_c⁴.
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_lift = abs_lift / mean_c
        rel_var = (
            abs_var / mean_c**2 + abs_lift**2 * var_c / mean_c**4 - 2 * abs_lift * cov_lift_c / mean_c**3
        )
    abs_se, rel_se = np.sqrt(abs_var), np.sqrt(rel_var)
    ratio = (abs_lift, abs_var, mean_c, var_c, cov_lift_c)
    return Comparison(
        control_ctr=mean_c,
        treatment_ctr=mean_t,
        abs_lift=abs_lift,
        abs_lift_se=abs_se,
        abs_lift_ci=(abs_lift - z * abs_se, abs_lift + z * abs_se),
        abs_p_value=_two_sided_p(abs_lift, abs_var),
        abs_lift_ci_sequential=sequential.interval(abs_lift, abs_var, n_total, tuning, alpha),
        rel_lift=rel_lift,
        rel_lift_se=rel_se,
        rel_lift_ci=(rel_lift - z * rel_se, rel_lift + z * rel_se),
        p_value=_two_sided_p(rel_lift, rel_var),
        rel_lift_ci_sequential=sequential.interval(rel_lift, rel_var, n_total, tuning, alpha),
        p_value_sequential=sequential.p_value(rel_lift, rel_var, n_total, tuning, alpha),
        rel_lift_ci_fieller=fieller_interval(*ratio, multiplier=z) if fieller else None,
        rel_lift_ci_sequential_fieller=(
            fieller_interval(*ratio, multiplier=sequential.multiplier(n_total, tuning, alpha))
            if fieller
            else None
        ),
        naive_p_value=naive_impression_p_value(control, treatment),
        cuped=cuped,
        cuped_theta=theta,
        sequential_tuning=tuning,
    )


@dataclass(frozen=True)
class SRM:
    """Sample-ratio mismatch: chi-square of users per arm against the configured weights."""

    chi2: float
    p_value: float
    expected: dict[str, float]
    alert: bool


def srm_test(
    users: Mapping[str, float], weights: Mapping[str, float] | None = None, threshold: float = SRM_ALERT_P
) -> SRM:
    """Chi-square goodness of fit of users per arm; weights default to equal. Alert when p < threshold."""
    arms = list(users)
    if len(arms) < 2:
        raise ValueError("SRM needs at least two arms")
    w = np.array([1.0] * len(arms) if weights is None else [float(weights.get(a, np.nan)) for a in arms])
    if weights is not None and set(weights) != set(arms):
        raise ValueError(f"weights name arms {sorted(weights)} but the data has arms {sorted(arms)}")
    if not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError("weights must be positive numbers")
    observed = np.array([float(users[a]) for a in arms])
    expected = observed.sum() * w / w.sum()
    if observed.sum() == 0:  # no users yet: no test (NaN), no alert, and no 0/0 inside scipy
        return SRM(chi2=math.nan, p_value=math.nan, expected=dict.fromkeys(arms, 0.0), alert=False)
    chi2, p = stats.chisquare(observed, expected)
    return SRM(
        chi2=float(chi2),
        p_value=float(p),
        expected=dict(zip(arms, expected.tolist(), strict=True)),
        alert=bool(p < threshold),
    )


def adjust_p_values(p_values: Sequence[float], method: Literal["holm", "bh"] = "holm") -> np.ndarray:
    """Holm (family-wise error) or Benjamini-Hochberg (false discovery rate) adjusted p-values.

    Same results as statsmodels' multipletests(method="holm" / "fdr_bh"); written out so that the
    report does not import statsmodels (slow to import, pulls in pandas) for ten lines of code.
    """
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p)
    ranked = p[order]
    if method == "holm":
        adjusted = np.maximum.accumulate((m - np.arange(m)) * ranked)
    elif method == "bh":
        adjusted = np.minimum.accumulate(m / np.arange(m, 0, -1) * ranked[::-1])[::-1]
    else:
        raise ValueError(f"unknown correction {method!r}: use 'holm' or 'bh'")
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def winsor_cap(values_by_arm: Sequence[np.ndarray], percentile: float) -> float:
    """The cap for per-user counts: the `percentile` of the values pooled over all arms.

    Pooling keeps the cap independent of the treatment, so capping cannot create a lift.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    return float(np.percentile(np.concatenate([np.ravel(v) for v in values_by_arm]), percentile))


def winsorize(values_by_arm: Sequence[np.ndarray], percentile: float) -> list[np.ndarray]:
    """Each arm's per-user counts capped at the pooled `percentile` (see `winsor_cap`)."""
    cap = winsor_cap(values_by_arm, percentile)
    return [np.minimum(np.asarray(v, dtype=float), cap) for v in values_by_arm]


@dataclass(frozen=True)
class Analysis:
    """Everything the CLI and the report show for one experiment at one point in time."""

    control: str
    arms: dict[str, ArmStats]
    srm: SRM
    comparisons: dict[str, Comparison]
    adjusted_p_values: dict[str, float]
    correction: str | None

    def to_dict(self) -> dict[str, Any]:
        """The `abrec analyze-file --json` shape; lifts are None for the control, NaN becomes None."""
        arms: dict[str, Any] = {}
        for name, s in self.arms.items():
            row: dict[str, Any] = {
                "users": int(s.n),
                "impressions": _num(s.sum_y),
                "clicks": _num(s.sum_x),
                "ctr": _num(s.ctr),
            }
            c = self.comparisons.get(name)
            row.update(
                abs_lift=_num(c.abs_lift) if c else None,
                abs_lift_ci=_pair(c.abs_lift_ci) if c else None,
                abs_p_value=_num(c.abs_p_value) if c else None,
                rel_lift=_num(c.rel_lift) if c else None,
                rel_lift_ci=_pair(c.rel_lift_ci) if c else None,
                p_value=_num(c.p_value) if c else None,
                rel_lift_ci_sequential=_pair(c.rel_lift_ci_sequential) if c else None,
                p_value_adjusted=_num(self.adjusted_p_values[name]) if c else None,
            )
            arms[name] = row
        return {"srm_p_value": _num(self.srm.p_value), "arms": arms}


def _num(v: Number) -> float | None:
    f = float(v)
    return f if np.isfinite(f) else None


def _pair(ci: tuple[Number, Number]) -> list[float | None]:
    return [_num(ci[0]), _num(ci[1])]


def analyze(
    arms: Mapping[str, ArmStats],
    control: str,
    weights: Mapping[str, float] | None = None,
    alpha: float = 0.05,
    sequential_tuning: float | None = None,
    cuped: bool | None = None,
    correction: Literal["holm", "bh"] | None = "holm",
) -> Analysis:
    """SRM plus every arm against `control`.

    sequential_tuning: N* (planned total users of the experiment); None = users seen so far.
    cuped: None applies CUPED when every arm has pre-period data.
    correction: adjusts the relative-lift p-values over the treatment arms (identity for one).
    """
    if control not in arms:
        raise ValueError(f"control arm {control!r} is not among the arms {sorted(arms)}")
    if len(arms) < 2:
        raise ValueError("need at least one arm besides the control")
    use_cuped = all(s.has_pre for s in arms.values()) if cuped is None else cuped
    srm = srm_test({a: s.n for a, s in arms.items()}, weights)
    comparisons = {
        name: compare(arms[control], s, alpha, sequential_tuning, cuped=use_cuped, fieller=True)
        for name, s in arms.items()
        if name != control
    }
    raw = [float(c.p_value) for c in comparisons.values()]
    adjusted = adjust_p_values(raw, correction) if correction else np.asarray(raw)
    return Analysis(
        control=control,
        arms=dict(arms),
        srm=srm,
        comparisons=comparisons,
        adjusted_p_values=dict(zip(comparisons, adjusted.tolist(), strict=True)),
        correction=correction,
    )
