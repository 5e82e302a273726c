"""What the pages show, gathered from experiments/, the registry and the stored analysis.

Every function here reads small tables only (experiments, arms, phases, registry rows, nightly
snapshots and stored reports): page cost does not grow with the event log.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from abrec.analysis import power, stats, store, timeviews
from abrec.experiments.schema import STATUSES, AuditLog, Experiment, Phase, utcnow
from abrec.models import registry
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, selectinload

# Running experiments first, then paused, drafts, and the finished ones.
STATUS_ORDER = {"running": 0, "paused": 1, "draft": 2, "stopped": 3, "shipped": 4}


@dataclass
class ArmRow:
    name: str
    model_alias: str
    weight: float
    is_control: bool
    users: float | None = None
    impressions: float | None = None
    clicks: float | None = None
    ctr: float | None = None
    rel_lift: float | None = None
    rel_lift_ci: list[float | None] | None = None
    p_value: float | None = None


@dataclass
class Summary:
    """One experiment as the overview shows it; figures come from its latest stored report."""

    experiment: Experiment
    arms: list[ArmRow]
    days_running: float | None
    report_date: str | None = None
    report_phase: int | None = None
    srm_p_value: float | None = None
    srm_alert: bool | None = None
    verdict: str | None = None
    verdict_arm: str | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapshot_date: str | None = None  # figures from a snapshot: there is no report yet


def days_running(experiment: Experiment, now: datetime | None = None) -> float | None:
    if experiment.started_at is None:
        return None
    end = experiment.stopped_at or now or utcnow()
    return max(0.0, (end - experiment.started_at).total_seconds() / 86400)


def _matching(query, search: str | None):
    """Experiments whose key or name contains `search` (case-insensitive), for the overview's search box."""
    if not search:
        return query
    pattern = f"%{search.lower()}%"
    return query.where(func.lower(Experiment.key).like(pattern) | func.lower(Experiment.name).like(pattern))


def status_counts(session: Session, search: str | None = None) -> dict[str, int]:
    query = _matching(select(Experiment.status, func.count()).group_by(Experiment.status), search)
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({status: n for status, n in session.execute(query)})
    return counts


