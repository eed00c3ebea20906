"""Procedural surface defects (scratch, spot, crack, missing chunk) and Perlin-noise anomaly masks.

Two users: the synthetic production line (:mod:`linewatch.acquire.synthetic`) draws realistic
defects into its parts, and AnoRefiner-style anomaly synthesis (PGT) pastes noise-shaped
anomalies into images judged normal. Everything here is numpy only and deterministic given the
``numpy.random.Generator`` passed in.

Conventions: images are uint8 HxWxC (C = 1 or 3); ``draw_*`` functions return a float32 alpha map
HxW in [0, 1] that is exactly zero outside the defect, so ``mask = alpha > 0`` is the exact
ground truth of the pixels :func:`apply_defect` changes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

DEFECT_KINDS = ("scratch", "spot", "crack", "missing")
MIN_AREA_FRAC = 0.002  # a defect is never smaller than this share of the image
MAX_AREA_FRAC = 0.05
ALPHA_CUTOFF = 0.3  # alpha below this is set to 0, so every masked pixel visibly changes
_MAX_TRIES = 12
BACKGROUND_GREY = 28.0  # dark conveyor belt seen through a missing chunk


@dataclass(frozen=True, slots=True)
class DefectInfo:
    """What was drawn: kind, bbox (x0, y0, x1, y1; exclusive upper bounds), a rough position word
    ("top-left" ... "center"), area in pixels, a size word and the look ("bright", "dark", ...)."""

    kind: str
    bbox: tuple[int, int, int, int]
    position: str
    area_px: int
    size: str
    look: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "bbox": list(self.bbox), "position": self.position,
                "area_px": self.area_px, "size": self.size, "look": self.look}


# ------------------------------------------------------------------------------------- geometry
def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), exclusive upper bounds, of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def position_word(bbox: tuple[int, int, int, int], h: int, w: int) -> str:
    """Rough position of a box centre on a 3x3 grid: "top-left", "top", ..., "center", ..."""
    cx = (bbox[0] + bbox[2]) / 2 / w
    cy = (bbox[1] + bbox[3]) / 2 / h
    row = "top" if cy < 1 / 3 else ("bottom" if cy >= 2 / 3 else "")
    col = "left" if cx < 1 / 3 else ("right" if cx >= 2 / 3 else "")
    if row and col:
        return f"{row}-{col}"
    return row or col or "center"


def size_word(area_px: int, h: int, w: int) -> str:
    """"small" below 1 % of the image area, "medium" up to 3 %, "large" above."""
    frac = area_px / float(h * w)
    return "small" if frac < 0.01 else ("medium" if frac < 0.03 else "large")


def _polyline_alpha(points: np.ndarray, half_widths: np.ndarray, h: int, w: int) -> np.ndarray:
    """Anti-aliased alpha of a thick polyline (points Nx2 as (y, x); one half width per point).
    Each segment is rasterised only inside its own small window, which keeps this well under 1 ms."""
    alpha = np.zeros((h, w), dtype=np.float32)
    pts = points.astype(np.float32)
    hws = ((half_widths[:-1] + half_widths[1:]) / 2).astype(np.float32)
    for i in range(len(pts) - 1):
        a, b, hw = pts[i], pts[i + 1], float(hws[i])
        pad = hw + 2.0
        y0 = max(0, int(math.floor(min(a[0], b[0]) - pad)))
        y1 = min(h, int(math.ceil(max(a[0], b[0]) + pad)) + 1)
        x0 = max(0, int(math.floor(min(a[1], b[1]) - pad)))
        x1 = min(w, int(math.ceil(max(a[1], b[1]) + pad)) + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - a[0]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - a[1]
        d = b - a
        den = float(d @ d) or 1e-6
        t = np.clip((yy * d[0] + xx * d[1]) / den, 0.0, 1.0)
        dist = np.hypot(yy - t * d[0], xx - t * d[1])
        win = alpha[y0:y1, x0:x1]
        np.maximum(win, np.clip(hw + 0.5 - dist, 0.0, 1.0), out=win)
    return alpha


def _cut(alpha: np.ndarray) -> np.ndarray:
    alpha[alpha < ALPHA_CUTOFF] = 0.0
    return alpha


# -------------------------------------------------------------------------------- defect shapes
def draw_scratch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A thin, gently curved line (quadratic Bezier), 1.5-3.5 px wide at 256 px, tapering ends."""
    s = min(h, w)
    length = rng.uniform(0.3, 0.75) * s
    ang = rng.uniform(0, math.pi)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    dy, dx = math.sin(ang) * length / 2, math.cos(ang) * length / 2
    p0, p2 = np.array([cy - dy, cx - dx]), np.array([cy + dy, cx + dx])
    bend = rng.uniform(-0.25, 0.25) * length
    p1 = (p0 + p2) / 2 + bend * np.array([math.cos(ang), -math.sin(ang)])
    t = np.linspace(0, 1, 14)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width = rng.uniform(0.75, 1.75) * max(1.0, s / 256)
    taper = np.sin(np.linspace(0.15, math.pi - 0.15, len(pts))) ** 0.5
    return _cut(_polyline_alpha(pts, width * taper, h, w))


