"""The store writer: one thread ("store-writer") that owns the database and writes in batches.

Submitting threads only turn their value into a plain record and enqueue it (never blocking:
when the bounded queue is full the record goes to the on-disk spool and is counted). The
writer thread takes up to ``batch_size`` records or whatever came within ``flush_interval_s``
and writes them in one transaction. When the database is down (connection / operational
error) the batch goes to the spool and the database is retried every ``retry_s``; once it is
back, ``upgrade head`` runs again and the spool is replayed oldest first, then deleted.
Replays are idempotent (see ops.py). ``stop()`` drains the queue to the database or, if it is
down, to the spool, so a clean stop loses nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..config import StoreConfig
from ..frames import LotEvent, Result
from . import db, ops
from .db import StoreError
from .ops import ModelCache, write_records
from .records import lot_event_record, lot_summary_record, model_record, result_record
from .spool import Spool, SpoolError

logger = logging.getLogger(__name__)

_STOP = object()
# A malformed record (e.g. a spool line written by another version, a field of the wrong kind
# or out of range): rejected, not retried, so that one such line cannot stop the replay of the
# spool behind it.
_BAD_RECORD = (KeyError, TypeError, ValueError, AttributeError, ArithmeticError)
DEFAULT_QUEUE_SIZE = 10_000
PRUNE_EVERY_S = 600.0  # how often rows older than retention_days are looked for
PRUNE_BATCH = 5000  # rows deleted per transaction
PRUNE_BUDGET_S = 2.0  # deleting time per pass at most; the rest goes at the next pass


class StoreWriter:
    """Batching SQL writer with an on-disk spool for database outages.

    ``StoreWriter(cfg, line)``, then ``start()``; ``submit_*`` / ``register_model`` from any
    thread; ``stop(timeout_s)`` at shutdown. Counters are plain attributes (see ``stats()``).
    """

    def __init__(self, cfg: StoreConfig, line: str, queue_size: int = DEFAULT_QUEUE_SIZE):
        self.cfg = cfg
        self.line = line
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: StoreError | None = None
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        self._count_lock = threading.Lock()
        self._gate = threading.Lock()  # orders a submit's queue put against stop()
        self._engine: Engine | None = None
        self._models = ModelCache()
        self._spool: Spool | None = None
        self._next_retry = 0.0
        self._late_warned = False
        self._stopped: bool | None = None  # stop()'s answer once it has run
        self._inflight: list[dict[str, Any]] | None = None  # live batch being written now
        # counters (written by the writer thread; overflow ones under _count_lock)
        self.rows_written = 0       # rows inserted/updated in the database (replays included)
        self.batches = 0            # transactions committed
        self.spooled_rows = 0       # rows written to the spool (outage, overflow, late submits)
        self.overflow_rows = 0      # of those, rows spooled because the queue was full
        self.replayed_rows = 0      # spooled rows later written to the database
        self.pruned_rows = 0        # results deleted as older than retention_days (regions with them)
        self.pruned_lots = 0
        self._next_prune = 0.0      # monotonic time of the next look for rows to delete
        self._lost_rows = 0         # rows the spool could not take (disk error)
        self.duplicate_rows = 0     # results ignored because their key was already there
        self.rejected_rows = 0      # rows the database refused (not an outage); logged with data
        self.db_errors = 0          # failed database attempts (writes and reconnects)
        self.db_up = False
        self.cpu_s = 0.0            # CPU seconds of the writer thread writing batches
        self.t_heartbeat = time.monotonic()  # stage heartbeat for the daemon's watchdog

    # ------------------------------------------------------------------ public, any thread
    @property
    def started(self) -> bool:
        """True once ``start()`` has launched the writer thread."""
        return self._thread is not None

    @property
    def queue_depth(self) -> int:
        """Records waiting in memory for the writer thread."""
        return self._queue.qsize()

    @property
    def spool_dropped_rows(self) -> int:
        """Rows lost: spool over its cap, unreadable spool lines, or a spool write error."""
        sp = self._spool
        return self._lost_rows + (sp.dropped_rows + sp.bad_lines if sp is not None else 0)

    @property
    def spool_sync_errors(self) -> int:
        """Spool segments whose sync to disk failed when sealed (their rows are kept)."""
        return self._spool.sync_errors if self._spool is not None else 0

    @property
    def spool_rows(self) -> int:
        """Rows waiting in the on-disk spool now."""
        return self._spool.rows if self._spool is not None else 0

    def stats(self) -> dict[str, Any]:
        """All counters as a dict (for metrics and `status`)."""
        return {k: getattr(self, k) for k in (
            "rows_written", "batches", "spooled_rows", "overflow_rows", "replayed_rows",
            "spool_dropped_rows", "duplicate_rows", "rejected_rows", "db_errors", "db_up",
            "queue_depth", "spool_rows", "spool_sync_errors", "pruned_rows", "pruned_lots")}

    def submit_result(self, result: Result, t_publish: float) -> None:
        """Queue a tier-1 or tier-2 result (by ``result.tier``) with its regions."""
        self._enqueue(result_record(result, self.line, t_publish))

    def submit_lot_event(self, event: LotEvent) -> None:
        """Queue a lot opened / closed event (a close sets closed_at, close_reason, n_frames)."""
        self._enqueue(lot_event_record(event, self.line))

    def submit_lot_summary(self, lot_id: str, counts: dict[str, int]) -> None:
        """Queue the verdict counts of a lot: keys n_ok/n_ng/n_not_inspected/n_fault or the
        verdict names OK/NG/NOT_INSPECTED/FAULT. Raises ValueError on an unknown key."""
        self._enqueue(lot_summary_record(lot_id, counts, self.line))

    def register_model(self, name: str, version: str, kind: str, details: dict[str, Any],
                       trained_on_lot: str | None = None) -> None:
        """Queue an upsert of a model version (``details`` must be JSON-able: ValueError if not)."""
        try:
            json.dumps(details)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model {name} {version}: details are not JSON-able: {exc}") from None
        self._enqueue(model_record(name, version, kind, details, trained_on_lot))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check the URL and paths, open the spool, start the writer thread, migrate the schema.

        Raises StoreError (one line) for a malformed or unsupported URL, a SQLite file that
        cannot be created or written, a spool folder that cannot be created, or a SQLite schema
        upgrade that fails. A PostgreSQL server that is down is not an error: rows spool until
        it is back.
        """
        if self._thread is not None:
            raise StoreError("store writer already started")
        parsed = db.parse_url(self.cfg.url)
        path = db.sqlite_path(parsed)
        if path is not None:
            db.prepare_sqlite_path(path)
        try:
            if self._spool is None:
                self._spool = self._new_spool()
        except SpoolError as exc:
            raise StoreError(f"store.spool_dir: {exc}") from None
        self._engine = db.make_engine(parsed)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._engine.dispose()
            raise self._start_error
        logger.info("store writer started: %s (db %s)", parsed.render_as_string(hide_password=True),
                    "up" if self.db_up else "DOWN, spooling")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Drain the queue to the database (or the spool), close, and join the thread.

        Returns True when the writer finished within ``timeout_s``. Near the deadline the
        writer stops trying the database and spools what is left; if the thread is still stuck
        in a database call at the deadline, the records still queued are spooled from here.
        """
        if self._thread is None or self._stopped is not None:
            return True if self._stopped is None else self._stopped
        self._stop_deadline = time.monotonic() + 0.8 * timeout_s
        with self._gate:  # from here every submit goes to the spool; none can slip in behind
            self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)  # only to wake the thread; it also reads _stopping
        except queue.Full:
            pass  # a full queue wakes it anyway
        self._thread.join(timeout_s)
        finished = not self._thread.is_alive()
        if not finished:
            self._stopped = False  # tells the stuck thread to quit as soon as it wakes
            logger.error("store writer did not finish within %.1f s (database hung?); spooling "
                         "the queue and the batch in flight", timeout_s)
            inflight = self._inflight
            if inflight:  # may still reach the database too: the replay then ignores it
                self._to_spool_from_caller(list(inflight))
        self._spool_rest_of_queue()  # what a thread that gave up at the deadline left queued
        if self._spool is not None:
            self._spool.close()
        if finished and self._engine is not None:
            self._engine.dispose()
        self._stopped = finished
        logger.info("store writer stopped: %s", self.stats())
        return finished

    # ------------------------------------------------------------------ internals
    def _enqueue(self, record: dict[str, Any]) -> None:
        with self._gate:  # the check and the put are one step against stop() setting _stopping
            late = self._stopping.is_set()
            full = False
            if not late:
                try:
                    self._queue.put_nowait(record)
                    return
                except queue.Full:
                    full = True
        if late and not self._late_warned:
            logger.warning("store writer is stopping: late records go to the spool")
            self._late_warned = True
        if full:
            with self._count_lock:
                self.overflow_rows += 1
        self._to_spool_from_caller([record])

    def _to_spool_from_caller(self, records: list[dict[str, Any]]) -> None:
        """Spool from a submitting thread; never raises into the inspection path."""
        try:
            with self._count_lock:
                if self._spool is None:  # queue full before start(): open the spool early
                    self._spool = self._new_spool()
            self._spool.append(records)
            if self._stopping.is_set():
                self._spool.sync()  # no writer pass will sync a record that came this late
        except SpoolError as exc:
            with self._count_lock:
                self._lost_rows += len(records)
            logger.error("store lost %d rows: %s", len(records), exc)
            return
        with self._count_lock:
            self.spooled_rows += len(records)

    def _spool_rest_of_queue(self) -> None:
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        if rest:
            self._to_spool_from_caller(rest)

    def _new_spool(self) -> Spool:
        return Spool(Path(self.cfg.spool_dir), self.cfg.spool_max_mb,
                     sync_interval_s=self.cfg.spool_sync_s)

    def _run(self) -> None:
        try:
            self._connect(startup=True)
        except StoreError as exc:
            self._start_error = exc
            return
        except BaseException as exc:  # anything else must not leave start() waiting forever
            self._start_error = StoreError(f"store writer failed to start: {exc!r}")
            raise
        finally:
            self._ready.set()
        stop_seen = False
        while True:
            self.t_heartbeat = time.monotonic()
            batch, got_stop = self._collect(drain=stop_seen)
            stop_seen = stop_seen or got_stop or self._stopping.is_set()
            if batch:
                c0 = time.thread_time()
                try:
                    self._write_batch(batch)
                except Exception:  # noqa: BLE001 - the one thread that owns the database must live on
                    self.db_errors += 1
                    logger.exception("store writer: unexpected error writing %d rows; spooling them",
                                     len(batch))
                    self._spool_batch(batch)
                self.cpu_s += time.thread_time() - c0
            if self._spool is not None:
                self._spool.sync_if_due()  # spooled rows reach the disk within spool_sync_s
            if self.db_up and not stop_seen:
                self._prune_if_due()
            now = time.monotonic()
            past_deadline = now >= self._stop_deadline
            try:
                if not self.db_up and now >= self._next_retry and not past_deadline:
                    self._connect(startup=False)
                if self.db_up and not past_deadline and self._spool is not None and self._spool.rows:
                    self._replay_one_segment()
            except Exception:  # noqa: BLE001 - back off and retry; the spool keeps the rows
                self.db_errors += 1
                logger.exception("store writer: unexpected error reconnecting or replaying; "
                                 "retry in %.1f s", self.cfg.retry_s)
                self.db_up = False
                self._next_retry = now + self.cfg.retry_s
            if self._stopped is not None:
                break  # stop() gave up on this thread and spooled its work; it must not write on
            if stop_seen and self._queue.empty() and (
                    past_deadline or not self.db_up or self._spool is None or not self._spool.rows):
                break

    def _collect(self, drain: bool) -> tuple[list[dict[str, Any]], bool]:
        """Up to batch_size records: wait for the first, then at most flush_interval_s more."""
        batch: list[dict[str, Any]] = []
        size, interval = self.cfg.batch_size, self.cfg.flush_interval_s
        first_wait = 0.0 if drain else interval
        if not self.db_up:
            first_wait = min(first_wait, max(0.0, self._next_retry - time.monotonic()))
        deadline = None
        while len(batch) < size:
            if deadline is None:
                timeout = first_wait
            else:
                timeout = 0.0 if drain else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            if deadline is None:
                deadline = time.monotonic() + interval
        return batch, False

    def _connect(self, startup: bool) -> None:
        """Run ``upgrade head``; on success the database is up. SQLite failing at startup is fatal."""
        assert self._engine is not None
        try:
            db.upgrade_to_head(self._engine)
        except AlembicError as exc:  # a broken or foreign migration history: not an outage
            if startup:
                raise StoreError(f"cannot migrate store {self._engine.url.render_as_string()}: "
                                 f"{str(exc).splitlines()[0]}") from None
            raise
        except SQLAlchemyError as exc:
            self.db_errors += 1
            self._next_retry = time.monotonic() + self.cfg.retry_s
            if startup and self._engine.dialect.name == "sqlite":
                why = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise StoreError(f"cannot open SQLite store {self._engine.url}: {why}") from None
            if not db.is_db_down(exc) and startup:
                raise StoreError(f"cannot migrate store {self._engine.url.render_as_string()}: "
                                 f"{str(exc).splitlines()[0]}") from None
            level = logging.WARNING if startup or self.db_up else logging.DEBUG
            logger.log(level, "store database unreachable, retry in %.1f s: %s",
                       self.cfg.retry_s, str(exc).splitlines()[0])
            self.db_up = False
            return
        if not self.db_up and not startup:
            logger.warning("store database is back")
        self._models.clear()
        self.db_up = True

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        """Write one live batch; what the database could not take (it is down) is spooled."""
        if not self.db_up or time.monotonic() >= self._stop_deadline:
            self._spool_batch(batch)
            return
        self._inflight = batch
        try:
            unwritten_from = self._try_write(batch)
            if unwritten_from is not None:
                self._spool_batch(batch[unwritten_from:])
        finally:
            self._inflight = None

    def _try_write(self, batch: list[dict[str, Any]]) -> int | None:
        """Write a batch in one transaction, or row by row when the database refuses it.

        Returns None when every record was written or rejected (rejections are counted and
        logged with the record), else the index of the first record not written because the
        database went down.
        """
        try:
            self._commit(batch)
            return None
        except SQLAlchemyError as exc:
            if db.is_db_down(exc):
                self._went_down(exc)
                return 0
            logger.warning("store batch of %d refused (%s); writing row by row",
                           len(batch), str(exc).splitlines()[0])
        except _BAD_RECORD as exc:
            logger.warning("store batch of %d has a bad record (%r); writing row by row", len(batch), exc)
        self._models.clear()  # the rolled-back transaction may have created rows whose ids are cached
        for i, rec in enumerate(batch):
            try:
                self._commit([rec])
            except SQLAlchemyError as exc:
                if db.is_db_down(exc):
                    self._went_down(exc)
                    return i
                self._reject(rec, str(exc).splitlines()[0])
            except _BAD_RECORD as exc:
                self._reject(rec, repr(exc))
        return None

    def _reject(self, rec: dict[str, Any], why: str) -> None:
        """Count and log a record whose one-row transaction was rolled back."""
        self._models.clear()  # that rollback may have voided a model row whose id is cached
        self.rejected_rows += 1
        logger.error("store refused a record, dropped: %s; record: %s", why, json.dumps(rec))

    def _commit(self, batch: list[dict[str, Any]]) -> None:
        assert self._engine is not None
        with self._engine.begin() as conn:
            written, dups = write_records(conn, batch, self._models)
        self.rows_written += written
        self.duplicate_rows += dups
        self.batches += 1

    def _prune_if_due(self) -> None:
        """Delete what is older than ``retention_days``, every ``PRUNE_EVERY_S``, in short
        transactions of ``PRUNE_BATCH`` rows and for at most ``PRUNE_BUDGET_S`` a pass, so that
        new rows never wait long (what is left goes at the next pass)."""
        days = self.cfg.retention_days
        now = time.monotonic()
        if days <= 0 or now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        cutoff = time.time() - days * 86400.0
        end = now + PRUNE_BUDGET_S
        try:
            while True:
                assert self._engine is not None
                with self._engine.begin() as conn:
                    n, n_lots = ops.prune_before(conn, cutoff, PRUNE_BATCH)
                self.pruned_rows += n
                self.pruned_lots += n_lots
                if n < PRUNE_BATCH or time.monotonic() >= end:
                    break
        except SQLAlchemyError as exc:
            if db.is_db_down(exc):
                self._went_down(exc)
            else:
                self.db_errors += 1
                logger.error("store: deleting rows older than %g days failed: %s", days,
                             str(exc).splitlines()[0])

    def _went_down(self, exc: SQLAlchemyError) -> None:
        self.db_errors += 1
        if self.db_up:
            logger.error("store database went down, spooling to %s: %s",
                         self.cfg.spool_dir, str(exc).splitlines()[0])
        self.db_up = False
        self._models.clear()
        self._next_retry = time.monotonic() + self.cfg.retry_s

    def _spool_batch(self, batch: list[dict[str, Any]]) -> None:
        assert self._spool is not None
        try:
            self._spool.append(batch)
        except SpoolError as exc:
            with self._count_lock:
                self._lost_rows += len(batch)
            logger.error("store lost %d rows: %s", len(batch), exc)
            return
        with self._count_lock:
            self.spooled_rows += len(batch)

    def _replay_one_segment(self) -> None:
        """Replay the oldest spool segment; delete it once all its rows are in the database."""
        assert self._spool is not None
        seg = self._spool.oldest()
        if seg is None:
            return
        size = self.cfg.batch_size
        for i in range(0, len(seg.records), size):
            if self._try_write(seg.records[i:i + size]) is not None:
                return  # down again: the segment stays and is replayed whole later (idempotent)
        self._spool.remove(seg)
        self.replayed_rows += len(seg.records)
        logger.info("store replayed %d spooled rows (%s), %d left", len(seg.records),
                    seg.path.name, self._spool.rows)
