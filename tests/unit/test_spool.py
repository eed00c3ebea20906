"""The on-disk spool: order, segments, the size cap and its counted loss, restart survival."""

from __future__ import annotations

from pathlib import Path

import pytest

from linewatch.store.spool import Spool, SpoolError


def _recs(start: int, n: int) -> list[dict]:
    return [{"op": "result", "frame_id": i, "pad": "x" * 100} for i in range(start, start + n)]


def _drain(spool: Spool) -> list[int]:
    ids = []
    while (seg := spool.oldest()) is not None:
        ids += [r["frame_id"] for r in seg.records]
        spool.remove(seg)
    return ids


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "sp", max_mb=10, segment_bytes=2000)
    for k in range(10):
        spool.append(_recs(k * 7, 7))
    assert spool.rows == 70
    assert len(spool.segments()) > 3, "small segment_bytes must rotate segments"
    assert _drain(spool) == list(range(70))
    assert spool.rows == 0
    assert list((tmp_path / "sp").glob("seg-*.jsonl")) == []


def test_cap_drops_oldest_segment_and_counts_it(tmp_path: Path) -> None:
    # ~130 bytes a record; cap 0.01 MB = 10485 bytes; segments of ~2 KB
    spool = Spool(tmp_path, max_mb=0.01, segment_bytes=2000)
    for k in range(40):
        spool.append(_recs(k * 5, 5))
    assert spool.dropped_rows > 0
    assert spool.size_bytes <= 10485 + 2000
    kept = _drain(spool)
    assert len(kept) + spool.dropped_rows == 200
    assert kept == list(range(200 - len(kept), 200)), "the newest rows survive, in order"


def test_spool_survives_a_restart(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_mb=1)
    first.append(_recs(0, 5))
    first.close()
    second = Spool(tmp_path, max_mb=1)
    assert second.rows == 5
    second.append(_recs(5, 3))  # goes to a new segment after the old ones
    assert _drain(second) == list(range(8))


def test_unreadable_line_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_mb=1)
    spool.append(_recs(0, 3))
    spool.close()
    seg_path = next(tmp_path.glob("seg-*.jsonl"))
    with open(seg_path, "ab") as fh:
        fh.write(b'{"op": "result", "frame_')  # a line cut short by a power loss
    again = Spool(tmp_path, max_mb=1)
    seg = again.oldest()
    assert seg is not None
    assert [r["frame_id"] for r in seg.records] == [0, 1, 2]
    assert seg.bad_lines == 1 and again.bad_lines == 1


def test_oldest_seals_the_open_segment_and_appends_continue(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_mb=1)
    spool.append(_recs(0, 2))
    seg = spool.oldest()
    assert seg is not None and len(seg.records) == 2
    spool.append(_recs(2, 2))  # must not go into the segment being replayed
    spool.remove(seg)
    assert _drain(spool) == [2, 3]


def test_spool_folder_under_a_file_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match="cannot create spool folder"):
        Spool(blocker / "spool", max_mb=1)


def test_a_failed_sync_at_a_segment_seal_loses_nothing_and_appends_go_on(tmp_path: Path, monkeypatch) -> None:
    """EIO or a full disk at fsync once must not leave a closed file as the open segment (every
    later append would fail with an error no caller handles, and the writer thread would die)."""
    import os

    import stat

    spool = Spool(tmp_path / "sp", max_mb=10, segment_bytes=2000, sync_interval_s=60)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return real_fsync(fd)  # the folder's sync after a segment is created
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for k in range(10):
        spool.append(_recs(k * 7, 7))  # rotates segments: the first seal's sync fails
    assert calls and spool.sync_errors == 1
    assert _drain(spool) == list(range(70))  # the rows of the unsynced segment are still replayed


def _count_file_syncs(monkeypatch) -> list[int]:
    import os
    import stat

    real_fsync, calls = os.fsync, []

    def counting_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return calls


def test_an_open_segment_is_synced_on_every_append_with_no_interval(tmp_path: Path, monkeypatch) -> None:
    """Regression: the open segment used to reach the disk only when sealed (up to 8 MB of rows
    a power loss could take)."""
    calls = _count_file_syncs(monkeypatch)
    spool = Spool(tmp_path, max_mb=10, sync_interval_s=0)
    spool.append(_recs(0, 3))
    spool.append(_recs(3, 3))
    assert len(calls) == 2 and spool.syncs == 2


def test_an_open_segment_is_synced_once_its_oldest_unsynced_append_is_due(tmp_path: Path, monkeypatch) -> None:
    calls = _count_file_syncs(monkeypatch)
    now = [100.0]
    spool = Spool(tmp_path, max_mb=10, sync_interval_s=1.0)
    spool._clock = lambda: now[0]
    spool.append(_recs(0, 3))
    now[0] += 0.6
    spool.append(_recs(3, 3))
    spool.sync_if_due()
    assert calls == [], "not yet due: the first append is 0.6 s old"
    now[0] += 0.5
    spool.sync_if_due()
    assert len(calls) == 1, "the first append is 1.1 s old: both appends are synced together"
    now[0] += 5
    spool.sync_if_due()
    assert len(calls) == 1, "nothing new to sync"
