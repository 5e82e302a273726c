"""The verdict for an experiment: ship, rollback, inconclusive or keep running, with the reasons.

Rules (issue 5): ship when the sequential CI of the primary metric lies above 0, SRM is clean,
every guardrail holds and both the minimum runtime (a weekly cycle by default) and the minimum
sample are reached; roll back as soon as the CI lies below 0 or a guardrail fails (the
sequential CI is valid at any look, and harm should not wait for the minimum runtime);
"inconclusive" once the planned end is reached without either; otherwise keep running.
An SRM alert blocks shipping: the assignment is broken, so the lift cannot be trusted.

The confidence sequences are asymptotic: with a handful of clicks per arm the relative lift is
far from normal and its interval misleads (the simulations in tests/test_analysis_simulation.py
show it). So the primary metric is only read once every arm has `min_clicks_per_arm` clicks;
until then only guardrails can end the experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from abrec.analysis.stats import SRM_ALERT_P

Verdict = Literal["ship", "rollback", "inconclusive", "keep running"]

MIN_CLICKS_PER_ARM = 100


@dataclass(frozen=True)
class Guardrail:
    """An operational metric that must stay at or below its threshold (lower is better).

    E.g. Guardrail("fallback rate", 0.004, 0.01), Guardrail("p99 latency ms", 180, 250).
    """

    name: str
    value: float
    threshold: float

    @property
    def holds(self) -> bool:
        return self.value <= self.threshold


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...]


def decide(
    sequential_ci: tuple[float, float],
    srm_p_value: float,
    guardrails: Sequence[Guardrail],
    runtime_days: float,
    users: float,
    min_arm_clicks: float,
    planned_days: float,
    min_runtime_days: float = 7.0,
    min_users: float = 1000,
    min_clicks_per_arm: float = MIN_CLICKS_PER_ARM,
    srm_threshold: float = SRM_ALERT_P,
) -> Decision:
    """Apply the rules to the primary metric's always-valid CI of the lift (absolute or relative).

    users: users in the experiment so far (all arms); min_arm_clicks: clicks of the arm with the
    fewest; planned_days: the planned duration.
    """
    lo, hi = sequential_ci
    readable = min_arm_clicks >= min_clicks_per_arm
    failed = [g for g in guardrails if not g.holds]
    reasons = [f"guardrail {g.name} failed: {g.value:g} > {g.threshold:g}" for g in failed]
    if readable and hi < 0:
        reasons.append(f"the primary metric's sequential CI [{lo:.4g}, {hi:.4g}] lies below 0")
    if reasons:
        return Decision("rollback", tuple(reasons))

    blockers = []
    if not readable:
        blockers.append(f"too little data: {min_arm_clicks:g} clicks in an arm < {min_clicks_per_arm:g}")
    if srm_p_value < srm_threshold:
        blockers.append(
            f"sample-ratio mismatch (p = {srm_p_value:.2g} < {srm_threshold:g}): check the assignment"
        )
    if runtime_days < min_runtime_days:
        blockers.append(f"runtime {runtime_days:.1f} days < minimum {min_runtime_days:g}")
    if users < min_users:
        blockers.append(f"{users:g} users < minimum sample {min_users:g}")
    if readable and lo > 0 and not blockers:
        ci_above = f"the primary metric's sequential CI [{lo:.4g}, {hi:.4g}] lies above 0"
        return Decision("ship", (ci_above, "guardrails hold"))
    if readable and not lo > 0:
        blockers.append(f"the primary metric's sequential CI [{lo:.4g}, {hi:.4g}] does not exclude 0")
    if runtime_days >= planned_days:
        return Decision("inconclusive", (f"planned end ({planned_days:g} days) reached", *blockers))
    return Decision("keep running", tuple(blockers))
