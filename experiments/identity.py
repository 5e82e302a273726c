"""Identities shared by the CLI, the API's admin endpoints and the dashboard: users, roles, API tokens.

Passwords are stored as werkzeug's salted scrypt hashes. An API token is shown once, at creation;
only its SHA-256 is stored (a token is 256 random bits, so a fast hash is enough, and a lookup by
hash is one indexed query). Like the experiment service, these functions never commit.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from functools import cache

from abrec.experiments import audit
from abrec.experiments.schema import ROLES, ApiToken, User, utcnow
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
TOKEN_PREFIX = "abrec_"
_RANK = {role: i for i, role in enumerate(ROLES)}  # viewer < editor < admin


class IdentityError(ValueError):
    """A refused identity change (bad username, weak password, unknown role or user)."""


def hash_password(password: str) -> str:
    return generate_password_hash(password, method="scrypt")


def verify_password(password_hash: str, password: str) -> bool:
    return check_password_hash(password_hash, password)


@cache
def _dummy_hash() -> str:
    # Checked when the user does not exist, so a wrong username costs as long as a wrong password.
    return hash_password(secrets.token_hex(16))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def role_at_least(user: User | None, role: str) -> bool:
    """Whether `user` holds `role` or a stronger one (viewer < editor < admin)."""
    if role not in _RANK:
        raise IdentityError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return user is not None and _RANK.get(user.role, -1) >= _RANK[role]


def get_user(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.username == username)).one_or_none()


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def create_user(session: Session, username: str, password: str, role: str, actor: str) -> User:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise IdentityError(f"invalid username {username!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise IdentityError(f"password must have at least {MIN_PASSWORD} characters")
    if get_user(session, username) is not None:
        raise IdentityError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    audit.record(session, actor, "create", "user", username, {"role": role})
    return user


def set_role(session: Session, username: str, role: str, actor: str) -> User:
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    user = _require_user(session, username)
    old, user.role = user.role, role
    audit.record(session, actor, "set_role", "user", username, {"old": old, "new": role})
    return user


def set_password(session: Session, username: str, password: str, actor: str) -> User:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise IdentityError(f"password must have at least {MIN_PASSWORD} characters")
    user = _require_user(session, username)
    user.password_hash = hash_password(password)
    audit.record(session, actor, "set_password", "user", username, {})
    return user


def _require_user(session: Session, username: str) -> User:
    user = get_user(session, username)
    if user is None:
        raise IdentityError(f"no user named {username!r}")
    return user


def create_token(
    session: Session, username: str, name: str = "", ttl_days: float | None = None, actor: str | None = None
) -> str:
    """A new API token for `username`; the plain token is returned once and never stored."""
    user = _require_user(session, username)
    if ttl_days is not None and not ttl_days > 0:
        raise IdentityError(f"ttl_days must be positive, got {ttl_days!r}")
    if not isinstance(name, str) or len(name) > 64:
        raise IdentityError("token name must be at most 64 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(days=ttl_days) if ttl_days is not None else None
    row = ApiToken(user_id=user.id, token_hash=hash_token(token), name=name, expires_at=expires_at)
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor or username,
        "create_token",
        "user",
        username,
        {
            "token_id": row.id,
            "name": name,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return token


def revoke_token(session: Session, username: str, name: str, actor: str) -> int:
    """Revoke every live token of `username` called `name`; returns how many were revoked."""
    user = _require_user(session, username)
    rows = session.scalars(
        select(ApiToken).where(
            ApiToken.user_id == user.id, ApiToken.name == name, ApiToken.revoked_at.is_(None)
        )
    ).all()
    if not rows:
        raise IdentityError(f"user {username!r} has no live token named {name!r}")
    now = utcnow()
    for row in rows:
        row.revoked_at = now
    audit.record(session, actor, "revoke_token", "user", username, {"name": name, "count": len(rows)})
    return len(rows)


def authenticate_token(session: Session, token: str) -> User | None:
    """The user a token belongs to, or None for an unknown, expired or revoked token."""
    if not isinstance(token, str) or not token:
        return None
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    return row.user


def authenticate_password(session: Session, username: str, password: str) -> User | None:
    user = get_user(session, username) if isinstance(username, str) else None
    if user is None:
        verify_password(_dummy_hash(), password if isinstance(password, str) else "")
        return None
    return user if verify_password(user.password_hash, password) else None
