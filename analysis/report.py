"""The nightly report of an experiment for one local date: aggregate, analyse, store, render.

`run_report(engine, key, day)` aggregates the event log of the phase in SQL (`aggregate`),
stores the day's snapshots, novelty view and serving health, runs the statistics (`stats`,
`decision`, `power`, `timeviews`) on the sums and stores the report JSON under (experiment,
date). Rows are upserted, so running a date twice gives the same rows (idempotent).

The nightly run is incremental (see `aggregate.aggregate_day`); a first run, a gap in the
stored days or `full=True` recomputes the whole phase from the log (`aggregate.aggregate_phase`).

`build_report` is the pure part (sums in, JSON-ready dict out) and `render_html` turns a stored
report into one standalone HTML file with plotly.js inline, readable offline.

Report JSON (numbers are floats or null where undefined; dates ISO):
    {"experiment": {key, name, id, hypothesis, primary_metric, status, timezone, control},
     "phase": {id, number, weights, started_at}, "date", "as_of", "generated_at",
     "runtime_days", "sequential_tuning" (N*), "srm_p_value", "srm": {chi2, p_value, expected, alert},
     "arms": {NAME: {users, impressions, clicks, ctr, abs_lift, abs_lift_ci, abs_p_value,
             abs_lift_ci_sequential, rel_lift, rel_lift_ci, p_value, p_value_adjusted,
             rel_lift_ci_sequential, p_value_sequential, rel_lift_ci_fieller,
             naive_per_impression_p_value, cuped, health: {impressions, fallbacks, fallback_rate,
             latency_p50_ms, latency_p99_ms, errors}, decision: {verdict, reasons} | null}},
     "correction", "decision": {verdict, arm, reasons}, "warnings": [str],
     "power": {target_effect, users_per_arm, total_users, users_so_far, days_left, ...} | null,
     "timeviews": {"daily_ctr": [...], "cumulative_lift": [...], "novelty": [...],
                   "health": [{date, arm, ...}]}}
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from abrec.analysis import aggregate, decision, power, stats, store, timeviews
from abrec.analysis.stats import ArmStats
from abrec.experiments.schema import Experiment, Phase
from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session, selectinload

log = logging.getLogger(__name__)

# Guardrails on serving (lower is better): a treatment that falls back or slows down fails.
MAX_FALLBACK_RATE = 0.01
MAX_P99_LATENCY_MS = 250.0
MIN_USERS = 1000  # minimum sample before shipping, besides the decision's minimum clicks per arm
# A rate or a p99 over a few dozen slates is noise: guardrails are judged from this many on.
MIN_GUARDRAIL_IMPRESSIONS = 1000


class ReportError(LookupError):
    """No such experiment, phase or date to report on; the message says which."""


# ---------------------------------------------------------------------------------------------
# Running a report


def default_day(experiment_timezone: str, now: datetime | None = None) -> date:
    """Yesterday in the experiment's timezone: the last complete local day."""
    now = now or datetime.now(UTC)
    return aggregate.local_date(now, experiment_timezone) - timedelta(days=1)


def load_experiment(session: Session, key: str) -> Experiment:
    exp = session.scalars(
        select(Experiment)
        .options(selectinload(Experiment.arms), selectinload(Experiment.phases))
        .where(Experiment.key == key)
    ).first()
    if exp is None:
        raise ReportError(f"no experiment with key {key!r}")
    return exp


def phase_for(experiment: Experiment, day: date, number: int | None = None) -> Phase:
    """The phase with `number`, or the one running at the end of local `day` (the newest started)."""
    if number is not None:
        for phase in experiment.phases:
            if phase.number == number:
                return phase
        raise ReportError(f"experiment {experiment.key!r} has no phase {number}")
    end = aggregate.day_start(day + timedelta(days=1), experiment.timezone)
    started = [p for p in experiment.phases if p.started_at < end]
    if not started:
        raise ReportError(f"experiment {experiment.key!r} had no phase by the end of {day}")
    return max(started, key=lambda p: p.number)


