"""The replay source: plays a folder of recorded images (with ground truth when known) as a line.

Layouts are those of :func:`linewatch.datasets.list_samples` (flat, MVTec-style, kolektor
items, kinds folders). Every image is resized to one fixed size, because the frame ring has one
slot shape. A file that cannot be decoded is still yielded, as an all-zero FAULT frame.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..datasets import Sample, list_samples, load_image, load_mask, resize_mask
from ..frames import FrameMeta
from .base import SourceError, SourceFrame, SourceStatus
from .synthetic import Pacer

logger = logging.getLogger(__name__)


class ReplayFolder:
    """Replays ``cfg.path`` at ``cfg.fps`` (0 = as fast as taken), once or in a loop.

    Frame ids run 0, 1, 2, ... and keep counting across loops. ``meta.source_ref`` is the file
    path, ``meta.extra`` holds ``kind`` (defect kind or "good"), ``group`` (kolektor item, MVTec
    category, folder name: a natural lot) and ``loop``; a corrupt file adds ``fault``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.camera
        self.height = int(cfg.height)
        self.width = int(cfg.width)
        self.channels = int(cfg.channels)
        self.status = SourceStatus()
        self._samples: list[Sample] = []
        self._next_id = 0

    # -- lifecycle
    def open(self) -> None:
        """List the folder and fix the frame size; SourceError if missing, empty or all unreadable."""
        path = Path(self.cfg.path)
        try:
            samples = list_samples(path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            # a folder it may not read, a corrupt ground-truth mask the layout reads while listing
            raise SourceError(f"replay source: {path}: {type(exc).__name__}: {exc}") from None
        if self.cfg.shuffle_seed is not None:
            random.Random(self.cfg.shuffle_seed).shuffle(samples)
        self._samples = samples
        if self.cfg.width == 0 or self.cfg.height == 0:
            first_h, first_w = self._first_size()
            self.width = int(self.cfg.width) or first_w
            self.height = int(self.cfg.height) or first_h
        self._next_id = 0
        self.status.connected = True
        self.status.extra = {"files": len(samples), "loops": 0}
        logger.info("replay %s: %d images from %s at %dx%dx%d, fps %s, loop %s", self.name,
                    len(samples), path, self.width, self.height, self.channels, self.cfg.fps,
                    self.cfg.loop)

    def close(self) -> None:
        self.status.connected = False

    def _first_size(self) -> tuple[int, int]:
        """(height, width) of the first image that can be read."""
        for s in self._samples:
            try:
                with Image.open(s.image) as im:
                    return im.height, im.width
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                logger.warning("replay %s: cannot read %s for the frame size: %s", self.name, s.image, exc)
        raise SourceError(f"replay source: no readable image under {self.cfg.path} to take the frame "
                          f"size from; set width and height")

    # -- frames
    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Load one sample at the source's size: (uint8 HxWxC image, bool HxW mask or None when
        the layout has no ground truth, fault reason or "")."""
        h, w = self.height, self.width
        try:
            img = load_image(sample.image, self.channels, self.cfg.bit_depth)
        except ValueError as exc:
            reason = str(exc).removeprefix(f"cannot decode image {sample.image}: ")
            return np.zeros((h, w, self.channels), np.uint8), None, f"corrupt image: {sample.image}: {reason}"
        img0_hw = img.shape[:2]
        if img.shape[:2] != (h, w):
            mode = "RGB" if self.channels == 3 else "L"
            pil = Image.fromarray(img if self.channels == 3 else img[..., 0], mode)
            img = np.asarray(pil.resize((w, h), Image.BILINEAR))
            img = img if img.ndim == 3 else img[..., None]
        if not sample.has_gt:
            return img, None, ""
        try:
            gt = load_mask(sample.mask, img0_hw)
            if gt.shape != (h, w):  # the frame was resized to the ring: so is its mask
                gt = resize_mask(gt, (h, w))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return img, None, f"corrupt mask: {sample.mask}: {exc}"
        return img, gt, ""

    def frames(self, stop: threading.Event) -> Iterator[SourceFrame]:
        """Yield every sample (in a loop when ``cfg.loop``) until ``stop`` or the end."""
        if not self._samples:
            raise SourceError("replay source: frames() called before open()")
        pacer = Pacer(self.cfg.fps, on_alive=self.status.alive)
        loop = 0
        while not stop.is_set():
            for sample in self._samples:
                image, gt, fault = self.read(sample)
                if not pacer.wait(stop):
                    return
                extra: dict = {"kind": sample.kind, "group": sample.group, "loop": loop}
                if fault:
                    extra["fault"] = fault
                    self.status.corrupt_frames += 1
                    self.status.last_error = fault
                    logger.warning("replay %s: frame %d: %s", self.name, self._next_id, fault)
                meta = FrameMeta(frame_id=self._next_id, t_capture=time.time(), camera=self.name,
                                 height=self.height, width=self.width, source_ref=str(sample.image),
                                 has_gt=gt is not None, extra=extra)
                self._next_id += 1
                yield SourceFrame(image=image, meta=meta, gt=gt)
            loop += 1
            self.status.extra["loops"] = loop
            self.status.extra["pacer_reanchors"] = pacer.reanchors
            if not self.cfg.loop:
                return
