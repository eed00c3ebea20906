"""The on-disk spool: where store records wait while the database is down (or the queue is full).

Append-only JSON-lines segment files ``seg-<n>.jsonl`` in one folder, oldest first by number.
Appends go to the newest segment, which is synced to disk at most ``sync_interval_s`` after
each append (0: on every append, before ``append`` returns) and sealed (synced, closed) and
replaced by a new one once it passes ``segment_bytes``; a power loss takes at most the rows of
the last interval. The total is capped at ``max_mb``: beyond it the oldest segment is
deleted and its rows are counted in ``dropped_rows`` and logged as an error. The writer
replays segments oldest first and deletes each one once all its rows are in the database.
A spool left by a previous run is picked up by the next one.

Thread-safe: the writer thread appends and replays; submitting threads append on queue overflow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

logger = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^seg-(\d{10})\.jsonl$")
MIN_SEGMENT_BYTES = 16 * 1024
MAX_SEGMENT_BYTES = 8 * 1024 * 1024


class SpoolError(OSError):
    """The spool folder cannot be created or written."""


@dataclass
class Segment:
    """One sealed spool file handed to the replayer, with the records read from it."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0


class Spool:
    """A bounded, ordered, crash-surviving queue of JSON records on disk.

    ``segment_bytes`` defaults to an eighth of the cap (16 KiB .. 8 MiB), so dropping the oldest
    segment loses at most about that share of the spool.
    """

    def __init__(self, directory: Path | str, max_mb: float, segment_bytes: int | None = None,
                 sync_interval_s: float = 0.0):
        self.directory = Path(directory)
        self.sync_interval_s = sync_interval_s
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.segment_bytes = segment_bytes or max(MIN_SEGMENT_BYTES,
                                                  min(MAX_SEGMENT_BYTES, self.max_bytes // 8))
        self.dropped_rows = 0  # rows in segments deleted to keep under the cap
        self.bad_lines = 0  # unreadable lines met while replaying
        self.appended_rows = 0
        self.sync_errors = 0  # syncs to disk that failed (logged; the rows stay for replay)
        self.syncs = 0
        self._unsynced_since: float | None = None  # monotonic time of the oldest unsynced append
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._rows: dict[Path, int] = {}  # rows per segment, oldest first (insertion order)
        self._bytes: dict[Path, int] = {}
        self._current: IO[bytes] | None = None
        self._current_path: Path | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.directory}: {exc.strerror or exc}") from None
        if not os.access(self.directory, os.W_OK):
            raise SpoolError(f"spool folder {self.directory} is not writable")
        found = sorted(p for p in self.directory.iterdir() if _SEGMENT_RE.match(p.name))
        for path in found:
            self._rows[path] = _count_lines(path)
            self._bytes[path] = path.stat().st_size
        self._next_seq = int(_SEGMENT_RE.match(found[-1].name).group(1)) + 1 if found else 0  # type: ignore[union-attr]
        if found:
            logger.warning("spool %s holds %d rows in %d segments from a previous run",
                           self.directory, self.rows, len(found))

    # ------------------------------------------------------------------ state
    @property
    def rows(self) -> int:
        """Rows waiting in the spool."""
        with self._lock:
            return sum(self._rows.values())

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        with self._lock:
            return list(self._rows)

    # ------------------------------------------------------------------ writing
    def append(self, records: Sequence[dict[str, Any]]) -> int:
        """Append records (JSON-able dicts) in order; returns how many were written."""
        if not records:
            return 0
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        with self._lock:
            if self._current is None or self._bytes[self._current_path] >= self.segment_bytes:  # type: ignore[index]
                self._open_new_locked()
            assert self._current is not None and self._current_path is not None
            try:
                self._current.write(data)
                self._current.flush()
            except (OSError, ValueError) as exc:  # ValueError: the file object is closed
                raise SpoolError(f"cannot write spool segment {self._current_path}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            self._rows[self._current_path] += len(records)
            self._bytes[self._current_path] += len(data)
            self.appended_rows += len(records)
            if self._unsynced_since is None:
                self._unsynced_since = self._clock()
            if self.sync_interval_s <= 0:
                self._sync_locked()
            self._enforce_cap_locked()
        return len(records)

    def sync_if_due(self) -> None:
        """Sync the open segment when its oldest unsynced append is ``sync_interval_s`` old
        (the writer thread calls this on every pass of its loop)."""
        with self._lock:
            due = (self._unsynced_since is not None
                   and self._clock() - self._unsynced_since >= self.sync_interval_s)
        if due:
            self.sync()

    def sync(self) -> None:
        """Sync the open segment now. The fsync runs outside the lock, on a duplicate of the
        file descriptor, so an append from a submitting thread does not wait for the disk."""
        with self._lock:
            self._unsynced_since = None
            current, path = self._current, self._current_path
            if current is None:
                return
            try:
                current.flush()
                fd = os.dup(current.fileno())
            except (OSError, ValueError) as exc:
                self._sync_failed(path, exc)
                return
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                self._sync_failed(path, exc)
            return
        finally:
            os.close(fd)
        with self._lock:
            self.syncs += 1

    def _sync_failed(self, path: Path | None, exc: BaseException) -> None:
        self.sync_errors += 1
        logger.error("spool segment %s not synced to disk (its rows stay for replay): %s",
                     path.name if path else "?", exc)

    def _sync_locked(self) -> bool:
        """fsync the open segment; a failure (EIO, a full disk) is logged and counted, never
        raised: the rows are written and stay for replay unless the machine loses power."""
        self._unsynced_since = None
        current, path = self._current, self._current_path
        if current is None:
            return True
        try:
            current.flush()
            os.fsync(current.fileno())
        except (OSError, ValueError) as exc:
            self._sync_failed(path, exc)
            return False
        self.syncs += 1
        return True

    def _open_new_locked(self) -> None:
        self._seal_locked()
        path = self.directory / f"seg-{self._next_seq:010d}.jsonl"
        self._next_seq += 1
        try:
            self._current = open(path, "ab")
        except OSError as exc:
            raise SpoolError(f"cannot create spool segment {path}: {exc.strerror or exc}") from None
        _sync_folder(self.directory)  # the new file's name survives a power loss too
        self._current_path = path
        self._rows[path] = 0
        self._bytes[path] = 0

    def _seal_locked(self) -> None:
        """Close the open segment. It is let go whatever happens: a failed sync (EIO, a full disk)
        is logged and counted, and the next append opens a new segment (a segment left open
        but closed would refuse every later append)."""
        current = self._current
        if current is None:
            return
        try:
            self._sync_locked()
        finally:
            self._current = None
            self._current_path = None
            try:
                current.close()
            except OSError:
                pass

    def _enforce_cap_locked(self) -> None:
        while sum(self._bytes.values()) > self.max_bytes and len(self._rows) > 1:
            oldest = next(iter(self._rows))
            if oldest == self._current_path:
                break
            lost = self._rows.pop(oldest)
            self._bytes.pop(oldest)
            self.dropped_rows += lost
            _unlink(oldest)
            logger.error("spool %s over its cap of %d bytes: dropped %d rows (%s)",
                         self.directory, self.max_bytes, lost, oldest.name)

    # ------------------------------------------------------------------ replay
    def oldest(self) -> Segment | None:
        """Seal and read the oldest segment (None when the spool is empty).

        Lines that are not valid JSON (e.g. a line cut short by a power loss) are skipped and
        counted in ``Segment.bad_lines``.
        """
        with self._lock:
            while self._rows:
                path = next(iter(self._rows))
                if self._rows[path] == 0 and path != self._current_path:
                    self._forget_locked(path)
                    continue
                if self._rows[path] == 0:
                    return None  # only the open, empty segment
                if path == self._current_path:
                    self._seal_locked()
                break
            else:
                return None
        seg = Segment(path)
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    seg.records.append(json.loads(raw))
                except ValueError:
                    seg.bad_lines += 1
        if seg.bad_lines:
            with self._lock:
                self.bad_lines += seg.bad_lines
            logger.error("spool segment %s: %d unreadable lines skipped", path.name, seg.bad_lines)
        return seg

    def remove(self, segment: Segment) -> None:
        """Delete a segment whose records are all in the database."""
        with self._lock:
            self._forget_locked(segment.path)

    def _forget_locked(self, path: Path) -> None:
        self._rows.pop(path, None)
        self._bytes.pop(path, None)
        if path == self._current_path:
            self._seal_locked()
        _unlink(path)

    def close(self) -> None:
        """Seal the open segment; the spool can still be appended to afterwards."""
        with self._lock:
            self._seal_locked()
            for path in [p for p, n in self._rows.items() if n == 0]:
                self._forget_locked(path)


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _sync_folder(directory: Path) -> None:
    """fsync a folder so a file created in it is still listed after a power loss (best effort:
    some file systems refuse it, and the rows are written either way)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