def run_report(
    engine: Engine, key: str, day: date | None = None, phase_number: int | None = None, full: bool = False
) -> dict[str, Any]:
    """Aggregate, analyse and store the report of experiment `key` for local `day` (default yesterday).

    Incremental when the days before are stored (the nightly case: one pass for the per-user
    totals plus the day's own events); otherwise, or with `full`, every day of the phase is
    recomputed from the log and stored again.
    """
    with Session(engine) as session:
        exp = load_experiment(session, key)
        day = day or default_day(exp.timezone)
        phase = phase_for(exp, day, phase_number)
        if day < aggregate.local_date(phase.started_at, exp.timezone):
            raise ReportError(f"phase {phase.number} of {key!r} starts after {day}")
        context = ReportContext.of(exp, phase, day)
    with engine.begin() as conn:
        agg = _aggregate_and_store(conn, context, full)
        report = build_report(context, agg)
        store.save_report(conn, context.experiment_id, day, report, context.phase_id)
    log.info("report %s %s: %s", key, day, report["decision"]["verdict"])
    return report


def _aggregate_and_store(conn: Connection, ctx: ReportContext, full: bool) -> aggregate.PhaseAggregate:
    first = aggregate.local_date(ctx.phase_started_at, ctx.timezone)
    days = [first + timedelta(days=i) for i in range((ctx.day - first).days + 1)]
    earlier = set(days[:-1])
    novelty_before = {}
    if earlier:
        for s in store.load_novelty(conn, ctx.phase_id, days[-2]):
            novelty_before.setdefault(s.key, {})[s.arm] = s.stats
    stored_health = {d: h for d, h in store.load_health(conn, ctx.phase_id).items() if d <= ctx.day}
    have_history = earlier <= store.snapshot_days(conn, ctx.phase_id) and earlier <= set(stored_health)
    if full or not have_history or (earlier and not novelty_before):
        agg = aggregate.aggregate_phase(conn, ctx.experiment_id, ctx.phase_id, ctx.day)
        store.save_snapshots(conn, ctx.experiment_id, ctx.phase_id, agg.snapshots)
        for d, health in agg.health.items():
            store.save_health(conn, ctx.experiment_id, ctx.phase_id, d, health)
        store.save_novelty(conn, ctx.experiment_id, ctx.phase_id, ctx.day, agg.novelty)
        return agg
    inc = aggregate.aggregate_day(conn, ctx.experiment_id, ctx.phase_id, ctx.day, novelty_before)
    store.save_snapshots(conn, ctx.experiment_id, ctx.phase_id, {ctx.day: inc.snapshot})
    store.save_health(conn, ctx.experiment_id, ctx.phase_id, ctx.day, inc.health)
    store.save_novelty(conn, ctx.experiment_id, ctx.phase_id, ctx.day, inc.novelty)
    snapshots: dict[date, dict[str, ArmStats]] = {}
    for s in store.load_snapshots(conn, ctx.phase_id, until=ctx.day):
        snapshots.setdefault(s.key, {})[s.arm] = s.stats
    health = stored_health | {ctx.day: inc.health}
    return aggregate.PhaseAggregate(days, snapshots, inc.novelty, health, aggregate.phase_health(health))


# ---------------------------------------------------------------------------------------------
# The pure part: sums in, report out


@dataclass(frozen=True)
class ReportContext:
    """What the report needs from the experiment definition (plain values, no ORM objects)."""

    experiment_id: int
    key: str
    name: str
    hypothesis: str
    primary_metric: str
    status: str
    timezone: str
    arms: tuple[str, ...]  # control first
    weights: dict[str, float]  # of the phase
    phase_id: int
    phase_number: int
    phase_started_at: datetime
    day: date
    planned_users: int | None
    target_effect: float | None
    min_runtime_days: int
    planned_end_at: datetime | None

    @classmethod
    def of(cls, exp: Experiment, phase: Phase, day: date) -> ReportContext:
        return cls(
            experiment_id=exp.id,
            key=exp.key,
            name=exp.name,
            hypothesis=exp.hypothesis,
            primary_metric=exp.primary_metric,
            status=exp.status,
            timezone=exp.timezone,
            arms=tuple(a.name for a in exp.arms),
            weights={a: float(w) for a, w in phase.weights.items()},
            phase_id=phase.id,
            phase_number=phase.number,
            phase_started_at=phase.started_at,
            day=day,
            planned_users=exp.planned_users,
            target_effect=exp.target_effect,
            min_runtime_days=exp.min_runtime_days,
            planned_end_at=exp.planned_end_at,
        )

    @property
    def as_of(self) -> datetime:
        return aggregate.day_start(self.day + timedelta(days=1), self.timezone)


