"""The engine protocol: what the inspector calls, whatever model or runtime is behind it."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..frames import EngineOutput, FrameMeta


class Tier2Unavailable(Exception):
    """A closed lot that cannot be judged as a whole (e.g. too few frames to set its score scale)."""


class Engine(Protocol):
    """A tier-1 inspection engine.

    ``infer`` takes a batch of frames (uint8 HxWxC views into the ring: read them, do not keep
    them) with their metadata (``meta.lot_id`` tells lot-aware engines which lot a frame is in)
    and returns one EngineOutput per frame, in order, with ``score_map`` in the frame's pixel
    grid. It raises on failure; the inspector turns that into FAULT results.

    ``lot_closed`` is called when a lot ends, after its last frame went through ``infer``; a
    lot-aware engine returns tier-2 (whole-lot) outputs keyed by frame id, or {}. The daemon
    calls it from its lot-closer thread WHILE ``infer`` keeps running on the inspector thread
    for the next lot, so an engine must make the two safe together (e.g. take the closed lot's
    features out under a lock at the start, then compute without holding it). It raises
    ``Tier2Unavailable`` when the lot cannot be judged as a whole (the lot's frames are then
    NOT_INSPECTED at tier 2, their tier-1 results stand) and anything else on failure (FAULT).

    Optional: ``has_tier2 = True`` for an engine that judges every lot's frames at lot end (the
    lot closer then reports frames missing from ``lot_closed``'s outputs as NOT_INSPECTED at tier
    2; a tier-1-only engine returns {} and nothing is missing). ``lot_skipped(lot_id)``, called instead of ``lot_closed`` when the lot closer is too
    far behind to run a lot's tier 2, so that a lot-aware engine lets go of what it kept for it.
    """

    name: str
    version: str

    def warmup(self, height: int, width: int, channels: int) -> None: ...

    def infer(self, images: Sequence[np.ndarray], metas: Sequence[FrameMeta]) -> list[EngineOutput]: ...

    def lot_closed(self, lot_id: str) -> dict[int, EngineOutput]: ...

    def close(self) -> None: ...
