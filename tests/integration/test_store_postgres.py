"""The store writer against the real PostgreSQL on 127.0.0.1:5432, in a database made for each
test and dropped after: migrations, upserts, and database outages cut by a local TCP proxy."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from linewatch.config import StoreConfig
from linewatch.frames import FrameMeta, LotEvent, LotEventKind, Region, Result, Verdict
from linewatch.store import StoreWriter, current_revision, head_revision, make_engine, upgrade_to_head
from linewatch.store.query import count_results, fetch_lots, fetch_results
from linewatch.store.schema import metadata

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (extra: postgres)")

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PG_HOST, PG_PORT = "127.0.0.1", 5432
T0 = 1_700_000_000.0


def _admin_user() -> str | None:
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    return None


@pytest.fixture
def pg_db():
    """(user, database name) of a fresh database, dropped after the test."""
    user = _admin_user()
    if user is None:
        pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT} as postgres or root (db 'test')")
    name = f"lw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield user, name
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _url(user: str, db: str, port: int = PG_PORT) -> str:
    return f"postgresql+psycopg://{user}@{PG_HOST}:{port}/{db}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((PG_HOST, 0))
        return s.getsockname()[1]


class TcpProxy:
    """A loopback TCP forwarder to PostgreSQL that the test can cut (stop) and restore (start)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._frozen = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((PG_HOST, self.port))
        ls.listen(16)
        ls.settimeout(0.05)
        self._listener = ls
        self._running.set()
        t = threading.Thread(target=self._accept_loop, name="test-pg-proxy", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        self._running.clear()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def freeze(self) -> None:
        """Keep connections open but forward nothing: a hung server."""
        self._frozen.set()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while self._running.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection((PG_HOST, self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self._frozen.is_set() and self._running.is_set():
                    time.sleep(0.01)
                if not self._running.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _wait_for(cond: Callable[[], bool], what: str, writer: StoreWriter, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}; writer stats {writer.stats()}")
        time.sleep(0.02)


def _result(frame_id: int, tier: int = 1) -> Result:
    meta = FrameMeta(frame_id, T0 + frame_id, "cam0", 32, 32, lot_id="LOT1")
    regs = [Region((0, 0, 4, 4), 16, 0.8)] if frame_id % 3 == 0 else []
    return Result(meta, Verdict.NG if regs else Verdict.OK, 0.5, regs,
                  {"name": "zeroshot", "version": "1"}, tier=tier)


def _cfg(url: str, tmp_path: Path, **kw) -> StoreConfig:
    return StoreConfig(url=url, spool_dir=tmp_path / "spool", batch_size=16,
                       flush_interval_s=0.05, retry_s=0.2, **kw)


def _distinct_keys(user: str, db: str) -> tuple[int, int]:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=db) as conn:
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (line, camera, frame_id, tier)) FROM results").fetchone()
    return total, distinct


def test_migrations_reach_head_match_the_schema_and_rerun_harmlessly(pg_db) -> None:
    user, db = pg_db
    engine = make_engine(_url(user, db))
    try:
        assert current_revision(engine) is None
        upgrade_to_head(engine)
        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diffs == [], f"migrations and schema.py drifted: {diffs}"
    finally:
        engine.dispose()


def test_rows_duplicates_tier2_and_lots(pg_db, tmp_path: Path) -> None:
    user, db = pg_db
    url = _url(user, db)
    w = StoreWriter(_cfg(url, tmp_path), "line1")
    w.start()
    assert w.db_up
    w.submit_lot_event(LotEvent(LotEventKind.OPENED, "LOT1", "rA", "part_count", T0))
    for i in range(40):
        w.submit_result(_result(i), T0 + i)
    for i in range(10):
        w.submit_result(_result(i), T0 + i)  # duplicates
    w.submit_result(_result(3, tier=2), T0 + 50)
    w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "LOT1", "rA", "part_count", T0 + 60, n_frames=40))
    w.submit_lot_summary("LOT1", {"n_ok": 26, "n_ng": 14, "n_not_inspected": 0, "n_fault": 0})
    assert w.stop(10)
    assert count_results(url) == 41 and count_results(url, tier=2) == 1
    assert w.duplicate_rows == 10
    rows = fetch_results(url, lot_id="LOT1")
    assert sum(len(r["regions"]) for r in rows) == 14 + 1
    assert rows[0]["t_capture"] == pytest.approx(T0, abs=1e-5)
    (lot,) = fetch_lots(url)
    assert (lot["n_frames"], lot["n_ok"], lot["n_ng"], lot["close_reason"]) == (40, 26, 14, "part_count")