def _num(value: Any) -> float | None:
    """JSON-safe float: NaN and infinities become null."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _pair(ci: tuple[Any, Any] | None) -> list[float | None] | None:
    return None if ci is None else [_num(ci[0]), _num(ci[1])]


def build_report(ctx: ReportContext, agg: aggregate.PhaseAggregate) -> dict[str, Any]:
    """The report JSON of one phase as of the end of ctx.day, from the aggregated sums."""
    control = ctx.arms[0]
    # Arms without traffic in this phase (weight 0) are not part of its randomisation.
    active = [a for a in ctx.arms if ctx.weights.get(a, 0.0) > 0]
    if control not in active or len(active) < 2:
        raise ReportError(f"phase {ctx.phase_number} of {ctx.key!r} has no control or treatment with traffic")
    final = agg.snapshots[ctx.day]
    arms = {a: final.get(a, ArmStats(0, 0, 0, 0, 0, 0)) for a in active}
    weights = {a: ctx.weights[a] for a in active}
    tuning = float(ctx.planned_users) if ctx.planned_users else None
    analysis = stats.analyze(arms, control, weights=weights, sequential_tuning=tuning)
    runtime_days = (ctx.as_of - ctx.phase_started_at).total_seconds() / 86400
    planned_days = (
        (ctx.planned_end_at - ctx.phase_started_at).total_seconds() / 86400
        if ctx.planned_end_at
        else math.inf
    )
    users = float(sum(s.n for s in arms.values()))
    min_clicks = float(min(s.sum_x for s in arms.values()))

    arm_rows: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, decision.Decision] = {}
    basic = analysis.to_dict()["arms"]
    for name in arms:
        health = agg.health_total.get(name) or store.Health(0, 0, None, None)
        row = dict(basic[name])
        c = analysis.comparisons.get(name)
        row.update(
            abs_lift_ci_sequential=_pair(c.abs_lift_ci_sequential) if c else None,
            p_value_sequential=_num(c.p_value_sequential) if c else None,
            rel_lift_ci_fieller=_pair(c.rel_lift_ci_fieller) if c else None,
            naive_per_impression_p_value=_num(c.naive_p_value) if c else None,
            cuped=bool(c.cuped) if c else None,
            health=health.to_dict(),
            decision=None,
        )
        if c is not None:
            guardrails = _guardrails(health)
            seq = (float(c.rel_lift_ci_sequential[0]), float(c.rel_lift_ci_sequential[1]))
            if not all(math.isfinite(v) for v in seq):
                seq = (-math.inf, math.inf)
            verdicts[name] = decision.decide(
                seq,
                analysis.srm.p_value if math.isfinite(analysis.srm.p_value) else 1.0,
                guardrails,
                runtime_days=runtime_days,
                users=users,
                min_arm_clicks=min_clicks,
                planned_days=planned_days,
                min_runtime_days=ctx.min_runtime_days,
                min_users=MIN_USERS,
            )
            row["decision"] = {"verdict": verdicts[name].verdict, "reasons": list(verdicts[name].reasons)}
        arm_rows[name] = row

    overall = _overall(verdicts, analysis)
    warnings = _warnings(analysis, arms, agg, min_clicks, users)
    if tuning is None:
        warnings.append(
            "No planned_users: the sequential CIs are tuned to the users so far (N*), which makes them "
            "tightest today rather than at the planned end; set planned_users on the experiment"
        )
    srm = analysis.srm
    return {
        "experiment": {
            "id": ctx.experiment_id,
            "key": ctx.key,
            "name": ctx.name,
            "hypothesis": ctx.hypothesis,
            "primary_metric": ctx.primary_metric,
            "status": ctx.status,
            "timezone": ctx.timezone,
            "control": control,
        },
        "phase": {
            "id": ctx.phase_id,
            "number": ctx.phase_number,
            "weights": ctx.weights,
            "started_at": ctx.phase_started_at.isoformat(),
        },
        "date": ctx.day.isoformat(),
        "as_of": ctx.as_of.isoformat(),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runtime_days": _num(runtime_days),
        "sequential_tuning": tuning,
        "srm_p_value": _num(srm.p_value),
        "srm": {
            "chi2": _num(srm.chi2),
            "p_value": _num(srm.p_value),
            "alert": srm.alert,
            "expected": {a: _num(v) for a, v in srm.expected.items()},
        },
        "arms": arm_rows,
        "correction": analysis.correction,
        "decision": overall,
        "power": _power(ctx, arms, agg),
        "warnings": warnings,
        "timeviews": _timeviews(ctx, agg, control, tuning),
    }


def _guardrails(health: store.Health) -> list[decision.Guardrail]:
    """Fallback rate and p99 latency of an arm, once it has served enough to judge them."""
    if health.impressions < MIN_GUARDRAIL_IMPRESSIONS:
        return []
    out = []
    if health.fallback_rate is not None:
        out.append(decision.Guardrail("fallback rate", health.fallback_rate, MAX_FALLBACK_RATE))
    if health.latency_p99_ms is not None:
        out.append(decision.Guardrail("p99 latency ms", health.latency_p99_ms, MAX_P99_LATENCY_MS))
    return out


def _overall(verdicts: Mapping[str, decision.Decision], analysis: stats.Analysis) -> dict[str, Any]:
    """One verdict for the experiment: any harm rolls back; else ship the arm with the best lower bound.

    The experiment is inconclusive only when every treatment is; otherwise it keeps running.
    """
    harmful = [a for a, d in verdicts.items() if d.verdict == "rollback"]
    if harmful:
        reasons = [f"{a}: {r}" for a in harmful for r in verdicts[a].reasons]
        return {"verdict": "rollback", "arm": harmful[0], "reasons": reasons}
    winners = [a for a, d in verdicts.items() if d.verdict == "ship"]
    if winners:
        best = max(winners, key=lambda a: float(analysis.comparisons[a].rel_lift_ci_sequential[0]))
        return {"verdict": "ship", "arm": best, "reasons": list(verdicts[best].reasons)}
    verdict = (
        "inconclusive"
        if verdicts and all(d.verdict == "inconclusive" for d in verdicts.values())
        else ("keep running")
    )
    reasons = [f"{a}: {r}" for a, d in verdicts.items() for r in d.reasons]
    return {"verdict": verdict, "arm": None, "reasons": reasons}


def _warnings(
    analysis: stats.Analysis,
    arms: Mapping[str, ArmStats],
    agg: aggregate.PhaseAggregate,
    min_clicks: float,
    users: float,
) -> list[str]:
    out = []
    if analysis.srm.alert:
        observed = ", ".join(f"{a} {int(s.n)}" for a, s in arms.items())
        out.append(
            f"Sample-ratio mismatch: p = {analysis.srm.p_value:.2g} < {stats.SRM_ALERT_P} "
            f"(users: {observed}); "
            "the assignment or the logging is broken, do not trust the lift"
        )
    for arm, h in agg.health_total.items():
        if h.fallbacks:
            out.append(
                f"{arm}: {h.fallbacks} fallback slates served ({h.fallback_rate:.2%} of {h.impressions})"
            )
    if min_clicks < decision.MIN_CLICKS_PER_ARM or users < MIN_USERS:
        out.append(
            f"Too little data: {int(users)} users, {int(min_clicks)} clicks in the smallest arm "
            f"(need {MIN_USERS} users and {decision.MIN_CLICKS_PER_ARM} clicks per arm)"
        )
    return out


def _power(
    ctx: ReportContext, arms: Mapping[str, ArmStats], agg: aggregate.PhaseAggregate
) -> dict[str, Any] | None:
    if not ctx.target_effect:
        return None
    days_seen = max(len(agg.days), 1)
    users = float(sum(s.n for s in arms.values()))
    try:
        need = power.users_needed(
            arms[ctx.arms[0]],
            ctx.target_effect,
            arms=len(arms),
            daily_users=users / days_seen if users else None,
        )
    except ValueError as exc:
        return {"target_effect": ctx.target_effect, "note": str(exc)}
    left = max(0.0, need.total_users - users)
    return {
        "target_effect": ctx.target_effect,
        "users_per_arm": need.users_per_arm,
        "total_users": need.total_users,
        "users_so_far": users,
        "days_left": _num(left / (users / days_seen)) if users else None,
        "critical_value": _num(need.critical_value),
    }


def _timeviews(
    ctx: ReportContext, agg: aggregate.PhaseAggregate, control: str, tuning: float | None
) -> dict[str, Any]:
    cumulative = [timeviews.Snapshot(d, a, s) for d, arms in agg.snapshots.items() for a, s in arms.items()]
    served = [s for s in cumulative if float(s.stats.sum_y) > 0]
    cohorts = [
        timeviews.Snapshot(k, a, s)
        for k, arms in agg.novelty.items()
        for a, s in arms.items()
        if float(s.sum_y) > 0
    ]

    def lift_rows(points: list[timeviews.LiftPoint], key_name: str) -> list[dict[str, Any]]:
        return [
            {
                key_name: p.key.isoformat() if isinstance(p.key, date) else p.key,
                "arm": p.arm,
                "users": _num(p.users),
                "rel_lift": _num(p.rel_lift),
                "rel_lift_ci": _pair(p.rel_lift_ci),
                "rel_lift_ci_sequential": _pair(p.rel_lift_ci_sequential),
                "abs_lift": _num(p.abs_lift),
                "abs_lift_ci": _pair(p.abs_lift_ci),
            }
            for p in points
        ]

    def with_control(snaps: list[timeviews.Snapshot]) -> bool:
        return any(s.arm == control for s in snaps)

    return {
        "daily_ctr": [
            {
                "date": p.key.isoformat(),
                "arm": p.arm,
                "clicks": p.clicks,
                "impressions": p.impressions,
                "ctr": _num(p.ctr),
            }
            for p in timeviews.daily_ctr(cumulative)
        ],
        "cumulative_lift": lift_rows(
            timeviews.cumulative_lift(served, control, sequential_tuning=tuning)
            if with_control(served)
            else [],
            "date",
        ),
        "novelty": lift_rows(
            timeviews.lift_by_exposure_day(cohorts, control) if with_control(cohorts) else [],
            "days_since_exposure",
        ),
        "health": [
            {"date": d.isoformat(), "arm": a} | h.to_dict()
            for d, arms in agg.health.items()
            for a, h in arms.items()
        ],
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def summary_text(report: Mapping[str, Any]) -> str:
    """A few plain lines for chat and e-mail: verdict, lift per arm, warnings."""
    exp = report["experiment"]
    lines = [
        f"{exp['key']} {report['date']} (phase {report['phase']['number']}): "
        f"{report['decision']['verdict'].upper()}"
        + (f" {report['decision']['arm']}" if report["decision"].get("arm") else "")
    ]
    for name, row in report["arms"].items():
        if row.get("rel_lift") is None:
            lines.append(
                f"  {name}: {row['users']} users, CTR {_fmt_pct(row.get('ctr'))} (control)"
                if name == exp["control"]
                else f"  {name}: no data"
            )
            continue
        ci = row.get("rel_lift_ci_sequential") or [None, None]
        lines.append(
            f"  {name}: {row['users']} users, CTR {_fmt_pct(row.get('ctr'))}, lift "
            f"{_fmt_pct(row['rel_lift'], signed=True)} (always-valid 95% CI {_fmt_pct(ci[0], True)} to "
            f"{_fmt_pct(ci[1], True)})"
        )
    lines += [f"  ! {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def _fmt_pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2%}" if signed else f"{value:.2%}"


def render_html(report: Mapping[str, Any]) -> str:
    """One standalone HTML page (plotly.js inline, no network needed) of a stored report."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    exp = report["experiment"]
    tv = report.get("timeviews", {})
    figures = []

    lift = go.Figure()
    for arm in {p["arm"] for p in tv.get("cumulative_lift", [])}:
        pts = [p for p in tv["cumulative_lift"] if p["arm"] == arm]
        x = [p["date"] for p in pts]
        lo = [(p["rel_lift_ci_sequential"] or [None, None])[0] for p in pts]
        hi = [(p["rel_lift_ci_sequential"] or [None, None])[1] for p in pts]
        lift.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=hi + lo[::-1],
                fill="toself",
                opacity=0.2,
                line_width=0,
                name=f"{arm}: always-valid 95% CI",
            )
        )
        lift.add_trace(
            go.Scatter(x=x, y=[p["rel_lift"] for p in pts], mode="lines+markers", name=f"{arm}: lift")
        )
    lift.add_hline(y=0, line_dash="dot")
    lift.update_layout(title="Cumulative relative CTR lift over the control", yaxis_tickformat=".1%")
    figures.append(lift)

    ctr = go.Figure()
    for arm in report["arms"]:
        pts = [p for p in tv.get("daily_ctr", []) if p["arm"] == arm]
        ctr.add_trace(
            go.Scatter(x=[p["date"] for p in pts], y=[p["ctr"] for p in pts], mode="lines+markers", name=arm)
        )
    ctr.update_layout(title="Daily CTR per arm", yaxis_tickformat=".2%")
    figures.append(ctr)

    novelty = go.Figure()
    for arm in {p["arm"] for p in tv.get("novelty", [])}:
        pts = [p for p in tv["novelty"] if p["arm"] == arm]
        novelty.add_trace(
            go.Scatter(
                x=[p["days_since_exposure"] for p in pts],
                y=[p["rel_lift"] for p in pts],
                mode="lines+markers",
                name=arm,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [_gap(p, 1) for p in pts],
                    "arrayminus": [_gap(p, 0) for p in pts],
                },
            )
        )
    novelty.add_hline(y=0, line_dash="dot")
    novelty.update_layout(
        title="Lift by days since first exposure (novelty)",
        xaxis_title="days since exposure",
        yaxis_tickformat=".1%",
    )
    figures.append(novelty)

    latency = go.Figure()
    for arm in report["arms"]:
        pts = [p for p in tv.get("health", []) if p["arm"] == arm]
        latency.add_trace(
            go.Scatter(
                x=[p["date"] for p in pts],
                y=[p["latency_p99_ms"] for p in pts],
                mode="lines+markers",
                name=f"{arm} p99",
            )
        )
    latency.add_hline(y=MAX_P99_LATENCY_MS, line_dash="dot", annotation_text="guardrail")
    latency.update_layout(title="Serving latency p99 (ms) per day")
    figures.append(latency)

    charts = "\n".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    e = html.escape
    decision_ = report["decision"]
    rows = []
    for name, row in report["arms"].items():
        h = row.get("health") or {}
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{e(str(v))}</td>"
                for v in (
                    name,
                    row["users"],
                    _int(row.get("impressions")),
                    _int(row.get("clicks")),
                    _fmt_pct(row.get("ctr")),
                    _fmt_pct(row.get("rel_lift"), True),
                    _ci(row.get("rel_lift_ci")),
                    _ci(row.get("rel_lift_ci_sequential")),
                    _p(row.get("p_value")),
                    _p(row.get("p_value_adjusted")),
                    _p(row.get("naive_per_impression_p_value")),
                    _fmt_pct(h.get("fallback_rate")),
                    _ms(h.get("latency_p99_ms")),
                    (row.get("decision") or {}).get("verdict", "control"),
                )
            )
            + "</tr>"
        )
    warnings = "".join(f"<li>{e(w)}</li>" for w in report.get("warnings", [])) or "<li>none</li>"
    reasons = "".join(f"<li>{e(r)}</li>" for r in decision_.get("reasons", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{e(exp["key"])} report {e(report["date"])}</title>
<script>{get_plotlyjs()}</script>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
.verdict{{font-size:1.4em;font-weight:bold}}.warn{{color:#a40}}</style></head><body>
<h1>{e(exp["name"] or exp["key"])}: report for {e(report["date"])}</h1>
<p>Experiment <b>{e(exp["key"])}</b>, phase {report["phase"]["number"]}, timezone {e(exp["timezone"])},
data up to {e(report["as_of"])}. Hypothesis: {e(exp.get("hypothesis") or "-")}</p>
<p class="verdict">Decision: {e(decision_["verdict"])} {e(decision_.get("arm") or "")}</p>
<ul>{reasons}</ul>
<h2>Warnings</h2><ul class="warn">{warnings}</ul>
<h2>Arms</h2>
<p>CTR lift relative to the control <b>{e(exp["control"])}</b>; users are the unit (delta method). The
always-valid CI may be read every day. The per-impression p-value is a diagnostic only: it ignores that
clicks cluster by user. SRM p = {_p(report.get("srm_p_value"))}.</p>
<table><tr><th>arm</th><th>users</th><th>impressions</th><th>clicks</th><th>CTR</th><th>lift</th>
<th>95% CI</th><th>always-valid 95% CI</th><th>p</th><th>p adjusted</th><th>naive p (diagnostic)</th>
<th>fallback rate</th><th>p99 latency</th><th>verdict</th></tr>
{"".join(rows)}</table>
{charts}
<h2>Report JSON</h2><details><summary>show</summary><pre>{e(json.dumps(report, indent=1))}</pre></details>
</body></html>
"""


def _gap(point: Mapping[str, Any], side: int) -> float | None:
    ci, lift = point.get("rel_lift_ci"), point.get("rel_lift")
    if not ci or ci[side] is None or lift is None:
        return None
    return abs(ci[side] - lift)


def _int(v: float | None) -> str:
    return "n/a" if v is None else f"{int(v):,}"


def _ci(ci: list[float | None] | None) -> str:
    return "n/a" if not ci or None in ci else f"[{ci[0]:+.2%}, {ci[1]:+.2%}]"


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"
