"""A running daemon for integration tests: real sockets, real SQLite, a SUB collecting everything.

``run_daemon(cfg)`` starts ``Daemon.run()`` in a thread with a subscriber already connected
(ipc endpoints in a temp dir, so the subscription is in place before the first message), and
returns a ``Run`` whose ``messages`` holds every multipart message seen, decoded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from linewatch.config import Config
from linewatch.daemon import Daemon
from linewatch.store import query


def config(tmp_path: Path, source: dict[str, Any], **sections: dict[str, Any]) -> Config:
    """A config for a test: ipc endpoints and SQLite under ``tmp_path``, metrics off."""
    raw: dict[str, Any] = {
        "source": source,
        "publish": {"endpoint": f"ipc://{tmp_path}/pub", "control_endpoint": f"ipc://{tmp_path}/ctl",
                    "heartbeat_s": 0.5},
        "store": {"url": f"sqlite:///{tmp_path}/lw.db", "spool_dir": str(tmp_path / "spool"),
                  "flush_interval_s": 0.1},
        "metrics": {"port": 0},
        "engine": {"kind": "zeroshot", "threads": 2},
        # tests block the source on a full ring for up to a minute (nothing dropped): no watchdog runs
        # here, but the config must let acquisition wait that long
        "daemon": {"stage_stale_s": 120.0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return Config.model_validate(raw)


@dataclass
class Run:
    daemon: Daemon
    messages: list[tuple[str, dict[str, Any], bytes | None]] = field(default_factory=list)
    rc: int | None = None
    observed: Any = None
    error: BaseException | None = None

    def frames(self, tier: int = 1) -> list[dict[str, Any]]:
        return [h for t, h, _ in self.messages if t.endswith(".frame") and h.get("tier") == tier]

    def payloads(self) -> list[bytes]:
        return [p for t, _, p in self.messages if t.endswith(".frame") and p is not None]

    def lots(self, event: str | None = None) -> list[dict[str, Any]]:
        return [h for t, h, _ in self.messages if t.endswith(".lot") and (event is None or h["event"] == event)]

    def seqs(self) -> list[int]:
        return [h["seq"] for _, h, _ in self.messages]

    def db_frames(self, tier: int = 1) -> list[dict[str, Any]]:
        url = str(self.daemon.cfg.store.url)
        return [r for r in query.fetch_results(url) if r["tier"] == tier]


def answers_per_frame(rows: list[dict[str, Any]]) -> Counter:
    return Counter(int(r["frame_id"]) for r in rows)


def run_daemon(cfg: Config, *, stop_after_s: float | None = None, timeout_s: float = 240.0,
               exit_at_source_end: bool = True, while_running=None) -> Run:
    """Run the daemon to its end (source end, or ``stop_after_s`` after READY) and collect.
    ``while_running(daemon)`` is called once (on the test thread) shortly after READY."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.")
    sub.connect(cfg.publish.endpoint)
    daemon = Daemon(cfg, None, exit_at_source_end=exit_at_source_end, install_signals=False)
    run = Run(daemon)

    def target() -> None:
        try:
            run.rc = daemon.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            run.error = exc
            daemon.stopped.set()

    thread = threading.Thread(target=target, name="daemon-under-test", daemon=True)
    thread.start()
    t_end = time.monotonic() + timeout_s
    stop_at = None
    quiet_since = None
    try:
        while time.monotonic() < t_end:
            if stop_after_s is not None and stop_at is None and daemon.ready.is_set():
                stop_at = time.monotonic() + stop_after_s
            if while_running is not None and daemon.ready.is_set():
                run.observed = while_running(daemon)
                while_running = None
            if stop_at is not None and time.monotonic() >= stop_at:
                daemon.request_stop()
                stop_at = float("inf")
            if sub.poll(100):
                parts = sub.recv_multipart()
                run.messages.append((parts[0].decode(), json.loads(parts[1]),
                                     parts[2] if len(parts) > 2 else None))
                quiet_since = None
            elif daemon.stopped.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.5:
                    break
        else:
            daemon.request_stop()
            raise AssertionError(f"daemon did not finish within {timeout_s} s")
    finally:
        thread.join(30)
        sub.close(linger=0)
        ctx.term()
    if run.error is not None:
        raise run.error
    return run
