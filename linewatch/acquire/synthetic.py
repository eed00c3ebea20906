"""The synthetic production line: procedural parts on a textured surface, some with defects.

Each frame is one part: a crop of a precomputed texture bank (brushed metal, woven fabric or a
speckled granular surface) with per-part illumination gain and shading, a slight shift and
rotation of the texture and sensor noise, so that no two normal parts are identical. A fraction
``defect_rate`` of parts get one (sometimes two) defects from :mod:`linewatch.acquire.defects`,
with the exact ground-truth mask and a description in ``meta.extra``.

Frame ``i`` depends only on ``(seed, i)``: the same seed gives the same frames and masks, and
:meth:`SyntheticLine.render` renders any frame (or its defect-free twin) on demand.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Iterator

import numpy as np

from ..frames import FrameMeta
from .base import SourceError, SourceFrame, SourceStatus
from .defects import BACKGROUND_GREY, apply_defect, fractal_noise

logger = logging.getLogger(__name__)

_PAD_PX = 12  # per-part texture shift range (each side)
_N_SHADES = 8
_TWO_DEFECT_PROB = 0.2
_NOISE_SIGMA = 2.5  # sensor noise, grey levels
_BANK_BUDGET_BYTES = 192 * 2 ** 20
_ANGLES_DEG = (-2.5, -1.25, 0.0, 1.25, 2.5)


class Pacer:
    """Paces a loop at ``fps`` on the monotonic clock: tick ``i`` is due at ``t0 + i / fps``, so
    sleep overshoot does not accumulate. When the loop falls more than one period behind (a slow
    consumer), the schedule is re-anchored instead of bursting to catch up. ``fps == 0``: no wait.
    ``on_alive`` is called at least every ``ALIVE_EVERY_S`` of a long wait (a slow replay is a
    source waiting on purpose, not a hung one: the daemon's watchdog reads it)."""

    ALIVE_EVERY_S = 1.0

    def __init__(self, fps: float, on_alive: Callable[[], None] | None = None):
        self.period_s = 1.0 / fps if fps > 0 else 0.0
        self.on_alive = on_alive
        self._t0: float | None = None
        self._i = 0
        self.reanchors = 0

    def wait(self, stop: threading.Event) -> bool:
        """Wait for the next tick; False when ``stop`` was set meanwhile."""
        if self.period_s == 0.0:
            return not stop.is_set()
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._i * self.period_s
        if now - due > self.period_s:
            self.reanchors += 1
            self._t0, self._i, due = now, 0, now
        self._i += 1
        while due > now:
            if stop.wait(min(due - now, self.ALIVE_EVERY_S)):
                return False
            if self.on_alive is not None:
                self.on_alive()
            now = time.monotonic()
        return not stop.is_set()


# ------------------------------------------------------------------------------ numpy helpers
def _blur(img: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Periodic Gaussian blur of a 2-D array by FFT (sigmas in pixels; 0 = none on that axis)."""
    h, w = img.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2 * math.pi ** 2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2))
    return np.fft.irfft2(np.fft.rfft2(img) * kernel, s=(h, w)).astype(np.float32)


def _unit(img: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation."""
    return ((img - img.mean()) / (img.std() + 1e-6)).astype(np.float32)


def _rotate_crop(img: np.ndarray, angle_deg: float, out_h: int, out_w: int) -> np.ndarray:
    """Rotate HxWxC ``img`` about its centre (bilinear) and take the central out_h x out_w."""
    h, w = img.shape[:2]
    a = math.radians(angle_deg)
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    yy -= (out_h - 1) / 2
    xx -= (out_w - 1) / 2
    sy = math.cos(a) * yy - math.sin(a) * xx + (h - 1) / 2
    sx = math.sin(a) * yy + math.cos(a) * xx + (w - 1) / 2
    y0 = np.clip(np.floor(sy).astype(np.int64), 0, h - 2)
    x0 = np.clip(np.floor(sx).astype(np.int64), 0, w - 2)
    fy = np.clip(sy - y0, 0, 1)[..., None]
    fx = np.clip(sx - x0, 0, 1)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bot = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


# ----------------------------------------------------------------------------------- textures
def _brushed_metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Directional fine streaks (noise smeared along x) over low-frequency shading; grey-blue."""
    s = min(h, w) / 256
    fine = _unit(_blur(rng.normal(size=(h, w)), 0.6 * s, 40 * s))
    coarse = _unit(_blur(rng.normal(size=(h, w)), 2.0 * s, 90 * s))
    shade = fractal_noise(rng, h, w, base_res=2, octaves=2)
    grey = 150.0 + 9.0 * fine + 6.0 * coarse + 14.0 * shade
    return grey[..., None] * np.array([0.96, 1.0, 1.06], np.float32)


def _woven(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Plain weave: warp and weft threads alternating over/under, with per-thread brightness
    and fibre streaks along each thread; beige fabric."""
    period = max(8, int(round(min(h, w) / 22)))
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    over = ((y // period + x // period) % 2) == 0
    prof_weft = np.sin(math.pi * ((y % period) + 0.5) / period) ** 0.7
    prof_warp = np.sin(math.pi * ((x % period) + 0.5) / period) ** 0.7
    row_gain = rng.uniform(0.9, 1.1, h // period + 2)[y // period]
    col_gain = rng.uniform(0.9, 1.1, w // period + 2)[x // period]
    fib_weft = _unit(_blur(rng.normal(size=(h, w)), 0.5, 6.0))
    fib_warp = _unit(_blur(rng.normal(size=(h, w)), 6.0, 0.5))
    weft = 200.0 * prof_weft * row_gain + 8.0 * fib_weft
    warp = 185.0 * prof_warp * col_gain + 8.0 * fib_warp
    grey = np.where(over, weft, warp) + 6.0 * fractal_noise(rng, h, w, base_res=2, octaves=2)
    colour = np.where(over[..., None], np.array([1.0, 0.93, 0.78], np.float32),
                      np.array([0.97, 0.91, 0.80], np.float32))
    return (30.0 + grey[..., None] * colour).astype(np.float32)


def _speckled(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Granular surface: dark and light grains of two sizes on a mottled grey (like a sintered
    or powder-coated part)."""
    def grains(density: float, sigma: float) -> np.ndarray:
        g = _blur((rng.random((h, w)) < density).astype(np.float32), sigma, sigma)
        return g / (g.max() + 1e-6)

    base = 140.0 + 10.0 * fractal_noise(rng, h, w, base_res=3, octaves=3)
    grey = (base + 6.0 * rng.normal(size=(h, w)) - 70.0 * grains(0.004, 1.0)
            + 45.0 * grains(0.006, 0.8) - 30.0 * grains(0.0008, 2.2))
    tint = np.array([1.03, 1.0, 0.95], np.float32)
    return np.clip(grey, 0, 255)[..., None] * tint


TEXTURES = {"brushed_metal": _brushed_metal, "woven": _woven, "speckled": _speckled}


# ------------------------------------------------------------------------------------- source
class SyntheticLine:
    """A procedural production line implementing the Source protocol (see ``acquire/base.py``).

    ``render(i)`` gives frame ``i`` as (uint8 HxWxC image, bool HxW mask, extra dict) without
    pacing; ``frames(stop)`` yields them as :class:`SourceFrame` at ``cfg.fps``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.camera
        self.height = int(cfg.height)
        self.width = int(cfg.width)
        self.channels = int(cfg.channels)
        self.status = SourceStatus()
        self._bank: np.ndarray | None = None  # (V, H+2p, W+2p, C) float32 textures
        self._shades: np.ndarray | None = None  # (S, H, W, C) float32 illumination fields
        self._noise: np.ndarray | None = None  # (H+2p, W+2p, C) float32 sensor noise
        self._background: np.ndarray | None = None  # uint8 HxWxC seen through a missing chunk

    # -- lifecycle
    def open(self) -> None:
        """Build the texture, shading and noise banks (deterministic by ``cfg.seed``)."""
        if self.cfg.product not in TEXTURES:
            raise SourceError(f"synthetic source: unknown product {self.cfg.product!r}")
        t0 = time.perf_counter()
        self._build_banks()
        self.status.connected = True
        self.status.extra = {"bank_build_s": round(time.perf_counter() - t0, 3), "defective_frames": 0}
        logger.info("synthetic line %s: %s %dx%dx%d, defect rate %.2f, bank built in %.2f s",
                    self.name, self.cfg.product, self.width, self.height, self.channels,
                    self.cfg.defect_rate, self.status.extra["bank_build_s"])

    def close(self) -> None:
        self.status.connected = False

    def _build_banks(self) -> None:
        h, w, c, p = self.height, self.width, self.channels, _PAD_PX
        hp, wp = h + 2 * p, w + 2 * p
        rng = np.random.default_rng([self.cfg.seed, 0xBA4C])
        n_var = int(max(1, min(len(_ANGLES_DEG), _BANK_BUDGET_BYTES // 2 // (hp * wp * c * 4))))
        n_shades = int(max(1, min(_N_SHADES, _BANK_BUDGET_BYTES // 2 // (h * w * c * 4))))
        angles = _ANGLES_DEG if n_var == len(_ANGLES_DEG) else _ANGLES_DEG[:n_var]
        margin = int(math.ceil(max(hp, wp) * math.sin(math.radians(max(map(abs, angles)))))) + 4
        base = TEXTURES[self.cfg.product](rng, hp + 2 * margin, wp + 2 * margin)
        bank = np.empty((len(angles), hp, wp, c), dtype=np.float32)
        for k, ang in enumerate(angles):
            rgb = _rotate_crop(base, ang, hp, wp)
            bank[k] = rgb if c == 3 else (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        self._bank = bank
        yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        shades = []
        for _ in range(n_shades):  # a gentle light gradient plus a soft hot spot, +-6 %
            gy, gx = rng.uniform(-0.04, 0.04, 2)
            cy, cx = rng.uniform(-0.6, 0.6, 2)
            spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.8)
            shades.append(1.0 + gy * yy + gx * xx + rng.uniform(-0.03, 0.03) * (spot - spot.mean()))
        self._shades = np.repeat(np.stack(shades)[..., None], c, axis=-1).astype(np.float32)
        self._noise = rng.normal(0.0, _NOISE_SIGMA, (hp, wp, c)).astype(np.float32)
        belt = BACKGROUND_GREY + 8.0 * fractal_noise(rng, h, w, base_res=8, octaves=2)
        belt = belt + rng.normal(0.0, 2.0, (h, w))
        self._background = np.clip(np.repeat(belt[..., None], c, axis=-1), 0, 255).astype(np.uint8)

    # -- rendering
    def render(self, index: int, defects: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
        """Frame ``index``: (uint8 HxWxC image, bool HxW ground-truth mask, meta.extra dict).

        ``defects=False`` gives the same part without its defects (for tests and synthesis).
        """
        if self._bank is None:
            self._build_banks()
        h, w, p = self.height, self.width, _PAD_PX
        part = np.random.default_rng([self.cfg.seed, index, 1])
        v = int(part.integers(len(self._bank)))
        dy, dx, ny, nx = (int(t) for t in part.integers(0, 2 * p + 1, 4))
        gain = float(part.uniform(0.9, 1.1))
        # full-channel, positive-stride operands: numpy is ~10x slower on broadcast/flipped ones
        img = self._bank[v, dy:dy + h, dx:dx + w] * self._shades[int(part.integers(len(self._shades)))]
        img *= np.float32(gain)
        img += self._noise[ny:ny + h, nx:nx + w]
        np.clip(img, 0, 255, out=img)
        image = img.astype(np.uint8)

        mask = np.zeros((h, w), dtype=bool)
        extra: dict = {"defect_kinds": [], "defect_boxes": [], "defect_positions": [], "defects": []}
        rng = np.random.default_rng([self.cfg.seed, index, 2])
        if rng.random() >= self.cfg.defect_rate:
            return image, mask, extra
        n = 2 if rng.random() < _TWO_DEFECT_PROB else 1
        for _ in range(n):
            kind = str(rng.choice(self.cfg.defect_kinds))
            if not defects:
                continue
            image, m, info = apply_defect(image, kind, rng, background=self._background)
            mask |= m
            extra["defect_kinds"].append(info.kind)
            extra["defect_boxes"].append(list(info.bbox))
            extra["defect_positions"].append(info.position)
            extra["defects"].append(info.as_dict())
        return image, mask, extra

    def frames(self, stop: threading.Event) -> Iterator[SourceFrame]:
        """Yield frames 0, 1, 2, ... at ``cfg.fps`` until ``stop`` or ``cfg.n_frames``."""
        if self._bank is None:
            raise SourceError("synthetic source: frames() called before open()")
        pacer = Pacer(self.cfg.fps, on_alive=self.status.alive)
        i = 0
        while not stop.is_set() and (self.cfg.n_frames == 0 or i < self.cfg.n_frames):
            image, mask, extra = self.render(i)
            if not pacer.wait(stop):
                break
            if extra["defect_kinds"]:
                self.status.extra["defective_frames"] += 1
            self.status.extra["pacer_reanchors"] = pacer.reanchors
            meta = FrameMeta(frame_id=i, t_capture=time.time(), camera=self.name, height=self.height,
                             width=self.width, source_ref=f"synthetic:{self.cfg.seed}:{i}",
                             has_gt=True, extra=extra)
            yield SourceFrame(image=image, meta=meta, gt=mask)
            i += 1
