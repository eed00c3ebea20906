"""Store records: the plain, JSON-able dicts the writer queues, spools and writes.

A record is made on the submitting thread, so no Result (and none of its numpy arrays) is
kept alive by the queue, and the same dict can go to the database or to the spool unchanged.
Every record has ``op``: result | lot_open | lot_close | lot_summary | model.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..frames import LotEvent, LotEventKind, Result

COUNT_KEYS = ("n_ok", "n_ng", "n_not_inspected", "n_fault")
_VERDICT_COUNT = {"OK": "n_ok", "NG": "n_ng", "NOT_INSPECTED": "n_not_inspected", "FAULT": "n_fault"}


def _num(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return None if math.isnan(f) else f


def result_record(result: Result, line: str, t_publish: float) -> dict[str, Any]:
    """A ``result`` record (tier 1 or 2) with its regions and model name/version."""
    meta = result.frame
    model = result.model or {}
    return {
        "op": "result", "line": line, "camera": meta.camera, "lot_id": meta.lot_id or "",
        "frame_id": int(meta.frame_id), "tier": int(result.tier),
        "verdict": getattr(result.verdict, "value", str(result.verdict)),
        "score": _num(result.score), "threshold": _num(result.threshold), "reason": result.reason or "",
        "t_capture": float(meta.t_capture), "t_inspected": _num(result.t_inspected),
        "t_publish": _num(t_publish),
        "model": {"name": str(model.get("name", "")), "version": str(model.get("version", "")),
                  "kind": str(model.get("kind", "engine"))},
        "regions": [[int(r.bbox[0]), int(r.bbox[1]), int(r.bbox[2]), int(r.bbox[3]), int(r.area_px),
                     float(r.score), str(r.label)] for r in result.regions],
    }


def lot_event_record(event: LotEvent, line: str) -> dict[str, Any]:
    """A ``lot_open`` or ``lot_close`` record."""
    op = "lot_open" if event.kind == LotEventKind.OPENED else "lot_close"
    return {"op": op, "line": line, "lot_id": event.lot_id, "recipe": event.recipe or "",
            "reason": event.reason, "t": float(event.t), "n_frames": int(event.n_frames)}


def lot_summary_record(lot_id: str, counts: dict[str, int], line: str) -> dict[str, Any]:
    """A ``lot_summary`` record. ``counts`` keys: n_ok/n_ng/n_not_inspected/n_fault, or the
    verdict names OK/NG/NOT_INSPECTED/FAULT (either spelling); missing keys stay NULL."""
    rec: dict[str, Any] = {"op": "lot_summary", "line": line, "lot_id": lot_id}
    for key, value in counts.items():
        name = _VERDICT_COUNT.get(getattr(key, "value", key), key)
        if name not in COUNT_KEYS:
            raise ValueError(f"lot summary count {key!r} is not one of {COUNT_KEYS} or a verdict name")
        rec[name] = int(value)
    return rec


def model_record(name: str, version: str, kind: str, details: dict[str, Any],
                 trained_on_lot: str | None) -> dict[str, Any]:
    """A ``model`` record (upsert into model_versions on (name, version))."""
    return {"op": "model", "name": name, "version": version, "kind": kind, "details": details,
            "trained_on_lot": trained_on_lot, "t": time.time()}
