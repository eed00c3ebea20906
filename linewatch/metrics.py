"""Evaluation metrics (numpy + scipy): AUROC, AP, F1-max, AUPRO, and referring-segmentation IoUs.

Image-level metrics are exact (every distinct score is a threshold, ties handled like
scikit-learn). Pixel-level metrics over hundreds of large maps use :class:`PixelAccumulator`,
which streams maps into score histograms of ``n_bins`` equal-width bins over a fixed score range
(pixels sharing a bin count as tied): memory does not grow with the data and the error is bounded
by the bin width (with the default 2^14 bins, AUROC/AP/AUPRO agree with the exact values to about
1e-3). ``pixel_metrics_exact`` computes the same figures without binning, for small inputs.

AUPRO follows the MVTec AD protocol: per-region overlap averaged over ground-truth connected
components (8-connected), plotted against the false-positive rate on defect-free pixels,
integrated up to FPR 0.3 and divided by 0.3 (so 1.0 is perfect).

``PixelAccumulator.add`` may also sort an image's normal pixels into named places (near a defect,
on a defect-free frame, ...); ``false_alarms`` then tells each place's share of the false alarms at
the F1-max threshold and the pixel-AP without that place's normal pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BINS = 1 << 14
AUPRO_FPR_LIMIT = 0.3
NEAR_DEFECT_FRACTION = 0.08  # ``near_defect``: about three patch cells of the engine's working geometry


# ---------------------------------------------------------------------- curves from counts
def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tp, fp at each distinct score taken as threshold (score >= t), thresholds descending."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    _finite(scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64)


def _finite(scores: np.ndarray) -> np.ndarray:
    """``scores`` if all finite; a NaN would otherwise rank as the lowest score and an inf as a tie."""
    if scores.size and not np.isfinite(scores).all():
        raise ValueError(f"{int(np.count_nonzero(~np.isfinite(scores)))} non-finite score(s): metrics undefined")
    return scores


def _check(tp: np.ndarray, fp: np.ndarray) -> tuple[float, float]:
    p, n = float(tp[-1]), float(fp[-1])
    if p == 0 or n == 0:
        raise ValueError("metric undefined: need both positive and negative samples")
    return p, n


def auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Area under the ROC curve from cumulative counts (thresholds descending, trapezoids)."""
    p, n = _check(tp, fp)
    tpr = np.r_[0.0, tp / p]
    fpr = np.r_[0.0, fp / n]
    return float(np.trapezoid(tpr, fpr))


def ap_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Average precision (step-wise, as scikit-learn): sum over thresholds of dRecall * precision."""
    p, _ = _check(tp, fp)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / p
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_curve(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """F1 at each threshold of cumulative counts (positives: ``tp[-1]``)."""
    return 2 * tp / np.maximum(tp + fp + tp[-1], 1e-12)


def f1max_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Best F1 over all thresholds."""
    _check(tp, fp)
    return float(_f1_curve(tp, fp).max())


def auroc(labels: Sequence, scores: Sequence) -> float:
    """Exact ROC AUC (ties count one half)."""
    return auroc_from_counts(*_cumulative_counts(np.asarray(labels), np.asarray(scores)))


def average_precision(labels: Sequence, scores: Sequence) -> float:
    """Exact average precision (same definition as sklearn.metrics.average_precision_score)."""
    return ap_from_counts(*_cumulative_counts(np.asarray(labels), np.asarray(scores)))


def f1_max(labels: Sequence, scores: Sequence) -> float:
    """Best F1 over every threshold."""
    return f1max_from_counts(*_cumulative_counts(np.asarray(labels), np.asarray(scores)))


