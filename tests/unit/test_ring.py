"""The frame ring: handles with generations, overflow policies, every drop counted and reported."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from linewatch.frames import FrameMeta, LotEvent, LotEventKind
from linewatch.ring import FrameRing, Handle, RingClosed, StaleHandle


def meta(i: int) -> FrameMeta:
    return FrameMeta(frame_id=i, t_capture=time.time(), camera="c", height=4, width=4)


def img(v: int) -> np.ndarray:
    return np.full((4, 4, 1), v, np.uint8)


def make(policy: str, slots: int = 2, timeout_s: float = 0.05):
    drops: list[tuple[int, str]] = []
    ring = FrameRing(slots, 4, 4, 1, policy, timeout_s, on_drop=lambda m, c: drops.append((m.frame_id, c)))
    return ring, drops


def test_frames_come_out_in_order_with_pixels_and_events_end_a_batch():
    ring, _ = make("block", slots=4)
    ring.put(img(1), meta(1))
    ring.put(img(2), meta(2))
    ring.put_event(LotEvent(LotEventKind.CLOSED, "L", "r", "part_count", 0.0))
    ring.put(img(3), meta(3))
    first = ring.take(8, timeout_s=0.1)
    assert [ring.view(h)[1].frame_id for h in first] == [1, 2]
    assert int(ring.view(first[1])[0][0, 0, 0]) == 2
    (ev,) = ring.take(8, timeout_s=0.1)
    assert isinstance(ev, LotEvent)
    (h3,) = ring.take(8, timeout_s=0.1)
    assert ring.view(h3)[1].frame_id == 3


def test_drop_oldest_reports_the_dropped_frame_and_stales_its_handle():
    ring, drops = make("drop_oldest")
    h1 = ring.put(img(1), meta(1))
    ring.put(img(2), meta(2))
    ring.put(img(3), meta(3))
    assert drops == [(1, "ring_full_oldest")] and ring.drops["ring_full_oldest"] == 1
    with pytest.raises(StaleHandle):
        ring.view(h1)
    assert [ring.view(h)[1].frame_id for h in ring.take(8, timeout_s=0.1)] == [2, 3]


def test_drop_oldest_with_every_slot_busy_drops_the_new_frame():
    ring, drops = make("drop_oldest")
    ring.put(img(1), meta(1))
    ring.put(img(2), meta(2))
    ring.take(8, timeout_s=0.1)  # both slots now BUSY with the inspector
    assert ring.put(img(3), meta(3)) is None
    assert drops == [(3, "ring_full_newest")]


def test_drop_newest_keeps_the_queued_frames():
    ring, drops = make("drop_newest")
    ring.put(img(1), meta(1))
    ring.put(img(2), meta(2))
    assert ring.put(img(3), meta(3)) is None
    assert drops == [(3, "ring_full_newest")]


def test_block_waits_for_a_release_then_times_out_with_a_counted_drop():
    ring, drops = make("block", timeout_s=2.0)
    ring.put(img(1), meta(1))
    ring.put(img(2), meta(2))
    handles = ring.take(1, timeout_s=0.1)
    threading.Timer(0.1, ring.release, args=(handles[0],)).start()
    assert isinstance(ring.put(img(3), meta(3)), Handle)  # waited for the release
    assert ring.blocked_s > 0.05 and drops == []
    ring.block_timeout_s = 0.05
    assert ring.put(img(4), meta(4)) is None
    assert drops == [(4, "ring_full_timeout")]


def test_wrong_size_frame_is_refused_and_closed_ring_raises():
    ring, _ = make("block")
    with pytest.raises(ValueError, match="the ring holds 4x4"):
        ring.put(np.zeros((5, 4, 1), np.uint8), meta(1))
    ring.close()
    with pytest.raises(RingClosed):
        ring.put(img(1), meta(1))


def test_drain_pending_returns_queued_frames_and_events_in_order():
    ring, _ = make("block", slots=4)
    ring.put(img(1), meta(1))
    ring.put_event(LotEvent(LotEventKind.CLOSED, "L", "r", "shutdown", 0.0))
    ring.put(img(2), meta(2))
    left = ring.drain_pending()
    assert [getattr(x, "frame_id", "event") for x in left] == [1, "event", 2]
    assert ring.depth() == 0


def test_a_put_that_fails_after_claiming_gives_the_slot_back():
    ring = FrameRing(2, 4, 4, 1, "block", 0.05, with_gt=True)
    for i in range(2):
        with pytest.raises(ValueError):
            ring.put(img(1), meta(i), gt=np.zeros((3, 3), bool))  # a mask of the wrong shape
    # both slots are free again: two good frames fit, and nothing was queued or dropped
    assert ring.put(img(2), meta(2)) is not None and ring.put(img(3), meta(3)) is not None
    assert ring.depth() == 2 and not any(ring.drops.values())


def test_pending_counts_lot_events_that_depth_leaves_out():
    """A drain that waits on depth() alone would hand a queued lot close to another thread."""
    ring, _ = make("block", slots=4)
    ring.put(img(1), meta(1))
    ring.put_event(LotEvent(LotEventKind.CLOSED, "L", "r", "part_count", 0.0))
    assert (ring.depth(), ring.pending()) == (1, 2)
    ring.take(8, timeout_s=0.1)  # the frame, handed out for inspection
    assert (ring.depth(), ring.pending()) == (0, 1)  # the close still waits for the inspector


def test_a_lot_event_waits_for_the_answer_of_a_frame_dropped_ahead_of_it():
    """Regression: the dropped frame's NOT_INSPECTED answer is made outside the ring's lock. A
    drop_oldest that took a lot's last frame let the inspector take that lot's close, queued
    behind the frame, before the answer was counted: the lot's summary missed the frame."""
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def slow_answer(m: FrameMeta, cause: str) -> None:
        entered.set()
        release.wait(5)
        order.append(f"answered {m.frame_id}")

    ring = FrameRing(2, 4, 4, 1, "drop_oldest", on_drop=slow_answer)
    ring.put(img(1), meta(1))  # lot A's last two frames
    ring.put(img(2), meta(2))
    ring.put_event(LotEvent(LotEventKind.CLOSED, "A", "r", "part_count", 0.0))
    producer = threading.Thread(target=ring.put, args=(img(3), meta(3)))  # drops frame 1
    producer.start()
    assert entered.wait(5)

    def consume() -> None:
        items = ring.take(8, timeout_s=1)  # frame 2 (the event ends the batch)
        assert [ring.view(h)[1].frame_id for h in items] == [2]
        (ev,) = ring.take(8, timeout_s=5)
        assert isinstance(ev, LotEvent)
        order.append("lot closed")

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(0.3)  # without the wait the consumer has the event by now
    release.set()
    consumer.join(5)
    producer.join(5)
    assert order == ["answered 1", "lot closed"]
