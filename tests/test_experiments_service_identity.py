"""Users, roles, passwords and API tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from abrec.experiments import audit
from abrec.experiments.identity import (
    IdentityError,
    authenticate_password,
    authenticate_token,
    create_token,
    create_user,
    hash_password,
    hash_token,
    revoke_token,
    role_at_least,
    set_role,
    verify_password,
)
from abrec.experiments.schema import ApiToken, User, utcnow
from sqlalchemy import select

from abrec.db import init_db, make_engine, session_factory, session_scope


@pytest.fixture
def factory(db_url):
    yield from _with_users(db_url)


@pytest.fixture
def sqlite_factory(sqlite_url):
    yield from _with_users(sqlite_url)


def _with_users(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    factory = session_factory(engine)
    with session_scope(factory) as s:
        create_user(s, "ada", "correct horse", "editor", actor="root")
        create_user(s, "vic", "viewer-pass", "viewer", actor="root")
    yield factory
    engine.dispose()


def test_passwords_are_salted_scrypt_hashes(factory):
    with session_scope(factory) as s:
        stored = s.scalars(select(User.password_hash).where(User.username == "ada")).one()
    assert stored.startswith("scrypt:") and "correct horse" not in stored
    assert hash_password("same") != hash_password("same")  # salted
    assert verify_password(stored, "correct horse") and not verify_password(stored, "correct hors")


def test_authenticate_password(factory):
    with session_scope(factory) as s:
        assert authenticate_password(s, "ada", "correct horse").username == "ada"
        assert authenticate_password(s, "ada", "wrong password") is None
        assert authenticate_password(s, "nobody", "correct horse") is None
        assert authenticate_password(s, "ada", "") is None


@pytest.mark.parametrize(
    "username,password,role,message",
    [
        ("ada", "another-pass", "viewer", "already exists"),
        ("bad name", "long-enough", "viewer", "invalid username"),
        ("eve", "short", "viewer", "at least 8"),
        ("eve", "long-enough", "superuser", "unknown role"),
    ],
)
def test_create_user_refusals(sqlite_factory, username, password, role, message):
    with pytest.raises(IdentityError, match=message):
        with session_scope(sqlite_factory) as s:
            create_user(s, username, password, role, actor="root")


def test_tokens_authenticate_and_only_their_hash_is_stored(factory):
    with session_scope(factory) as s:
        token = create_token(s, "ada", name="ci")
    with session_scope(factory) as s:
        stored = s.scalars(select(ApiToken.token_hash)).all()
        assert stored == [hash_token(token)] and token not in stored
        assert authenticate_token(s, token).username == "ada"
        assert authenticate_token(s, token + "x") is None
        assert authenticate_token(s, "") is None
        assert authenticate_token(s, "abrec_forged") is None


def test_expired_token_is_refused(factory):
    with session_scope(factory) as s:
        token = create_token(s, "ada", name="short", ttl_days=1)
    with session_scope(factory) as s:
        assert authenticate_token(s, token) is not None
        row = s.scalars(select(ApiToken)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(factory) as s:
        assert authenticate_token(s, token) is None


def test_revoked_token_is_refused(factory):
    with session_scope(factory) as s:
        keep = create_token(s, "ada", name="keep")
        drop = create_token(s, "ada", name="drop")
    with session_scope(factory) as s:
        assert revoke_token(s, "ada", "drop", actor="root") == 1
    with session_scope(factory) as s:
        assert authenticate_token(s, drop) is None
        assert authenticate_token(s, keep).username == "ada"
    with pytest.raises(IdentityError, match="no live token"):
        with session_scope(factory) as s:
            revoke_token(s, "ada", "drop", actor="root")


def test_token_for_unknown_user_or_bad_ttl_refused(factory):
    with pytest.raises(IdentityError, match="no user"):
        with session_scope(factory) as s:
            create_token(s, "ghost")
    with pytest.raises(IdentityError, match="ttl_days"):
        with session_scope(factory) as s:
            create_token(s, "ada", ttl_days=0)


def test_roles_are_ordered(factory):
    with session_scope(factory) as s:
        ada = authenticate_password(s, "ada", "correct horse")
        vic = authenticate_password(s, "vic", "viewer-pass")
        assert [role_at_least(ada, r) for r in ("viewer", "editor", "admin")] == [True, True, False]
        assert [role_at_least(vic, r) for r in ("viewer", "editor", "admin")] == [True, False, False]
        assert not role_at_least(None, "viewer")
        set_role(s, "vic", "admin", actor="root")
    with session_scope(factory) as s:
        vic = authenticate_password(s, "vic", "viewer-pass")
        assert role_at_least(vic, "admin")
    with pytest.raises(IdentityError, match="unknown role"):
        role_at_least(vic, "owner")


def test_identity_changes_are_audited(factory):
    with session_scope(factory) as s:
        create_token(s, "ada", name="ci", actor="root")
        revoke_token(s, "ada", "ci", actor="root")
    with session_scope(factory) as s:
        rows = audit.history(s, "user", "ada")
    assert [(r.actor, r.action) for r in rows] == [
        ("root", "create"),
        ("root", "create_token"),
        ("root", "revoke_token"),
    ]
    assert all("correct horse" not in str(r.details) for r in rows)
