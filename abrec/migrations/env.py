"""Alembic environment: runs on the connection `abrec.db.init_db` passes in, or on ABREC_DATABASE_URL."""

from alembic import context

from abrec.config import get_settings
from abrec.db import Base, import_all_tables, make_engine

import_all_tables()
target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        engine = make_engine(get_settings().database_url)
        with engine.begin() as connection:
            _migrate(connection)
    else:
        _migrate(connection)


def _render_item(type_, obj, autogen_context):
    # Migrations must not import application types: UTCDateTime is a plain aware DateTime in the DB.
    if type_ == "type" and type(obj).__name__ == "UTCDateTime":
        return "sa.DateTime(timezone=True)"
    return False


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_item,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
