"""The API through Flask's test client, on SQLite and PostgreSQL, against the real model server on loopback:
slates and their logged rows, clicks (signature, slate, window, duplicates), lifecycle serving,
admin authentication, fallbacks, bad input, ops endpoints."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from abrec.experiments import metrics
from abrec.experiments.api import MAX_BODY_BYTES, create_app, shutdown
from abrec.experiments.clock import get_clock
from abrec.experiments.schema import Click, Exposure, Impression, utcnow
from abrec.experiments.signing import Signer
from abrec.models import registry
from abrec.models.client import HttpModelClient
from api_support import ModelServerThread, recommend_body, seed
from sqlalchemy import func, select

from abrec.config import Settings
from abrec.db import make_engine, session_factory

SECRET = "test-secret"


@pytest.fixture
def world(db_url, tmp_path, make_checkpoint):
    return seed(db_url, tmp_path / "store", make_checkpoint)


@pytest.fixture
def model_server(world):
    ms = ModelServerThread(world.url, world.store)
    yield ms
    ms.stop()


def _app(world, model_url: str, deadline_s: float = 5.0):
    settings = Settings(
        database_url=world.url,
        model_server_url=model_url,
        secret_key=SECRET,
        model_deadline_s=deadline_s,
        snapshot_ttl_s=0.2,
    )
    engine = make_engine(world.url)
    return create_app(settings, engine=engine, model_client=HttpModelClient(model_url)), engine


@pytest.fixture
def api(world, model_server):
    app, engine = _app(world, model_server.url)
    yield app.test_client(), world, session_factory(engine)
    shutdown(app)
    get_clock().reset()
    engine.dispose()


def _count(sessions, table, *where) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(table).where(*where))


def test_recommend_and_click_round_trip(api) -> None:
    client, _, sessions = api
    first = client.post("/v1/recommendations", json=recommend_body("alice", items=["i1", 2], k=5))
    assert first.status_code == 200, first.json
    body = first.json
    assert body["logged"] is True and body["fallback"] is False
    assert body["arm"] in ("control", "treatment") and len(body["items"]) == 5
    assert body["model_version"] == {"control": "sasrec:1", "treatment": "tron:1"}[body["arm"]]
    again = client.post("/v1/recommendations", json=recommend_body("alice", k=3)).json
    assert again["arm"] == body["arm"]  # sticky assignment

    row_id = body["impression_id"].split(".")[0]
    with sessions() as s:
        imp = s.get(Impression, row_id)
        assert (
            imp.items == body["items"]
            and imp.arm_name == body["arm"]
            and imp.model_version == body["model_version"]
        )
        assert imp.user_id == "alice" and imp.session_id == "s-alice" and imp.in_analysis and not imp.fallback
        assert imp.latency_ms > 0 and imp.phase_id is not None
        exposures = s.scalars(select(Exposure)).all()
    # Two requests, one exposure: the first assignment in the phase.
    assert [(e.user_id, e.arm_name, e.phase_id) for e in exposures] == [("alice", body["arm"], imp.phase_id)]

    item = body["items"][3]
    click = client.post("/v1/clicks", json={"impression_id": body["impression_id"], "item_id": item})
    assert click.status_code == 200 and click.json == {
        "recorded": True,
        "duplicate": False,
        "arm": body["arm"],
        "position": 3,
    }
    repeat = client.post("/v1/clicks", json={"impression_id": body["impression_id"], "item_id": item})
    assert repeat.status_code == 200 and repeat.json["duplicate"] is True
    with sessions() as s:
        clicks = s.scalars(select(Click)).all()
    assert len(clicks) == 1
    c = clicks[0]
    assert (c.impression_id, c.item_id, c.position, c.arm_name, c.user_id, c.phase_id, c.in_analysis) == (
        row_id,
        item,
        3,
        body["arm"],
        "alice",
        imp.phase_id,
        True,
    )
    assert c.experiment_id == imp.experiment_id


def test_click_signature_slate_and_unknown_impression(api) -> None:
    client, _, sessions = api
    body = client.post("/v1/recommendations", json=recommend_body("bob")).json
    token = body["impression_id"]
    row_id, issued, mac = token.split(".")
    item = body["items"][0]
    forged = [
        f"{row_id}.{issued}.{'0' * 32}",  # wrong MAC
        f"{row_id}.{int(issued) + 3600}.{mac}",  # issue time moved to stretch the window
        f"{'f' * 32}.{issued}.{mac}",  # MAC of another row
        Signer("another-secret").sign(row_id, int(issued)),  # signed with someone else's key
        "not-a-token",
    ]
    for bad in forged:
        resp = client.post("/v1/clicks", json={"impression_id": bad, "item_id": item})
        assert resp.status_code == 400 and resp.json["error"] == "invalid impression_id", bad
    missing = client.post("/v1/clicks", json={"impression_id": "not in the slate", "item_id": item})
    assert missing.status_code == 400
    resp = client.post("/v1/clicks", json={"impression_id": token, "item_id": "i999"})
    assert resp.status_code == 422 and "not shown" in resp.json["detail"]
    # A correctly signed id whose row does not exist (e.g. signed by a leaked secret for a made-up row).
    ghost = Signer(SECRET).sign("a" * 32, int(issued))
    resp = client.post("/v1/clicks", json={"impression_id": ghost, "item_id": item})
    assert resp.status_code == 404
    assert _count(sessions, Click) == 0


def test_attribution_window_follows_the_settable_clock(api) -> None:
    client, world, sessions = api
    body = client.post("/v1/recommendations", json=recommend_body("carol")).json
    clock = get_clock()
    clock.set_offset(29 * 60)
    ok = client.post("/v1/clicks", json={"impression_id": body["impression_id"], "item_id": body["items"][0]})
    assert ok.status_code == 200
    clock.set_offset(31 * 60)
    late = client.post(
        "/v1/clicks", json={"impression_id": body["impression_id"], "item_id": body["items"][1]}
    )
    assert late.status_code == 410 and late.json["error"] == "expired"
    assert _count(sessions, Click) == 1
    # Rows are stamped with the simulated time.
    with sessions() as s:
        stamped = s.scalars(select(Click.created_at)).one()
    assert abs(stamped - (utcnow() + timedelta(minutes=29))) < timedelta(minutes=1.5)
    # Only an admin may move the clock, through the admin endpoint.
    assert client.post("/v1/admin/clock", json={"offset_s": 0}).status_code == 401
    assert (
        client.post("/v1/admin/clock", json={"offset_s": 0}, headers=world.auth("editor")).status_code == 403
    )
    resp = client.post("/v1/admin/clock", json={"now": "2031-01-02T03:04:05Z"}, headers=world.auth("admin"))
    assert resp.status_code == 200 and resp.json["now"].startswith("2031-01-02T03:04")
    bad = client.post("/v1/admin/clock", json={"now": "1800-01-01T00:00:00Z"}, headers=world.auth("admin"))
    assert bad.status_code == 400


def test_lifecycle_and_pins_through_the_admin_api(api) -> None:
    client, world, sessions = api
    editor, viewer = world.auth("editor"), world.auth("viewer")
    arms = [
        {"name": "a", "weight": 1, "model": "sasrec@champion"},
        {"name": "b", "weight": 3, "model": "tron@champion"},
    ]
    assert client.post("/v1/admin/experiments", json={"key": "e2", "arms": arms}).status_code == 401
    assert (
        client.post(
            "/v1/admin/experiments",
            json={"key": "e2", "arms": arms},
            headers={"Authorization": "Bearer nope"},
        ).status_code
        == 401
    )
    assert (
        client.post("/v1/admin/experiments", json={"key": "e2", "arms": arms}, headers=viewer).status_code
        == 403
    )
    created = client.post("/v1/admin/experiments", json={"key": "e2", "arms": arms}, headers=editor)
    assert created.status_code == 201 and created.json["status"] == "draft"
    assert [a["weight"] for a in created.json["arms"]] == [0.25, 0.75]
    dup = client.post("/v1/admin/experiments", json={"key": "e2", "arms": arms}, headers=editor)
    assert dup.status_code == 409 and "already exists" in dup.json["detail"]

    draft = client.post("/v1/recommendations", json=recommend_body("u", experiment="e2"))
    assert draft.status_code == 409
    assert client.post("/v1/admin/experiments/e2/start", headers=editor).json["status"] == "running"
    assert client.post("/v1/admin/experiments/e2/start", headers=editor).status_code == 409

    users = [f"user{i}" for i in range(40)]
    arms_seen = {
        u: client.post("/v1/recommendations", json=recommend_body(u, experiment="e2")).json["arm"]
        for u in users
    }
    assert set(arms_seen.values()) == {"a", "b"}
    assert _count(sessions, Exposure) == 40

    pin = client.post("/v1/admin/experiments/e2/pins", json={"user_id": "qa", "arm": "b"}, headers=editor)
    assert pin.status_code == 200 and pin.json["pins"] == {"qa": "b"}
    pinned = client.post("/v1/recommendations", json=recommend_body("qa", experiment="e2")).json
    assert pinned["arm"] == "b"

    paused = client.post("/v1/admin/experiments/e2/pause", json={}, headers=editor)
    assert paused.json["status"] == "paused"
    served = [
        client.post("/v1/recommendations", json=recommend_body(f"new{i}", experiment="e2")).json["arm"]
        for i in range(10)
    ]
    assert served == ["a"] * 10  # the control, and no exposure logged
    assert _count(sessions, Exposure) == 40
    with sessions() as s:
        not_analysed = s.scalars(
            select(Impression.in_analysis).where(Impression.user_id.in_(["qa", "new0"]))
        ).all()
    assert not_analysed == [False, False]

    weights = client.post(
        "/v1/admin/experiments/e2/weights", json={"weights": {"a": 1, "b": 1}}, headers=editor
    )
    assert weights.status_code == 200 and len(weights.json["phases"]) == 2
    assert (
        client.post("/v1/admin/experiments/e2/ship", json={"arm": "zzz"}, headers=editor).status_code == 409
    )
    shipped = client.post("/v1/admin/experiments/e2/ship", json={"arm": "b"}, headers=editor)
    assert shipped.json["status"] == "shipped"
    assert client.post("/v1/recommendations", json=recommend_body("new0", experiment="e2")).json["arm"] == "b"
    listed = client.get("/v1/admin/experiments", headers=viewer).json["experiments"]
    assert [e["key"] for e in listed] == ["exp", "e2"]
    assert client.get("/v1/admin/experiments/nope", headers=viewer).status_code == 404
    assert client.post("/v1/admin/experiments/nope/stop", headers=editor).status_code == 404


def test_fallback_on_model_fault_timeout_and_stopped_server(api, model_server, monkeypatch) -> None:
    client, _, sessions = api

    def fallbacks(arm: str) -> float:
        return metrics.FALLBACKS.labels("exp", arm)._value.get()

    def broken(*args, **kwargs):
        raise RuntimeError("injected model fault")

    # 1. The model raises inside the model server: it answers 500, the API serves popular items.
    monkeypatch.setattr(model_server.server, "submit", broken)
    before = {arm: fallbacks(arm) for arm in ("control", "treatment")}
    resp = client.post("/v1/recommendations", json=recommend_body("dave", k=4)).json
    assert resp["fallback"] is True and resp["model_version"] == "popular"
    with sessions() as s:
        popular = {a: registry.popular_items(s, a) for a in ("sasrec@champion", "tron@champion")}
    alias = {"control": "sasrec@champion", "treatment": "tron@champion"}[resp["arm"]]
    assert resp["items"] == popular[alias][:4] == ["i0", "i1", "i2", "i3"]
    assert resp["logged"] is True
    assert fallbacks(resp["arm"]) == before[resp["arm"]] + 1
    monkeypatch.undo()
    assert client.post("/v1/recommendations", json=recommend_body("dave")).json["fallback"] is False

    # 2. The model server is slower than the deadline.
    slow_app, slow_engine = _app(api[1], model_server.url, deadline_s=1e-5)
    slow = slow_app.test_client().post("/v1/recommendations", json=recommend_body("erin", k=3)).json
    assert slow["fallback"] is True and slow["items"] == ["i0", "i1", "i2"]
    shutdown(slow_app)
    slow_engine.dispose()

    # 3. The model server is down.
    model_server.http.stop()
    down = client.post("/v1/recommendations", json=recommend_body("frank", k=2))
    assert down.status_code == 200 and down.json["fallback"] is True and down.json["items"] == ["i0", "i1"]
    with sessions() as s:
        rows = s.scalars(select(Impression).where(Impression.fallback.is_(True))).all()
    assert {r.user_id for r in rows} >= {"dave", "frank"} and all(r.model_version == "popular" for r in rows)
    assert client.get("/readyz").status_code == 503


BAD_RECOMMENDATIONS = {
    "malformed JSON": (b"{not json", 400),
    "not an object": (b"[1, 2]", 400),
    "empty body": (b"", 400),
    "NaN": (b'{"experiment":"exp","user_id":"u","session_id":"s","items":[],"k":NaN}', 400),
    "missing field": ({"experiment": "exp", "user_id": "u", "items": [], "k": 5}, 400),
    "extra field": ({**recommend_body("u"), "admin": True}, 400),
    "wrong type": ({**recommend_body("u"), "k": "5"}, 400),
    "bool k": ({**recommend_body("u"), "k": True}, 400),
    "k zero": ({**recommend_body("u"), "k": 0}, 400),
    "k too big": ({**recommend_body("u"), "k": 101}, 400),
    "oversized items": ({**recommend_body("u"), "items": [f"i{j}" for j in range(201)]}, 400),
    "nested item": ({**recommend_body("u"), "items": [["i1"]]}, 400),
    "empty user": ({**recommend_body("u"), "user_id": ""}, 400),
    "long user": ({**recommend_body("u"), "user_id": "x" * 129}, 400),
    "unknown experiment": ({**recommend_body("u"), "experiment": "nope"}, 404),
    "huge body": (b'{"experiment":"' + b"x" * 70_000 + b'"}', 413),
}


def test_bad_input_is_a_4xx_naming_the_problem_and_writes_nothing(api) -> None:
    client, _, sessions = api
    for case, (body, status) in BAD_RECOMMENDATIONS.items():
        if isinstance(body, bytes):
            resp = client.post("/v1/recommendations", data=body, content_type="application/json")
        else:
            resp = client.post("/v1/recommendations", json=body)
        assert resp.status_code == status, (case, resp.json)
        assert isinstance(resp.json["error"], str) and resp.json["error"], case
    assert _count(sessions, Impression) == 0 and _count(sessions, Exposure) == 0


def test_bad_clicks_and_methods(api) -> None:
    client, _, sessions = api
    assert client.post("/v1/clicks", data=b"{", content_type="application/json").status_code == 400
    assert client.post("/v1/clicks", json={"impression_id": "x"}).status_code == 400
    resp = client.post("/v1/clicks", json={"impression_id": "x", "item_id": 1.5})
    assert resp.status_code == 400 and "item_id" in resp.json["error"]
    assert client.get("/v1/clicks").status_code == 405
    assert client.get("/v1/nothing").json["error"] == "not found"
    assert _count(sessions, Click) == 0


def test_ops_endpoints(api) -> None:
    client, _, _ = api
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"] == {"database": "ok", "model_server": "ok"}
    client.post("/v1/recommendations", json=recommend_body("gina"))
    text = client.get("/metrics").data.decode()
    for name in (
        "abrec_recommendations_total",
        "abrec_recommendation_seconds_bucket",
        "abrec_fallbacks_total",
        "abrec_eventlog_queue_depth",
        "abrec_eventlog_batch_rows_bucket",
        "abrec_api_requests_total",
    ):
        assert name in text
    doc = client.get("/openapi.json").json
    rules = {
        r.rule.replace("<", "{").replace(">", "}")
        for r in client.application.url_map.iter_rules()
        if r.endpoint != "static"
    }
    assert rules == set(doc["paths"])  # every route documented, nothing documented that is not served


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys; from abrec.experiments.api import create_app; import abrec.experiments.api_cli; "
        "from abrec.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_hot_path_answers_as_the_flask_routes_do(api) -> None:
    """The plain POSTs skip Flask (HotPath); the same requests through Flask's routes get the same answers."""
    client, _, sessions = api
    app = client.application
    hot = app.wsgi_app
    assert hot.__class__.__name__ == "HotPath"
    # One impression per pass (same user, so same arm): each pass's click is new.
    slates = [client.post("/v1/recommendations", json=recommend_body("hana")).json for _ in range(2)]

    def cases(good: dict) -> list:
        return [
            ("/v1/recommendations", recommend_body("hana")),
            ("/v1/recommendations", recommend_body("hana", experiment="nope")),
            ("/v1/recommendations", {**recommend_body("hana"), "k": 0}),
            ("/v1/recommendations", {**recommend_body("hana"), "extra": 1}),
            ("/v1/recommendations", b"{"),
            ("/v1/recommendations", b""),
            ("/v1/clicks", {"impression_id": good["impression_id"], "item_id": good["items"][1]}),
            ("/v1/clicks", {"impression_id": good["impression_id"], "item_id": "not-shown"}),
            ("/v1/clicks", {"impression_id": "x" * 20, "item_id": "i1"}),
        ]

    def answers(good: dict) -> list:
        out = []
        for path, body in cases(good):
            raw = body if isinstance(body, bytes) else None
            resp = client.post(path, data=raw, json=None if raw is not None else body)
            data = resp.get_json()
            if data and "impression_id" in data:  # fresh per request; the rest must match
                assert data.pop("impression_id").count(".") == 2
            out.append((resp.status_code, resp.headers["Content-Type"], data))
        return out

    through_hot = answers(slates[0])
    app.wsgi_app = hot.flask_wsgi
    try:
        through_flask = answers(slates[1])
    finally:
        app.wsgi_app = hot
    assert through_hot == through_flask
    assert [status for status, _, _ in through_hot] == [200, 404, 400, 400, 400, 400, 200, 422, 400]
    # The hot path counts its requests as Flask's hook does.
    text = client.get("/metrics").data.decode()
    assert 'abrec_api_requests_total{endpoint="/v1/recommendations",status="404"}' in text
    # A body over the limit goes on to Flask, whose refusal is JSON too.
    big = client.post(
        "/v1/recommendations", data=b"x" * (MAX_BODY_BYTES + 1), content_type="application/json"
    )
    assert big.status_code == 413 and big.json["error"] == "request entity too large"
