"""The store writer against a real SQLite file in tmp_path: rows, regions, lots, models,
duplicates, flush on stop, queue overflow, spool replay at start, migrations, bad paths."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from linewatch.config import StoreConfig
from linewatch.frames import FrameMeta, LotEvent, LotEventKind, Region, Result, Verdict
from linewatch.store import StoreError, StoreWriter, current_revision, head_revision, make_engine
from linewatch.store import upgrade_to_head
from linewatch.store.query import count_results, fetch_lots, fetch_models, fetch_results
from linewatch.store.records import result_record
from linewatch.store.schema import metadata
from linewatch.store.spool import Spool

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
MODEL = {"name": "zeroshot", "version": "1.0"}


def _cfg(tmp_path: Path, **kw) -> StoreConfig:
    base = dict(url=f"sqlite:///{tmp_path}/db/linewatch.db", spool_dir=tmp_path / "spool",
                batch_size=8, flush_interval_s=0.05, retry_s=0.2)
    base.update(kw)
    return StoreConfig(**base)


def _result(frame_id: int, *, tier: int = 1, lot: str = "LOT1", verdict: Verdict = Verdict.OK,
            regions: list[Region] | None = None, camera: str = "cam0") -> Result:
    meta = FrameMeta(frame_id, T0 + frame_id, camera, 64, 64, lot_id=lot)
    return Result(meta, verdict, 0.25 + frame_id / 1000, regions or [], dict(MODEL),
                  threshold=0.5, t_inspected=T0 + frame_id + 0.01, tier=tier)


@pytest.fixture
def writer_factory(tmp_path: Path):
    made: list[StoreWriter] = []

    def make(**kw) -> StoreWriter:
        w = StoreWriter(_cfg(tmp_path, **{k: v for k, v in kw.items() if k != "queue_size"}), "line1",
                        **({"queue_size": kw["queue_size"]} if "queue_size" in kw else {}))
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop(5)


def test_rows_regions_lots_and_models_arrive(tmp_path: Path, writer_factory) -> None:
    w = writer_factory()
    w.start()
    assert w.db_up
    w.register_model("zeroshot", "1.0", "engine", {"backbone": "effnet-lite0"})
    w.submit_lot_event(LotEvent(LotEventKind.OPENED, "LOT1", "recipeA", "control", T0))
    for i in range(20):
        regs = [Region((1, 2, 11, 12), 100, 0.9, "scratch"), Region((5, 5, 7, 7), 4, 0.6)] if i % 5 == 0 else []
        w.submit_result(_result(i, verdict=Verdict.NG if regs else Verdict.OK, regions=regs), T0 + i + 0.02)
    w.submit_result(_result(0, tier=2, verdict=Verdict.NG, regions=[Region((0, 0, 3, 3), 9, 0.7)]), T0 + 99)
    w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "LOT1", "recipeA", "control_end", T0 + 100, n_frames=20))
    w.submit_lot_summary("LOT1", {"OK": 16, "NG": 4, "NOT_INSPECTED": 0, "FAULT": 0})
    assert w.stop(10)
    url = w.cfg.url
    assert count_results(url) == 21
    assert count_results(url, tier=1) == 20 and count_results(url, tier=2) == 1
    rows = fetch_results(url, lot_id="LOT1")
    first = rows[0]
    assert (first["line"], first["camera"], first["frame_id"], first["tier"]) == ("line1", "cam0", 0, 1)
    assert first["verdict"] == "NG" and first["threshold"] == 0.5
    assert first["t_capture"] == pytest.approx(T0, abs=1e-5)
    assert first["t_publish"] == pytest.approx(T0 + 0.02, abs=1e-5)
    assert first["model"] == MODEL
    assert first["regions"] == [
        {"bbox": (1, 2, 11, 12), "area_px": 100, "score": 0.9, "label": "scratch"},
        {"bbox": (5, 5, 7, 7), "area_px": 4, "score": 0.6, "label": "anomaly"}]
    assert sum(len(r["regions"]) for r in rows if r["tier"] == 1) == 8
    tier2 = [r for r in rows if r["tier"] == 2]
    assert len(tier2) == 1 and tier2[0]["frame_id"] == 0 and len(tier2[0]["regions"]) == 1
    (lot,) = fetch_lots(url)
    assert lot["lot_id"] == "LOT1" and lot["recipe"] == "recipeA"
    assert lot["open_reason"] == "control" and lot["close_reason"] == "control_end"
    assert lot["opened_at"] == pytest.approx(T0) and lot["closed_at"] == pytest.approx(T0 + 100)
    assert (lot["n_frames"], lot["n_ok"], lot["n_ng"], lot["n_not_inspected"], lot["n_fault"]) == (20, 16, 4, 0, 0)
    (model,) = fetch_models(url)
    assert model["details"] == {"backbone": "effnet-lite0"} and model["kind"] == "engine"
    assert w.rows_written >= 25 and w.batches >= 1
    assert w.spooled_rows == 0 and w.duplicate_rows == 0 and w.rejected_rows == 0


def test_duplicates_are_ignored_within_and_across_runs(tmp_path: Path, writer_factory) -> None:
    w = writer_factory()
    w.start()
    for i in range(5):
        w.submit_result(_result(i, regions=[Region((0, 0, 1, 1), 1, 0.5)]), T0)
    w.submit_result(_result(2, regions=[Region((0, 0, 1, 1), 1, 0.5)]), T0)
    w.stop(10)
    assert w.duplicate_rows == 1
    again = writer_factory()
    again.start()
    for i in range(5):
        again.submit_result(_result(i), T0)
    again.submit_result(_result(2, camera="cam1"), T0)  # another camera: a different part
    again.stop(10)
    assert again.duplicate_rows == 5
    assert count_results(w.cfg.url) == 6
    rows = fetch_results(w.cfg.url)
    assert sum(len(r["regions"]) for r in rows) == 5, "a duplicate must not add regions"


def test_a_later_run_reusing_frame_ids_is_stored_not_a_duplicate(tmp_path: Path, writer_factory) -> None:
    """Frame ids start again with every daemon start: the capture time tells the runs apart."""
    w = writer_factory()
    w.start()
    for i in range(3):
        w.submit_result(_result(i, regions=[Region((0, 0, 1, 1), 1, 0.5)]), T0)
    w.stop(10)
    later = writer_factory()
    later.start()
    for i in range(3):  # the same ids, captured an hour later, each with a region
        r = _result(i, regions=[Region((0, 0, 2, 2), 4, 0.7)])
        r.frame.t_capture += 3600.0
        later.submit_result(r, T0 + 3600.0)
    later.stop(10)
    assert later.duplicate_rows == 0
    rows = fetch_results(w.cfg.url)
    assert len(rows) == 6 and all(len(r["regions"]) == 1 for r in rows)
    assert sorted(r["regions"][0]["area_px"] for r in rows) == [1, 1, 1, 4, 4, 4]  # each row its own


def test_register_model_upserts(tmp_path: Path, writer_factory) -> None:
    w = writer_factory()
    w.start()
    w.register_model("ard", "lot7", "ard", {"epochs": 3})
    w.register_model("ard", "lot7", "ard", {"epochs": 5}, trained_on_lot="LOT7")
    w.submit_result(Result(FrameMeta(1, T0, "cam0", 8, 8), Verdict.OK, 0.1, [],
                           {"name": "ard", "version": "lot7"}), T0)
    w.stop(10)
    models = fetch_models(w.cfg.url)
    assert len(models) == 1
    assert models[0]["details"] == {"epochs": 5} and models[0]["trained_on_lot"] == "LOT7"
    assert fetch_results(w.cfg.url)[0]["model_version_id"] == models[0]["id"]
    with pytest.raises(ValueError, match="not JSON-able"):
        w.register_model("x", "1", "engine", {"bad": object()})


def test_stop_flushes_a_partial_batch(tmp_path: Path, writer_factory) -> None:
    """Guards against rows lost at shutdown when neither batch_size nor the interval is reached."""
    w = writer_factory(batch_size=1000, flush_interval_s=3600)
    w.start()
    for i in range(37):
        w.submit_result(_result(i), T0)
    assert w.stop(10)
    assert count_results(w.cfg.url) == 37
    assert w.queue_depth == 0


def test_queue_overflow_goes_to_the_spool_and_is_replayed(tmp_path: Path, writer_factory) -> None:
    w = writer_factory(queue_size=10)
    for i in range(25):  # not started: the queue fills, the rest overflows to disk
        w.submit_result(_result(i), T0)
    assert w.overflow_rows == 15 and w.spooled_rows == 15 and w.queue_depth == 10
    w.start()
    assert w.stop(10)
    assert count_results(w.cfg.url) == 25
    assert w.replayed_rows == 15 and w.spool_rows == 0


def test_spool_left_by_a_previous_run_is_replayed_on_start(tmp_path: Path, writer_factory) -> None:
    cfg = _cfg(tmp_path)
    spool = Spool(cfg.spool_dir, cfg.spool_max_mb)
    spool.append([result_record(_result(i), "line1", T0) for i in range(12)])
    spool.close()
    w = writer_factory()
    w.start()
    w.submit_result(_result(100), T0)
    assert w.stop(10)
    assert count_results(cfg.url) == 13
    assert w.replayed_rows == 12
    assert list(Path(cfg.spool_dir).glob("seg-*.jsonl")) == []


def test_a_spooled_record_that_cannot_be_written_is_rejected_and_replay_goes_on(tmp_path: Path,
                                                                                writer_factory) -> None:
    """A malformed line in the spool (valid JSON, impossible values) must not stop the replay of
    everything after it: it is rejected, counted and logged with the record."""
    cfg = _cfg(tmp_path)
    spool = Spool(cfg.spool_dir, cfg.spool_max_mb, segment_bytes=16 * 1024)
    bad_time = result_record(_result(5), "line1", T0)
    bad_time["t_capture"] = 1e20  # no datetime can hold it (OverflowError)
    no_model = result_record(_result(6), "line1", T0)
    no_model["model"] = None  # a record from another version
    spool.append([result_record(_result(i), "line1", T0) for i in range(5)] + [bad_time, no_model])
    spool.append([result_record(_result(i), "line1", T0) for i in range(7, 12)])
    spool.close()
    w = writer_factory()
    w.start()
    assert w.stop(10)
    assert w.rejected_rows >= 1
    assert count_results(cfg.url) == 12 - w.rejected_rows
    assert list(Path(cfg.spool_dir).glob("seg-*.jsonl")) == []


def test_migrations_reach_head_match_the_schema_and_rerun_harmlessly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        upgrade_to_head(engine)
        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            assert diffs == [], f"migrations and schema.py drifted: {diffs}"
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() > 0
    finally:
        engine.dispose()


def test_sqlite_path_under_a_regular_file_is_a_one_line_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    w = StoreWriter(_cfg(tmp_path, url=f"sqlite:///{blocker}/sub/lw.db"), "line1")
    with pytest.raises(StoreError) as err:
        w.start()
    msg = str(err.value)
    assert "\n" not in msg and str(blocker) in msg and "is a file" in msg


def test_sqlite_path_that_is_a_folder_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "adir.db").mkdir()
    with pytest.raises(StoreError, match="is a folder"):
        StoreWriter(_cfg(tmp_path, url=f"sqlite:///{tmp_path}/adir.db"), "line1").start()


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "postgresql+nosuchdriver://h/db"])
def test_malformed_or_unsupported_url_is_a_store_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(StoreError) as err:
        StoreWriter(_cfg(tmp_path, url=url), "line1").start()
    assert "\n" not in str(err.value) and "store.url" in str(err.value)


def test_missing_parent_folder_is_created(tmp_path: Path, writer_factory) -> None:
    w = writer_factory(url=f"sqlite:///{tmp_path}/a/b/c/lw.db")
    w.start()
    assert (tmp_path / "a" / "b" / "c" / "lw.db").is_file()


def test_submits_from_many_threads_all_arrive(tmp_path: Path, writer_factory) -> None:
    import threading

    w = writer_factory(batch_size=16)
    w.start()

    def feed(cam: str) -> None:
        for i in range(100):
            w.submit_result(_result(i, camera=cam), time.time())

    threads = [threading.Thread(target=feed, args=(f"cam{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.stop(10)
    assert count_results(w.cfg.url) == 400
    assert w.batches >= 400 // 16


def test_spool_over_its_cap_drops_oldest_and_counts_every_lost_row(tmp_path: Path, writer_factory) -> None:
    w = writer_factory(queue_size=1, spool_max_mb=0.02)
    for i in range(600):  # not started: all but one record overflow into a 20 KB spool
        w.submit_result(_result(i), T0)
    assert w.spool_dropped_rows > 0
    w.start()
    assert w.stop(10)
    written = count_results(w.cfg.url)
    assert written + w.spool_dropped_rows == 600
    newest = max(r["frame_id"] for r in fetch_results(w.cfg.url))
    assert newest == 599, "the newest rows are kept, the oldest dropped"


def test_submit_after_stop_goes_to_the_spool_for_the_next_run(tmp_path: Path, writer_factory) -> None:
    w = writer_factory(spool_sync_s=60)
    w.start()
    w.stop(10)
    w.submit_result(_result(7), T0)  # must not raise into the inspection path, nor vanish
    assert w.spooled_rows == 1
    assert w._spool is not None and w._spool.syncs == 1, "no writer pass is left to sync it later"
    nxt = writer_factory()
    nxt.start()
    nxt.stop(10)
    assert count_results(w.cfg.url) == 1 and nxt.replayed_rows == 1


def test_a_submit_racing_stop_is_written_not_left_in_the_queue(tmp_path: Path, writer_factory) -> None:
    """Regression: a submit that checked 'not stopping' and then queued its record after stop()
    had spooled the rest of the queue left that record in memory: neither written nor spooled."""
    import threading

    w = writer_factory()
    w.start()
    real_put, stopper = w._queue.put_nowait, []

    def put_after_a_stop(item):
        if not stopper and item is not None and isinstance(item, dict):
            t = threading.Thread(target=w.stop, args=(10,))
            stopper.append(t)
            t.start()
            t.join(0.5)  # the old code finished the whole stop here, before the put
        real_put(item)

    w._queue.put_nowait = put_after_a_stop
    w.submit_result(_result(1), T0)
    stopper[0].join(10)
    assert count_results(w.cfg.url) + w.spool_rows == 1
    assert w.queue_depth == 0


def test_rows_older_than_the_retention_are_deleted_with_their_regions(tmp_path: Path, writer_factory) -> None:
    """An edge box's disk must not fill with history: results captured (and lots closed) more than
    retention_days ago go, with their regions; newer ones and model versions stay."""
    from linewatch.store import writer as writer_mod

    now = time.time()
    w = writer_factory(retention_days=1.0)
    old_t, new_t = now - 3 * 86400, now - 3600
    box = [Region((0, 0, 4, 4), 16, 0.9, "defect")]
    for i in range(7):  # more than one delete transaction
        meta = FrameMeta(i, old_t + i, "cam0", 64, 64, lot_id="OLD")
        w.submit_result(Result(meta, Verdict.NG, 2.0, box, dict(MODEL), threshold=0.5, t_inspected=old_t), old_t)
    for i in range(3):
        meta = FrameMeta(100 + i, new_t + i, "cam0", 64, 64, lot_id="NEW")
        w.submit_result(Result(meta, Verdict.NG, 2.0, box, dict(MODEL), threshold=0.5, t_inspected=new_t), new_t)
    w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "OLD", "r", "part_count", old_t + 10))
    w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "NEW", "r", "part_count", new_t + 10))
    writer_mod.PRUNE_BATCH, batch = 3, writer_mod.PRUNE_BATCH
    try:
        w.start()
        deadline = time.monotonic() + 10
        while w.rows_written < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        w._next_prune = 0.0  # the next pass of the writer looks now
        while (w.pruned_rows < 7 or w.pruned_lots < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.stop(10)
    finally:
        writer_mod.PRUNE_BATCH = batch
    rows = fetch_results(w.cfg.url)
    assert sorted(r["frame_id"] for r in rows) == [100, 101, 102]
    assert all(len(r["regions"]) == 1 for r in rows)
    assert [lot["lot_id"] for lot in fetch_lots(w.cfg.url)] == ["NEW"]
    assert w.pruned_rows == 7 and w.pruned_lots == 1
    assert fetch_models(w.cfg.url), "model versions are kept"
    from sqlalchemy import create_engine

    with create_engine(w.cfg.url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM regions")).scalar() == 3  # none left behind


def test_two_lines_may_use_the_same_lot_id(tmp_path: Path) -> None:
    """Lot ids are per line (a PLC numbers its own lots): two lines writing lot L0142 into one
    database keep two rows; the second no longer overwrites the first's times, recipe and counts."""
    writers = [StoreWriter(_cfg(tmp_path, spool_dir=tmp_path / f"spool-{line}"), line) for line in ("lineA", "lineB")]
    for w, recipe, t in zip(writers, ("bracket", "housing"), (T0, T0 + 500)):
        w.start()
        w.submit_lot_event(LotEvent(LotEventKind.OPENED, "L0142", recipe, "control", t))
        w.submit_lot_event(LotEvent(LotEventKind.CLOSED, "L0142", recipe, "control_end", t + 60, n_frames=3))
        w.submit_lot_summary("L0142", {"n_ok": 3, "n_ng": 0, "n_not_inspected": 0, "n_fault": 0})
    for w in writers:
        assert w.stop(10)
    rows = {r["line"]: r for r in fetch_lots(writers[0].cfg.url)}
    assert sorted(rows) == ["lineA", "lineB"]
    assert (rows["lineA"]["recipe"], rows["lineA"]["opened_at"]) == ("bracket", pytest.approx(T0))
    assert (rows["lineB"]["recipe"], rows["lineB"]["opened_at"]) == ("housing", pytest.approx(T0 + 500))


def test_the_lots_key_migration_keeps_existing_rows(tmp_path: Path) -> None:
    """A database at revision 0002 (lots keyed by lot id alone) upgrades in place: its rows stay,
    and the key becomes (line, lot_id)."""
    from alembic import command
    from sqlalchemy import inspect

    from linewatch.store.db import alembic_config

    url = f"sqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002_results_key_t_capture")
            conn.execute(text("INSERT INTO lots (lot_id, line, recipe) VALUES ('L1', 'lineA', 'r')"))
        upgrade_to_head(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT lot_id, line, recipe FROM lots")).all() == [("L1", "lineA", "r")]
            assert inspect(conn).get_pk_constraint("lots")["constrained_columns"] == ["line", "lot_id"]
    finally:
        engine.dispose()
