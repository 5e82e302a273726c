"""Synthetic per-user click data with a known truth, for checking the statistics by simulation.

Users differ in activity (gamma-distributed impression rate: a few heavy returning users, many
light ones) and in click propensity (beta-distributed), so clicks cluster by user and impressions
are far from independent. The same rate and propensity drive a pre-period, so CUPED has a real
covariate. A treatment multiplies every user's click probability by (1 + lift); propensities are
drawn as half a Beta variable so that p (1 + lift) stays below 1 for lifts up to 100 %, which
makes the true CTR exactly `ctr` and the true relative lift exactly `lift`.

Vectorised: arrays have shape (experiments, users) and are drawn in one go per arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from abrec.analysis.stats import ArmStats


@dataclass(frozen=True)
class Population:
    ctr: float = 0.1  # mean click probability, also the true CTR
    concentration: float = 4.0  # Beta a + b; smaller = clicks cluster more strongly by user
    activity_mean: float = 6.0  # mean impressions per user beyond the first (exposure) one
    activity_shape: float = 1.0  # gamma shape of user activity: 1 = exponential, smaller = heavier tail
    pre_activity: float = 1.0  # pre-period impression rate relative to the experiment period

    def __post_init__(self) -> None:
        if not 0 < self.ctr < 0.5:
            raise ValueError("ctr must lie in (0, 0.5)")


@dataclass(frozen=True)
class Users:
    clicks: np.ndarray
    impressions: np.ndarray
    pre_clicks: np.ndarray
    pre_impressions: np.ndarray

    def stats(self, pre: bool = True) -> ArmStats:
        if pre:
            return ArmStats.from_arrays(self.clicks, self.impressions, self.pre_clicks, self.pre_impressions)
        return ArmStats.from_arrays(self.clicks, self.impressions)


def _propensity(rng: np.random.Generator, pop: Population, shape: tuple[int, ...]) -> np.ndarray:
    """Click probabilities: half a Beta(c * 2 ctr, c * (1 - 2 ctr)) variable, mean ctr."""
    # Beta as a ratio of gammas: numpy's own beta sampler is 4x slower for parameters below 1.
    a = rng.standard_gamma(pop.concentration * 2 * pop.ctr, shape)
    b = rng.standard_gamma(pop.concentration * (1 - 2 * pop.ctr), shape)
    return 0.5 * a / (a + b)


def draw_users(
    rng: np.random.Generator, shape: tuple[int, ...], pop: Population = Population(), lift: float = 0.0
) -> Users:
    """Users of one arm; every user was exposed, so has at least one impression."""
    if not -1 < lift <= 1:
        raise ValueError("lift must lie in (-1, 1]")
    rate = rng.gamma(pop.activity_shape, pop.activity_mean / pop.activity_shape, shape)
    p = _propensity(rng, pop, shape)
    impressions = 1 + rng.poisson(rate)
    clicks = rng.binomial(impressions, p * (1 + lift))
    pre_impressions = rng.poisson(rate * pop.pre_activity)
    pre_clicks = rng.binomial(pre_impressions, p)
    return Users(clicks, impressions, pre_clicks, pre_impressions)


def draw_daily_cumulative(
    rng: np.random.Generator,
    experiments: int,
    users: int,
    days: int,
    pop: Population = Population(),
    lift: float = 0.0,
    arrival_days: float = 7.0,
) -> list[ArmStats]:
    """Cumulative sufficient statistics of one arm after each of `days` days (arrays over experiments).

    `users` users arrive over the days, most of them early (first visits decay geometrically,
    `arrival_days` on average; those who would come after the last day never enter), and return
    every day after with Poisson impressions at their own rate (activity_mean spread over the
    days); their totals so far enter each day's sums, as in the nightly snapshots.
    """
    arrival = rng.geometric(1 / arrival_days, (experiments, users, 1)) - 1
    day = np.arange(days)
    active = day >= arrival
    shape = (experiments, users, 1)
    # A user present from the first day sees about 2 * activity_mean impressions in all.
    rate = rng.gamma(pop.activity_shape, pop.activity_mean / pop.activity_shape / days * 2, shape)
    p = _propensity(rng, pop, shape)
    impressions = np.where(active, rng.poisson(np.broadcast_to(rate, active.shape)) + (day == arrival), 0)
    clicks = rng.binomial(impressions, np.broadcast_to(p * (1 + lift), active.shape))
    x = np.cumsum(clicks, axis=2, dtype=np.float64)
    y = np.cumsum(impressions, axis=2, dtype=np.float64)
    n = active.sum(axis=1, dtype=np.float64)
    sums = dict(
        sum_x=x.sum(1), sum_y=y.sum(1), sum_x2=(x * x).sum(1), sum_y2=(y * y).sum(1), sum_xy=(x * y).sum(1)
    )
    return [ArmStats(n=n[:, d], **{k: v[:, d] for k, v in sums.items()}) for d in range(days)]


def concat(parts: list[ArmStats]) -> ArmStats:
    """Join ArmStats of several chunks of simulated experiments into one (arrays end to end)."""
    sizes = [np.size(p.n) for p in parts]

    def join(name: str) -> np.ndarray:
        pieces = [np.broadcast_to(getattr(p, name), (k,)) for p, k in zip(parts, sizes, strict=True)]
        return np.concatenate(pieces)

    return ArmStats(**{name: join(name) for name in ArmStats.__dataclass_fields__})
