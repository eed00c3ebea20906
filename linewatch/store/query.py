"""Read the SQL history back as plain dicts (for tests, the CLI and quick checks).

Times come back as epoch seconds (float, UTC) under the same names the writer was given:
``t_capture``, ``t_inspected``, ``t_publish``; lot times as ``opened_at`` / ``closed_at``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select

from .db import make_engine, parse_url
from .schema import lots, model_versions, regions, results


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite keeps no zone; the writer always stores UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def count_results(url: str, tier: int | None = None) -> int:
    """Number of result rows, all tiers or one."""
    engine = make_engine(parse_url(url))
    try:
        stmt = select(func.count()).select_from(results)
        if tier is not None:
            stmt = stmt.where(results.c.tier == tier)
        with engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())
    finally:
        engine.dispose()


def fetch_results(url: str, lot_id: str | None = None) -> list[dict[str, Any]]:
    """Result rows (optionally of one lot) in insertion order, each with ``regions`` (list of
    dicts: bbox, area_px, score, label) and ``model`` ({name, version} or None)."""
    engine = make_engine(parse_url(url))
    try:
        stmt = (select(results, model_versions.c.name.label("model_name"),
                       model_versions.c.version.label("model_version"))
                .select_from(results.outerjoin(model_versions,
                                               results.c.model_version_id == model_versions.c.id))
                .order_by(results.c.id))
        if lot_id is not None:
            stmt = stmt.where(results.c.lot_id == lot_id)
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
            by_id: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
            if rows:
                reg_stmt = select(regions).order_by(regions.c.id)
                if lot_id is not None:
                    reg_stmt = reg_stmt.where(regions.c.result_id.in_(
                        select(results.c.id).where(results.c.lot_id == lot_id)))
                for g in conn.execute(reg_stmt):
                    if g.result_id in by_id:
                        by_id[g.result_id].append({"bbox": (g.x0, g.y0, g.x1, g.y1),
                                                   "area_px": g.area_px, "score": g.score,
                                                   "label": g.label})
    finally:
        engine.dispose()
    out = []
    for r in rows:
        for key in ("t_capture", "t_inspected", "t_publish"):
            r[key] = _epoch(r[key])
        name, version = r.pop("model_name"), r.pop("model_version")
        r["model"] = {"name": name, "version": version} if name is not None else None
        r["regions"] = by_id[r["id"]]
        out.append(r)
    return out


def fetch_lots(url: str) -> list[dict[str, Any]]:
    """All lot rows, oldest opened first, times as epoch seconds."""
    engine = make_engine(parse_url(url))
    try:
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                select(lots).order_by(lots.c.opened_at, lots.c.lot_id))]
    finally:
        engine.dispose()
    for r in rows:
        r["opened_at"], r["closed_at"] = _epoch(r["opened_at"]), _epoch(r["closed_at"])
    return rows


def fetch_models(url: str) -> list[dict[str, Any]]:
    """All model_versions rows in id order (``created_at`` as epoch seconds)."""
    engine = make_engine(parse_url(url))
    try:
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(model_versions).order_by(model_versions.c.id))]
    finally:
        engine.dispose()
    for r in rows:
        r["created_at"] = _epoch(r["created_at"])
    return rows
