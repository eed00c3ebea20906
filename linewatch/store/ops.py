"""Write store records to the database: idempotent inserts and upserts, batched by kind.

Every operation can be replayed: results are ``INSERT ... ON CONFLICT DO NOTHING`` on the
result key (their regions go in only with a newly inserted result), lots and model versions are
upserts that each touch only their own columns, so replaying a spool in any order gives the
same rows. Used only by the writer thread, inside one transaction per batch.
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from .records import COUNT_KEYS
from .schema import RESULT_KEY, lots, model_versions, regions, results

logger = logging.getLogger(__name__)


def utc(t: float | None) -> datetime | None:
    """Epoch seconds -> aware UTC datetime (None stays None)."""
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


def _insert(conn: Connection, table: Any) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class ModelCache:
    """(name, version) -> model_versions.id, filled as rows are written; cleared on reconnect."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], int] = {}

    def clear(self) -> None:
        self.ids.clear()


def write_records(conn: Connection, records: Sequence[dict[str, Any]], cache: ModelCache) -> tuple[int, int]:
    """Write records in order; returns (rows inserted or updated, duplicate results ignored).

    Consecutive records of the same kind go in one statement. Raises what SQLAlchemy raises;
    the caller owns the transaction.
    """
    written = duplicates = 0
    for op, group in itertools.groupby(records, key=lambda r: r["op"]):
        recs = list(group)
        if op == "result":
            ins = _write_results(conn, recs, cache)
            written += ins
            duplicates += len(recs) - ins
        elif op in ("lot_open", "lot_close", "lot_summary"):
            for rec in recs:
                _write_lot(conn, rec)
            written += len(recs)
        elif op == "model":
            for rec in recs:
                _write_model(conn, rec, cache)
            written += len(recs)
        else:
            raise ValueError(f"unknown store record op {op!r}")
    return written, duplicates


def _model_id(conn: Connection, model: dict[str, str], cache: ModelCache) -> int | None:
    name, version = model.get("name", ""), model.get("version", "")
    if not name:
        return None
    key = (name, version)
    if key in cache.ids:
        return cache.ids[key]
    found = conn.execute(select(model_versions.c.id).where(
        model_versions.c.name == name, model_versions.c.version == version)).scalar()
    if found is None:
        # A result names a model nobody registered: record it rather than lose the link.
        stmt = _insert(conn, model_versions).values(
            name=name, version=version, kind=model.get("kind") or "engine", details={},
            trained_on_lot=None, created_at=datetime.now(timezone.utc)).on_conflict_do_nothing(
            index_elements=["name", "version"])
        conn.execute(stmt)
        found = conn.execute(select(model_versions.c.id).where(
            model_versions.c.name == name, model_versions.c.version == version)).scalar_one()
    cache.ids[key] = found
    return found


def _key(values) -> tuple:
    """A result key comparable between what was written and what RETURNING gives back (SQLite
    returns the capture time naive, in UTC)."""
    return tuple(v.replace(tzinfo=timezone.utc) if isinstance(v, datetime) and v.tzinfo is None else v
                 for v in values)


def _write_results(conn: Connection, recs: list[dict[str, Any]], cache: ModelCache) -> int:
    rows = []
    for rec in recs:
        rows.append({
            "line": rec["line"], "camera": rec["camera"], "lot_id": rec["lot_id"],
            "frame_id": rec["frame_id"], "tier": rec["tier"], "verdict": rec["verdict"],
            "score": rec["score"], "threshold": rec["threshold"], "reason": rec["reason"],
            "t_capture": utc(rec["t_capture"]), "t_inspected": utc(rec["t_inspected"]),
            "t_publish": utc(rec["t_publish"]), "model_version_id": _model_id(conn, rec["model"], cache),
        })
    stmt = (_insert(conn, results).on_conflict_do_nothing(index_elements=list(RESULT_KEY))
            .returning(results.c.id, *(results.c[k] for k in RESULT_KEY)))
    inserted = {_key(row[1:]): row[0] for row in conn.execute(stmt, rows)}
    n_inserted = len(inserted)
    region_rows = []
    for rec, row in zip(recs, rows):
        rid = inserted.pop(_key([row[k] for k in RESULT_KEY]), None)
        if rid is None:
            continue  # duplicate (a replayed row, or a frame sent twice): its regions are already there
        for x0, y0, x1, y1, area, score, label in rec["regions"]:
            region_rows.append({"result_id": rid, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                                "area_px": area, "score": score, "label": label})
    if region_rows:
        conn.execute(regions.insert(), region_rows)
    return n_inserted


def _write_lot(conn: Connection, rec: dict[str, Any]) -> None:
    op = rec["op"]
    if op == "lot_open":
        own = {"opened_at": utc(rec["t"]), "open_reason": rec["reason"], "recipe": rec["recipe"]}
    elif op == "lot_close":
        own = {"closed_at": utc(rec["t"]), "close_reason": rec["reason"], "n_frames": rec["n_frames"]}
        if rec.get("recipe"):
            own["recipe"] = rec["recipe"]
    else:
        own = {k: rec[k] for k in COUNT_KEYS if k in rec}
    stmt = _insert(conn, lots).values(lot_id=rec["lot_id"], line=rec["line"], **own)
    key = ["line", "lot_id"]
    conn.execute(stmt.on_conflict_do_update(index_elements=key, set_=own) if own
                 else stmt.on_conflict_do_nothing(index_elements=key))


def _write_model(conn: Connection, rec: dict[str, Any], cache: ModelCache) -> None:
    own = {"kind": rec["kind"], "details": rec["details"], "trained_on_lot": rec["trained_on_lot"]}
    stmt = _insert(conn, model_versions).values(name=rec["name"], version=rec["version"],
                                                created_at=utc(rec["t"]), **own)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name", "version"], set_=own))
    cache.ids.pop((rec["name"], rec["version"]), None)


def prune_before(conn: Connection, cutoff: float, limit: int) -> tuple[int, int]:
    """Delete up to ``limit`` results captured before ``cutoff`` (epoch seconds) with their
    regions, and the lots closed before it; returns (results deleted, lots deleted). The caller
    owns the transaction and calls again while a full ``limit`` was deleted (short transactions
    keep the writer's inserts from waiting)."""
    when = utc(cutoff)
    ids = [r[0] for r in conn.execute(select(results.c.id).where(results.c.t_capture < when)
                                      .order_by(results.c.id).limit(limit))]
    if ids:
        conn.execute(delete(regions).where(regions.c.result_id.in_(ids)))
        conn.execute(delete(results).where(results.c.id.in_(ids)))
    n_lots = conn.execute(delete(lots).where(lots.c.closed_at < when)).rowcount if len(ids) < limit else 0
    return len(ids), int(n_lots or 0)
