"""The dashboard over a real SQLite database through Flask's test client: login, roles, CSRF,
every page with and without data, the engineer actions and pagination."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
from abrec.dashboard.app import create_app
from abrec.dashboard.auth import SAFE_METHODS, VIEWER_POST_ENDPOINTS
from abrec.experiments import identity, service
from abrec.models import registry
from dashboard_seed import EXPERIMENT, PASSWORDS, seed
from werkzeug.routing import AnyConverter

from abrec.db import make_engine, session_factory, session_scope

CSRF_RE = re.compile(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"')


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dashboard") / "seeded.db"
    seed(f"sqlite:///{path}")
    return path


@pytest.fixture
def seeded_url(seeded_file: Path, tmp_path: Path) -> str:
    """A fresh copy of the seeded database per test (seeding hashes passwords: slow on purpose)."""
    shutil.copyfile(seeded_file, tmp_path / "abrec.db")
    return f"sqlite:///{tmp_path / 'abrec.db'}"


@pytest.fixture
def app(seeded_url: str):
    return create_app(seeded_url, secret_key="test-secret", TESTING=True)


def csrf_token(client, path: str = "/login") -> str:
    match = CSRF_RE.search(client.get(path).get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def login(client, username: str, password: str | None = None):
    token = csrf_token(client)
    return client.post("/login", data={"username": username, "password": password or PASSWORDS[username],
                                       "csrf_token": token})


def logged_in(app, role: str):
    client = app.test_client()
    assert login(client, role).status_code == 302
    return client


def read(url: str, fn):
    engine = make_engine(url)
    try:
        with session_scope(session_factory(engine)) as s:
            return fn(s)
    finally:
        engine.dispose()


def changing_urls(app) -> list[tuple[str, str, str]]:
    """(endpoint, method, url) for every route that accepts a method other than GET/HEAD/OPTIONS."""
    out = []
    with app.test_request_context():
        for rule in app.url_map.iter_rules():
            methods = sorted((rule.methods or set()) - SAFE_METHODS)
            if not methods or rule.endpoint in VIEWER_POST_ENDPOINTS:
                continue
            choices = []
            for arg in sorted(rule.arguments):
                converter = rule._converters[arg]
                any_of = isinstance(converter, AnyConverter)
                choices.append(sorted(converter.items) if any_of else [EXPERIMENT])
            for values in itertools.product(*choices):
                url = app.url_for(rule.endpoint, **dict(zip(sorted(rule.arguments), values, strict=True)))
                out.extend((rule.endpoint, m, url) for m in methods)
    return out


def test_pages_need_a_login(app):
    client = app.test_client()
    for path in ("/", "/registry", f"/experiments/{EXPERIMENT}"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert client.post(f"/experiments/{EXPERIMENT}/stop").status_code in (400, 401)


def test_wrong_password_is_refused(app):
    client = app.test_client()
    response = login(client, "viewer", "not-the-password")
    assert response.status_code == 401
    assert "Wrong username or password" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_login_never_redirects_off_site(app):
    client = app.test_client()
    token = csrf_token(client)
    response = client.post("/login?next=https://evil.example/", data={
        "username": "viewer", "password": PASSWORDS["viewer"], "csrf_token": token})
    assert response.headers["Location"] == "/"


def test_viewer_is_refused_on_every_route_that_changes_anything(app, seeded_url):
    routes = changing_urls(app)
    endpoints = {endpoint for endpoint, _, _ in routes}
    # Not vacuous: the known actions are among the routes enumerated from the URL map.
    assert {"actions.lifecycle", "actions.ship", "actions.change_weights", "actions.new_experiment",
            "actions.move_alias", "actions.users"} <= endpoints
    client = logged_in(app, "viewer")
    token = csrf_token(client, "/")  # a valid token: the refusal must come from the role, not CSRF
    before = read(seeded_url, lambda s: service.describe(s, EXPERIMENT))
    for endpoint, method, url in routes:
        response = client.open(url, method=method, data={
            "csrf_token": token, "arm": "tron", "key": "new-exp", "username": "mallory",
            "password": "long-password", "role": "admin", "alias": "tron@champion", "version": "tron:1",
            "confirm": "y", "weights-0": "1", "weights-1": "1", "weights-2": "2",
        })
        assert response.status_code == 403, (endpoint, method, url, response.status_code)
    after = read(seeded_url, lambda s: service.describe(s, EXPERIMENT))
    assert after == before
    assert read(seeded_url, lambda s: identity.get_user(s, "mallory")) is None
    assert read(seeded_url, lambda s: registry.resolve(s, "tron@champion").label) == "tron:2"


def test_viewer_reads_every_page(app):
    client = logged_in(app, "viewer")
    for path in ("/", "/registry", f"/experiments/{EXPERIMENT}", "/experiments/gru4rec-baseline"):
        response = client.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        assert "Log out" in html
        assert "Stop</button>" not in html and "New experiment" not in html  # no action buttons for viewers
    assert client.get("/users").status_code == 403
    assert client.get("/experiments/new").status_code == 403


def test_forms_need_the_csrf_token(app, seeded_url):
    client = logged_in(app, "editor")
    assert client.post(f"/experiments/{EXPERIMENT}/stop").status_code == 400
    assert client.post(f"/experiments/{EXPERIMENT}/stop", data={"csrf_token": "forged"}).status_code == 400
    assert read(seeded_url, lambda s: service.get_experiment(s, EXPERIMENT).status) == "running"


def test_editor_runs_the_lifecycle(app, seeded_url):
    client = logged_in(app, "editor")
    token = csrf_token(client, "/")
    status = lambda: read(seeded_url, lambda s: service.get_experiment(s, EXPERIMENT).status)  # noqa: E731
    assert client.post(f"/experiments/{EXPERIMENT}/pause", data={"csrf_token": token}).status_code == 302
    assert status() == "paused"
    assert client.post(f"/experiments/{EXPERIMENT}/resume", data={"csrf_token": token}).status_code == 302
    assert status() == "running"
    # A refused transition is shown, not a 500.
    response = client.post(f"/experiments/{EXPERIMENT}/start", data={"csrf_token": token},
                           follow_redirects=True)
    assert response.status_code == 200 and "flash error" in response.get_data(as_text=True)
    assert status() == "running"
    response = client.post(f"/experiments/{EXPERIMENT}/ship", data={"csrf_token": token, "arm": "tron"})
    assert response.status_code == 302
    shipped = read(seeded_url, lambda s: service.get_experiment(s, EXPERIMENT))
    assert (shipped.status, shipped.shipped_arm) == ("shipped", "tron")
    page = client.get("/").get_data(as_text=True)
    assert "Shipped: tron now serves everyone." in page


def test_changing_weights_needs_the_confirmation_and_starts_a_phase(app, seeded_url):
    client = logged_in(app, "editor")
    form = client.get(f"/experiments/{EXPERIMENT}/weights").get_data(as_text=True)
    assert "starts a new phase" in form and "re-randomised" in form
    token = CSRF_RE.search(form).group(1)
    weights = {"weights-0": "2", "weights-1": "1", "weights-2": "1", "csrf_token": token}
    response = client.post(f"/experiments/{EXPERIMENT}/weights", data=weights)
    assert response.status_code == 400 and "Tick the confirmation" in response.get_data(as_text=True)
    assert len(read(seeded_url, lambda s: service.describe(s, EXPERIMENT))["phases"]) == 1
    response = client.post(f"/experiments/{EXPERIMENT}/weights", data=weights | {"confirm": "y"})
    assert response.status_code == 302
    described = read(seeded_url, lambda s: service.describe(s, EXPERIMENT))
    assert len(described["phases"]) == 2
    assert described["phases"][1]["seed"] != described["phases"][0]["seed"]  # re-randomised
    assert described["arms"][0]["weight"] == pytest.approx(0.5)


def test_editor_creates_an_experiment_bound_to_aliases(app, seeded_url):
    client = logged_in(app, "editor")
    token = csrf_token(client, "/experiments/new")
    data = {"csrf_token": token, "key": "ssm-test", "name": "SSM test", "min_runtime_days": "7",
            "timezone": "UTC",
            "arms-0-name": "control", "arms-0-weight": "1", "arms-0-model_alias": "sasrec@champion",
            "arms-1-name": "ssm", "arms-1-weight": "1", "arms-1-model_alias": "sasrec-ssm@champion",
            "arms-2-name": "", "arms-2-weight": "1", "arms-2-model_alias": "tron@champion"}
    response = client.post("/experiments/new", data=data)
    assert response.status_code == 302, response.get_data(as_text=True)
    described = read(seeded_url, lambda s: service.describe(s, "ssm-test"))
    assert described["status"] == "draft"
    assert [(a["name"], a["model_alias"]) for a in described["arms"]] == [
        ("control", "sasrec@champion"), ("ssm", "sasrec-ssm@champion")]
    # A bad definition comes back with the service's message and creates nothing.
    response = client.post("/experiments/new", data=data | {"key": "Bad Key!"})
    assert response.status_code == 400 and "invalid experiment key" in response.get_data(as_text=True)


def test_alias_move_under_a_live_experiment_asks_for_confirmation(app, seeded_url):
    client = logged_in(app, "editor")
    token = csrf_token(client, "/registry/move-alias")
    data = {"csrf_token": token, "alias": "tron@champion", "version": "tron:1", "reason": "rollback"}
    response = client.post("/registry/move-alias", data=data)
    assert response.status_code == 400 and EXPERIMENT in response.get_data(as_text=True)
    assert read(seeded_url, lambda s: registry.resolve(s, "tron@champion").label) == "tron:2"
    assert client.post("/registry/move-alias", data=data | {"confirm": "y"}).status_code == 302
    assert read(seeded_url, lambda s: registry.resolve(s, "tron@champion").label) == "tron:1"
    assert len(read(seeded_url, lambda s: service.describe(s, EXPERIMENT))["phases"]) == 2
    assert "rollback" in client.get("/registry").get_data(as_text=True)


def test_only_an_admin_manages_users(app, seeded_url):
    assert logged_in(app, "editor").get("/users").status_code == 403
    client = logged_in(app, "admin")
    token = csrf_token(client, "/users")
    response = client.post("/users", data={"csrf_token": token, "username": "pm", "password": "pm-password-1",
                                           "role": "viewer"})
    assert response.status_code == 302
    assert read(seeded_url, lambda s: identity.get_user(s, "pm").role) == "viewer"
    assert login(app.test_client(), "pm", "pm-password-1").status_code == 302
    assert client.post("/users/pm/role", data={"csrf_token": token, "role": "editor"}).status_code == 302
    assert read(seeded_url, lambda s: identity.get_user(s, "pm").role) == "editor"
    client.post("/users/admin/role", data={"csrf_token": token, "role": "viewer"})  # not one's own role
    assert read(seeded_url, lambda s: identity.get_user(s, "admin").role) == "admin"
    assert logged_in(app, "editor").post("/users/pm/role", data={"csrf_token": token, "role": "admin"}
                                         ).status_code in (400, 403)
    assert read(seeded_url, lambda s: identity.get_user(s, "pm").role) == "editor"


def test_unknown_experiment_is_a_404_page(app):
    client = logged_in(app, "viewer")
    response = client.get("/experiments/nope")
    assert response.status_code == 404 and "no experiment with key" in response.get_data(as_text=True)
    assert client.get("/?page=0").status_code == 400
    assert client.get("/?status=bogus").status_code == 400


def test_empty_database_pages_are_sensible(sqlite_url):
    app = create_app(sqlite_url, secret_key="t", TESTING=True)
    read(sqlite_url, lambda s: identity.create_user(s, "pm", "pm-password-1", "viewer", "test"))
    client = app.test_client()
    assert login(client, "pm", "pm-password-1").status_code == 302
    assert "No experiments yet" in client.get("/").get_data(as_text=True)
    assert "No model registered yet" in client.get("/registry").get_data(as_text=True)


def test_overview_paginates_thousands_of_experiments(sqlite_url):
    app = create_app(sqlite_url, secret_key="t", TESTING=True, OVERVIEW_PAGE_SIZE=25)

    def make(s):
        identity.create_user(s, "pm", "pm-password-1", "viewer", "test")
        for i in range(1200):
            service.create_experiment(s, key=f"exp-{i:04d}", actor="test", arms=[
                service.ArmSpec("a", 1, "m@a"), service.ArmSpec("b", 1, "m@b")])

    read(sqlite_url, make)
    client = app.test_client()
    login(client, "pm", "pm-password-1")
    first = client.get("/").get_data(as_text=True)
    assert first.count('class="card"') == 25 and "Page 1 of 48" in first
    last = client.get("/?page=48").get_data(as_text=True)
    assert last.count('class="card"') == 1200 - 47 * 25
    keys = set(re.findall(r"exp-\d{4}", first)) | set(re.findall(r"exp-\d{4}", last))
    assert len(keys) == 50  # pages do not overlap
    assert client.get("/?page=49").status_code == 200  # past the end: an empty page, not an error
    found = client.get("/?q=EXP-011").get_data(as_text=True)  # search: case-insensitive substring
    assert set(re.findall(r"exp-\d{4}", found)) == {f"exp-011{i}" for i in range(10)}
    assert "No experiment matches" in client.get("/?q=nothing-like-this").get_data(as_text=True)


def test_plotly_is_served_by_the_app_and_pages_use_no_cdn(app):
    client = logged_in(app, "viewer")
    response = client.get("/assets/plotly.min.js")
    assert response.status_code == 200 and len(response.data) > 1_000_000
    assert b"plotly" in response.data[:2000].lower()
    cached = client.get("/assets/plotly.min.js", headers={"If-None-Match": response.headers["ETag"]})
    assert cached.status_code == 304
    for path in ("/", "/registry", f"/experiments/{EXPERIMENT}"):
        html = client.get(path).get_data(as_text=True)
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', html), path


def test_pages_read_snapshots_never_raw_events(app):
    """Page cost must not grow with the event log: no page touches impressions, clicks or exposures."""
    from sqlalchemy import event

    engine = app.extensions["abrec_engine"]
    client = logged_in(app, "viewer")
    raw_scan = re.compile(r"\b(from|join)\s+\"?(impressions|clicks|exposures)\b")

    def statements_of(path: str) -> list[str]:
        seen: list[str] = []
        listener = lambda conn, cursor, statement, *args: seen.append(statement.lower())  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            response = client.get(path)
            assert response.status_code == 200, path
            response.get_data()  # drain a streamed body inside the listener
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        return seen

    for path in ("/", "/?status=running", "/registry", f"/experiments/{EXPERIMENT}",
                 "/experiments/tron-challenger-ramp"):
        statements = statements_of(path)
        assert statements, path
        assert [s for s in statements if raw_scan.search(s)] == [], path
    # The one route allowed to read the log (the per-user export) is caught by the same check.
    assert any(raw_scan.search(s) for s in statements_of(f"/experiments/{EXPERIMENT}/users.csv"))


def test_experiment_page_shows_the_stored_report(app, seeded_url):
    from abrec.analysis import store

    exp_id = read(seeded_url, lambda s: service.get_experiment(s, EXPERIMENT).id)
    day, report = read(seeded_url, lambda s: store.get_report(s, exp_id))
    html = logged_in(app, "viewer").get(f"/experiments/{EXPERIMENT}").get_data(as_text=True)
    tron = report["arms"]["tron"]
    assert f"{100 * tron['ctr']:.2f}%" in html
    assert f"{100 * tron['rel_lift']:+.1f}%" in html
    assert f"{tron['users']:,.0f}" in html
    assert day.isoformat() in html
    for chart in ("chart-lift", "chart-daily-ctr", "chart-novelty", "chart-srm", "chart-power",
                  "chart-latency"):
        assert f'id="{chart}"' in html
    # The stored report opens from the history.
    client = logged_in(app, "viewer")
    response = client.get(f"/experiments/{EXPERIMENT}/reports/{day.isoformat()}")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert day.isoformat() in response.get_data(as_text=True)
    assert client.get(f"/experiments/{EXPERIMENT}/reports/{day.isoformat()}?format=json").json == report
    assert logged_in(app, "viewer").get(f"/experiments/{EXPERIMENT}/reports/2001-01-01").status_code == 404
    assert logged_in(app, "viewer").get(f"/experiments/{EXPERIMENT}/reports/yesterday").status_code == 400


def test_arm_without_traffic_is_shown_as_such(app):
    html = logged_in(app, "viewer").get("/experiments/tron-challenger-ramp").get_data(as_text=True)
    assert "no traffic yet" in html


def test_per_user_csv_is_streamed_and_matches_the_log(app, seeded_url):
    import csv
    import io

    from abrec.experiments.schema import Click, Exposure, Impression
    from sqlalchemy import func, select

    client = logged_in(app, "viewer")
    response = client.get(f"/experiments/{EXPERIMENT}/users.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.is_streamed
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    exp_id = read(seeded_url, lambda s: service.get_experiment(s, EXPERIMENT).id)
    counts = read(seeded_url, lambda s: [
        s.scalar(select(func.count()).select_from(t).where(t.experiment_id == exp_id))
        for t in (Exposure, Impression, Click)])
    assert len(rows) == counts[0]
    assert sum(int(r["impressions"]) for r in rows) == counts[1]
    assert sum(int(r["clicks"]) for r in rows) == counts[2]
    assert {r["arm"] for r in rows} == {"sasrec", "sasrec-ssm", "tron"}
    assert client.get(f"/experiments/{EXPERIMENT}/users.csv?phase=9").status_code == 404
    assert client.get("/experiments/gru4rec-baseline/users.csv").status_code == 404


@pytest.mark.postgres
def test_pages_and_csv_on_postgresql(pg_url):
    seed(pg_url)
    app = create_app(pg_url, secret_key="t", TESTING=True)
    client = logged_in(app, "viewer")
    for path in ("/", "/registry", f"/experiments/{EXPERIMENT}", "/experiments/tron-challenger-ramp"):
        assert client.get(path).status_code == 200, path
    html = client.get(f"/experiments/{EXPERIMENT}").get_data(as_text=True)
    assert 'id="chart-lift"' in html and "SRM ok" in html
    body = client.get(f"/experiments/{EXPERIMENT}/users.csv").get_data(as_text=True)
    assert body.startswith("unit_id,arm,impressions,clicks") and body.count("\n") > 1000
    app.extensions["abrec_engine"].dispose()
