"""The watchdog's view of the acquisition stage: a paused triggered line is not a hung daemon."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from linewatch.acquire.base import SourceStatus
from linewatch.daemon import Daemon


def _daemon(t_acq: float, t_alive: float, connected: bool = True) -> SimpleNamespace:
    now = time.monotonic()
    stage = SimpleNamespace(t_heartbeat=now)
    return SimpleNamespace(inspector=stage, closer=stage, publisher=stage, control=stage, store=stage,
                           _source_ended=threading.Event(), t_acq_heartbeat=t_acq,
                           source=SimpleNamespace(status=SourceStatus(connected=connected, t_alive=t_alive)))


def test_a_source_loop_alive_without_frames_keeps_the_acquire_stage_fresh():
    now = time.monotonic()
    paused = Daemon._stage_ages(_daemon(t_acq=now - 3600, t_alive=now - 0.5))  # no part for an hour
    assert paused["acquire"] < 5
    hung = Daemon._stage_ages(_daemon(t_acq=now - 3600, t_alive=now - 3600))  # the loop itself is stuck
    assert hung["acquire"] > 3000
    lost = Daemon._stage_ages(_daemon(t_acq=now - 3600, t_alive=0.0, connected=False))  # reopening
    assert "acquire" not in lost


def _with_closer(t_closer: float, busy_since: float | None) -> SimpleNamespace:
    d = _daemon(t_acq=time.monotonic(), t_alive=time.monotonic())
    d.closer = SimpleNamespace(t_heartbeat=t_closer, busy_since=busy_since)
    d.cfg = SimpleNamespace(daemon=SimpleNamespace(stage_stale_s=10.0, tier2_stale_s=300.0))
    d._stage_ages = lambda: Daemon._stage_ages(d)
    return d


def test_a_lot_closer_inside_a_long_tier_2_is_not_a_hung_daemon():
    """Regression: the lot closer beats only between lots, so one tier-2 pass longer than
    stage_stale_s (a large lot with a tier-2 memory on a CPU) withheld the watchdog pings and
    systemd killed a healthy daemon."""
    now = time.monotonic()
    assert "lot-closer" not in Daemon._stale_stages(_with_closer(now - 60, busy_since=now - 60))
    assert "lot-closer" in Daemon._stale_stages(_with_closer(now - 400, busy_since=now - 400))  # stuck
    assert "lot-closer" in Daemon._stale_stages(_with_closer(now - 60, busy_since=None))  # idle loop dead


def test_watchdog_pings_go_on_during_a_long_reload():
    """Regression: only the main thread pinged, and it runs the reload (a source reopened, an
    engine built): a reload longer than the watchdog interval got a healthy daemon killed."""
    pings: list[float] = []
    d = _with_closer(time.monotonic(), busy_since=None)
    d.notifier = SimpleNamespace(watchdog_ping=lambda: pings.append(time.monotonic()))
    d._stale_stages = lambda: Daemon._stale_stages(d)

    def slow_reload():
        time.sleep(0.5)
        return {"applied": []}

    d._reload = slow_reload
    assert Daemon._reload_pinging(d, 0.05) == {"applied": []}
    assert len(pings) >= 3
