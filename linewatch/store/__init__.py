"""SQL history: schema, Alembic migrations, the batching writer thread and its on-disk spool.

``StoreWriter`` is what the daemon uses; ``linewatch.store.query`` reads rows back for tests
and the CLI; ``upgrade_to_head`` migrates a database by hand.
"""

from .db import StoreError, current_revision, head_revision, make_engine, upgrade_to_head
from .writer import StoreWriter

__all__ = ["StoreError", "StoreWriter", "current_revision", "head_revision", "make_engine",
           "upgrade_to_head"]
