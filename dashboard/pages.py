"""Read-only pages: experiments overview, experiment detail, stored reports, CSV export, registry."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from datetime import date
from typing import Any

from abrec.analysis import aggregate, store
from abrec.analysis import report as report_html
from abrec.dashboard import charts, data
from abrec.dashboard.app import db
from abrec.experiments import service
from abrec.experiments.schema import STATUSES, Experiment, Phase
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from markupsafe import Markup

bp = Blueprint("pages", __name__)


def _page_arg() -> int:
    try:
        page = int(request.args.get("page", "1"))
    except ValueError:
        abort(400, "page must be a whole number")
    if page < 1:
        abort(400, "page must be 1 or more")
    return page


@bp.get("/")
def overview() -> Any:
    session = db()
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        abort(400, f"unknown status {status!r}")
    search = (request.args.get("q") or "").strip()[:100] or None
    per_page = current_app.config["OVERVIEW_PAGE_SIZE"]
    page = _page_arg()
    counts = data.status_counts(session, search)
    total = counts[status] if status else sum(counts.values())
    pages = max(1, math.ceil(total / per_page))
    experiments = data.page_of_experiments(session, page, per_page, status, search)
    reports = data.latest_reports(session, [e.id for e in experiments])
    summaries = []
    for e in experiments:
        day, report = reports.get(e.id, (None, None))
        summaries.append(data.summarise(e, report, day))
    return render_template(
        "overview.html", nav="experiments", summaries=summaries, page=page, pages=pages, total=total,
        status=status, search=search, counts=counts, decision_text=data.decision_text,
    )


@bp.get("/registry")
def registry() -> Any:
    session = db()
    view = data.registry_view(session)
    arms = data.arms_on_aliases(session)
    figures = []
    if view.versions_by_model:
        figures.append(charts.render(charts.offline_metrics(view, data.metric), "chart-offline"))
    if any(a.ctr is not None for a in arms):
        figures.append(charts.render(charts.offline_vs_online(arms), "chart-offline-online"))
    return render_template("registry.html", nav="registry", view=view, arms=arms, figures=figures,
                           metric=data.metric)


def url_for_page(page: int, status: str | None, search: str | None = None) -> str:
    return url_for("pages.overview", page=page, status=status, q=search)


@bp.app_context_processor
def _helpers() -> dict[str, Any]:
    return {"url_for_page": url_for_page}


@bp.get("/experiments/<key>")
def experiment(key: str) -> Any:
    session = db()
    exp = service.get_experiment(session, key)
    day, report = data.latest_reports(session, [exp.id]).get(exp.id, (None, None))
    summary = data.summarise(exp, report, day)
    phase = _chosen_phase(exp)
    views = data.phase_views(session, exp, phase) if phase is not None else None
    if views is not None:
        data.fill_from_snapshot(summary, views)
    return render_template(
        "experiment.html", nav="experiments", s=summary, e=exp, decision_text=data.decision_text,
        served=data.served_versions(session, exp), audit=data.recent_audit(session, exp.key),
        views=views, figures=_figures(views) if views else [], phase=phase,
        reports=store.list_reports(session, exp.id), health=_health_totals(views) if views else {},
    )


def _chosen_phase(exp: Experiment) -> Phase | None:
    """The phase named by ?phase=N, else the newest; None before the experiment starts."""
    if not exp.phases:
        return None
    number = request.args.get("phase", type=int)
    if number is None:
        return exp.phases[-1]
    for phase in exp.phases:
        if phase.number == number:
            return phase
    abort(404, f"{exp.key} has no phase {number}")


def _figures(views: data.PhaseViews) -> list[Markup]:
    """The charts that have something to show, in reading order."""
    out = []
    if views.cumulative_lift:
        out.append(charts.render(charts.cumulative_lift(views), "chart-lift"))
    if any(d.ctr is not None for d in views.daily_ctr):
        out.append(charts.render(charts.daily_ctr(views), "chart-daily-ctr"))
    if views.novelty:
        out.append(charts.render(charts.novelty(views), "chart-novelty"))
    if views.days:
        out.append(charts.render(charts.users_vs_expected(views), "chart-srm"))
    if views.power and views.power.users_needed:
        out.append(charts.render(charts.power_progress(views.power), "chart-power"))
    if views.health:
        out.append(charts.render(charts.serving_latency(views), "chart-latency"))
        out.append(charts.render(charts.fallback_rate(views), "chart-fallback"))
    return out


def _health_totals(views: data.PhaseViews) -> dict[str, dict[str, Any]]:
    """Per arm over the phase: impressions and fallbacks summed, the latest day's p50/p99, worst p99."""
    out: dict[str, dict[str, Any]] = {}
    for arm in views.arms:
        days = [(d, views.health[d][arm]) for d in sorted(views.health) if arm in views.health[d]]
        if not days:
            continue
        impressions = sum(h.impressions for _, h in days)
        fallbacks = sum(h.fallbacks for _, h in days)
        p99s = [h.latency_p99_ms for _, h in days if h.latency_p99_ms is not None]
        out[arm] = {"impressions": impressions, "fallbacks": fallbacks,
                    "fallback_rate": fallbacks / impressions if impressions else None,
                    "p50": days[-1][1].latency_p50_ms, "p99": days[-1][1].latency_p99_ms,
                    "worst_p99": max(p99s) if p99s else None, "day": days[-1][0]}
    return out


@bp.get("/experiments/<key>/users.csv")
def users_csv(key: str) -> Any:
    """The per-user table of one phase, streamed in chunks from a server-side cursor."""
    session = db()
    exp = service.get_experiment(session, key)
    number = request.args.get("phase", type=int)
    phases = {p.number: p for p in exp.phases}
    if not phases:
        abort(404, f"{key} has not started: there is no per-user data yet")
    if number is None:
        number = max(phases)
    if number not in phases:
        abort(404, f"{key} has no phase {number} (phases: {', '.join(map(str, sorted(phases)))})")
    experiment_id, phase_id = exp.id, phases[number].id
    engine = current_app.extensions["abrec_engine"]

    def generate() -> Iterator[str]:
        # Its own connection: the request's session closes when the view returns, before streaming.
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(USER_COLUMNS)
        with engine.connect() as connection:
            for i, row in enumerate(aggregate.iter_user_rows(connection, experiment_id, phase_id), start=1):
                writer.writerow(row)
                if i % CSV_CHUNK_ROWS == 0:  # chunks of rows, not one write per row
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    filename = f"{key}-phase{number}-users.csv"
    return Response(stream_with_context(generate()), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# The columns `abrec analyze-file` reads.
USER_COLUMNS = ("unit_id", "arm", "impressions", "clicks", "pre_impressions", "pre_clicks")
CSV_CHUNK_ROWS = 5000


@bp.get("/experiments/<key>/reports/<day>")
def report(key: str, day: str) -> Any:
    """One stored nightly report, as it was written that night."""
    session = db()
    exp = service.get_experiment(session, key)
    try:
        when = date.fromisoformat(day)
    except ValueError:
        abort(400, f"{day!r} is not a date (YYYY-MM-DD)")
    found = store.get_report(session, exp.id, when)
    if found is None:
        abort(404, f"{key} has no report for {day}")
    if request.args.get("format") == "json":
        return jsonify(found[1])
    # The same standalone page that is delivered by e-mail: plotly inline, works offline when saved.
    return Response(report_html.render_html(found[1]), mimetype="text/html")
