"""Read-only pages: experiments overview, experiment detail, stored reports, CSV export, registry."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import Any

from abrec.dashboard import charts, data
from abrec.dashboard.app import db
from abrec.experiments import service
from abrec.experiments.schema import STATUSES
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    render_template,
    request,
    stream_with_context,
    url_for,
)

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
    per_page = current_app.config["OVERVIEW_PAGE_SIZE"]
    page = _page_arg()
    total = data.count_experiments(session, status)
    pages = max(1, math.ceil(total / per_page))
    experiments = data.page_of_experiments(session, page, per_page, status)
    reports = data.latest_reports(session, [e.id for e in experiments])
    summaries = []
    for e in experiments:
        day, report = reports.get(e.id, (None, None))
        summaries.append(data.summarise(e, report, day))
    return render_template(
        "overview.html", nav="experiments", summaries=summaries, page=page, pages=pages, total=total,
        status=status, counts=data.status_counts(session), decision_text=data.decision_text,
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


def url_for_page(page: int, status: str | None) -> str:
    return url_for("pages.overview", page=page, status=status)


@bp.app_context_processor
def _helpers() -> dict[str, Any]:
    return {"url_for_page": url_for_page}


@bp.get("/experiments/<key>")
def experiment(key: str) -> Any:
    session = db()
    exp = service.get_experiment(session, key)
    reports = data.latest_reports(session, [exp.id])
    day, report = reports.get(exp.id, (None, None))
    summary = data.summarise(exp, report, day)
    return render_template(
        "experiment.html", nav="experiments", s=summary, e=exp, decision_text=data.decision_text,
        served=data.served_versions(session, exp), audit=data.recent_audit(session, exp.key),
        figures=[],
    )


@bp.get("/experiments/<key>/users.csv")
def users_csv(key: str) -> Any:
    """The per-user table of one phase, streamed row by row from a server-side cursor."""
    from abrec.analysis.aggregate import iter_user_rows

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
    phase_id = phases[number].id
    engine = current_app.extensions["abrec_engine"]

    def generate() -> Iterator[str]:
        # Own connection: the request's session is closed when the view returns, before streaming.
        with engine.connect() as connection:
            rows = iter_user_rows(connection, exp.id, phase_id)
            header = None
            for row in rows:
                if header is None:
                    header = list(row.keys())
                    yield _csv_line(header)
                yield _csv_line([row[h] for h in header])
            if header is None:
                yield _csv_line(["unit_id", "arm", "impressions", "clicks"])

    filename = f"{key}-phase{number}-users.csv"
    return Response(stream_with_context(generate()), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()
