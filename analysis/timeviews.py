"""Time views over nightly snapshots: daily CTR, cumulative lift with CI, lift by days since exposure.

A snapshot holds an arm's cumulative sufficient statistics up to a day (each user's totals so
far). A cumulative delta-method CI needs those per-user totals: daily CIs cannot be summed.
Daily CTR, on the other hand, only needs the linear sums, so it comes from differences of
consecutive snapshots. The novelty view takes per-cohort statistics instead: for each k, the
sums over users of their clicks and impressions on the k-th day after their first exposure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from abrec.analysis.stats import ArmStats, compare


@dataclass(frozen=True)
class Snapshot:
    """One arm's statistics at one point: `key` is a date (cumulative) or days since exposure."""

    key: Hashable
    arm: str
    stats: ArmStats


@dataclass(frozen=True)
class DailyCtr:
    key: Hashable
    arm: str
    clicks: float
    impressions: float
    ctr: float | None  # None on a day without impressions


@dataclass(frozen=True)
class LiftPoint:
    key: Hashable
    arm: str
    users: float
    rel_lift: float
    rel_lift_ci: tuple[float, float]
    rel_lift_ci_sequential: tuple[float, float]
    abs_lift: float
    abs_lift_ci: tuple[float, float]
    abs_lift_ci_sequential: tuple[float, float]
    p_value: float


def _by_arm(snapshots: Sequence[Snapshot]) -> dict[str, list[Snapshot]]:
    arms: dict[str, list[Snapshot]] = defaultdict(list)
    for s in sorted(snapshots, key=lambda s: s.key):  # type: ignore[arg-type, return-value]
        arms[s.arm].append(s)
    return arms


def daily_ctr(cumulative: Sequence[Snapshot]) -> list[DailyCtr]:
    """Each arm's CTR on each day, from differences of consecutive cumulative snapshots."""
    out = []
    for arm, snaps in _by_arm(cumulative).items():
        prev_x = prev_y = 0.0
        for s in snaps:
            x, y = float(s.stats.sum_x) - prev_x, float(s.stats.sum_y) - prev_y
            out.append(DailyCtr(s.key, arm, x, y, x / y if y > 0 else None))
            prev_x, prev_y = float(s.stats.sum_x), float(s.stats.sum_y)
    return out


def cumulative_lift(
    cumulative: Sequence[Snapshot], control: str, alpha: float = 0.05, sequential_tuning: float | None = None
) -> list[LiftPoint]:
    """Each arm's lift over the control with CIs as of each snapshot date.

    sequential_tuning: N*, the planned total users; None treats each date as a final look.
    """
    return _lift_series(cumulative, control, alpha, sequential_tuning)


def lift_by_exposure_day(cohorts: Sequence[Snapshot], control: str, alpha: float = 0.05) -> list[LiftPoint]:
    """Lift on the k-th day after first exposure (key = k): a shrinking lift means novelty.

    Each snapshot sums, over the users of an arm exposed at least k days ago, their clicks and
    impressions on day k after their first exposure (users without impressions that day count
    with zeros).
    """
    return _lift_series(cohorts, control, alpha, None)


def _lift_series(
    snapshots: Sequence[Snapshot], control: str, alpha: float, sequential_tuning: float | None
) -> list[LiftPoint]:
    # No CUPED here: the point is the shape over time, and old snapshots may lack pre-period terms.
    arms = _by_arm(snapshots)
    if control not in arms:
        raise ValueError(f"no snapshots for the control arm {control!r}")
    control_at = {s.key: s.stats for s in arms[control]}
    out = []
    for arm, snaps in arms.items():
        if arm == control:
            continue
        for s in snaps:
            base = control_at.get(s.key)
            if base is None:
                continue
            c = compare(base, s.stats, alpha, sequential_tuning)
            out.append(
                LiftPoint(
                    key=s.key,
                    arm=arm,
                    users=float(base.n + s.stats.n),
                    rel_lift=float(c.rel_lift),
                    rel_lift_ci=(float(c.rel_lift_ci[0]), float(c.rel_lift_ci[1])),
                    rel_lift_ci_sequential=(
                        float(c.rel_lift_ci_sequential[0]),
                        float(c.rel_lift_ci_sequential[1]),
                    ),
                    abs_lift=float(c.abs_lift),
                    abs_lift_ci=(float(c.abs_lift_ci[0]), float(c.abs_lift_ci[1])),
                    abs_lift_ci_sequential=(
                        float(c.abs_lift_ci_sequential[0]),
                        float(c.abs_lift_ci_sequential[1]),
                    ),
                    p_value=float(c.p_value),
                )
            )
    return out
