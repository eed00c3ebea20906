"""The SQL history schema (SQLAlchemy 2 Core): model versions, lots, per-frame results, regions.

Times are UTC timestamps (``DateTime(timezone=True)``: ``timestamptz`` on PostgreSQL; on SQLite
the naive text form, always written and read as UTC). The unique key of ``results``
(line, camera, frame_id, tier, t_capture) makes a replayed row an ignored duplicate, never a
second row, while the same frame id from a later daemon run (ids start again) is a new row.

The Alembic revisions (``migrations/versions/``) create exactly these tables; a test compares
the migrated database against this metadata so the two cannot drift.
"""

from __future__ import annotations

from sqlalchemy import (JSON, BigInteger, Column, DateTime, Float, ForeignKey, Index, Integer,
                        MetaData, PrimaryKeyConstraint, SmallInteger, String, Table, Text, UniqueConstraint)

# Named constraints so later migrations (and SQLite batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

# SQLite only autoincrements an INTEGER PRIMARY KEY, so the 64-bit id is INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")

model_versions = Table(
    "model_versions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("kind", String(32), nullable=False, comment="engine | ard | ..."),
    Column("details", JSON, nullable=False),
    Column("trained_on_lot", String(128), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "version"),
)

lots = Table(
    "lots", metadata,
    Column("lot_id", String(128), nullable=False),
    Column("line", String(64), nullable=False),
    Column("recipe", String(128), nullable=False, server_default=""),
    Column("opened_at", DateTime(timezone=True), nullable=True),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Column("open_reason", String(64), nullable=True),
    Column("close_reason", String(64), nullable=True),
    Column("n_frames", Integer, nullable=True),
    Column("n_ok", Integer, nullable=True),
    Column("n_ng", Integer, nullable=True),
    Column("n_not_inspected", Integer, nullable=True),
    Column("n_fault", Integer, nullable=True),
    PrimaryKeyConstraint("line", "lot_id"),  # lot ids are per line (revision 0003)
    Index(None, "opened_at"),
)

results = Table(
    "results", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("line", String(64), nullable=False),
    Column("camera", String(64), nullable=False),
    Column("lot_id", String(128), nullable=False, server_default=""),
    Column("frame_id", BigInteger, nullable=False),
    Column("tier", SmallInteger, nullable=False, comment="1 = per frame, 2 = refined at lot end"),
    Column("verdict", String(16), nullable=False),
    Column("score", Float, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("reason", Text, nullable=False, server_default=""),
    Column("t_capture", DateTime(timezone=True), nullable=False),
    Column("t_inspected", DateTime(timezone=True), nullable=True),
    Column("t_publish", DateTime(timezone=True), nullable=True),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    UniqueConstraint("line", "camera", "frame_id", "tier", "t_capture"),
    Index(None, "lot_id"),
    Index(None, "verdict"),
    Index(None, "t_capture"),
    Index(None, "model_version_id"),
)

regions = Table(
    "regions", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("result_id", BigId, ForeignKey("results.id", ondelete="CASCADE"), nullable=False),
    Column("x0", Integer, nullable=False),
    Column("y0", Integer, nullable=False),
    Column("x1", Integer, nullable=False),
    Column("y1", Integer, nullable=False),
    Column("area_px", Integer, nullable=False),
    Column("score", Float, nullable=False),
    Column("label", String(64), nullable=False),
    Index(None, "result_id"),
)

RESULT_KEY = ("line", "camera", "frame_id", "tier", "t_capture")
"""The columns that identify one result row; a second insert with the same key is ignored (a
spooled row replayed). The capture time is part of it because frame ids start again with every
daemon start (revision 0002)."""
