"""`abrec db`, `abrec users` and `abrec experiments` against real databases."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from abrec.experiments import audit
from abrec.experiments.identity import authenticate_token
from abrec.experiments.service import decide, load_snapshot
from sqlalchemy import inspect

from abrec.cli import main
from abrec.db import make_engine, session_factory, session_scope


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def session(db_url):
    return session_scope(session_factory(make_engine(db_url)))


def test_db_upgrade_creates_the_tables(db_url, capsys):
    rc, out, _ = run(capsys, "db", "upgrade", "--db", db_url)
    assert rc == 0 and "newest revision" in out
    tables = set(inspect(make_engine(db_url)).get_table_names())
    assert {"experiments", "arms", "phases", "pins", "users", "api_tokens", "audit_log"} <= tables
    assert run(capsys, "db", "upgrade", "--db", db_url)[0] == 0  # idempotent


def test_experiment_lifecycle_from_the_cli(db_url, capsys):
    db = ["--db", db_url, "--actor", "alice"]
    rc, out, err = run(
        capsys,
        "experiments",
        "create",
        "home",
        "--arm",
        "control=tron@champion",
        "--arm",
        "treatment=tron@challenger:3",
        "--hypothesis",
        "TRON wins",
        "--target-effect",
        "0.02",
        "--planned-users",
        "5000",
        "--timezone",
        "Europe/Berlin",
        *db,
    )
    assert rc == 0, err
    assert "control=tron@champion:0.25, treatment=tron@challenger:0.75" in out
    assert run(capsys, "experiments", "start", "home", *db)[1].strip() == "experiment home is running"
    rc, out, _ = run(capsys, "experiments", "weights", "home", "control=1", "treatment=1", *db)
    assert rc == 0 and out.startswith("phase 2 started")
    rc, out, _ = run(capsys, "experiments", "weights", "home", "control=2", "treatment=1", "--keep-seed", *db)
    assert rc == 0 and "seed kept" in out
    rc, out, _ = run(capsys, "experiments", "coverage", "home", "0.5", *db)
    assert rc == 0 and "coverage 1 -> 0.5" in out
    assert run(capsys, "experiments", "pin", "home", "qa-user", "treatment", *db)[0] == 0
    assert run(capsys, "experiments", "pause", "home", *db)[0] == 0
    assert run(capsys, "experiments", "resume", "home", *db)[0] == 0

    rc, out, _ = run(capsys, "experiments", "show", "home", "--db", db_url)
    shown = json.loads(out)
    assert shown["status"] == "running" and shown["timezone"] == "Europe/Berlin"
    assert [p["number"] for p in shown["phases"]] == [1, 2, 3, 4]
    assert shown["phases"][2]["seed"] == shown["phases"][1]["seed"] != shown["phases"][0]["seed"]
    assert shown["pins"] == {"qa-user": "treatment"}
    assert shown["planned_users"] == 5000 and shown["hypothesis"] == "TRON wins"

    rc, out, _ = run(capsys, "experiments", "list", "--db", db_url)
    assert out.splitlines()[0].split() == ["KEY", "STATUS", "PHASE", "COVERAGE", "ARMS"]
    assert out.splitlines()[1].split()[:4] == ["home", "running", "4", "0.5"]

    with session(db_url) as s:
        snap = load_snapshot(s, "home")
        assert decide(snap, "qa-user").reason == "pinned"
        actions = [(r.actor, r.action) for r in audit.history(s, "experiment", "home")]
    assert actions == [
        ("alice", "create"),
        ("alice", "start"),
        ("alice", "change_weights"),
        ("alice", "change_weights"),
        ("alice", "change_coverage"),
        ("alice", "pin"),
        ("alice", "pause"),
        ("alice", "resume"),
    ]

    assert run(capsys, "experiments", "stop", "home", *db)[0] == 0
    rc, out, _ = run(capsys, "experiments", "ship", "home", "--arm", "treatment", *db)
    assert rc == 0 and "everyone gets treatment" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["experiments", "start", "missing"], "no experiment with key 'missing'"),
        (["experiments", "create", "x", "--arm", "a=m@x"], "at least two arms"),
        (["experiments", "create", "x", "--arm", "a"], "NAME=MODEL@ALIAS"),
        (["experiments", "create", "x", "--arm", "a=m@x:heavy", "--arm", "b=m@y"], "must be a number"),
        (
            ["experiments", "create", "x", "--arm", "a=m@x", "--arm", "b=m@y", "--timezone", "Nowhere/City"],
            "unknown timezone",
        ),
        (["experiments", "create", "x", "--arm", "a=m@x", "--arm", "b=m@y", "--coverage", "2"], "(0, 1]"),
        (["experiments", "weights", "missing", "a"], "NAME=WEIGHT"),
        (["users", "create", "bob", "--role", "viewer", "--password", "short"], "at least 8"),
        (["users", "token", "ghost"], "no user named 'ghost'"),
    ],
)
def test_mistakes_exit_2_with_a_clear_message(sqlite_url, capsys, argv, message):
    rc, _, err = run(capsys, *argv, "--db", sqlite_url)
    assert rc == 2
    assert message in err


def test_refused_transition_exits_2(db_url, capsys):
    db = ["--db", db_url]
    run(capsys, "experiments", "create", "e1", "--arm", "a=m@x", "--arm", "b=m@y", *db)
    rc, _, err = run(capsys, "experiments", "pause", "e1", *db)
    assert rc == 2 and "cannot pause experiment 'e1': it is draft" in err


def test_users_and_tokens(db_url, capsys, monkeypatch):
    db = ["--db", db_url]
    monkeypatch.setenv("USER", "root-admin")
    assert (
        run(capsys, "users", "create", "ada", "--role", "editor", "--password", "correct horse", *db)[0] == 0
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("viewer-secret\n"))
    assert run(capsys, "users", "create", "vic", "--role", "viewer", "--password-stdin", *db)[0] == 0
    rc, out, _ = run(capsys, "users", "list", *db)
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["USERNAME", "ROLE"],
        ["ada", "editor"],
        ["vic", "viewer"],
    ]

    rc, out, _ = run(capsys, "users", "token", "ada", "--name", "ci", "--ttl-days", "3", *db)
    token = out.strip()
    assert rc == 0 and token.startswith("abrec_")
    with session(db_url) as s:
        assert authenticate_token(s, token).username == "ada"
        assert [r.actor for r in audit.history(s, "user")] == ["root-admin"] * 3
    assert run(capsys, "users", "revoke", "ada", "--name", "ci", *db)[0] == 0
    with session(db_url) as s:
        assert authenticate_token(s, token) is None

    from abrec.experiments.identity import authenticate_password

    with session(db_url) as s:
        assert authenticate_password(s, "vic", "viewer-secret").role == "viewer"


def test_password_required_without_a_terminal(sqlite_url, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, _, err = run(capsys, "users", "create", "ada", "--role", "admin", "--db", sqlite_url)
    assert rc == 2 and "--password" in err


def test_unreachable_database_is_a_clear_error(capsys):
    url = "postgresql+psycopg://root@127.0.0.1:1/none?connect_timeout=2"
    rc, _, err = run(capsys, "experiments", "list", "--db", url)
    assert rc == 2 and "cannot open database" in err


def test_cli_module_is_light():
    code = (
        "import sys\n"
        "import abrec.experiments.cli\n"
        "print(','.join(m for m in ('torch', 'flask', 'sqlalchemy', 'werkzeug') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
