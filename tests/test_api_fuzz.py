"""Fuzz every endpoint from /openapi.json (schemathesis: schema-valid and schema-breaking inputs) with an
admin token, plus hypothesis on the deep paths (a real experiment, real impression ids): never a 5xx,
and every answer matches the document. The app runs against SQLite and the real model server."""

from __future__ import annotations

import pytest
import schemathesis
from abrec.experiments.api import create_app, shutdown
from abrec.experiments.clock import get_clock
from abrec.models.client import HttpModelClient
from api_support import ModelServerThread, checkpoint_factory, recommend_body, seed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from abrec.config import Settings
from abrec.db import make_engine

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
)
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    world = seed(f"sqlite:///{tmp / 'abrec.db'}", tmp / "store", checkpoint_factory(tmp))
    ms = ModelServerThread(world.url, world.store)
    cfg = Settings(database_url=world.url, model_server_url=ms.url, secret_key="fuzz", model_deadline_s=5.0)
    engine = make_engine(world.url)
    app = create_app(cfg, engine=engine, model_client=HttpModelClient(ms.url))
    yield app, world
    shutdown(app)
    get_clock().reset()
    ms.stop()
    engine.dispose()


def _operations(app):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # Registering a checkpoint validates it in a child process that imports torch: seconds per example.
    return [
        r.ok()
        for r in schema.get_all_operations()
        if (r.ok().method.upper(), r.ok().path) != ("POST", "/v1/admin/models")
    ]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_endpoint_answers_5xx(fuzz_app, mode) -> None:
    app, world = fuzz_app
    operations = _operations(app)
    assert len(operations) >= 20
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not (len(operation.body) or len(operation.path_parameters)):
            continue  # nothing to break in a request without a body or parameters

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(headers=world.auth("admin"), checks=CHECKS)

        run()


_item = st.one_of(st.text(min_size=1, max_size=20), st.integers(min_value=0, max_value=10**6))


@FUZZ
@given(
    user=st.text(min_size=1, max_size=128),
    items=st.lists(_item, max_size=200),
    k=st.integers(min_value=-5, max_value=120),
    click_item=_item,
    tamper=st.sampled_from(["", "0", "x", "."]),
)
def test_recommend_and_click_deep_paths(fuzz_app, user, items, k, click_item, tamper) -> None:
    client = fuzz_app[0].test_client()
    rec = client.post("/v1/recommendations", json={**recommend_body(user, k=k), "items": items})
    assert rec.status_code < 500, rec.json
    if rec.status_code != 200:
        assert rec.status_code == 400 and not 1 <= k <= 100
        return
    body = rec.json
    # 60 items in the catalogue; with no known item in the session the model answers its 30 popular ones.
    assert body["logged"] and len(body["items"]) in (min(k, 30), min(k, 60))
    assert len(set(body["items"])) == len(body["items"])
    for impression_id, item in (
        (body["impression_id"], click_item),
        (body["impression_id"] + tamper, body["items"][0]),
        (body["impression_id"], body["items"][-1]),
    ):
        resp = client.post("/v1/clicks", json={"impression_id": impression_id, "item_id": item})
        assert resp.status_code in (200, 400, 422), resp.json
