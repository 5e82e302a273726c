"""Always-valid (sequential) confidence intervals: asymptotic confidence sequences.

These are the asymptotic confidence sequences of Waudby-Smith, Pekelis, Ramdas et al.
("Time-uniform central limit theory and asymptotic confidence sequences", arXiv:2103.06476,
eq. 9 for the half-width and eq. 161 for the mixing parameter), as GrowthBook's gbstats uses
them. The tuning constant N* is the sample size at which the sequence is tightest; set it to the
planned total number of users (both arms of the comparison) of the experiment.

With an estimator whose variance is `variance` after `n` users in total, the half-width is

    half-width    = multiplier(n) * sqrt(variance)
    multiplier(n) = sqrt(2 (n rho^2 + 1) / (n rho^2) * ln(sqrt(n rho^2 + 1) / alpha))
    rho^2         = (-2 ln alpha + ln(-2 ln alpha + 1)) / N*

which is gbstats' `sequential_interval_halfwidth(s2 = variance * n, n, N*, alpha)` written in terms
of the estimator's variance. At n = N* and alpha = 0.05 the multiplier is 3.035 against the fixed
1.960, so a sequential interval is about 1.55 times as wide as the fixed one at the planned end.

All functions work elementwise on numpy arrays as well as on floats.
"""

from __future__ import annotations

import numpy as np

Number = float | np.ndarray


def rho_squared(alpha: float, tuning: float) -> float:
    """The mixing parameter rho^2 that makes the sequence tightest at `tuning` = N* users."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not tuning > 0:
        raise ValueError(f"the sequential tuning constant N* must be positive, got {tuning}")
    log_alpha = np.log(alpha)
    return float((-2 * log_alpha + np.log(-2 * log_alpha + 1)) / tuning)


def multiplier(n: Number, tuning: Number, alpha: float = 0.05) -> Number:
    """Half-width in standard errors of the confidence sequence after `n` users in total.

    The counterpart of the fixed-horizon z = 1.96; it is smallest relative to z near n = N*.
    """
    nr2 = np.asarray(n, dtype=float) * rho_squared(alpha, 1.0) / np.asarray(tuning, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(2 * (nr2 + 1) / nr2 * np.log(np.sqrt(nr2 + 1) / alpha))


def interval(
    estimate: Number, variance: Number, n: Number, tuning: Number, alpha: float = 0.05
) -> tuple[Number, Number]:
    """Always-valid (lower, upper) interval for `estimate` with estimator variance `variance`."""
    half = multiplier(n, tuning, alpha) * np.sqrt(variance)
    return estimate - half, estimate + half


def p_value(estimate: Number, variance: Number, n: Number, tuning: Number, alpha: float = 0.05) -> Number:
    """Always-valid p-value of estimate = 0: 1 / (the mixture e-value), capped at 1.

    Uses the same rho as `interval`, so p < alpha exactly when the interval excludes 0
    (Waudby-Smith et al., eq. 155).
    """
    nr2 = np.asarray(n, dtype=float) * rho_squared(alpha, 1.0) / np.asarray(tuning, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z2 = np.square(estimate) / variance
        log_e = nr2 * z2 / (2 * (nr2 + 1)) - 0.5 * np.log(nr2 + 1)
        return np.minimum(1.0, np.exp(-log_e))
