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
