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


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
