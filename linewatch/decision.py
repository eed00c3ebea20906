"""Turning engine score maps into answers: the OK/NG threshold (fixed or calibrated), masks, regions."""

from __future__ import annotations

import collections
import logging
import math

import numpy as np
from scipy import ndimage

from .config import ThresholdConfig
from .frames import Region

logger = logging.getLogger(__name__)


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def regions_from_mask(mask: np.ndarray, score_map: np.ndarray, min_area_px: int,
                      label: str = "anomaly") -> list[Region]:
    """Connected components of ``mask`` (8-connected) of at least ``min_area_px`` pixels, each
    with its bbox (x0, y0, x1, y1; exclusive upper bounds), area and max score, largest first."""
    return _components(mask, score_map, min_area_px, label)[0]


def regions_and_mask(mask: np.ndarray, score_map: np.ndarray, min_area_px: int,
                     label: str = "anomaly") -> tuple[list[Region], np.ndarray]:
    """``regions_from_mask`` and the mask of the kept regions only (the published defect mask
    must not hold blobs the region list left out as too small)."""
    regions, keep, labels = _components(mask, score_map, min_area_px, label)
    return regions, keep[labels]


def _components(mask: np.ndarray, score_map: np.ndarray, min_area_px: int,
                label: str) -> tuple[list[Region], np.ndarray, np.ndarray]:
    """The kept regions, a per-label keep flag (index 0: background) and the label image."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return [], np.zeros(1, dtype=bool), labels
    # per-label area and peak over the masked pixels only (ndimage.sum_labels / maximum scan the
    # whole frame per call: ~1 ms each at 256 x 256, on the per-frame path)
    lab = labels[mask]
    areas = np.bincount(lab, minlength=n + 1)[1:]
    maxes = np.full(n + 1, -np.inf, dtype=np.float64)
    np.maximum.at(maxes, lab, score_map[mask])
    boxes = ndimage.find_objects(labels)
    out = []
    keep = np.zeros(n + 1, dtype=bool)
    for i, (area, peak, sl) in enumerate(zip(areas, maxes[1:], boxes)):
        if area < min_area_px or sl is None:
            continue
        keep[i + 1] = True
        ys, xs = sl
        out.append(Region((int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)), int(area),
                          float(peak), label))
    out.sort(key=lambda r: r.area_px, reverse=True)
    return out, keep, labels


class Threshold:
    """The OK/NG threshold on image scores (and on pixel scores for the mask).

    ``fixed``: ``cfg.value``. ``calibrated``: median + k * 1.4826 * MAD of the last ``window``
    image scores, which tolerates a few defective parts among them. Until ``min_scores`` scores
    are seen, the last calibrated value is kept; with none at all, :meth:`current` is None and
    the caller must not decide OK (it publishes NOT_INSPECTED: an uncalibrated OK would fail open).
    """

    def __init__(self, cfg: ThresholdConfig):
        self.cfg = cfg
        self._scores: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self._last: float | None = None

    def reconfigure(self, cfg: ThresholdConfig) -> None:
        self.cfg = cfg
        self._scores = collections.deque(self._scores, maxlen=cfg.window)

    def observe(self, score: float) -> None:
        if math.isfinite(score):
            self._scores.append(score)

    def current(self) -> float | None:
        cfg = self.cfg
        if cfg.mode == "fixed":
            return cfg.value
        if len(self._scores) >= cfg.min_scores:
            arr = np.fromiter(self._scores, dtype=np.float64)
            med = float(np.median(arr))
            mad = float(np.median(np.abs(arr - med))) * 1.4826
            # a floor on the spread so a line of identical scores does not flag noise
            self._last = med + cfg.k_mad * max(mad, 1e-6 + 0.02 * abs(med))
        return self._last


class Thresholds:
    """A :class:`Threshold` per recipe: one product's scores never calibrate another's threshold
    (a product change on the line would otherwise judge the new parts by the old product's score
    spread). ``reset`` forgets them all: after an engine restart scores are on another scale, and
    a window of the old engine's scores let defective parts pass for dozens of frames (each
    recipe calibrates again, its first ``min_scores`` frames NOT_INSPECTED). Up to ``MAX_RECIPES``
    are kept, the least recently used forgotten beyond it."""

    MAX_RECIPES = 64

    def __init__(self, cfg: ThresholdConfig):
        self.cfg = cfg
        self._by_recipe: collections.OrderedDict[str, Threshold] = collections.OrderedDict()

    def get(self, recipe: str) -> Threshold:
        thr = self._by_recipe.get(recipe)
        if thr is None:
            thr = self._by_recipe[recipe] = Threshold(self.cfg)
            while len(self._by_recipe) > self.MAX_RECIPES:
                self._by_recipe.popitem(last=False)
        else:
            self._by_recipe.move_to_end(recipe)
        return thr

    def reconfigure(self, cfg: ThresholdConfig) -> None:
        self.cfg = cfg
        for thr in list(self._by_recipe.values()):
            thr.reconfigure(cfg)

    def reset(self) -> None:
        self._by_recipe = collections.OrderedDict()
