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
    d._watchdog_check = lambda wd, skip=(): Daemon._watchdog_check(d, wd, skip)

    def slow_reload():
        time.sleep(0.5)
        return {"applied": []}

    d._reload = slow_reload
    assert Daemon._reload_pinging(d, 0.05) == {"applied": []}
    assert len(pings) >= 3


def test_a_reload_pings_at_once_not_an_interval_after_it_began():
    """The main loop's last ping may be nearly an interval old when a reload starts; waiting a
    whole interval more before the first ping put the gap past systemd's limit."""
    pings: list[float] = []
    d = _with_closer(time.monotonic(), busy_since=None)
    d.notifier = SimpleNamespace(watchdog_ping=lambda: pings.append(time.monotonic()))
    d._stale_stages = lambda: Daemon._stale_stages(d)
    d._watchdog_check = lambda wd, skip=(): Daemon._watchdog_check(d, wd, skip)
    t0 = time.monotonic()

    def reload():
        time.sleep(0.3)
        return {}

    d._reload = reload
    Daemon._reload_pinging(d, 10.0)
    assert pings and pings[0] - t0 < 0.2


def test_a_slow_replay_keeps_its_source_alive_between_frames():
    """A replay at 0.05 frames/s waits 20 s between frames on purpose: its loop says it is alive
    (stage_stale_s is 10 s; the watchdog used to be withheld and systemd killed the daemon)."""
    from linewatch.acquire.synthetic import Pacer

    status = SourceStatus()
    pacer = Pacer(1 / 2.5, on_alive=status.alive)  # a frame every 2.5 s
    stop = threading.Event()
    assert pacer.wait(stop)  # the first tick is due at once
    threading.Timer(1.6, stop.set).start()
    t0 = time.monotonic()
    assert not pacer.wait(stop)  # stopped in the middle of the wait
    assert status.t_alive >= t0 + 0.9  # it reported in while waiting


def test_acquisition_waits_as_long_as_the_stale_limit_are_refused():
    import pytest
    from pydantic import ValidationError

    from linewatch.config import Config

    with pytest.raises(ValidationError, match="ring.block_timeout_s"):
        Config.model_validate({"ring": {"policy": "block", "block_timeout_s": 10.0}})
    Config.model_validate({"ring": {"policy": "block", "block_timeout_s": 9.0}})


def test_a_withheld_ping_is_looked_at_again_within_a_second():
    """A stage stale at one check used to leave the next look a whole interval away: with
    systemd's limit at two intervals, one stale moment killed a healthy daemon."""
    pings: list[float] = []
    now = time.monotonic()
    d = _with_closer(now - 60, busy_since=None)  # the lot closer looks hung right now
    d.notifier = SimpleNamespace(watchdog_ping=lambda: pings.append(time.monotonic()))
    d._stale_stages = lambda: Daemon._stale_stages(d)
    d._watchdog_check = lambda wd, skip=(): Daemon._watchdog_check(d, wd, skip)
    again = Daemon._watchdog_check(d, 15.0)
    assert not pings and again - time.monotonic() <= 1.0
    d.closer.t_heartbeat = time.monotonic()  # it beat again
    again = Daemon._watchdog_check(d, 15.0)
    assert len(pings) == 1 and again - time.monotonic() > 14.0