def pro_curve_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under PRO(FPR) from 0 to ``fpr_limit``; points in any order of threshold
    but FPR non-decreasing; the curve is closed at (0, 0) and cut by linear interpolation."""
    fpr = np.r_[0.0, np.asarray(fpr, dtype=np.float64)]
    pro = np.r_[0.0, np.asarray(pro, dtype=np.float64)]
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    nxt = np.flatnonzero(~keep)
    if nxt.size:
        j = nxt[0]
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x, fpr_limit], np.r_[y, y_cut]
    return float(np.trapezoid(y, x) / fpr_limit)


# --------------------------------------------------------------------------- pixel metrics
def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


@dataclass
class PixelAccumulator:
    """Streams (score map, bool mask) pairs into histograms; see the module docstring.

    ``lo``/``hi`` bound the scores (values outside are clipped into the end bins).
    """

    lo: float
    hi: float
    n_bins: int = DEFAULT_BINS
    pos: np.ndarray = field(init=False)
    neg: np.ndarray = field(init=False)
    regions: list[np.ndarray] = field(init=False, default_factory=list)  # per-component histograms
    # normal pixels by where they lie (``add``'s ``places``): place -> histogram
    places: dict[str, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            self.hi = self.lo + 1.0
        self.pos = np.zeros(self.n_bins, dtype=np.int64)
        self.neg = np.zeros(self.n_bins, dtype=np.int64)

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        scores = _finite(np.asarray(scores, dtype=np.float64))
        b = (scores - self.lo) * (self.n_bins / (self.hi - self.lo))
        return np.clip(b, 0, self.n_bins - 1).astype(np.int64)

    def add(self, score_map: np.ndarray, mask: np.ndarray, places: dict[str, np.ndarray] | None = None) -> None:
        """Add one image (float HxW map, bool HxW ground truth). ``places`` (optional): name ->
        bool HxW map of some of the image's normal pixels, counted apart for ``false_alarms``."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != score_map.shape:
            raise ValueError(f"score map {score_map.shape} and mask {mask.shape} differ in shape")
        bins = self._bin(score_map)
        self.neg += np.bincount(bins[~mask], minlength=self.n_bins)
        for name, where in (places or {}).items():
            hist = np.bincount(bins[np.asarray(where, dtype=bool) & ~mask], minlength=self.n_bins)
            self.places[name] = self.places.get(name, 0) + hist
        if mask.any():
            self.pos += np.bincount(bins[mask], minlength=self.n_bins)
            labels, n = _components(mask)
            lab = labels[mask]
            bm = bins[mask]
            for k in range(1, n + 1):
                self.regions.append(np.bincount(bm[lab == k], minlength=self.n_bins))

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative tp, fp for thresholds at bin lower edges, descending."""
        return np.cumsum(self.pos[::-1]).astype(np.float64), np.cumsum(self.neg[::-1]).astype(np.float64)

    def aupro(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
        if not self.regions:
            raise ValueError("AUPRO undefined: no defect regions")
        _, fp = self.counts()
        fpr = fp / max(fp[-1], 1)
        pro = np.zeros(self.n_bins)
        for h in self.regions:
            pro += np.cumsum(h[::-1]) / h.sum()
        return pro_curve_area(fpr, pro / len(self.regions), fpr_limit)

    def merged(self, other: "PixelAccumulator") -> "PixelAccumulator":
        """A new accumulator holding both this one's images and ``other``'s (same bins)."""
        if (self.lo, self.hi, self.n_bins) != (other.lo, other.hi, other.n_bins):
            raise ValueError("cannot merge pixel accumulators with different bins")
        out = PixelAccumulator(self.lo, self.hi, self.n_bins)
        out.pos, out.neg = self.pos + other.pos, self.neg + other.neg
        out.regions = self.regions + other.regions
        for name in dict.fromkeys([*self.places, *other.places]):
            out.places[name] = self.places.get(name, 0) + other.places.get(name, 0)
        return out

    def false_alarms(self) -> dict[str, dict[str, float]]:
        """Where the false alarms lie, per place given to ``add``: ``share_at_f1max``, the place's
        share of the normal pixels scored at or above the F1-max threshold, and ``ap_without``,
        the pixel-AP with the place's normal pixels left out (what a perfect suppression of false
        alarms there could reach at most)."""
        tp, fp = self.counts()
        if tp[-1] == 0 or fp[-1] == 0:
            return {}
        at = int(np.argmax(_f1_curve(tp, fp)))
        out = {}
        for name, hist in self.places.items():
            rest = np.cumsum((self.neg - hist)[::-1]).astype(np.float64)
            out[name] = {"share_at_f1max": float(np.cumsum(hist[::-1])[at] / max(fp[at], 1.0)),
                         "ap_without": ap_from_counts(tp, rest) if rest[-1] > 0 else 1.0}
        return out

    def result(self) -> dict[str, float]:
        tp, fp = self.counts()
        return {"pixel_auroc": auroc_from_counts(tp, fp), "pixel_ap": ap_from_counts(tp, fp),
                "pixel_f1max": f1max_from_counts(tp, fp), "aupro": self.aupro()}


def near_defect(mask: np.ndarray, fraction: float = NEAR_DEFECT_FRACTION) -> np.ndarray:
    """Normal pixels of a bool mask's frame within ``fraction`` of the frame's shorter side of a
    marked pixel (square neighbourhood): where the blurred halo of a patch-level map falls."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    r = max(1, int(round(fraction * min(mask.shape))))
    return ndimage.maximum_filter(mask, size=2 * r + 1, mode="constant") & ~mask


