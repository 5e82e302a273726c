"""Registry administration: alias moves under live experiments, the `abrec models` CLI, the REST blueprint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from abrec.experiments import audit, identity, service
from abrec.experiments.models_admin import ConfirmationRequired, move_alias
from abrec.experiments.schema import Phase
from abrec.models import registry
from abrec.models.store import DirectoryStore
from flask import Flask
from sqlalchemy import select

from abrec.cli import main
from abrec.db import init_db, make_engine, session_factory


@pytest.fixture
def env(db_url: str, tmp_path: Path, make_checkpoint):
    """A database with tron:1 and tron:2 registered and tron@champion -> tron:1."""
    yield from _env(db_url, tmp_path, make_checkpoint)


@pytest.fixture
def sqlite_env(sqlite_url: str, tmp_path: Path, make_checkpoint):
    """`env` on SQLite only, for the CLI and REST layers (the database work is tested on both)."""
    yield from _env(sqlite_url, tmp_path, make_checkpoint)


def _env(db_url: str, tmp_path: Path, make_checkpoint):
    engine = make_engine(db_url)
    init_db(engine)
    sessions = session_factory(engine)
    store = DirectoryStore(tmp_path / "store")
    with sessions() as s:
        registry.register_model(s, store, make_checkpoint(seed=1), "tron", actor="alice")
        registry.register_model(s, store, make_checkpoint(seed=2), "tron", actor="alice")
        registry.set_alias(s, "tron@champion", "tron:1", actor="alice")
        registry.register_model(s, store, make_checkpoint(seed=3), "sasrec", actor="alice")
        registry.set_alias(s, "sasrec@champion", "sasrec:1", actor="alice")
        s.commit()
    yield sessions, store, db_url
    engine.dispose()


def _running_experiment(sessions, key: str = "exp1") -> None:
    with sessions() as s:
        service.create_experiment(
            s,
            key=key,
            arms=[
                service.ArmSpec("control", 1, "sasrec@champion"),
                service.ArmSpec("tron", 1, "tron@champion"),
            ],
            actor="alice",
        )
        service.start(s, key, "alice")
        s.commit()


def _phases(sessions, key: str) -> list[int]:
    with sessions() as s:
        exp = service.get_experiment(s, key)
        query = select(Phase.number).where(Phase.experiment_id == exp.id).order_by(Phase.number)
        return list(s.scalars(query))


def test_alias_move_under_a_running_experiment_needs_confirmation(env) -> None:
    sessions, _, _ = env
    _running_experiment(sessions)
    with sessions() as s:
        with pytest.raises(ConfirmationRequired, match="exp1") as info:
            move_alias(s, "tron@champion", "tron:2", actor="bob")
        assert info.value.experiments == ["exp1"]
        s.rollback()
    with sessions() as s:  # refused: nothing changed, nothing recorded, no new phase
        assert registry.resolve(s, "tron@champion").label == "tron:1"
        assert len(registry.alias_history(s, "tron@champion")) == 1
    assert _phases(sessions, "exp1") == [1]

    with sessions() as s:
        outcome = move_alias(s, "tron@champion", "tron:2", actor="bob", confirm=True, reason="retrained")
        s.commit()
    assert outcome.to_dict() == {
        "alias": "tron@champion",
        "from": "tron:1",
        "to": "tron:2",
        "changed": True,
        "new_phases": {"exp1": 2},
    }
    assert _phases(sessions, "exp1") == [1, 2]
    with sessions() as s:
        assert registry.resolve(s, "tron@champion").label == "tron:2"
        moves = [a for a in audit.history(s, "model_alias", "tron@champion") if a.action == "alias_move"]
        assert [(m.actor, m.details["from"], m.details["to"]) for m in moves] == [("bob", "tron:1", "tron:2")]


def test_alias_move_without_live_experiments_needs_no_confirmation(env) -> None:
    sessions, _, _ = env
    _running_experiment(sessions)
    with sessions() as s:
        service.stop(s, "exp1", "alice")
        s.commit()
    with sessions() as s:
        outcome = move_alias(s, "tron@champion", "tron:2", actor="bob")
        s.commit()
    assert outcome.move.changed and outcome.new_phases == {}


def test_cli_register_list_show_alias(sqlite_env, make_checkpoint, capsys) -> None:
    sessions, store, url = sqlite_env
    _running_experiment(sessions)
    common = ["--db", url]
    path = make_checkpoint(seed=9)
    assert main(["models", "register", str(path), "--name", "tron", "--store", str(store.root),
                 "--actor", "carol", *common]) == 0
    assert "registered tron:3" in capsys.readouterr().out

    assert main(["models", "list", "--json", *common]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listed["versions"]] == ["sasrec:1", "tron:1", "tron:2", "tron:3"]
    assert listed["aliases"] == {"sasrec@champion": "sasrec:1", "tron@champion": "tron:1"}

    # Bound to a running experiment: refused without --confirm (exit 2, a message naming it).
    assert main(["models", "alias", "tron@champion", "tron:3", "--actor", "carol", *common]) == 2
    assert "exp1" in capsys.readouterr().err
    assert main(["models", "alias", "tron@champion", "tron:3", "--confirm", "--reason", "better",
                 "--actor", "carol", *common]) == 0
    assert "new phase 2" in capsys.readouterr().out

    assert main(["models", "show", "tron@champion", "--json", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "tron:3" and shown["live_experiments"] == ["exp1"]
    assert [(h["from"], h["to"], h["actor"]) for h in shown["history"]] == [
        (None, "tron:1", "alice"), ("tron:1", "tron:3", "carol"),
    ]
    first_move = shown["history"][0]["at"]
    assert main(["models", "show", "tron@champion", "--at", first_move, "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["at"]["version"] == "tron:1"
    assert main(["models", "show", "tron:3", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["created_by"] == "carol"


def test_cli_refuses_bad_input_with_a_message(sqlite_env, tmp_path: Path, capsys) -> None:
    _, store, url = sqlite_env
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    args = ["models", "register", str(bad), "--name", "tron", "--store", str(store.root), "--db", url]
    assert main(args) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["models", "show", "tron:99", "--db", url]) == 2
    assert "no model version tron:99" in capsys.readouterr().err
    assert main(["models", "alias", "tron@champion", "sasrec:1", "--db", url]) == 2
    assert "only point to a version of 'tron'" in capsys.readouterr().err


@pytest.fixture
def api(sqlite_env):
    from abrec.experiments.models_admin import models_admin_bp

    sessions, store, _ = sqlite_env
    with sessions() as s:
        identity.create_user(s, "vera", "password-123", "viewer", "admin")
        identity.create_user(s, "eddie", "password-123", "editor", "admin")
        tokens = {"viewer": identity.create_token(s, "vera"), "editor": identity.create_token(s, "eddie")}
        s.commit()
    app = Flask("test")
    app.extensions["abrec_sessions"] = sessions
    app.extensions["abrec_registry_store"] = store
    app.register_blueprint(models_admin_bp)
    client = app.test_client()
    headers = {role: {"Authorization": f"Bearer {token}"} for role, token in tokens.items()}
    return client, headers, sessions


def test_rest_requires_tokens_and_roles(api) -> None:
    client, headers, _ = api
    assert client.get("/v1/admin/models").status_code == 401
    assert client.get("/v1/admin/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/admin/models", headers=headers["viewer"]).status_code == 200
    resp = client.put("/v1/admin/aliases/tron@champion", json={"version": "tron:2"},
                      headers=headers["viewer"])
    assert resp.status_code == 403 and "editor" in resp.get_json()["error"]


def test_rest_register_show_and_move(api, make_checkpoint, tmp_path: Path) -> None:
    client, headers, sessions = api
    _running_experiment(sessions)
    upload = io.BytesIO(make_checkpoint(seed=11).read_bytes())
    data = {"name": "tron", "checkpoint": (upload, "c.safetensors")}
    resp = client.post("/v1/admin/models", data=data, headers=headers["editor"])
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["version"] == "tron:3" and resp.get_json()["created_by"] == "eddie"

    bad = {"name": "tron", "checkpoint": (io.BytesIO(b"not a checkpoint"), "c.safetensors")}
    resp = client.post("/v1/admin/models", data=bad, headers=headers["editor"])
    assert resp.status_code == 400 and "refused" in resp.get_json()["error"]
    assert client.get("/v1/admin/models/tron:4", headers=headers["viewer"]).status_code == 404

    resp = client.put("/v1/admin/aliases/tron@champion", json={"version": "tron:3"},
                      headers=headers["editor"])
    assert resp.status_code == 409 and resp.get_json()["experiments"] == ["exp1"]
    resp = client.put("/v1/admin/aliases/tron@champion", json={"version": "tron:3", "confirm": True},
                      headers=headers["editor"])
    assert resp.status_code == 200 and resp.get_json()["new_phases"] == {"exp1": 2}
    resp = client.put("/v1/admin/aliases/tron@champion", json={"version": 3}, headers=headers["editor"])
    assert resp.status_code == 400
    resp = client.put("/v1/admin/aliases/tron@champion", json={"version": "tron:3", "x": 1},
                      headers=headers["editor"])
    assert resp.status_code == 400 and "x" in resp.get_json()["error"]

    shown = client.get("/v1/admin/aliases/tron@champion", headers=headers["viewer"]).get_json()
    assert shown["version"] == "tron:3"
    assert [h["to"] for h in shown["history"]] == ["tron:1", "tron:3"]
    at = client.get("/v1/admin/aliases/tron@champion", query_string={"at": shown["history"][0]["at"]},
                    headers=headers["viewer"]).get_json()
    assert at["at"]["version"] == "tron:1"
    assert client.get("/v1/admin/aliases/tron@nothing", headers=headers["viewer"]).status_code == 404
    assert client.get("/v1/admin/aliases", headers=headers["viewer"]).get_json()["tron@champion"] == "tron:3"