def draw_crack(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark jagged line (random walk with a drifting direction) with one to three branches."""
    s = min(h, w)
    step = s / 40
    scale = max(1.0, s / 256)

    def walk(start: np.ndarray, ang: float, n: int, width: float) -> np.ndarray:
        pts = [start]
        for _ in range(n):
            ang += rng.normal(0, 0.45)
            pts.append(pts[-1] + step * rng.uniform(0.6, 1.2) * np.array([math.sin(ang), math.cos(ang)]))
        arr = np.asarray(pts)
        taper = np.linspace(1.0, 0.45, len(arr))
        return arr, width * taper

    start = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w])
    ang0 = rng.uniform(0, 2 * math.pi)
    main, main_hw = walk(start, ang0, int(rng.integers(8, 18)), rng.uniform(1.1, 2.0) * scale)
    alpha = _polyline_alpha(main, main_hw, h, w)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(2, len(main) - 1))
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        br, br_hw = walk(main[k], ang0 + side, int(rng.integers(3, 8)), main_hw[k] * 0.7)
        np.maximum(alpha, _polyline_alpha(br, br_hw, h, w), out=alpha)
    return _cut(alpha)


def _blob_alpha(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, r: float,
                aspect: float, soft_px: float) -> np.ndarray:
    """Irregular blob: an ellipse whose radius is modulated by a few random harmonics."""
    pad = int(r * max(aspect, 1 / aspect) * 1.5) + 3
    y0, y1 = max(0, int(cy) - pad), min(h, int(cy) + pad + 1)
    x0, x1 = max(0, int(cx) - pad), min(w, int(cx) + pad + 1)
    alpha = np.zeros((h, w), dtype=np.float32)
    if y1 <= y0 or x1 <= x0:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    rot = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
    v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in (2, 3, 5):
        radius += rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    rho = np.hypot(u / aspect, v * aspect)
    alpha[y0:y1, x0:x1] = np.clip((r * radius - rho) / soft_px, 0.0, 1.0)
    return alpha


def draw_spot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A blob (stain, dent, residue) with an irregular outline and a soft rim."""
    s = min(h, w)
    r = rng.uniform(0.035, 0.1) * s
    return _cut(_blob_alpha(rng, h, w, rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w, r,
                            rng.uniform(0.7, 1.4), soft_px=max(1.5, r * 0.35)))


def draw_missing(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A chunk bitten out of the part at an edge or a corner (hard edge: alpha is 0 or 1)."""
    s = min(h, w)
    if rng.random() < 0.3:  # corner
        cy, cx = float(rng.choice([0, h - 1])), float(rng.choice([0, w - 1]))
        r = rng.uniform(0.1, 0.22) * s
    else:  # along one edge
        edge = int(rng.integers(4))
        t = rng.uniform(0.15, 0.85)
        cy, cx = [(0.0, t * w), (h - 1.0, t * w), (t * h, 0.0), (t * h, w - 1.0)][edge]
        r = rng.uniform(0.07, 0.15) * s
    alpha = _blob_alpha(rng, h, w, cy, cx, r, rng.uniform(0.75, 1.35), soft_px=0.5)
    return (alpha >= 0.5).astype(np.float32)


DRAWERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "scratch": draw_scratch, "spot": draw_spot, "crack": draw_crack, "missing": draw_missing}


def draw_defect(rng: np.random.Generator, kind: str, h: int, w: int,
                min_area_frac: float = MIN_AREA_FRAC, max_area_frac: float = MAX_AREA_FRAC) -> np.ndarray:
    """Alpha of one defect of ``kind`` whose area lies in [min, max] x h x w (redrawn until it
    does; after many tries the closest draw is kept, so a tiny image still gets a defect)."""
    if kind not in DRAWERS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    lo, hi = min_area_frac * h * w, max_area_frac * h * w
    best, best_err = None, math.inf
    for _ in range(_MAX_TRIES):
        alpha = DRAWERS[kind](rng, h, w)
        area = int(np.count_nonzero(alpha))
        err = 0.0 if lo <= area <= hi else min(abs(area - lo), abs(area - hi))
        if err == 0.0:
            return alpha
        if area > 0 and err < best_err:
            best, best_err = alpha, err
    if best is None:
        raise RuntimeError(f"could not draw a {kind} defect on a {h}x{w} image")
    logger.debug("%s defect outside the area range after %d tries", kind, _MAX_TRIES)
    return best


# -------------------------------------------------------------------------------- appearance
def _tint(rgb: tuple[float, float, float], channels: int) -> np.ndarray:
    t = np.asarray(rgb, dtype=np.float32)
    return t if channels == 3 else np.array([t @ np.array([0.299, 0.587, 0.114], np.float32)],
                                            dtype=np.float32)


def _target(kind: str, win: np.ndarray, rng: np.random.Generator,
            background: np.ndarray | None) -> tuple[np.ndarray, str]:
    """What the defect pixels become (before alpha blending), and a word for their look."""
    c = win.shape[-1]
    if kind == "scratch":
        if rng.random() < 0.5:  # at least +45 grey levels, so it shows on bright surfaces too
            return win + np.maximum((255.0 - win) * rng.uniform(0.5, 0.75), 45.0), "bright"
        return win * rng.uniform(0.2, 0.45), "dark"
    if kind == "crack":
        return win * rng.uniform(0.1, 0.3), "dark"
    if kind == "spot":
        look = str(rng.choice(["dark", "bright", "rust", "blue"]))
        if look == "dark":
            return win * rng.uniform(0.35, 0.55), look
        if look == "bright":
            return win + (255.0 - win) * rng.uniform(0.45, 0.65), look
        colour = (160.0, 82.0, 38.0) if look == "rust" else (60.0, 85.0, 160.0)
        mean = win.mean(axis=(0, 1), keepdims=True)
        return _tint(colour, c) * rng.uniform(0.8, 1.1) + 0.35 * (win - mean), look
    if kind == "missing":
        if background is not None:
            return background.astype(np.float32), "hole"
        noise = rng.normal(0.0, 3.0, win.shape[:2] + (1,)).astype(np.float32)
        return np.full_like(win, BACKGROUND_GREY) + noise, "hole"
    raise ValueError(f"unknown defect kind {kind!r}")


def apply_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
                 background: np.ndarray | None = None, alpha: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, DefectInfo]:
    """Draw one defect of ``kind`` into a uint8 HxWxC image (changed in place and returned).

    ``background`` (uint8 HxWxC, optional) is what shows through a ``missing`` chunk; a dark
    conveyor grey by default. ``alpha`` overrides the drawn shape. Returns the image, the exact
    bool HxW mask of changed pixels and a :class:`DefectInfo`.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 HxWxC, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if alpha is None:
        alpha = draw_defect(rng, kind, h, w)
    mask = alpha > 0
    x0, y0, x1, y1 = mask_bbox(mask)
    win = image[y0:y1, x0:x1].astype(np.float32)
    bg = None if background is None else background[y0:y1, x0:x1]
    target, look = _target(kind, win, rng, bg)
    a = alpha[y0:y1, x0:x1, None]
    out = win + a * (target - win)
    sub = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][sub] = np.clip(np.rint(out), 0, 255).astype(np.uint8)[sub]
    area = int(np.count_nonzero(mask))
    bbox = (x0, y0, x1, y1)
    return image, mask, DefectInfo(kind, bbox, position_word(bbox, h, w), area, size_word(area, h, w), look)


# ------------------------------------------------------------------- Perlin noise (AnoRefiner)
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(rng: np.random.Generator, h: int, w: int, res: tuple[int, int] = (4, 4)) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 HxW in about [-1, 1], with ``res`` cells per axis."""
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    ang = rng.uniform(0, 2 * math.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) * (ry / h)
    xs = np.arange(w, dtype=np.float32) * (rx / w)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        return (gy[np.ix_(iy + oy, ix + ox)] * (fy - oy) + gx[np.ix_(iy + oy, ix + ox)] * (fx - ox))

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
    bot = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
    return (math.sqrt(2) * (top + uy * (bot - top))).astype(np.float32)


def fractal_noise(rng: np.random.Generator, h: int, w: int, base_res: int = 2, octaves: int = 4,
                  persistence: float = 0.5) -> np.ndarray:
    """Sum of Perlin octaves (each twice the frequency, ``persistence`` times the amplitude),
    normalised to about [-1, 1]."""
    out = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        r = base_res * 2 ** o
        out += amp * perlin_noise(rng, h, w, (min(r, h), min(r, w)))
        total += amp
        amp *= persistence
    return out / total


def perlin_mask(rng: np.random.Generator, h: int, w: int, threshold: float = 0.5,
                min_area_frac: float = 0.005, max_area_frac: float = 0.15) -> np.ndarray:
    """A noise-shaped anomaly mask (bool HxW): thresholded Perlin noise at a random scale, redrawn
    until its area lies in [min, max] x h x w (the closest draw is kept after many tries)."""
    lo, hi = min_area_frac * h * w, max_area_frac * h * w
    best, best_err = None, math.inf
    for _ in range(_MAX_TRIES):
        ry, rx = 2 ** int(rng.integers(0, 4)), 2 ** int(rng.integers(0, 4))
        m = perlin_noise(rng, h, w, (ry, rx)) > threshold
        area = int(np.count_nonzero(m))
        err = 0.0 if lo <= area <= hi else min(abs(area - lo), abs(area - hi))
        if err == 0.0:
            return m
        if area > 0 and err < best_err:
            best, best_err = m, err
    if best is None:  # noise never exceeded the threshold: fall back to a blob
        return draw_spot(rng, h, w) > 0
    return best


def paste_noise_anomaly(image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None,
                        mask: np.ndarray | None = None, beta_range: tuple[float, float] = (0.0, 0.6)
                        ) -> tuple[np.ndarray, np.ndarray]:
    """AnoRefiner / DRAEM-style synthetic anomaly: inside a Perlin mask, blend the image with a
    foreign texture (``source``, uint8 HxWxC, e.g. another image; by default fractal noise with a
    random colour) after a random intensity change. Returns a new uint8 image and the bool mask.

    ``beta`` (drawn in ``beta_range``) is how much of the original stays visible in the anomaly.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 HxWxC, got {image.dtype} {image.shape}")
    h, w, c = image.shape
    if mask is None:
        mask = perlin_mask(rng, h, w)
    if source is None:
        tex = fractal_noise(rng, h, w, base_res=int(rng.integers(4, 16)), octaves=3)[..., None]
        colour = rng.uniform(20, 235, (1, 1, c)).astype(np.float32)
        src = np.clip(colour + 60.0 * tex, 0, 255)
    else:
        if source.shape[:2] != (h, w):
            raise ValueError(f"source {source.shape} does not match image {image.shape}")
        src = source.astype(np.float32)
        if src.shape[-1] != c:
            src = np.repeat(src.mean(axis=-1, keepdims=True), c, axis=-1)
    gain, offset = rng.uniform(0.5, 1.5), rng.uniform(-50, 50)
    src = np.clip(src * gain + offset, 0, 255)
    beta = rng.uniform(*beta_range)
    img = image.astype(np.float32)
    out = np.where(mask[..., None], beta * img + (1 - beta) * src, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask
