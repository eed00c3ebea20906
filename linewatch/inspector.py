"""The inspector stage (tier 1) and the lot closer (tier 2).

Inspector thread: takes frame handles from the ring in batches (up to ``batch_size`` or
``batch_wait_ms``), runs the engine, turns each output into an answer, and releases the slots.
Any engine exception, a wrong-sized answer, a non-finite score or a deadline overrun becomes a
FAULT result for the frames concerned: nothing fails open.

Lot closer thread: when a lot closes, asks the engine for whole-lot (tier 2) outputs and turns
them into refined results, beside the inspector so tier 1 keeps its latency.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .config import InspectConfig, ThresholdConfig
from .decision import Threshold, Thresholds, regions_and_mask, regions_from_mask
from .engines.base import Engine, Tier2Unavailable
from .frames import EngineOutput, FrameMeta, LotEvent, Result, Verdict
from .priority import TIER2_NICE, lower_priority
from .ring import FrameRing, Handle, StaleHandle

logger = logging.getLogger(__name__)


def model_info(engine: Engine) -> dict[str, str]:
    return {"name": engine.name, "version": engine.version}


def decide(out: EngineOutput, meta: FrameMeta, thr: Threshold, min_region_px: int,
           model: dict[str, str], tier: int = 1, observe: bool = True) -> Result:
    """One engine output -> one Result (OK / NG, or NOT_INSPECTED while uncalibrated, FAULT for
    a non-finite score or map). Threshold-free engines (``out.mask`` set) decide by their regions."""
    now = time.time()
    score = float(out.image_score)
    why = None
    if not math.isfinite(score):
        why = "engine returned a non-finite score"
    elif out.score_map.shape != (meta.height, meta.width):
        why = f"engine returned a {out.score_map.shape} map for a {meta.height}x{meta.width} frame"
    elif out.score_map.size and not math.isfinite(float(out.score_map.max())):  # NaN or +inf anywhere
        why = "engine returned a non-finite score map"
    if why is not None:
        return Result(meta, Verdict.FAULT, None, [], model, reason=why, t_inspected=now, tier=tier)
    if out.mask is not None:
        regions = out.regions or regions_from_mask(out.mask, out.score_map, min_region_px)
        verdict = Verdict.NG if regions else Verdict.OK
        return Result(meta, verdict, score, regions, model, t_inspected=now, mask=out.mask,
                      score_map=out.score_map, tier=tier)
    t = thr.current()
    if observe:
        thr.observe(score)
    if t is None:
        return Result(meta, Verdict.NOT_INSPECTED, score, [], model, reason="threshold calibrating",
                      t_inspected=now, score_map=out.score_map, tier=tier)
    mask = out.score_map > t
    regions = out.regions or []
    if score > t and not regions:
        # the published mask holds the listed regions only, not blobs below min_region_px
        regions, mask = regions_and_mask(mask, out.score_map, min_region_px)
    verdict = Verdict.NG if (score > t and regions) else Verdict.OK
    return Result(meta, verdict, score, regions, model, threshold=t, t_inspected=now, mask=mask,
                  score_map=out.score_map, tier=tier)


@dataclass
class LotLedger:
    """Frames inspected per open lot, so tier 2 can name them and the summary can count them."""

    metas: dict[str, list[FrameMeta]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, lot_id: str, verdict: Verdict) -> None:
        with self.lock:
            c = self.counts.setdefault(lot_id, {v.value: 0 for v in Verdict})
            c[verdict.value] += 1

    def add(self, meta: FrameMeta) -> None:
        with self.lock:
            self.metas.setdefault(meta.lot_id, []).append(meta)

    def pop(self, lot_id: str) -> tuple[list[FrameMeta], dict[str, int]]:
        with self.lock:
            return (self.metas.pop(lot_id, []),
                    self.counts.pop(lot_id, {v.value: 0 for v in Verdict}))


class Inspector:
    """Tier-1 stage. ``emit`` receives every Result; ``on_lot`` receives lot events in order."""

    def __init__(self, ring: FrameRing, engine: Engine, cfg: InspectConfig, thr_cfg: ThresholdConfig,
                 emit: Callable[[Result], None], on_lot: Callable[[LotEvent], None],
                 on_engine_time: Callable[[float], None] | None = None):
        self.ring = ring
        self.engine = engine
        self.on_engine_time = on_engine_time  # seconds of each engine call (the metrics histogram)
        self.cfg = cfg
        self.thr_cfg = thr_cfg
        self.threshold = Thresholds(thr_cfg)  # per recipe; forgotten when the engine changes
        self.emit = emit
        self.on_lot = on_lot
        self.model = model_info(engine)
        self.t_heartbeat = time.monotonic()
        self.engine_s = 0.0  # time inside engine.infer
        # CPU seconds of this thread (time.thread_time): the daemon's own cost is cpu_s - engine_cpu_s
        self.cpu_s = 0.0
        self.engine_cpu_s = 0.0
        self.batches = 0
        self.faults = 0
        self.inspected = 0
        self._stop = threading.Event()
        self._swap: Engine | None = None
        self._thread = threading.Thread(target=self._run, name="inspector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reconfigure(self, cfg: InspectConfig, thr_cfg: ThresholdConfig) -> None:
        self.cfg, self.thr_cfg = cfg, thr_cfg
        self.threshold.reconfigure(thr_cfg)

    def swap_engine(self, engine: Engine) -> None:
        """Use a new (warmed-up) engine from the next batch on (engine restart on reload)."""
        self._swap = engine

    def _run(self) -> None:
        while True:
            self.t_heartbeat = time.monotonic()
            if self._swap is not None:
                old, self.engine, self._swap = self.engine, self._swap, None
                self.model = model_info(self.engine)
                self.threshold.reset()  # the new engine's scores are on their own scale
                old.close()
            ring = self.ring  # a reload may swap self.ring: this batch goes back to the ring it came from
            items = ring.take(self.cfg.batch_size, timeout_s=0.2, wait_fill_s=self.cfg.batch_wait_ms / 1000.0)
            if not items:
                if self._stop.is_set():
                    return
                continue
            c0 = time.thread_time()
            if isinstance(items[0], LotEvent):
                self.on_lot(items[0])
            else:
                self._inspect([h for h in items if isinstance(h, Handle)], ring)
            self.cpu_s += time.thread_time() - c0

    def _fault(self, meta: FrameMeta, reason: str) -> None:
        self.faults += 1
        self.emit(Result(meta, Verdict.FAULT, None, [], self.model, reason=reason, t_inspected=time.time()))

    def _inspect(self, handles: list[Handle], ring: FrameRing) -> None:
        deadline_s = self.cfg.deadline_ms / 1000.0
        batch: list[tuple[Handle, np.ndarray, FrameMeta]] = []
        for h in handles:
            try:
                img, meta, _gt = ring.view(h)
            except StaleHandle:
                continue  # reused by drop_oldest: its NOT_INSPECTED went out at the drop
            fault = meta.extra.get("fault")
            age = meta.age_s()
            if fault:
                ring.release(h)
                self._fault(meta, f"source: {fault}")
            elif deadline_s and age > deadline_s:
                ring.release(h)
                self._fault(meta, f"deadline overrun: waited {1000 * age:.0f} ms "
                                  f"before inspection (deadline {self.cfg.deadline_ms:.0f} ms)")
            else:
                batch.append((h, img, meta))
        if not batch:
            return
        metas = [m for _, _, m in batch]
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            outs = self.engine.infer([img for _, img, _ in batch], metas)
            if len(outs) != len(batch):
                raise RuntimeError(f"engine returned {len(outs)} outputs for {len(batch)} frames")
        except Exception as exc:  # noqa: BLE001 - any engine failure must become FAULT, never OK
            logger.exception("engine %s failed on %d frames", self.model["name"], len(batch))
            for h, _, meta in batch:
                ring.release(h)
                self._fault(meta, f"engine error: {type(exc).__name__}: {exc}")
            return
        finally:
            spent = time.perf_counter() - t0
            self.engine_s += spent
            self.engine_cpu_s += time.thread_time() - c0
            self.batches += 1
            if self.on_engine_time is not None:
                self.on_engine_time(spent)
        for (h, _, meta), out in zip(batch, outs):
            ring.release(h)
            age = meta.age_s()
            if deadline_s and age > deadline_s:
                self._fault(meta, f"deadline overrun: inspected {1000 * age:.0f} ms "
                                  f"after capture (deadline {self.cfg.deadline_ms:.0f} ms)")
                continue
            try:
                r = decide(out, meta, self.threshold.get(meta.recipe), self.thr_cfg.min_region_px, self.model)
            except Exception as exc:  # noqa: BLE001 - a malformed output is FAULT; the batch's other frames go on
                logger.exception("engine %s gave frame %s an unusable output", self.model["name"], meta.frame_id)
                self._fault(meta, f"engine returned an unusable output: {type(exc).__name__}: {exc}")
                continue
            if r.verdict is Verdict.FAULT:
                self.faults += 1
            self.inspected += 1
            self.emit(r)

    def stop(self, timeout_s: float) -> bool:
        """Ask the loop to end once the ring is empty; True if it ended in time."""
        self._stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread.is_alive()


class LotCloser:
    """Tier-2 stage: whole-lot outputs from the engine at lot end, in lot order."""

    def __init__(self, get_engine: Callable[[], Engine], thr_cfg: ThresholdConfig,
                 ledger: LotLedger, publish_lot: Callable[[LotEvent, list[Result], dict[str, int]], None],
                 queue_max: int = 8):
        self.get_engine = get_engine
        self.threshold = Thresholds(thr_cfg)  # per recipe; forgotten when the engine changes
        self._engine_seen: Engine | None = None
        self.thr_cfg = thr_cfg
        self.ledger = ledger
        self.publish_lot = publish_lot
        self._q: queue.Queue[LotEvent | None] = queue.Queue(queue_max)
        self.t_heartbeat = time.monotonic()
        self.skipped = 0
        self.busy_since: float | None = None  # monotonic start of the lot being closed, None when idle
        self.refined_lots = 0
        self._thread = threading.Thread(target=self._run, name="lot-closer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reconfigure(self, thr_cfg: ThresholdConfig) -> None:
        self.thr_cfg = thr_cfg
        self.threshold.reconfigure(thr_cfg)

    def submit(self, ev: LotEvent) -> None:
        """Queue a closed lot. If tier 2 is too far behind, the lot is closed without refinement
        (counted, and said so in its lot message) rather than stalling tier 1."""
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            self.skipped += 1
            metas, counts = self.ledger.pop(ev.lot_id)
            logger.warning("tier 2 behind: lot %s closed without refinement", ev.lot_id)
            skipped = getattr(self.get_engine(), "lot_skipped", None)  # let a lot-aware engine free it
            if skipped is not None:
                try:
                    skipped(ev.lot_id)
                except Exception:  # noqa: BLE001 - freeing is housekeeping; the lot message still goes out
                    logger.exception("engine failed to let go of skipped lot %s", ev.lot_id)
            self.publish_lot(ev, [], {**counts, "tier2": "skipped: lot closer behind"})

    def _run(self) -> None:
        lower_priority(TIER2_NICE)
        while True:
            self.t_heartbeat = time.monotonic()
            try:
                ev = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if ev is None:
                return
            self.busy_since = time.monotonic()  # one lot's tier 2 may take long: see tier2_stale_s
            try:
                self._close(ev)
            finally:
                self.busy_since = None

    def _close(self, ev: LotEvent) -> None:
        metas, counts = self.ledger.pop(ev.lot_id)
        engine = self.get_engine()
        if engine is not self._engine_seen:  # swapped by a reload: its tier-2 scores have their own scale
            self.threshold.reset()
            self._engine_seen = engine
        threshold = self.threshold.get(ev.recipe)
        model = model_info(engine)
        refined: list[Result] = []
        try:
            outs = engine.lot_closed(ev.lot_id)
        except Tier2Unavailable as exc:
            logger.warning("tier 2 not inspected for lot %s: %s", ev.lot_id, exc)
            self.publish_lot(ev, [], {**counts, "tier2": f"NOT_INSPECTED: {exc}"})
            return
        except Exception as exc:  # noqa: BLE001 - a tier-2 failure is reported, tier 1 stands
            logger.exception("tier 2 failed for lot %s", ev.lot_id)
            self.publish_lot(ev, [], {**counts, "tier2": f"FAULT: {type(exc).__name__}: {exc}"})
            return
        # an engine that refines tier 2 with another model (the AnoRefiner ARD) names it per lot
        model = getattr(engine, "last_tier2_model", None) or model
        notes: list[str] = []  # why frames of the lot get no tier-2 result
        seen = collections.Counter(m.frame_id for m in metas)
        repeated = {fid for fid, n in seen.items() if n > 1}
        if repeated:  # a source restarted mid-lot numbers afresh: an output keyed by id fits none of them
            n_rep = sum(seen[fid] for fid in repeated)
            logger.warning("tier 2 of lot %s: %d frame(s) share %d frame id(s); they get no tier-2 result",
                           ev.lot_id, n_rep, len(repeated))
            notes.append(f"{n_rep} of {len(metas)} frame(s) share a frame id with another frame of the lot "
                         f"(the source numbered afresh)")
        by_id = {m.frame_id: m for m in metas if m.frame_id not in repeated}
        for fid in outs:
            if fid in by_id:
                threshold.observe(float(outs[fid].image_score))
        for fid, out in sorted(outs.items()):
            meta = by_id.get(fid)
            if meta is None:
                continue
            refined.append(decide(out, meta, threshold, self.thr_cfg.min_region_px, model,
                                  tier=2, observe=False))
        missing = (sum(1 for m in metas if m.frame_id not in outs and m.frame_id not in repeated)
                   if getattr(engine, "has_tier2", False) else 0)
        if missing:  # frames the engine kept no features for: said so, never silently left out
            logger.warning("tier 2 of lot %s: %d of %d frame(s) without a result", ev.lot_id, missing, len(metas))
            notes.append(f"{missing} of {len(metas)} frame(s) without a tier-2 result (the engine kept no "
                         f"features for them: engine changed, lot evicted, or frames beyond its per-lot cap)")
        if notes:  # said so, never silently left out
            counts = {**counts, "tier2": "NOT_INSPECTED: " + "; ".join(notes)}
        if refined:
            self.refined_lots += 1
        self.publish_lot(ev, refined, counts)

    def stop(self, timeout_s: float) -> bool:
        """Finish the queued lots within ``timeout_s``; past it, every lot still queued is closed
        with its tier-1 counts and ``tier2: NOT_INSPECTED: shutdown ...`` (the lot in progress
        ends on its own). True when all lots got their tier 2."""
        deadline = time.monotonic() + timeout_s
        try:
            self._q.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        else:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if not self._thread.is_alive():
                return True
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                break
            if ev is None:
                continue
            self.skipped += 1
            _, counts = self.ledger.pop(ev.lot_id)
            logger.error("shutdown: lot %s closed without tier 2", ev.lot_id)
            self.publish_lot(ev, [], {**counts, "tier2": "NOT_INSPECTED: shutdown before tier 2 ran"})
        try:
            self._q.put_nowait(None)  # the thread ends after the lot in progress
        except queue.Full:
            pass
        return False