def pixel_metrics(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], lo: float, hi: float,
                  n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Binned pixel AUROC, AP, F1-max and AUPRO over matching maps and masks."""
    acc = PixelAccumulator(lo, hi, n_bins)
    for m, g in zip(maps, masks):
        acc.add(m, g)
    return acc.result()


def aupro_exact(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """AUPRO with every distinct score as a threshold (small inputs only)."""
    scores = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    gts = np.concatenate([np.asarray(g, dtype=bool).ravel() for g in masks])
    comp_ids, offset = [], 0
    for g in masks:
        lab, n = _components(np.asarray(g, dtype=bool))
        comp_ids.append(np.where(lab > 0, lab + offset, 0).ravel())
        offset += n
    comp = np.concatenate(comp_ids)
    if offset == 0:
        raise ValueError("AUPRO undefined: no defect regions")
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fp = np.cumsum(~gts[order])[last] / max((~gts).sum(), 1)
    sizes = np.bincount(comp, minlength=offset + 1)[1:].astype(np.float64)
    pro = np.zeros(last.size)
    c = comp[order]
    for k in range(1, offset + 1):
        pro += np.cumsum(c == k)[last] / sizes[k - 1]
    return pro_curve_area(fp, pro / offset, fpr_limit)


def pixel_metrics_exact(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Pixel metrics without binning (small inputs: every pixel is sorted)."""
    scores = np.concatenate([np.asarray(m).ravel() for m in maps])
    gts = np.concatenate([np.asarray(g, dtype=bool).ravel() for g in masks])
    tp, fp = _cumulative_counts(gts, scores)
    return {"pixel_auroc": auroc_from_counts(tp, fp), "pixel_ap": ap_from_counts(tp, fp),
            "pixel_f1max": f1max_from_counts(tp, fp), "aupro": aupro_exact(maps, masks)}


def image_metrics(labels: Sequence, scores: Sequence) -> dict[str, float]:
    """Exact image AUROC, AP and F1-max."""
    tp, fp = _cumulative_counts(np.asarray(labels), np.asarray(scores))
    return {"image_auroc": auroc_from_counts(tp, fp), "image_ap": ap_from_counts(tp, fp),
            "image_f1max": f1max_from_counts(tp, fp)}


# -------------------------------------------------------------- referring segmentation
def segmentation_metrics(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray],
                         thresholds: Sequence[float] = (0.5, 0.7, 0.9)) -> dict[str, float]:
    """Referring-segmentation figures over bool mask pairs: mIoU (mean of per-image IoU; an image
    where both masks are empty has IoU 1), overall IoU (summed intersections / summed unions) and
    precision@t (share of images with IoU >= t, keys ``prec@0.5`` etc.)."""
    pairs = []
    for p, g in zip(preds, gts):
        p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
        pairs.append((int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())))
    return iou_summary(pairs, thresholds)


def iou_summary(pairs: Sequence[tuple[int, int]], thresholds: Sequence[float] = (0.5, 0.7, 0.9)) -> dict[str, float]:
    """mIoU, overall IoU and precision@t (IoU >= t) from per-image (intersection, union) pixel
    counts; a pair with union 0 (both masks empty) has IoU 1."""
    if not pairs:
        raise ValueError("no masks given")
    arr = np.asarray([i / u if u else 1.0 for i, u in pairs])
    union_sum = sum(u for _, u in pairs)
    out = {"miou": float(arr.mean()), "oiou": float(sum(i for i, _ in pairs) / union_sum) if union_sum else 1.0}
    for t in thresholds:
        out[f"prec@{t:g}"] = float((arr >= t).mean())
    return out
