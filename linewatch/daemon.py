"""The daemon: stage wiring, lifecycle, signals, reload and shutdown order.

Stages and their threads: ``acquire`` (source -> lots -> ring), ``inspector`` (tier 1),
``lot-closer`` (tier 2), ``publisher`` (owns the PUB socket), ``control`` (owns the REP socket),
``store-writer`` (owns the database connection), and the main thread, which turns signals
(written to a self-pipe by the handlers) into reload / stop and pings the systemd watchdog only
while every stage's heartbeat is fresh.

Start order: store, sockets, source (opened, fails fast), engine warm-up, threads; READY to
systemd then (a triggered line may send no part for hours: waiting for one would fail the start),
with the status "waiting for the first frame" until one came. Stop order: source, close the open lot, drain the ring through the
inspector (up to ``drain_timeout_s``; what is left is published NOT_INSPECTED), tier 2,
publisher, store (flushed).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from . import __version__
from . import config as cfgmod
from .acquire import SourceUnavailable, create_source
from .acquire.base import Source, SourceError, SourceFrame
from .config import Config, ConfigError
from .control import RELOAD_WAIT_S, ControlServer
from .engines import EngineUnavailable, create_engine
from .engines.base import Engine
from .frames import FrameMeta, LotEvent, LotEventKind, Result, Verdict
from .inspector import Inspector, LotCloser, LotLedger, model_info
from .lots import LotTracker
from .publish import EndpointError, Publisher, frame_header, lot_header
from .ring import FrameRing, RingClosed
from .store import StoreError, StoreWriter
from .systemd import Notifier, watchdog_period_s
from .telemetry import Telemetry

logger = logging.getLogger(__name__)

MAX_GAP_FILL = 10_000  # frame-id gaps larger than this are counted but not itemised


RELOAD_WATCHDOG_CAP_S = 2 * RELOAD_WAIT_S  # watchdog pings go on this long at most during a reload
WATCHDOG_RETRY_S = 1.0  # how soon a withheld watchdog ping is looked at again
PUBLISHER_KEYS = {"endpoint", "sndhwm"}  # [publish] keys a reload applies by moving the PUB socket


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the line engineer."""


class Dispatcher:
    """Fans every result and lot event out to the publisher, the store and the counters."""

    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.ledger = LotLedger()
        self.lock = threading.Lock()
        self.verdicts: dict[str, int] = {v.value: 0 for v in Verdict}
        self.tier2_results = 0

    def result(self, r: Result) -> None:
        d = self.d
        now = time.time()
        with self.lock:
            self.verdicts[r.verdict.value] += 1
        d.telemetry.results.labels(r.verdict.value).inc()
        if r.verdict is Verdict.NOT_INSPECTED:
            d.telemetry.drops.labels(r.reason.split(":")[0]).inc()
        if r.verdict is not Verdict.NOT_INSPECTED or r.reason == "threshold calibrating":
            # not dropped or lost frames: their instant answers would make the histogram look
            # better the more frames are dropped
            d.telemetry.latency.observe(max(0.0, r.frame.age_s()))
        self.ledger.count(r.frame.lot_id, r.verdict)
        if r.verdict in (Verdict.OK, Verdict.NG) or r.reason == "threshold calibrating":
            self.ledger.add(r.frame)
        payload = None
        mode = d.cfg.publish.payload
        if r.verdict in (Verdict.OK, Verdict.NG):
            # an OK part has no defect to outline: its mask would be an empty PNG on every frame
            payload = (r.mask if mode == "mask" and r.verdict is Verdict.NG else
                       r.score_map if mode == "score_map" else None)
        d.publisher.send("frame", frame_header(r, d.cfg.daemon.line), payload)
        if r.verdict is Verdict.FAULT:
            d.publisher.send("fault", {"kind": "fault", "line": d.cfg.daemon.line, "camera": r.frame.camera,
                                       "frame_id": r.frame.frame_id, "lot_id": r.frame.lot_id,
                                       "reason": r.reason})
        d.store.submit_result(r, now)

    def lot_event(self, ev: LotEvent) -> None:
        """Called by the inspector, in order with the frames."""
        d = self.d
        d.telemetry.lots.labels(ev.kind.value).inc()
        if ev.kind is LotEventKind.OPENED:
            d.publisher.send("lot", lot_header(ev, d.cfg.daemon.line))
            d.store.submit_lot_event(ev)
        else:
            d.closer.submit(ev)

    def lot_closed(self, ev: LotEvent, refined: list[Result], summary: dict[str, Any]) -> None:
        """Called by the lot closer with tier-2 results (possibly none)."""
        d = self.d
        now = time.time()
        d.publisher.send("lot", lot_header(ev, d.cfg.daemon.line, refined, summary))
        for r in refined:
            d.store.submit_result(r, now)
        with self.lock:
            self.tier2_results += len(refined)
        d.store.submit_lot_event(ev)
        d.store.submit_lot_summary(ev.lot_id, {k: v for k, v in summary.items() if k in Verdict.__members__})


