"""Pseudo-normal selection: the frames of a lot that the zero-shot scores call normal."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def select_pseudo_normals(image_scores: Sequence[float], fraction: float, min_count: int = 2) -> list[int]:
    """Indices of the ``fraction`` of frames with the lowest image scores (at least ``min_count``,
    at most all), lowest first.

    Robustness to defective frames comes from two sides: defective frames tend to score high, so
    few of them pass; and those that do carry a small defect in a large normal surface, which the
    pasted synthetic anomalies outweigh in training.
    """
    n = len(image_scores)
    if n == 0:
        return []
    k = min(n, max(int(min_count), int(math.ceil(fraction * n))))
    order = np.argsort(np.asarray(image_scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:k]]