def test_outage_spools_then_replays_without_loss_or_duplicates(pg_db, tmp_path: Path) -> None:
    """Guards against rows lost or doubled when the database connection is cut mid-run."""
    user, db = pg_db
    proxy = TcpProxy(PG_PORT)
    proxy.start()
    w = StoreWriter(_cfg(_url(user, db, proxy.port), tmp_path), "line1")
    try:
        w.start()
        assert w.db_up
        for i in range(30):
            w.submit_result(_result(i), T0 + i)
        _wait_for(lambda: w.rows_written >= 30, "the first 30 rows", w)

        proxy.stop()  # database cut off
        for i in range(30, 60):
            w.submit_result(_result(i), T0 + i)
        _wait_for(lambda: w.spooled_rows >= 30, "30 rows in the spool", w)
        assert not w.db_up and w.db_errors >= 1
        assert count_results(_url(user, db)) == 30, "nothing reached the database during the cut"
        assert w.spool_rows >= 30
        # the open segment reaches the disk within spool_sync_s, not only when it is sealed
        _wait_for(lambda: w._spool is not None and w._spool.syncs >= 1, "the spool synced", w)

        proxy.start()  # database back
        _wait_for(lambda: w.db_up and w.spool_rows == 0, "the spool replayed", w)
        assert w.replayed_rows == w.spooled_rows
        for i in range(60, 70):
            w.submit_result(_result(i), T0 + i)
        assert w.stop(10)
    finally:
        w.stop(5)
        proxy.stop()
    assert _distinct_keys(user, db) == (70, 70)
    assert sorted(r["frame_id"] for r in fetch_results(_url(user, db))) == list(range(70))
    assert w.spool_dropped_rows == 0 and w.rejected_rows == 0
    assert list((tmp_path / "spool").glob("seg-*.jsonl")) == []


def test_database_down_at_start_spools_and_next_run_replays(pg_db, tmp_path: Path) -> None:
    """Guards against rows lost when the daemon starts and stops while PostgreSQL is down."""
    user, db = pg_db
    dead = StoreWriter(_cfg(_url(user, db, _free_port()), tmp_path), "line1")
    dead.start()  # not an error: the server may come up later
    assert not dead.db_up and dead.db_errors >= 1
    dead.submit_lot_event(LotEvent(LotEventKind.OPENED, "LOT1", "rA", "control", T0))
    for i in range(25):
        dead.submit_result(_result(i), T0 + i)
    dead.register_model("zeroshot", "1", "engine", {"note": "registered while down"})
    assert dead.stop(10)
    assert dead.spooled_rows == 27 and dead.rows_written == 0

    live = StoreWriter(_cfg(_url(user, db), tmp_path), "line1")
    live.start()
    assert live.stop(10)
    assert live.replayed_rows == 27
    assert count_results(_url(user, db)) == 25
    assert fetch_lots(_url(user, db))[0]["open_reason"] == "control"
    assert list((tmp_path / "spool").glob("seg-*.jsonl")) == []


def test_stop_with_a_hung_database_spools_the_batch_in_flight(pg_db, tmp_path: Path) -> None:
    """Guards against losing the batch the writer thread is stuck writing when stop() gives up."""
    user, db = pg_db
    proxy = TcpProxy(PG_PORT)
    proxy.start()
    cfg = StoreConfig(url=_url(user, db, proxy.port), spool_dir=tmp_path / "spool", batch_size=64,
                      flush_interval_s=0.05, retry_s=0.2)
    w = StoreWriter(cfg, "line1")
    try:
        w.start()
        for i in range(10):
            w.submit_result(_result(i), T0 + i)
        _wait_for(lambda: w.rows_written >= 10, "the first 10 rows", w)
        proxy.freeze()
        for i in range(10, 30):
            w.submit_result(_result(i), T0 + i)
        _wait_for(lambda: w.queue_depth == 0, "the writer to take the batch", w)
        assert w.stop(timeout_s=1.0) is False, "the writer is stuck in the hung database"
        assert w.spool_rows >= 20
    finally:
        proxy.stop()  # cuts the hung connection: the stuck thread errors out and quits
    _wait_for(lambda: not w._thread.is_alive(), "the stuck writer thread to quit", w)

    again = StoreWriter(_cfg(_url(user, db), tmp_path), "line1")
    again.start()
    assert again.stop(10)
    assert _distinct_keys(user, db) == (30, 30)
    assert again.replayed_rows >= 20


def test_retention_deletes_old_results_with_their_regions_and_old_lots(pg_db, tmp_path: Path) -> None:
    """The same delete as on SQLite, against PostgreSQL's timestamptz columns."""
    from sqlalchemy import text

    from linewatch.store import ops

    user, db = pg_db
    url = _url(user, db)
    w = StoreWriter(_cfg(url, tmp_path), "line1")
    w.start()
    for i in range(9):  # T0 + i: long ago; regions on frames 0, 3, 6
        w.submit_result(_result(i), T0 + i)
    now = time.time()
    recent = FrameMeta(50, now, "cam0", 32, 32, lot_id="LOT2")
    w.submit_result(Result(recent, Verdict.NG, 0.5, [Region((0, 0, 4, 4), 16, 0.8)],
                           {"name": "zeroshot", "version": "1"}), now)
    w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "LOT1", "r", "part_count", T0 + 20))
    assert w.stop(10)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            assert ops.prune_before(conn, now - 86400, 5) == (5, 0)  # a full batch: lots wait
        with engine.begin() as conn:
            assert ops.prune_before(conn, now - 86400, 5) == (4, 1)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM regions")).scalar() == 1
    finally:
        engine.dispose()
    assert [r["frame_id"] for r in fetch_results(url)] == [50]
