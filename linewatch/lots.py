"""Lot grouping: which lot each frame belongs to, and when lots open and close (with the reason).

Policies: ``count`` (every N parts), ``idle`` (a gap without frames), ``control`` (only PLC
messages), ``line`` (a GenICam line/chunk value changes). A control message always wins: a
`lot start` closes the current lot and opens the named one, a `lot end` closes it.

The tracker is called from the acquisition thread (``assign``), the control thread
(``start``/``end``) and the housekeeping tick (``tick``); a lock keeps them consistent. Events
go to ``emit`` in order, under the same lock, so they interleave correctly with frames.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .config import LotsConfig
from .frames import FrameMeta, LotEvent, LotEventKind

logger = logging.getLogger(__name__)


@dataclass
class OpenLot:
    lot_id: str
    recipe: str
    opened_reason: str
    t_open: float
    n_frames: int = 0
    t_last_frame: float = 0.0
    line_value: int | None = None


class LotTracker:
    """Assigns frames to lots and emits OPENED / CLOSED events."""

    def __init__(self, cfg: LotsConfig, emit: Callable[[LotEvent], None],
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self._emit = emit
        self._clock = clock
        self._lock = threading.RLock()
        self.current: OpenLot | None = None
        self._seq = 0
        self.opened = 0
        self.closed = 0

    def reconfigure(self, cfg: LotsConfig) -> None:
        """Live reload: new rules apply from the next frame; the open lot stays open."""
        with self._lock:
            self.cfg = cfg

    # ----------------------------------------------------------- internal
    def _new_id(self) -> str:
        self._seq += 1
        return f"{self.cfg.id_prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self._clock()))}-{self._seq:04d}"

    def _open(self, lot_id: str, recipe: str, reason: str) -> OpenLot:
        now = self._clock()
        self.current = OpenLot(lot_id, recipe, reason, now, t_last_frame=now)
        self.opened += 1
        self._emit(LotEvent(LotEventKind.OPENED, lot_id, recipe, reason, now))
        logger.info("lot %s opened (%s), recipe %s", lot_id, reason, recipe)
        return self.current

    def _close(self, reason: str) -> None:
        lot = self.current
        if lot is None:
            return
        self.current = None
        self.closed += 1
        self._emit(LotEvent(LotEventKind.CLOSED, lot.lot_id, lot.recipe, reason, self._clock(),
                            n_frames=lot.n_frames))
        logger.info("lot %s closed (%s) after %d frames", lot.lot_id, reason, lot.n_frames)

    # ----------------------------------------------------------- callers
    def assign(self, meta: FrameMeta, enqueue: Callable[[], None] | None = None) -> None:
        """Set ``meta.lot_id`` / ``meta.recipe``, opening or closing lots as the policy says.

        ``enqueue`` (put the frame in the ring, or publish its answer) runs under the tracker's
        lock, after the frame joined its lot and before a close that the frame triggers, so the
        frame always precedes its lot's close event, also against a concurrent `lot end`.
        """
        with self._lock:
            cfg = self.cfg
            now = meta.t_capture
            lot = self.current
            if lot is not None and cfg.idle_gap_s > 0 and lot.n_frames and now - lot.t_last_frame > cfg.idle_gap_s:
                self._close("idle_gap")
                lot = None
            if lot is not None and cfg.policy == "line" and meta.line_value is not None \
                    and lot.line_value is not None and meta.line_value != lot.line_value:
                self._close("line_change")
                lot = None
            if lot is None:
                reason = {"count": "part_count", "idle": "first_frame_after_idle",
                          "control": "no_lot_open", "line": "line_value"}[cfg.policy]
                lot = self._open(self._new_id(), cfg.recipe, reason)
            if lot.line_value is None:
                lot.line_value = meta.line_value
            lot.n_frames += 1
            lot.t_last_frame = now
            meta.lot_id, meta.recipe = lot.lot_id, lot.recipe
            if enqueue is not None:
                enqueue()
            if cfg.policy == "count" and lot.n_frames >= cfg.part_count:
                self._close("part_count")

    def start(self, lot_id: str, recipe: str | None = None) -> str:
        """PLC `lot start`: close the open lot (if any) and open ``lot_id``.

        A repeated `lot start` of the lot that is open (a PLC retrying after a timeout) changes
        nothing; with another recipe it is refused (ValueError): closing and reopening a lot of the
        same id would merge two lots in every per-lot count, summary and tier-2 pass."""
        with self._lock:
            cur = self.current
            if cur is not None and lot_id and cur.lot_id == lot_id:
                if recipe is None or recipe == cur.recipe:
                    logger.info("lot start %s: already open (a repeated command), nothing changed", lot_id)
                    return lot_id
                raise ValueError(f"lot {lot_id!r} is open with recipe {cur.recipe!r}: end it, or start the new "
                                 f"recipe under another lot id")
            if self.current is not None:
                self._close("control_start")
            self._open(lot_id or self._new_id(), recipe or self.cfg.recipe, "control")
            return self.current.lot_id  # type: ignore[union-attr]

    def redirect(self, emit: Callable[[LotEvent], None], first: Callable[[], None] | None = None) -> None:
        """Send later lot events to ``emit`` (a new ring); ``first`` runs under the same lock
        before, so that no lot event (a `lot start` from the control thread) falls between."""
        with self._lock:
            if first is not None:
                first()
            self._emit = emit

    def end(self, reason: str = "control_end") -> str | None:
        """PLC `lot end` (or shutdown): close the open lot; returns its id or None."""
        with self._lock:
            lot_id = self.current.lot_id if self.current else None
            self._close(reason)
            return lot_id

    def tick(self, now: float | None = None) -> None:
        """Housekeeping: close a lot whose idle gap has passed even if no frame comes. Skipped
        when a frame is being assigned (the acquisition thread holds the lock, perhaps for a ring
        wait of seconds): frames are coming, so no idle gap is due, and the caller (the daemon's
        main loop, which serves stops and reloads) must not wait."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            lot = self.current
            gap = self.cfg.idle_gap_s
            if lot is not None and gap > 0 and lot.n_frames:
                if (now if now is not None else self._clock()) - lot.t_last_frame > gap:
                    self._close("idle_gap")
        finally:
            self._lock.release()
