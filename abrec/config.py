"""Configuration in one place: every setting has a default and an ABREC_* environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(f"ABREC_{name}", default)


@dataclass(frozen=True)
class SmtpSettings:
    """Where nightly reports are e-mailed from (analysis.delivery); login only when a user is set."""

    host: str = field(default_factory=lambda: _env("SMTP_HOST", "localhost"))
    port: int = field(default_factory=lambda: int(_env("SMTP_PORT", "25")))
    user: str | None = field(default_factory=lambda: os.environ.get("ABREC_SMTP_USER"))
    password: str | None = field(default_factory=lambda: os.environ.get("ABREC_SMTP_PASSWORD"))
    # 1 upgrades the connection with STARTTLS before logging in.
    starttls: bool = field(default_factory=lambda: _env("SMTP_STARTTLS", "0") == "1")
    sender: str = field(default_factory=lambda: _env("SMTP_FROM", "abrec@localhost"))
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Settings:
    # SQLite file by default; any SQLAlchemy URL works (postgresql+psycopg://... for several processes).
    database_url: str = field(default_factory=lambda: _env("DATABASE_URL", "sqlite:///abrec.db"))
    # Where `abrec model-server` listens and API processes find it.
    model_server_url: str = field(default_factory=lambda: _env("MODEL_SERVER_URL", "http://127.0.0.1:8601"))
    # Per-request deadline of an API process waiting for the model server (seconds).
    model_deadline_s: float = field(default_factory=lambda: float(_env("MODEL_DEADLINE_MS", "50")) / 1000)
    # Signs impression ids (HMAC) and dashboard sessions. Set it in production.
    secret_key: str = field(default_factory=lambda: _env("SECRET_KEY", "dev-secret-change-me"))
    # Directory that holds registered model artifacts.
    registry_store: Path = field(default_factory=lambda: Path(_env("REGISTRY_STORE", "abrec-registry")))
    # Attribution window of a click after its impression (seconds).
    attribution_window_s: int = field(default_factory=lambda: int(_env("ATTRIBUTION_WINDOW_S", "1800")))
    # API: how long a cached experiment definition serves before it is re-read (seconds).
    snapshot_ttl_s: float = field(default_factory=lambda: float(_env("SNAPSHOT_TTL_S", "1.0")))
    # API event log (group commit): longest wait for more rows, and most rows, per transaction.
    eventlog_max_wait_ms: float = field(default_factory=lambda: float(_env("EVENTLOG_MAX_WAIT_MS", "2")))
    eventlog_max_rows: int = field(default_factory=lambda: int(_env("EVENTLOG_MAX_ROWS", "500")))
    # E-mail delivery of reports (ABREC_SMTP_HOST, _PORT, _USER, _PASSWORD, _STARTTLS, _FROM).
    smtp: SmtpSettings = field(default_factory=SmtpSettings)


def get_settings() -> Settings:
    return Settings()
