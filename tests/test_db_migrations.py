"""The migrations build exactly the schema the ORM declares (what `alembic check` verifies)."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from abrec.db import MIGRATIONS_DIR, Base, import_all_tables, init_db, make_engine


def _differences(engine) -> list:
    import_all_tables()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def _index_names(engine, table: str) -> set[str]:
    return {ix["name"] for ix in inspect(engine).get_indexes(table)}


def test_migrated_schema_matches_the_orm(db_url):
    engine = make_engine(db_url)
    try:
        init_db(engine)
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_exp0003_replaces_the_user_index_with_the_analysis_index_and_back(db_url):
    engine = make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))

    def migrate(step, target: str) -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            step(cfg, target)

    try:
        init_db(engine)
        for table in ("impressions", "clicks"):
            assert _index_names(engine, table) >= {f"ix_{table}_analysis"}
            assert f"ix_{table}_exp_phase_user" not in _index_names(engine, table)
        migrate(command.downgrade, "exp0002")
        for table in ("impressions", "clicks"):
            assert {f"ix_{table}_analysis", f"ix_{table}_exp_phase_user"} <= _index_names(engine, table)
        migrate(command.upgrade, "heads")
        assert _differences(engine) == []
    finally:
        engine.dispose()
