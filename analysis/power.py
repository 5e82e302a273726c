"""Sample size and duration for a minimum detectable relative CTR lift.

The per-user variance of CTR comes from the delta method (users are the unit), so clustering of
clicks within users is accounted for; impression-level binomial formulas understate the users
needed whenever users differ in propensity or see several impressions. With sequential testing
the critical value is the confidence sequence's multiplier at the planned end (3.04 instead of
1.96 at alpha = 0.05 when N* is the planned total), which roughly doubles the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abrec.analysis import sequential
from abrec.analysis.stats import ArmStats, ctr_variance
from scipy import stats


@dataclass(frozen=True)
class PowerResult:
    users_per_arm: int
    total_users: int
    days: float | None  # at the current daily traffic of new users; None when traffic is unknown
    critical_value: float  # 1.96 for a fixed-horizon test at alpha = 0.05, larger when sequential
    baseline_ctr: float
    per_user_variance: float  # n * Var(CTR): variance of the linearised per-user CTR


def users_needed(
    baseline: ArmStats,
    mde: float,
    alpha: float = 0.05,
    power: float = 0.8,
    arms: int = 2,
    sequential_test: bool = True,
    daily_users: float | None = None,
) -> PowerResult:
    """Users per arm to detect a relative lift `mde` (0.05 = +5 %) of CTR with the given power.

    baseline: the control arm's sufficient statistics (from a previous experiment or the first
    days of this one); its per-user variance and CTR are taken as the truth. Each treatment arm
    is compared with the control, arms share traffic equally and N* of the sequential test is
    the planned total `arms * users_per_arm`. The relative lift's delta-method variance under
    the alternative is (sigma_t² + (1 + mde)² sigma²) / (ctr² n), with the treatment's per-user
    variance sigma_t² = (1 + mde) sigma², proportional to its CTR as for overdispersed counts
    (the part of the variance from users' differing propensities grows with the square of the
    lift, the binomial part linearly).
    """
    if not mde > 0:
        raise ValueError("mde must be a positive relative lift, e.g. 0.05")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError("alpha and power must lie in (0, 1)")
    if arms < 2:
        raise ValueError("an experiment has at least two arms")
    ctr = float(baseline.ctr)
    sigma2 = float(baseline.n * ctr_variance(baseline))
    if not (ctr > 0 and math.isfinite(sigma2)):
        raise ValueError("the baseline needs clicks from at least two users")
    if sequential_test:
        # The pair's n over N* is 2/arms whatever the size, so the multiplier is a constant.
        critical = float(sequential.multiplier(2.0, float(arms), alpha))
    else:
        critical = float(stats.norm.ppf(1 - alpha / 2))
    unit_var = sigma2 / ctr**2 * ((1 + mde) + (1 + mde) ** 2)
    per_arm = math.ceil((critical + stats.norm.ppf(power)) ** 2 * unit_var / mde**2)
    total = per_arm * arms
    return PowerResult(
        users_per_arm=per_arm,
        total_users=total,
        days=total / daily_users if daily_users else None,
        critical_value=critical,
        baseline_ctr=ctr,
        per_user_variance=sigma2,
    )
