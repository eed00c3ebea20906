"""Alembic environment for the linewatch store.

Programmatic use (the writer): ``db.upgrade_to_head`` passes an open connection in
``config.attributes["connection"]``. By hand: ``alembic -c linewatch/store/alembic.ini
-x url=sqlite:///var/linewatch.db upgrade head`` (or ``revision --autogenerate``).
Logging is left alone: the daemon owns it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from linewatch.store.schema import metadata

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database URL: alembic -x url=sqlite:///path.db ...")
    return url


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
else:
    shared = config.attributes.get("connection")
    if shared is not None:
        _run(shared)
    else:
        engine = create_engine(_url())
        try:
            with engine.begin() as conn:
                _run(conn)
        finally:
            engine.dispose()