class Daemon:
    """One running linewatch. ``run()`` blocks until stopped and returns the exit code."""

    def __init__(self, cfg: Config, config_path: Path | None = None, exit_at_source_end: bool = False,
                 install_signals: bool = True):
        self.cfg = cfg
        self.config_path = config_path
        self.exit_at_source_end = exit_at_source_end
        self.install_signals = install_signals and threading.current_thread() is threading.main_thread()
        self.telemetry = Telemetry()
        self.notifier = Notifier()
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.stopping = threading.Event()  # the main loop has left: no queued reload will run
        self.started_at = time.time()
        self._started: list[str] = []  # the threads _start has started, in order
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._pending: list[str] = []
        self._acq_stop = threading.Event()
        self._source_ended = threading.Event()
        self.dispatch = Dispatcher(self)
        self.camera_lost = 0
        self.last_frame_id: int | None = None
        self.exit_code = 0  # 1 when the daemon stops because it cannot go on (systemd restarts it)
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload_error = ""
        self.acq_cpu_s = 0.0  # CPU seconds of the acquire thread between frames (source excluded)

    # ----------------------------------------------------------------- control
    def request_stop(self) -> None:
        self._wake("stop")

    def request_reload(self) -> None:
        self._wake("reload")

    def _wake(self, what: str) -> None:
        self._pending.append(what)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # the pipe is full (the main loop is awake anyway) or closed (already stopped)

    # ----------------------------------------------------------------- start-up
    def _start(self) -> None:
        cfg = self.cfg
        logging.getLogger("linewatch").setLevel(cfg.daemon.log_level)
        self.store = StoreWriter(cfg.store, cfg.daemon.line)
        try:
            self.store.start()
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.ctx = zmq.Context()
        try:
            self.publisher = Publisher(self.ctx, cfg.publish.endpoint, cfg.daemon.line, cfg.publish.sndhwm,
                                       cfg.publish.heartbeat_s, self.status_brief)
            self.control = ControlServer(self.ctx, cfg.publish.control_endpoint, self._handlers())
        except EndpointError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.telemetry.serve(cfg.metrics.host, cfg.metrics.port)
        except OSError as exc:
            raise StartupError(f"metrics.port = {cfg.metrics.port}: cannot serve metrics: {exc.strerror}") from None
        self.source = self._open_source(cfg)
        self.engine = self._make_engine(cfg, self.source)
        self.store.register_model(self.engine.name, self.engine.version, "engine",
                                  {"config": cfg.engine.model_dump(mode="json")})
        self.ring = self._make_ring(cfg, self.source)
        self.tracker = LotTracker(cfg.lots, self.ring.put_event)
        self.inspector = Inspector(self.ring, self.engine, cfg.inspect, cfg.threshold,
                                   self.dispatch.result, self.dispatch.lot_event,
                                   on_engine_time=self.telemetry.engine_s.observe)
        self.closer = LotCloser(lambda: self.inspector.engine, cfg.threshold, self.dispatch.ledger,
                                self.dispatch.lot_closed)
        # threads from here on: a start that fails part-way stops the ones already running
        for name, start in (("publisher", self.publisher.start), ("control", self.control.start),
                            ("closer", self.closer.start), ("inspector", self.inspector.start),
                            ("acquisition", self._start_acquisition)):
            start()
            self._started.append(name)

    def _open_source(self, cfg: Config) -> Source:
        try:
            src = create_source(cfg.source)
            src.open()
        except (SourceUnavailable, SourceError) as exc:
            raise StartupError(f"source ({cfg.source.kind}): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to open is a start-up error: at a reload
            # it must take the path that reopens the previous source, not leave none running
            logger.exception("source (%s) failed to open", cfg.source.kind)
            raise StartupError(f"source ({cfg.source.kind}): {type(exc).__name__}: {exc}") from None
        self.telemetry.source_connected.set(1)
        return src

    def _make_engine(self, cfg: Config, src: Source) -> Engine:
        try:
            engine = create_engine(cfg.engine, batch_size=cfg.inspect.batch_size)
            engine.warmup(src.height, src.width, src.channels)
            if cfg.refine.enabled and hasattr(engine, "enable_refinement"):
                # tier-2 AnoRefiner; each ARD version is recorded with the lot it was trained on
                engine.enable_refinement(cfg.refine, on_model=self.store.register_model)
        except (EngineUnavailable, ImportError, OSError, RuntimeError, AssertionError) as exc:
            # AssertionError: torch's own check, e.g. device "cuda" on a CPU build of torch
            # warm-up loads what the engine loads lazily (the sentence encoder, CUDA buffers): its
            # failures are start-up errors too, one line each
            why = str(exc) if isinstance(exc, (EngineUnavailable, FileNotFoundError)) else f"{type(exc).__name__}: {exc}"
            raise StartupError(f"engine ({cfg.engine.kind}): {why}") from None
        logger.info("engine %s %s warmed up for %dx%dx%d", engine.name, engine.version, src.width,
                    src.height, src.channels)
        return engine

    def _make_ring(self, cfg: Config, src: Source) -> FrameRing:
        return FrameRing(cfg.ring.slots, src.height, src.width, src.channels, cfg.ring.policy,
                         cfg.ring.block_timeout_s, on_drop=self._on_drop)

    def _on_drop(self, meta: FrameMeta, cause: str) -> None:
        self.dispatch.result(Result(meta, Verdict.NOT_INSPECTED, None, [], model_info(self.inspector.engine)
                                    if hasattr(self, "inspector") else {}, reason=f"{cause}: dropped",
                                    t_inspected=time.time()))

    # ----------------------------------------------------------------- acquisition
    def _start_acquisition(self) -> None:
        self._acq_stop = threading.Event()
        self.last_frame_id = None  # a new source numbers its frames afresh: no gap against the old one
        self._acq_thread = threading.Thread(target=self._acquire, args=(self.source, self.ring, self._acq_stop),
                                            name="acquire", daemon=True)
        self.t_acq_heartbeat = time.monotonic()
        self._acq_thread.start()

    def _acquire(self, src: Source, ring: FrameRing, stop: threading.Event) -> None:
        try:
            for sf in src.frames(stop):
                c0 = time.thread_time()
                self.t_acq_heartbeat = time.monotonic()
                self.telemetry.frames_in.inc()
                meta = sf.meta
                self._fill_gap(meta)
                self.tracker.assign(meta, lambda: self._put(ring, sf))
                self.acq_cpu_s += time.thread_time() - c0
                if stop.is_set():
                    break
        except RingClosed:
            return
        except Exception as exc:  # noqa: BLE001 - a source that fails must not leave a daemon serving no frames
            # a source's normal end is the end of its frames; an error (a camera the source could
            # not reopen, a replay folder that vanished) is a failure, not an end: treated as one it
            # left a live line idle with exit code 0, which systemd does not restart
            if isinstance(exc, (SourceError, OSError)):
                logger.error("source failed: %s: stopping with exit code 1 so that systemd restarts the daemon", exc)
            else:
                logger.exception("acquisition failed: stopping with exit code 1 so that systemd restarts the daemon")
            self.telemetry.source_connected.set(0)
            self.exit_code = 1
            self._wake("stop")
            return
        if not stop.is_set():
            logger.info("source ended")
            self._source_ended.set()
            self.tracker.end("source_end")
            if self.exit_at_source_end:
                self._wake("source_end")

    def _put(self, ring: FrameRing, sf: SourceFrame) -> None:
        try:
            ring.put(sf.image, sf.meta, sf.gt)
        except ValueError as exc:  # a frame of the wrong size: FAULT, not a crash
            self.dispatch.result(Result(sf.meta, Verdict.FAULT, None, [], self.inspector.model,
                                        reason=f"source: {exc}", t_inspected=time.time()))

    def _fill_gap(self, meta: FrameMeta) -> None:
        """Frame ids that never arrived are camera-side loss: each gets NOT_INSPECTED."""
        last = self.last_frame_id
        self.last_frame_id = meta.frame_id if last is None else max(last, meta.frame_id)
        if last is None or meta.frame_id <= last + 1:
            return
        missing = meta.frame_id - last - 1
        self.camera_lost += missing
        self.telemetry.camera_loss.inc(missing)
        logger.warning("camera %s: %d frame(s) lost before id %d", meta.camera, missing, meta.frame_id)
        if missing > MAX_GAP_FILL:
            logger.error("camera %s: frame ids %d-%d are counted as lost but get no NOT_INSPECTED message "
                         "each (more than %d in one gap)", meta.camera, last + 1 + MAX_GAP_FILL,
                         meta.frame_id - 1, MAX_GAP_FILL)
        for fid in range(last + 1, last + 1 + min(missing, MAX_GAP_FILL)):
            lost = FrameMeta(fid, meta.t_capture, meta.camera, meta.height, meta.width)
            self.tracker.assign(lost, lambda m=lost: self.dispatch.result(Result(
                m, Verdict.NOT_INSPECTED, None, [], self.inspector.model,
                reason="camera_loss: frame id never arrived", t_inspected=time.time())))

    def _stop_acquisition(self, timeout_s: float = 5.0) -> None:
        self._acq_stop.set()
        self._acq_thread.join(timeout_s)
        try:
            self.source.close()
        except (SourceError, OSError) as exc:
            logger.warning("closing the source: %s", exc)

    # ----------------------------------------------------------------- status
    def status_brief(self) -> dict[str, Any]:
        d = self.dispatch
        ring = getattr(self, "ring", None)
        return {
            "version": __version__, "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.ready.is_set(),
            "frames_in": ring.frames_in if ring else 0, "verdicts": dict(d.verdicts),
            "drops": dict(ring.drops) if ring else {}, "camera_lost": self.camera_lost,
            "ring_depth": ring.depth() if ring else 0,
            "ring_blocked_s": round(ring.blocked_s, 3) if ring else 0.0,
            "lot": getattr(getattr(getattr(self, "tracker", None), "current", None), "lot_id", None),  # read once
            "publisher_dropped": self.publisher.dropped if hasattr(self, "publisher") else 0,
            "publisher_failed": self.publisher.failed if hasattr(self, "publisher") else 0,
        }

    def status(self) -> dict[str, Any]:
        s = self.status_brief()
        src = self.source.status
        s.update({
            "line": self.cfg.daemon.line, "source": {"kind": self.cfg.source.kind, "connected": src.connected,
                                                     "reopen_count": src.reopen_count, "last_error": src.last_error,
                                                     "corrupt_frames": src.corrupt_frames,
                                                     "ended": self._source_ended.is_set()},
            "engine": model_info(self.inspector.engine), "tier2_results": self.dispatch.tier2_results,
            "tier2_skipped": self.closer.skipped, "store": self.store.stats(),
            "reloads": self.reloads, "last_reload_error": self.last_reload_error,
            "stages": {k: round(v, 2) for k, v in self._stage_ages().items()},
        })
        return s

    def _stale_stages(self) -> dict[str, float]:
        """Stages whose heartbeat is too old (the watchdog is withheld while there are any). The
        lot closer inside one lot's tier 2 has the longer ``tier2_stale_s``."""
        d = self.cfg.daemon
        busy = getattr(self.closer, "busy_since", None) is not None
        return {k: a for k, a in self._stage_ages().items()
                if a > (max(d.stage_stale_s, d.tier2_stale_s) if k == "lot-closer" and busy else d.stage_stale_s)}

    def _stage_ages(self) -> dict[str, float]:
        now = time.monotonic()
        ages = {"inspector": now - self.inspector.t_heartbeat, "lot-closer": now - self.closer.t_heartbeat,
                "publisher": now - self.publisher.t_heartbeat, "control": now - self.control.t_heartbeat,
                "store-writer": now - self.store.t_heartbeat}
        if not self._source_ended.is_set() and self.source.status.connected:
            # a frame, or the source loop's own sign of life (a triggered line may pause for hours)
            ages["acquire"] = now - max(self.t_acq_heartbeat, self.source.status.t_alive)
        return ages

    def _handlers(self) -> dict[str, Any]:
        def lot_start(args: list[str]) -> dict[str, Any]:
            if not 1 <= len(args) <= 2:  # a lot id or recipe with a space must be quoted
                raise ValueError(f"usage: lot start <lot_id> [recipe] (got {len(args)} arguments: {args}; "
                                 "quote an id or recipe that holds spaces)")
            return {"lot_id": self.tracker.start(args[0], args[1] if len(args) > 1 else None)}

        def lot_end(args: list[str]) -> dict[str, Any]:
            if args:
                raise ValueError(f"usage: lot end (no arguments; got {args})")
            return {"closed": self.tracker.end()}

        def reload(args: list[str]) -> dict[str, Any]:
            done = threading.Event()
            result: dict[str, Any] = {}
            self._reload_reply = (done, result)
            self.request_reload()
            end = time.monotonic() + RELOAD_WAIT_S
            while not done.wait(0.5):
                self.control.t_heartbeat = time.monotonic()  # waiting on the reload, not hung
                if self.stopping.is_set():  # a stop came first: nothing will run this reload, and
                    # waiting on would hold the control socket open past the stop
                    raise RuntimeError("the daemon is stopping; the reload was not run")
                if time.monotonic() > end:
                    raise RuntimeError(f"reload did not finish within {RELOAD_WAIT_S:.0f} s")
            self.control.t_heartbeat = time.monotonic()
            if result.get("errors"):
                what = ("reload failed part-way" if result.get("restarted") else "reload refused, nothing changed")
                raise ValueError(f"{what}: " + " | ".join(result["errors"]))
            return result

        return {"lot start": lot_start, "lot end": lot_end, "status": lambda a: self.status(),
                "reload": reload, "ping": lambda a: {"pong": True}}

    # ----------------------------------------------------------------- reload
    def _reload(self) -> dict[str, Any]:
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError("<none>", ["the daemon was started without a config file; nothing to reload"])
            new = cfgmod.load(self.config_path)
        except ConfigError as exc:
            self.last_reload_error = " | ".join(exc.lines)  # before the count: status readers poll the count
            self.reloads["failed"] += 1
            for line in exc.lines:
                logger.error("reload refused: %s", line)
            self.notifier.ready(status="reload refused; running on the previous config")
            return {"errors": exc.lines}
        changed = cfgmod.diff(self.cfg, new)
        applied, restarted, needs_restart = [], [], []
        try:
            # the PUB socket first: an address in use fails here, before anything else changed
            if set(changed.get("publish", [])) & PUBLISHER_KEYS:
                try:
                    self.publisher.rebind(new.publish.endpoint, new.publish.sndhwm)
                except EndpointError as exc:
                    raise StartupError(str(exc)) from None
                self.cfg = self.cfg.model_copy(update={"publish": self.cfg.publish.model_copy(
                    update={k: getattr(new.publish, k) for k in PUBLISHER_KEYS})})
                restarted.append("publisher")
            if "source" in changed or "ring" in changed:
                self._restart_source(new, restarted)
            if "engine" in changed or "refine" in changed:
                engine = self._make_engine(new, self.source)
                self.inspector.swap_engine(engine)
                self.store.register_model(engine.name, engine.version, "engine",
                                          {"config": new.engine.model_dump(mode="json")})
                restarted.append("engine")
        except Exception as exc:  # noqa: BLE001 - a failed reload must not take the daemon down
            if not isinstance(exc, StartupError):
                logger.exception("reload failed unexpectedly while restarting a stage")
            why = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            if "source" in restarted:  # the source runs on the new [source] / [ring]: the config must say so
                self.cfg = self.cfg.model_copy(update={"source": new.source, "ring": new.ring})
            if restarted:
                why += f" (already restarted on the new config: {', '.join(restarted)}; the rest is unchanged)"
            self.last_reload_error = why
            self.reloads["failed"] += 1
            logger.error("reload failed while restarting a stage: %s", why)
            self.notifier.ready(status="reload failed")
            return {"errors": [why], "restarted": restarted}
        for section in ("daemon", "publish", "store", "metrics"):
            restart_keys = [k for k in changed.get(section, [])
                            if not cfgmod.live_fields().get(f"{section}.{k}", False)
                            and not (section == "publish" and k in PUBLISHER_KEYS)]
            needs_restart += [f"{section}.{k}" for k in restart_keys]
        update = {}
        for section in ("daemon", "publish", "store", "metrics"):
            keys = [k.split(".", 1)[1] for k in needs_restart if k.startswith(section + ".")]
            if keys:
                old_sec = getattr(self.cfg, section)
                update[section] = getattr(new, section).model_copy(
                    update={k: getattr(old_sec, k) for k in keys})
        merged = new.model_copy(update=update)
        self.cfg = merged
        self.tracker.reconfigure(merged.lots)
        self.inspector.reconfigure(merged.inspect, merged.threshold)
        self.closer.reconfigure(merged.threshold)
        self.publisher.heartbeat_s = merged.publish.heartbeat_s
        self.store.cfg = merged.store  # its live keys (retention_days); the restart keys kept their values
        logging.getLogger("linewatch").setLevel(merged.daemon.log_level)
        applied = [f"{s}.{k}" for s, ks in changed.items() for k in ks
                   if f"{s}.{k}" not in needs_restart and s not in ("source", "ring", "engine", "refine")
                   and not (s == "publish" and k in PUBLISHER_KEYS)]  # those are "publisher" in restarted
        self.reloads["ok"] += 1
        self.last_reload_error = ""
        if needs_restart:
            logger.warning("reload: these keys need a daemon restart and keep their old values: %s",
                           ", ".join(needs_restart))
        logger.info("reload applied: live %s, restarted %s", applied or "-", restarted or "-")
        self.notifier.ready(status="running")
        return {"applied": applied, "restarted": restarted, "needs_daemon_restart": needs_restart}

    def _restart_source(self, new: Config, restarted: list[str]) -> None:
        """Stop acquisition, open the new source, and give the inspector a new ring if the frame
        shape changed (after the old ring is drained). Once the new source is open, "source" is
        in ``restarted`` and acquisition starts again whatever fails after (a new ring that cannot
        be made, an engine warm-up that fails on the new shape): the frames are then answered,
        FAULT where they cannot be inspected, instead of a camera left open and never read.
        The open lot closes (``source_restart``): the restarted source numbers its frames afresh,
        and a lot holding one frame id twice could not be judged as a whole. A lot the PLC opened
        (``control`` policy) stays open, its lot id is the PLC's; frames that then share an id get
        no tier-2 result, which the lot message says."""
        self._stop_acquisition()
        if self.cfg.lots.policy != "control":
            self.tracker.end("source_restart")
        try:
            src = self._open_source(new)
        except StartupError as exc:
            logger.error("new source failed to open; reopening the previous one")
            try:
                self.source = self._open_source(self.cfg)
            except StartupError as again:
                # no source at all: running on would only ping the watchdog over an idle line
                self.exit_code = 1
                logger.error("reload left no source (new: %s; previous: %s): stopping with exit code 1 "
                             "so that systemd restarts the daemon", exc, again)
                self._wake("stop")
                raise
            self._start_acquisition()
            raise
        self.source = src
        restarted.append("source")
        self._source_ended.clear()
        try:
            self._swap_ring(new, src)
        finally:
            self._start_acquisition()

    def _swap_ring(self, new: Config, src: Source) -> None:
        if (src.height, src.width, src.channels) != self.ring.shape or new.ring != self.cfg.ring:
            # the inspector takes everything queued, lot events included, in order: a lot close
            # handed out from here instead could overtake the inspector's last batch
            deadline = time.monotonic() + new.daemon.drain_timeout_s
            while self.ring.pending() and time.monotonic() < deadline:
                time.sleep(0.02)
            ring = self._make_ring(new, src)
            ring.carry_counts(self.ring)  # acquisition is stopped: the old ring's counts are final

            def drain_old() -> None:  # under the tracker's lock: no lot event can go to the old ring
                for item in self.ring.drain_pending():
                    self._not_inspected_left(item, "source restart")

            self.tracker.redirect(ring.put_event, first=drain_old)
            self.inspector.ring = ring
            self.ring = ring
            if self.inspector.engine is not None:
                self.inspector.engine.warmup(src.height, src.width, src.channels)

    def _not_inspected_left(self, item: FrameMeta | LotEvent, why: str) -> None:
        if isinstance(item, LotEvent):
            self.dispatch.lot_event(item)
        else:
            self.dispatch.result(Result(item, Verdict.NOT_INSPECTED, None, [], self.inspector.model,
                                        reason=f"{why}: not inspected in time", t_inspected=time.time()))

    # ----------------------------------------------------------------- main loop
    def run(self) -> int:
        """Start, serve until a stop request, shut down in order. Returns the exit code."""
        try:
            self._start()
        except BaseException as exc:
            # whatever stopped the start (a StartupError, Ctrl-C, an error nobody foresaw): what was
            # started is undone, else the ZeroMQ context's finaliser blocks on the bound sockets
            # and the process hangs instead of exiting with the error
            if isinstance(exc, (StartupError, KeyboardInterrupt)):
                logger.error("start-up stopped: %s", exc or type(exc).__name__)
            else:
                logger.exception("start-up failed")
            try:
                self._teardown_partial()
            finally:
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
                self.stopped.set()
            raise
        old_handlers = self._install_signals()
        try:
            self._serve()
        finally:
            # handlers stay ours until the drain is done: a second SIGTERM/SIGINT during the
            # drain is only a wake-up, never a KeyboardInterrupt in the middle of a flush
            self._shutdown()
            self._restore_signals(old_handlers)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.stopped.set()
        return self.exit_code

    def _serve(self) -> None:
        wd = watchdog_period_s()
        next_wd = time.monotonic()
        # started: source open, engine warm, every stage running
        self.notifier.ready(status="running; waiting for the first frame")
        logger.info("started; waiting for the first frame")
        while True:
            if not self.ready.is_set() and (self.ring.frames_in > 0 or sum(self.ring.drops.values()) > 0):
                self.ready.set()
                self.notifier.ready(status="running")
                logger.info("ready: first frame received, engine warm; publishing on %s, control on %s",
                            self.publisher.endpoint, self.control.endpoint)
            r, _, _ = select.select([self._wake_r], [], [], 0.25)
            if r:
                os.read(self._wake_r, 4096)
            while self._pending:
                what = self._pending.pop(0)
                if what in ("stop", "source_end"):
                    logger.info("stopping (%s)", what)
                    return
                if what == "reload":
                    # the `ctl reload` waiting now is answered by this reload, which reads the file
                    # after its request; one that comes in while this runs gets a reload of its own
                    reply, self._reload_reply = getattr(self, "_reload_reply", None), None
                    result = self._reload_pinging(wd)
                    if reply is not None:
                        reply[1].update(result)
                        reply[0].set()
            self.tracker.tick()
            self._update_gauges()
            if wd is not None and time.monotonic() >= next_wd:
                next_wd = self._watchdog_check(wd)

    def _watchdog_check(self, wd: float, skip: tuple[str, ...] = ()) -> float:
        """Ping the watchdog unless a stage (other than those in ``skip``) is stale; returns when
        to look again. A withheld ping is looked at again within a second: a stage stale for a
        moment must not leave the next ping a whole interval away (systemd's limit is two of them)."""
        stale = {k: a for k, a in self._stale_stages().items() if k not in skip}
        if stale:
            logger.error("watchdog withheld: stale stages %s", stale)
        else:
            self.notifier.watchdog_ping()
        return time.monotonic() + (min(wd, WATCHDOG_RETRY_S) if stale else wd)

    def _reload_pinging(self, wd: float | None) -> dict[str, Any]:
        """A reload (a source reopened, an engine built and warmed up) can outlast the watchdog
        interval, and only this thread pings: a helper pings meanwhile while the stages that run
        on (all but acquisition, which the reload may stop; a control thread waiting on a `ctl
        reload` keeps its own heartbeat) are fresh, for at most ``RELOAD_WATCHDOG_CAP_S``; a
        reload stuck longer is a hung daemon."""
        if wd is None:
            return self._reload()
        done = threading.Event()

        def ping() -> None:
            # at once, then every half interval: the main loop's last ping may be nearly an
            # interval old already when the reload starts
            end = time.monotonic() + RELOAD_WATCHDOG_CAP_S
            while time.monotonic() < end:
                self._watchdog_check(wd, skip=("acquire",))
                if done.wait(wd / 2):
                    return

        pinger = threading.Thread(target=ping, name="reload-watchdog", daemon=True)
        pinger.start()
        try:
            return self._reload()
        finally:
            done.set()
            pinger.join()

    def _update_gauges(self) -> None:
        t = self.telemetry
        t.queue_depth.labels("ring").set(self.ring.depth())
        t.queue_depth.labels("publisher").set(self.publisher.depth())
        c = self.store.stats()
        t.queue_depth.labels("store").set(c.get("queue_depth", 0))
        t.store_spooled.set(c.get("spool_rows", 0))  # what the spool holds now, a previous run's too
        t.source_connected.set(1 if self.source.status.connected else 0)

    def _install_signals(self) -> dict[int, Any]:
        if not self.install_signals:
            return {}
        old = {}
        for sig, what in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            old[sig] = signal.signal(sig, lambda s, f, w=what: self._wake(w))
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    def _shutdown(self) -> None:
        """Drain and stop, in order. Each step is attempted even when an earlier one fails (the
        store must still flush if, say, tier 2 fails to stop); a failed step is logged and makes
        the exit code 1."""
        self.stopping.set()
        self.notifier.stopping()
        drain_s = self.cfg.daemon.drain_timeout_s

        def inspector() -> None:
            if not self.inspector.stop(drain_s):
                logger.error("inspector did not drain within %.1f s", drain_s)

        def ring() -> None:
            for item in self.ring.drain_pending():
                self._not_inspected_left(item, "shutdown")
            self.ring.close()

        def tier2() -> None:
            if not self.closer.stop(max(drain_s, 5.0)):
                logger.error("tier 2 did not finish within the drain time")

        def engine() -> None:
            if self.inspector.alive():  # still inside the engine: closing it under the thread is worse
                logger.error("inspector still running: its engine is left open")
            else:
                self.inspector.engine.close()

        # the control socket stops before the last lot closes: a `lot start` during the drain
        # would open a lot that nothing ever closes
        failed = self._run_steps("stopping", [
            ("acquisition", self._stop_acquisition), ("control", self.control.stop),
            ("lot", lambda: self.tracker.end("shutdown")), ("inspector", inspector), ("ring", ring),
            ("tier 2", tier2), ("publisher", self.publisher.stop),
            ("store", lambda: self.store.stop(timeout_s=30.0)), ("engine", engine),
            ("telemetry", self.telemetry.close)])
        # term() waits for every socket to close; after a failed step one may never close
        self._run_steps("stopping", [("zeromq", lambda: self.ctx.destroy(linger=0) if failed else self.ctx.term()),
                                     ("notifier", self.notifier.close)])
        if failed and not self.exit_code:
            self.exit_code = 1
        logger.info("stopped: %s", {k: v for k, v in self.dispatch.verdicts.items()})

    @staticmethod
    def _run_steps(what: str, steps: list[tuple[str, Callable[[], Any]]], level: int = logging.ERROR) -> list[str]:
        """Run every step even when one fails; log each failure; return the names that failed."""
        failed = []
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the remaining steps still run
                failed.append(name)
                logger.log(level, "%s: %s: %s: %s", what, name, type(exc).__name__, exc)
        return failed

    def _teardown_partial(self) -> None:
        """Undo a half-done start so the error is all that remains: threads already started are
        stopped (each closes its own socket), then the engine, source and store are closed and
        the ZeroMQ context destroyed with every socket it still has. Each step is attempted even
        when an earlier one fails, and none of their errors replaces the start-up error."""
        stops = {"publisher": lambda: self.publisher.stop(timeout_s=2.0), "control": lambda: self.control.stop(),
                 "closer": lambda: self.closer.stop(1.0), "inspector": lambda: self.inspector.stop(1.0),
                 "acquisition": lambda: self._stop_acquisition(timeout_s=2.0)}
        steps = [(name, stops[name]) for name in reversed(self._started)] + [  # last started, first stopped
            ("engine", lambda: getattr(self, "engine", None) and self.engine.close()),
            # stopping the acquisition closes the source; a source opened but never read is closed here
            ("source", lambda: getattr(self, "source", None) and "acquisition" not in self._started
             and self.source.close()),
            ("store", lambda: getattr(self, "store", None) and self.store.started and self.store.stop(timeout_s=5.0)),
            ("telemetry", self.telemetry.close),
            # linger 0: sockets of stages that never started (or did not stop in time) are closed too
            ("zeromq", lambda: getattr(self, "ctx", None) and self.ctx.destroy(linger=0)),
        ]
        self._run_steps("undoing the start", steps, logging.WARNING)  # the start-up error is the one to report
