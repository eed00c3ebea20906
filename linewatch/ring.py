"""The frame ring: preallocated pixel slots, generation-counted handles, named overflow policies.

Frames live here from capture until the inspector is done with them; queues elsewhere carry
only :class:`Handle` (slot number + generation). Lot events travel through the same ordered
work queue so the inspector sees a lot close after the lot's last frame.

Slot life: FREE -> WRITING (source fills it) -> READY (queued) -> BUSY (inspector holds it)
-> FREE. Only READY slots can be taken back by ``drop_oldest``; a BUSY slot never is.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .frames import FrameMeta, LotEvent

logger = logging.getLogger(__name__)

DROP_ANSWER_WAIT_S = 5.0  # how long a lot event waits for a dropped frame's answer


class OverflowPolicy(str, enum.Enum):
    """What happens when a frame arrives and no slot is free.

    BLOCK: the source waits up to ``block_timeout_s`` (back-pressure reaches the camera's own
        buffers; use when every part must be inspected and the line can stall briefly).
    DROP_OLDEST: the oldest frame still waiting is dropped (freshest frames win; use when
        late verdicts are worthless to the PLC).
    DROP_NEWEST: the new frame is dropped (frames already queued keep their order; use when
        the lot's first parts matter most).
    Every drop is counted and handed to ``on_drop`` so the frame is published NOT_INSPECTED.
    """

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class _State(enum.IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    BUSY = 3


@dataclass(frozen=True, slots=True)
class Handle:
    """A reference to one frame in the ring; stale once the slot's generation moves on."""

    slot: int
    generation: int


class StaleHandle(Exception):
    """The slot was reused since the handle was issued (the frame was dropped)."""


class RingClosed(Exception):
    """The ring was closed while waiting."""


class FrameRing:
    """Fixed pool of frame slots of one shape, with an ordered work queue of handles and events."""

    def __init__(self, n_slots: int, height: int, width: int, channels: int,
                 policy: OverflowPolicy | str = OverflowPolicy.DROP_OLDEST,
                 block_timeout_s: float = 1.0, with_gt: bool = True,
                 on_drop: Callable[[FrameMeta, str], None] | None = None):
        if n_slots < 2:
            raise ValueError("a ring needs at least 2 slots")
        self.shape = (height, width, channels)
        self.pixels = np.zeros((n_slots, height, width, channels), dtype=np.uint8)
        self.gt = np.zeros((n_slots, height, width), dtype=bool) if with_gt else None
        self.meta: list[FrameMeta | None] = [None] * n_slots
        self._state = [_State.FREE] * n_slots
        self._gen = [0] * n_slots
        self._free: collections.deque[int] = collections.deque(range(n_slots))
        self._work: collections.deque[Handle | LotEvent] = collections.deque()
        self._cond = threading.Condition()
        self.policy = OverflowPolicy(policy)
        self.block_timeout_s = block_timeout_s
        self.on_drop = on_drop
        self.closed = False
        self.drops: collections.Counter[str] = collections.Counter()
        self._dropping = 0  # on_drop calls under way (made outside the lock)
        self.frames_in = 0
        self.blocked_s = 0.0  # time producers waited for a free slot (policy block)

    def carry_counts(self, old: "FrameRing") -> None:
        """Continue the counters of the ring this one replaces (a reload with a new frame shape),
        so that status and heartbeats never count backwards."""
        with self._cond:
            self.frames_in += old.frames_in
            self.drops.update(old.drops)
            self.blocked_s += old.blocked_s

    # ------------------------------------------------------------------ producer side
    def put(self, image: np.ndarray, meta: FrameMeta, gt: np.ndarray | None = None) -> Handle | None:
        """Copy a frame into a slot and queue it. Returns None when the frame was dropped."""
        if image.shape[:2] != self.shape[:2]:
            raise ValueError(f"frame {meta.frame_id} is {image.shape[1]}x{image.shape[0]}, "
                             f"the ring holds {self.shape[1]}x{self.shape[0]}")
        slot = self._claim(meta)
        if slot is None:
            return None
        try:
            dst = self.pixels[slot]
            if image.ndim == 2:
                dst[...] = image[..., None]
            elif image.shape[2] == dst.shape[2]:
                dst[...] = image
            elif image.shape[2] == 1:
                dst[...] = image  # broadcast mono into all channels
            else:
                dst[...] = image.mean(axis=2, keepdims=True).astype(np.uint8)
            if self.gt is not None:
                if gt is not None:
                    self.gt[slot] = gt
                    meta.has_gt = True
                else:
                    meta.has_gt = False
        except BaseException:  # e.g. a mask of the wrong shape: the slot goes back, the error up
            with self._cond:
                self._free_slot(slot)
                self._cond.notify_all()
            raise
        with self._cond:
            self.meta[slot] = meta
            self._state[slot] = _State.READY
            handle = Handle(slot, self._gen[slot])
            self._work.append(handle)
            self.frames_in += 1
            self._cond.notify_all()
        return handle

    def put_event(self, event: LotEvent) -> None:
        """Queue a lot event in order with the frames (never dropped)."""
        with self._cond:
            self._work.append(event)
            self._cond.notify_all()

    def _claim(self, meta: FrameMeta) -> int | None:
        dropped: FrameMeta | None = None
        dropped_new: FrameMeta | None = None
        with self._cond:
            if not self._free and self.policy is OverflowPolicy.BLOCK:
                t0 = time.monotonic()
                deadline = t0 + self.block_timeout_s
                while not self._free and not self.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self.blocked_s += time.monotonic() - t0
            if self.closed:
                raise RingClosed()
            if self._free:
                slot = self._free.popleft()
                self._state[slot] = _State.WRITING
                return slot
            if self.policy is OverflowPolicy.DROP_OLDEST:
                for i, item in enumerate(self._work):
                    if isinstance(item, Handle):
                        del self._work[i]
                        slot = item.slot
                        dropped = self.meta[slot]
                        self._gen[slot] += 1
                        self._state[slot] = _State.WRITING
                        self.meta[slot] = None
                        self.drops["ring_full_oldest"] += 1
                        break
                else:
                    slot = None  # every slot is BUSY with the inspector: drop the new frame
            else:
                slot = None
            if slot is None:
                cause = "ring_full_timeout" if self.policy is OverflowPolicy.BLOCK else "ring_full_newest"
                self.drops[cause] += 1
                dropped_new = meta
            if self.on_drop and (dropped is not None or dropped_new is not None):
                self._dropping += 1
        if self.on_drop and (dropped is not None or dropped_new is not None):
            # outside the lock (the answer goes to the publisher and the store), but a lot event
            # is not handed out until it is done: the dropped frame may be the last of a lot
            # whose close is queued behind it, and the lot's summary must count it
            try:
                if dropped is not None:
                    self.on_drop(dropped, "ring_full_oldest")
                else:
                    self.on_drop(dropped_new, cause)  # type: ignore[arg-type]
            finally:
                with self._cond:
                    self._dropping -= 1
                    self._cond.notify_all()
        return slot

    def _wait_drops_locked(self) -> None:
        """Wait (caller holds ``_cond``) until the drops under way are answered."""
        if self._dropping and not self._cond.wait_for(lambda: not self._dropping, DROP_ANSWER_WAIT_S):
            logger.error("a dropped frame's answer took over %.0f s; the lot event goes on without "
                         "waiting for it", DROP_ANSWER_WAIT_S)

    # ------------------------------------------------------------------ consumer side
    def take(self, max_items: int, timeout_s: float | None, wait_fill_s: float = 0.0
             ) -> list[Handle | LotEvent]:
        """Take up to ``max_items`` work items in order, waiting up to ``timeout_s`` for the first
        and then up to ``wait_fill_s`` more for the batch to fill. A lot event ends a batch.

        Frame slots handed out are BUSY until :meth:`release`.
        """
        out: list[Handle | LotEvent] = []
        with self._cond:
            if not self._work and not self._cond.wait_for(lambda: self._work or self.closed, timeout_s):
                return out
            fill_deadline = time.monotonic() + wait_fill_s
            while len(out) < max_items:
                if not self._work:
                    left = fill_deadline - time.monotonic()
                    if left <= 0 or self.closed or not self._cond.wait_for(
                            lambda: self._work or self.closed, left):
                        break
                    if not self._work:
                        break
                item = self._work[0]
                if isinstance(item, LotEvent):
                    if out:
                        break  # finish the frames before the event
                    if self._dropping:
                        self._wait_drops_locked()
                        if not self._work or self._work[0] is not item:
                            continue  # drained meanwhile
                    out.append(self._work.popleft())
                    break
                self._work.popleft()
                self._state[item.slot] = _State.BUSY
                out.append(item)
        return out

    def view(self, h: Handle) -> tuple[np.ndarray, FrameMeta, np.ndarray | None]:
        """Pixels, meta and ground truth of a handed-out frame (views into the ring, no copy)."""
        if self._gen[h.slot] != h.generation:
            raise StaleHandle(h)
        meta = self.meta[h.slot]
        assert meta is not None
        gt = self.gt[h.slot] if (self.gt is not None and meta.has_gt) else None
        return self.pixels[h.slot], meta, gt

    def release(self, h: Handle) -> None:
        """Give a slot back once its frame is inspected."""
        with self._cond:
            if self._gen[h.slot] != h.generation:
                raise StaleHandle(h)
            self._free_slot(h.slot)
            self._cond.notify_all()

    def _free_slot(self, slot: int) -> None:
        """Make ``slot`` free (caller holds ``_cond``): handles to it go stale."""
        self._gen[slot] += 1
        self._state[slot] = _State.FREE
        self.meta[slot] = None
        self._free.append(slot)

    def drain_pending(self) -> list[FrameMeta | LotEvent]:
        """Remove everything still queued (on shutdown); frames come back as their metadata."""
        out: list[FrameMeta | LotEvent] = []
        with self._cond:
            self._wait_drops_locked()
            while self._work:
                item = self._work.popleft()
                if isinstance(item, Handle):
                    meta = self.meta[item.slot]
                    self._free_slot(item.slot)
                    if meta is not None:
                        out.append(meta)
                else:
                    out.append(item)
            self._cond.notify_all()
        return out

    def pending(self) -> int:
        """Items still queued: frames and lot events."""
        with self._cond:
            return len(self._work)

    def depth(self) -> int:
        with self._cond:
            return sum(1 for x in self._work if isinstance(x, Handle))

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
