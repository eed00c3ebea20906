"""Engine creation, URL and SQLite path checks, and programmatic Alembic ``upgrade head``.

Only SQLite and PostgreSQL (psycopg 3) are supported. SQLite connections run in WAL mode with a
busy timeout and foreign keys on. On PostgreSQL the upgrade holds an advisory lock so several
boxes of a fleet starting at once do not race to create the same tables.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, InterfaceError,
                            NoSuchModuleError, OperationalError)

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 5
# Arbitrary constant key for pg_advisory_xact_lock: "linewatch migrate".
_PG_MIGRATE_LOCK = 0x6C77_6D69


class StoreError(Exception):
    """The store cannot be used as configured (bad URL, SQLite path not writable, ...).

    The message is one line that names the URL or path and what is wrong with it.
    """


def parse_url(url: str) -> URL:
    """Parse and check a store URL: SQLite or PostgreSQL with an importable driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"store.url {url!r} is not a valid SQLAlchemy URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"store.url {url!r}: backend {backend!r} is not supported "
                         "(use sqlite:///path.db or postgresql+psycopg://host/db)")
    try:
        parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise StoreError(f"store.url {url!r}: driver not available: {exc}") from None
    return parsed


def sqlite_path(parsed: URL) -> Path | None:
    """The SQLite file a URL names, or None for in-memory / URI-style databases."""
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database or ""
    if db in ("", ":memory:") or db.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(db).expanduser()


def prepare_sqlite_path(path: Path) -> None:
    """Create the parent folder of a SQLite file and check that it can be written.

    Raises StoreError (one line) when a parent is a regular file, the folder cannot be created,
    or the file / folder cannot be written (e.g. read-only file system).
    """
    path = path.absolute()
    for ancestor in reversed(path.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise StoreError(f"cannot create SQLite database {path}: {ancestor} is a file, not a folder")
    if path.is_dir():
        raise StoreError(f"cannot use SQLite database {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        # WAL mode needs to create -wal / -shm files beside the database.
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise StoreError(f"cannot write SQLite database {path}: {exc.strerror or exc}") from None


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def make_engine(url: str | URL) -> Engine:
    """An engine for the store: WAL + busy timeout on SQLite, connect timeout and pre-ping on PG."""
    parsed = make_url(url) if isinstance(url, str) else url
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 1
        kwargs["max_overflow"] = 1
        # Find a dead or silent server within ~15 s even mid-query (keepalives when idle, a TCP
        # user timeout when data is unacknowledged), unless the URL sets these itself.
        defaults = {"connect_timeout": PG_CONNECT_TIMEOUT_S, "keepalives": 1, "keepalives_idle": 5,
                    "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 15000}
        kwargs["connect_args"] = {k: v for k, v in defaults.items() if k not in parsed.query}
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def is_db_down(exc: BaseException) -> bool:
    """True for errors that mean 'the database cannot be reached now' (retry later, spool)."""
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def alembic_config() -> AlembicConfig:
    """An Alembic config pointing at the packaged migrations (works from an installed wheel)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no Alembic revisions packaged"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Run ``alembic upgrade head`` on the engine's database; harmless when already at head."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    logger.debug("store schema at %s", head_revision())
