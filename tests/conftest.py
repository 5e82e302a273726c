"""Shared fixtures: fresh databases on SQLite and on the local PostgreSQL server.

The PostgreSQL tests need the server at 127.0.0.1:5432 (trust auth). They skip when it is
unreachable, unless ABREC_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail instead.
Each test gets its own database, so parallel sessions on one server never collide.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("ABREC_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    ok = _pg_available()
    if not ok and os.environ.get("ABREC_REQUIRE_POSTGRES") == "1":
        pytest.fail("PostgreSQL at 127.0.0.1:5432 is required (ABREC_REQUIRE_POSTGRES=1) but unreachable")
    return ok


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'abrec.db'}"


@pytest.fixture
def pg_url(pg_available: bool):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not pg_available:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    import psycopg

    name = f"abrec_t_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Run a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the public datasets; tests that need it skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """Factory of small random `tron` checkpoints (d=16, one layer), fast enough for any test.

    make_checkpoint(seed=0, n_items=60, name="c0") -> Path of a .safetensors file whose item ids
    are "i0".."i{n-1}" and whose popular items are i0, i1, i2 ...
    """

    def make(seed: int = 0, n_items: int = 60, name: str | None = None, **overrides) -> Path:
        import torch
        from abrec.models.checkpoint import save_checkpoint
        from abrec.models.data import ItemMap
        from abrec.models.presets import build_model, resolve_config

        torch.manual_seed(seed)
        small = {"hidden": 16, "layers": 1, "max_len": 10, "dropout": 0.0}
        config = resolve_config("tron", small | overrides)
        model = build_model("tron", config, n_items)
        path = tmp_path / "checkpoints" / f"{name or f'c{seed}'}.safetensors"
        save_checkpoint(
            path,
            model,
            kind="tron",
            config=config,
            item_map=ItemMap([f"i{j}" for j in range(n_items)]),
            metrics={"recall@20": 0.5, "mrr@20": 0.2},
            popular=list(range(1, min(n_items, 30) + 1)),
            data_fingerprint=f"synthetic-{seed}",
        )
        return path

    return make
