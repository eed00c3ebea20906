"""Lot grouping: count, idle gap, control messages, GenICam line value; the reason is recorded."""

from __future__ import annotations

from linewatch.config import LotsConfig
from linewatch.frames import FrameMeta, LotEventKind
from linewatch.lots import LotTracker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tracker(**cfg):
    events, order = [], []
    clock = Clock()
    lt = LotTracker(LotsConfig(**cfg), lambda e: (events.append(e), order.append(("event", e.kind.value))),
                    clock=clock)
    return lt, events, order, clock


def frame(i: int, t: float, line_value: int | None = None) -> FrameMeta:
    return FrameMeta(frame_id=i, t_capture=t, camera="c", height=1, width=1, line_value=line_value)


def test_count_policy_closes_after_part_count_with_the_frame_before_the_close():
    """Regression: the lot's last frame was queued after its close event and missed the lot."""
    lt, events, order, _ = tracker(policy="count", part_count=2, recipe="bracket")
    metas = [frame(i, 1000.0 + i) for i in range(5)]
    for m in metas:
        lt.assign(m, lambda m=m: order.append(("frame", m.frame_id)))
    assert order == [("event", "opened"), ("frame", 0), ("frame", 1), ("event", "closed"),
                     ("event", "opened"), ("frame", 2), ("frame", 3), ("event", "closed"),
                     ("event", "opened"), ("frame", 4)]
    assert [m.lot_id for m in metas][:2] == [events[0].lot_id] * 2
    closed = [e for e in events if e.kind is LotEventKind.CLOSED]
    assert [(e.reason, e.n_frames, e.recipe) for e in closed] == [("part_count", 2, "bracket")] * 2


def test_idle_gap_closes_on_the_next_frame_and_on_tick():
    lt, events, _, clock = tracker(policy="idle", idle_gap_s=5.0)
    lt.assign(frame(0, 1000.0))
    lt.assign(frame(1, 1002.0))
    lt.assign(frame(2, 1010.0))  # 8 s gap: the first lot closes, a new one opens
    assert [(e.kind.value, e.reason) for e in events] == [
        ("opened", "first_frame_after_idle"), ("closed", "idle_gap"), ("opened", "first_frame_after_idle")]
    clock.t = 1016.0
    lt.tick()
    assert events[-1].kind is LotEventKind.CLOSED and events[-1].reason == "idle_gap"
    assert lt.current is None


def test_control_messages_win_and_carry_the_recipe():
    lt, events, _, _ = tracker(policy="count", part_count=100)
    lt.assign(frame(0, 1000.0))
    assert lt.start("L-7", "housing") == "L-7"
    m = frame(1, 1001.0)
    lt.assign(m)
    assert (m.lot_id, m.recipe) == ("L-7", "housing")
    assert lt.end() == "L-7"
    assert [(e.kind.value, e.lot_id if e.lot_id == "L-7" else "auto", e.reason) for e in events] == [
        ("opened", "auto", "part_count"), ("closed", "auto", "control_start"),
        ("opened", "L-7", "control"), ("closed", "L-7", "control_end")]
    assert lt.end() is None  # nothing open: no event


def test_line_value_change_closes_the_lot():
    lt, events, _, _ = tracker(policy="line")
    for i, v in enumerate([1, 1, 1, 2, 2]):
        lt.assign(frame(i, 1000.0 + i, line_value=v))
    assert [(e.kind.value, e.reason) for e in events] == [
        ("opened", "line_value"), ("closed", "line_change"), ("opened", "line_value")]
    assert events[1].n_frames == 3


def test_reconfigure_applies_from_the_next_frame():
    lt, events, _, _ = tracker(policy="count", part_count=100)
    lt.assign(frame(0, 1000.0))
    lt.reconfigure(LotsConfig(policy="count", part_count=2))
    lt.assign(frame(1, 1001.0))
    assert events[-1].kind is LotEventKind.CLOSED and events[-1].n_frames == 2


def test_a_repeated_lot_start_of_the_open_lot_changes_nothing():
    """A PLC that retries `lot start A` after a timeout must not split A into two lots of one id."""
    import pytest

    lt, events, _, _ = tracker(policy="control")
    assert lt.start("A", "housing") == "A"
    lt.assign(frame(0, 1000.0))
    assert lt.start("A", "housing") == "A" and lt.start("A") == "A"
    assert [e.kind.value for e in events] == ["opened"] and lt.current.n_frames == 1
    with pytest.raises(ValueError, match="open with recipe 'housing'"):
        lt.start("A", "bracket")
    assert lt.start("B", "bracket") == "B"
    assert [(e.kind.value, e.lot_id) for e in events] == [("opened", "A"), ("closed", "A"), ("opened", "B")]


def test_redirect_sends_later_events_to_the_new_emit_after_the_drain():
    lt, events, _, _ = tracker(policy="control")
    lt.start("A")
    seen, new = [], []
    lt.redirect(new.append, first=lambda: seen.append(len(events)))
    lt.start("B")
    assert seen == [1]  # ran under the lock, before any later event
    assert [e.kind.value for e in events] == ["opened"]  # A's open, on the old emit
    assert [(e.kind.value, e.lot_id) for e in new] == [("closed", "A"), ("opened", "B")]


def test_tick_never_waits_for_a_frame_being_assigned():
    """The daemon's main loop ticks the tracker; the acquisition thread holds its lock while a
    full ring makes the frame wait (seconds with policy block): a tick waited, and stops and
    reloads with it."""
    import threading
    import time

    lt = LotTracker(LotsConfig(policy="idle", idle_gap_s=0.01), lambda e: None)
    held, release = threading.Event(), threading.Event()

    def assign_slowly():
        lt.assign(FrameMeta(0, 0.0, "c", 4, 4), lambda: (held.set(), release.wait(5)))

    t = threading.Thread(target=assign_slowly)
    t.start()
    assert held.wait(5)
    t0 = time.monotonic()
    lt.tick()
    assert time.monotonic() - t0 < 0.5
    release.set()
    t.join()