def page_of_experiments(
    session: Session, page: int, per_page: int, status: str | None = None, search: str | None = None
) -> list[Experiment]:
    """One page of experiments, live ones first, newest first: one query plus one for the arms."""
    order = case(STATUS_ORDER, value=Experiment.status, else_=9)
    query = (
        select(Experiment)
        .options(selectinload(Experiment.arms))
        .order_by(order, Experiment.created_at.desc(), Experiment.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    if status is not None:
        query = query.where(Experiment.status == status)
    return list(session.scalars(_matching(query, search)))


def summarise(experiment: Experiment, report: dict[str, Any] | None, report_date: str | None) -> Summary:
    """Merge an experiment's definition with its latest report (None: no report yet)."""
    arms = [
        ArmRow(a.name, a.model_alias, a.weight, is_control=a.position == 0) for a in experiment.arms
    ]
    summary = Summary(experiment, arms, days_running(experiment))
    if report is None:
        return summary
    figures = report.get("arms", {})
    for arm in arms:
        row = figures.get(arm.name) or {}
        arm.users = row.get("users")
        arm.impressions = row.get("impressions")
        arm.clicks = row.get("clicks")
        arm.ctr = row.get("ctr")
        arm.rel_lift = row.get("rel_lift")
        arm.rel_lift_ci = row.get("rel_lift_ci_sequential") or row.get("rel_lift_ci")
        arm.p_value = row.get("p_value_adjusted", row.get("p_value"))
    summary.report_date = report_date
    summary.report_phase = (report.get("phase") or {}).get("number")
    summary.srm_p_value = report.get("srm_p_value")
    srm = report.get("srm") or {}
    summary.srm_alert = srm.get("alert", _srm_alert(summary.srm_p_value))
    decision = report.get("decision") or {}
    summary.verdict = decision.get("verdict")
    summary.verdict_arm = decision.get("arm")
    summary.reasons = list(decision.get("reasons", []))
    summary.warnings = list(report.get("warnings", []))
    return summary


def fill_from_snapshot(summary: Summary, views: PhaseViews) -> None:
    """Before the first report, show each arm's counts from the latest nightly snapshot (no lift)."""
    if summary.report_date is not None or not views.days:
        return
    for arm in summary.arms:
        s = views.latest.get(arm.name)
        if s is not None:
            arm.users, arm.impressions, arm.clicks = float(s.n), float(s.sum_y), float(s.sum_x)
            arm.ctr = float(s.sum_x) / float(s.sum_y) if float(s.sum_y) > 0 else None
    summary.snapshot_date = views.days[-1].isoformat()
    summary.srm_p_value = views.srm_p_value
    summary.srm_alert = _srm_alert(views.srm_p_value)


def _srm_alert(p: float | None) -> bool | None:
    return None if p is None or not math.isfinite(p) else p < stats.SRM_ALERT_P


def decision_text(summary: Summary) -> str:
    """The verdict in plain words for a product manager."""
    exp = summary.experiment
    arm = summary.verdict_arm
    if exp.status == "draft":
        return "Not started yet."
    if exp.status == "shipped":
        return f"Shipped: {exp.shipped_arm} now serves everyone."
    if summary.verdict is None and summary.snapshot_date:
        return (f"No report yet: the counts are from the snapshot of {summary.snapshot_date}; "
                "lifts and the decision come with the first report.")
    if summary.verdict is None:
        return "No nightly report yet: figures appear after the first report."
    if summary.verdict == "ship":
        winner = arm or "the treatment"
        return f"Ship {winner}: it beats the control with confidence, and the guardrails hold."
    if summary.verdict == "rollback":
        return (f"Roll back {arm}: it is worse than the control, or one of its guardrails failed."
                if arm else "Roll back: a treatment is worse than the control or a guardrail failed.")
    if summary.verdict == "inconclusive":
        return "Inconclusive: the planned end is reached without a clear winner."
    return "Keep running: not enough evidence yet to decide."


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass
class RegistryView:
    versions_by_model: dict[str, list[registry.ModelVersion]]
    aliases: list[registry.ModelAlias]
    aliases_by_version: dict[int, list[str]]
    history: list[registry.ModelAliasHistory]


def registry_view(session: Session, history_limit: int = 200) -> RegistryView:
    versions = registry.list_versions(session)
    by_model: dict[str, list[registry.ModelVersion]] = defaultdict(list)
    for v in versions:
        by_model[v.name].append(v)
    for rows in by_model.values():
        rows.sort(key=lambda v: v.version, reverse=True)
    aliases = registry.list_aliases(session)
    by_version: dict[int, list[str]] = defaultdict(list)
    for a in aliases:
        by_version[a.version_id].append(a.ref)
    history = list(
        session.scalars(
            select(registry.ModelAliasHistory)
            .order_by(registry.ModelAliasHistory.at.desc(), registry.ModelAliasHistory.id.desc())
            .limit(history_limit)
        )
    )
    return RegistryView(dict(by_model), aliases, dict(by_version), history)


def metric(version: registry.ModelVersion, name: str) -> tuple[float | None, str]:
    """An offline metric of a version and the split it was measured on ("test", "valid" or "").

    Checkpoints record metrics flat (`recall@20`) or per split (`{"valid": {"valid_recall@20": ..}}`);
    test figures are preferred, as validation ones picked the epoch.
    """
    metrics = version.metrics or {}
    candidates = [
        ("test", metrics.get("test"), name), ("test", metrics.get("test"), f"test_{name}"),
        ("test", metrics, f"test_{name}"), ("", metrics, name),
        ("valid", metrics.get("valid"), name), ("valid", metrics.get("valid"), f"valid_{name}"),
        ("valid", metrics, f"valid_{name}"),
    ]
    for split, table, key in candidates:
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value), split
    return None, ""


@dataclass
class ArmOnAlias:
    """An experiment arm beside the model version its alias points to now."""

    experiment_key: str
    experiment_status: str
    arm: str
    position: int
    model_alias: str
    version: registry.ModelVersion | None
    ctr: float | None
    rel_lift: float | None
    report_date: str | None


def arms_on_aliases(session: Session, live_limit: int = 50, finished_limit: int = 20) -> list[ArmOnAlias]:
    """Arms of the newest live experiments and of the most recently finished ones, with online CTR."""
    live = list(session.scalars(
        select(Experiment).options(selectinload(Experiment.arms))
        .where(Experiment.status.in_(("running", "paused")))
        .order_by(Experiment.started_at.desc()).limit(live_limit)
    ))
    finished = list(session.scalars(
        select(Experiment).options(selectinload(Experiment.arms))
        .where(Experiment.status.in_(("stopped", "shipped")))
        .order_by(Experiment.stopped_at.desc()).limit(finished_limit)
    ))
    experiments = live + finished
    aliases = {a.ref: a.version for a in registry.list_aliases(session)}
    reports = latest_reports(session, [e.id for e in experiments])
    out = []
    for e in experiments:
        day, report = reports.get(e.id, (None, None))
        figures = (report or {}).get("arms", {})
        for arm in e.arms:
            row = figures.get(arm.name) or {}
            out.append(ArmOnAlias(e.key, e.status, arm.name, arm.position, arm.model_alias,
                                  aliases.get(arm.model_alias), row.get("ctr"), row.get("rel_lift"), day))
    return out


def latest_reports(session: Session, experiment_ids: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """The newest stored nightly report of each experiment: {id: (ISO date, report JSON)}."""
    return store.latest_reports(session, experiment_ids)


@dataclass
class Served:
    """A model version that an arm's alias pointed to during part of the experiment."""

    version: str
    since: datetime
    until: datetime | None  # None: still serving


def served_versions(session: Session, experiment: Experiment) -> dict[str, list[Served]]:
    """Per arm, which version its alias pointed to when, over the experiment's run (alias history)."""
    start = experiment.started_at
    end = experiment.stopped_at
    out: dict[str, list[Served]] = {}
    for arm in experiment.arms:
        try:
            moves = registry.alias_history(session, arm.model_alias)
        except registry.RegistryError:
            moves = []
        spans = [
            Served(m.to_version.label, m.at, moves[i + 1].at if i + 1 < len(moves) else None)
            for i, m in enumerate(moves)
        ]
        if start is not None:
            # Keep the spans that overlap the run, clipped to it.
            spans = [
                s for s in spans
                if (s.until is None or s.until > start) and (end is None or s.since < end)
            ]
            for s in spans:
                s.since = max(s.since, start)
                if end is not None and (s.until is None or s.until > end):
                    s.until = end
        out[arm.name] = spans
    return out


def recent_audit(session: Session, key: str, limit: int = 30) -> list[AuditLog]:
    """The newest changes to one experiment, newest first."""
    return list(session.scalars(
        select(AuditLog).where(AuditLog.entity == "experiment", AuditLog.entity_id == key)
        .order_by(AuditLog.id.desc()).limit(limit)
    ))


# ---------------------------------------------------------------------------------------------
# One phase over time, from the nightly snapshots


@dataclass
class PowerProgress:
    users_so_far: float
    users_needed: int | None  # None when the control has too little data to estimate variance
    target_effect: float
    days_left: float | None
    note: str = ""


@dataclass
class PhaseViews:
    """Everything the experiment page plots for one phase; lists are empty before the first night."""

    phase: Phase
    control: str
    arms: list[str]
    days: list[Any]
    daily_ctr: list[timeviews.DailyCtr]
    cumulative_lift: list[timeviews.LiftPoint]
    novelty: list[timeviews.LiftPoint]
    latest: dict[str, stats.ArmStats]  # each arm's cumulative statistics on the last day
    users: dict[str, float]
    expected_users: dict[str, float]
    srm_p_value: float | None
    power: PowerProgress | None
    health: dict[Any, dict[str, store.Health]]


def _finite(point: timeviews.LiftPoint) -> bool:
    return all(math.isfinite(v) for v in (point.rel_lift, *point.rel_lift_ci, *point.rel_lift_ci_sequential))


DEFAULT_TARGET_EFFECT = 0.05


def phase_views(session: Session, experiment: Experiment, phase: Phase) -> PhaseViews:
    arms = [a.name for a in experiment.arms]
    control = arms[0]
    snapshots = store.load_snapshots(session, phase.id)
    days = sorted({s.key for s in snapshots})
    # N* of the confidence sequence: the planned total users (None treats each day as the final look).
    tuning = float(experiment.planned_users) if experiment.planned_users else None
    # A lift needs impressions on both sides: an arm that has none yet (or a day without) is left out.
    served = [s for s in snapshots if float(s.stats.sum_y) > 0]
    lift: list[timeviews.LiftPoint] = []
    if any(s.arm == control for s in served):
        lift = timeviews.cumulative_lift(served, control, sequential_tuning=tuning)
    novelty: list[timeviews.LiftPoint] = []
    if days:
        cohorts = [c for c in store.load_novelty(session, phase.id, days[-1]) if float(c.stats.sum_y) > 0]
        if any(c.arm == control for c in cohorts):
            novelty = timeviews.lift_by_exposure_day(cohorts, control)

    latest = {s.arm: s.stats for s in snapshots if s.key == days[-1]} if days else {}
    users = {arm: float(latest[arm].n) if arm in latest else 0.0 for arm in arms}
    weights = {arm: float(phase.weights.get(arm, 0.0)) for arm in arms}
    total = sum(users.values())
    expected = {arm: total * w / (sum(weights.values()) or 1.0) for arm, w in weights.items()}
    srm_p = None
    if total > 0 and all(w > 0 for w in weights.values()):
        srm_p = stats.srm_test(users, weights).p_value
    return PhaseViews(
        phase=phase, control=control, arms=arms, days=days,
        daily_ctr=timeviews.daily_ctr(snapshots),
        cumulative_lift=[p for p in lift if _finite(p)],
        novelty=[p for p in novelty if _finite(p)],
        latest=latest, users=users, expected_users=expected, srm_p_value=srm_p,
        power=_power(experiment, latest.get(control), total, len(days), len(arms)) if days else None,
        health=store.load_health(session, phase.id),
    )


def _power(experiment: Experiment, control: stats.ArmStats | None, users: float, days: int,
           n_arms: int) -> PowerProgress:
    effect = experiment.target_effect or DEFAULT_TARGET_EFFECT
    if control is None:
        return PowerProgress(users, None, effect, None, "the control arm has no data yet")
    try:
        need = power.users_needed(control, effect, arms=n_arms, daily_users=users / max(days, 1))
    except ValueError as exc:
        return PowerProgress(users, None, effect, None, str(exc))
    left = max(0.0, need.total_users - users)
    days_left = left / (users / max(days, 1)) if users > 0 else None
    return PowerProgress(users, need.total_users, effect, days_left)
