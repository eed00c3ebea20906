"""The source protocol: what every frame source (camera, replay folder, synthetic line) offers."""

from __future__ import annotations

import time

import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from ..frames import FrameMeta


@dataclass(slots=True)
class SourceFrame:
    """One frame from a source: uint8 pixels HxWxC (C = the source's channels), its metadata,
    and the ground-truth mask (bool HxW) when the source knows it (replay, synthetic)."""

    image: np.ndarray
    meta: FrameMeta
    gt: np.ndarray | None = None


@dataclass
class SourceStatus:
    """What a source reports about itself (read by the daemon's status and metrics)."""

    connected: bool = False
    reopen_count: int = 0
    last_error: str = ""
    corrupt_frames: int = 0  # frames the source could not decode (published FAULT)
    # time.monotonic() of the source loop's last sign of life (a frame, or a wait for one that
    # ended): a triggered camera may send nothing for hours while its loop is healthy
    t_alive: float = 0.0
    extra: dict = field(default_factory=dict)

    def alive(self) -> None:
        """The source loop is healthy now (waiting on purpose for its next frame)."""
        self.t_alive = time.monotonic()


class SourceError(Exception):
    """A startup problem with a source that the line engineer must fix (one clear line)."""


class Source(Protocol):
    """A frame source. ``open`` fails fast with SourceError on bad configuration (a node the
    camera lacks, a value it refuses, an empty folder); after that ``frames`` yields until
    ``stop`` is set or the source ends (replay once, synthetic n_frames). A camera that vanishes
    is reopened inside ``frames`` with backoff; the source never raises for that, it reports
    it in ``status``. Frame ids increase; a gap is camera-side loss.

    A frame that cannot be decoded is still yielded: its meta has ``extra['fault'] = '<reason>'``
    and ``image`` is an all-zero array of the right shape, so the daemon publishes it FAULT and
    the frame id is not lost.
    """

    name: str
    height: int
    width: int
    channels: int
    status: SourceStatus

    def open(self) -> None: ...

    def frames(self, stop: threading.Event) -> Iterator[SourceFrame]: ...

    def close(self) -> None: ...
