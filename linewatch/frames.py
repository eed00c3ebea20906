"""Core value types that flow between stages: frame metadata, verdicts, results, lot events."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Verdict(str, enum.Enum):
    """The answer every part gets. Only OK means the part passed inspection."""

    OK = "OK"
    NG = "NG"
    NOT_INSPECTED = "NOT_INSPECTED"
    FAULT = "FAULT"


@dataclass(slots=True)
class FrameMeta:
    """What is known about a frame besides its pixels; travels with the ring slot.

    ``frame_id`` is the camera's (or source's) own counter, so gaps reveal camera-side loss.
    ``t_capture`` is wall-clock seconds (``time.time()``) when the source received the frame.
    ``t_mono`` is the same instant on the monotonic clock (set from ``t_capture`` when the meta is
    made): deadlines are measured on it, so an NTP or PTP step of the wall clock neither turns
    every frame in flight into a deadline FAULT nor lets a late verdict through.
    """

    frame_id: int
    t_capture: float
    camera: str
    height: int
    width: int
    lot_id: str = ""
    recipe: str = ""
    line_value: int | None = None  # GenICam line/chunk value used by the `line` lot policy
    source_ref: str = ""  # e.g. the replay file path; empty for live cameras
    has_gt: bool = False  # a ground-truth mask is stored in the ring slot beside the pixels
    extra: dict[str, Any] = field(default_factory=dict)
    t_mono: float | None = None

    def __post_init__(self) -> None:
        if self.t_mono is None:
            self.t_mono = time.monotonic() - max(0.0, time.time() - self.t_capture)

    def age_s(self) -> float:
        """Seconds since capture, on the monotonic clock."""
        return time.monotonic() - self.t_mono  # type: ignore[operator]


@dataclass(slots=True)
class Region:
    """One connected defect region: bbox is (x0, y0, x1, y1) in pixels, exclusive upper bounds."""

    bbox: tuple[int, int, int, int]
    area_px: int
    score: float
    label: str = "anomaly"

    def to_json(self) -> dict[str, Any]:
        return {"bbox": list(self.bbox), "area": self.area_px, "score": round(self.score, 6),
                "label": self.label}


@dataclass(slots=True)
class EngineOutput:
    """What an engine returns for one frame (tier 1) or one refined frame (tier 2)."""

    score_map: np.ndarray  # float32 HxW, higher = more anomalous, in the frame's pixel grid
    image_score: float
    mask: np.ndarray | None = None  # bool HxW; None lets the inspector threshold the score map
    regions: list[Region] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    """One published answer for one frame. Every frame id produced gets exactly one tier-1 Result."""

    frame: FrameMeta
    verdict: Verdict
    score: float | None
    regions: list[Region]
    model: dict[str, str]
    reason: str = ""  # why NOT_INSPECTED / FAULT, empty for OK / NG
    threshold: float | None = None
    t_inspected: float | None = None
    mask: np.ndarray | None = None  # bool HxW, carried only when a payload is wanted
    score_map: np.ndarray | None = None
    tier: int = 1


class LotEventKind(str, enum.Enum):
    OPENED = "opened"
    CLOSED = "closed"


@dataclass(slots=True)
class LotEvent:
    """A lot opened or closed, with the rule that did it (``reason``)."""

    kind: LotEventKind
    lot_id: str
    recipe: str
    reason: str
    t: float
    n_frames: int = 0
