"""The refiner: refines a closed lot with the current ARD, and trains the next ARD on that lot (PGT)
in a background thread (``pgt``), so tier 1 never waits for training.

Order per lot, as in DESIGN.md: lot k's coarse maps are refined with the ARD trained on an earlier
lot (lot k-1 when training keeps up), then lot k is handed to the worker. The worker holds one
pending lot: a newer lot replaces a pending one that has not started (counted in ``skipped``), so
a slow trainer falls behind by at most one lot and never queues work without bound. Training is
progressive: each round starts from the current ARD's weights. A finished ARD gets a new version
(``ard-<run>-<n>``, the run id random so two refiners, or two lines sharing a database, never name
two ARDs alike), is announced through ``on_model(name, version, kind, details, trained_on_lot)``
(the daemon records it in the model-versions table), and replaces the current one atomically.

One ARD is kept per recipe (product): a lot is refined by the ARD trained on an earlier lot of its
own recipe, never by one learned on another product, and a recipe seen for the first time gets
the coarse maps until a lot of it has been trained on (its first ARD starts from the untrained
decoder, not from another product's weights).

The time budget covers building the training samples as well as training; a stop (``close``, or
the end of the program's main thread) ends a round at its next sample batch or training step, so
the worker never keeps the process alive after the daemon is done.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..models.ard import ARD
from ..models.backbone import preprocess
from ..models.zeroshot import Reference, Scorer
from ..priority import TIER2_NICE, lower_priority
from .pseudo import select_pseudo_normals
from .synth import Extract, make_samples
from .train import train_ard

logger = logging.getLogger(__name__)

ARD_NAME = "ard"
MAX_RECIPES = 32  # ARDs kept, one per recipe (the least recently trained is forgotten beyond it)
SAMPLE_BUDGET_SHARE = 0.5  # building samples stops at this share of the time budget (training needs the rest)
# selector(lot_id, image_scores, fraction) -> indices of pseudo-normal frames (eval overrides it)
Selector = Callable[[str, Sequence[float], float], list[int]]


@dataclass(frozen=True, slots=True)
class ARDVersion:
    """A trained, frozen ARD with its identity. ``module`` is never trained again after release."""

    module: ARD
    version: str
    trained_on_lot: str
    recipe: str = ""

    @property
    def model(self) -> dict[str, str]:
        return {"name": ARD_NAME, "version": self.version, "kind": "ard"}


@dataclass(slots=True)
class LotJob:
    """One closed lot handed to PGT: frames in working geometry, tier-1 features and subsampled
    reference patches, coarse grids in lot units, tier-2 image scores, the lot's score scale."""

    lot_id: str
    images: list[np.ndarray]
    feats: list[torch.Tensor]  # patch level (what the ARD sees)
    refs: list[Reference]
    z: list[torch.Tensor]  # the frames' coarse grids in lot units
    image_scores: list[float]
    scale: float
    border: dict = field(default_factory=dict)  # the lot's border calibration (zeroshot.border_stats)
    # each frame's position-calibration offset grid (zeroshot.position_offset), None where none applies
    position: list = field(default_factory=list)
    # the tier-2 memory (references of earlier lots' frames) the lot was scored with
    memory: list[Reference] = field(default_factory=list)
    recipe: str = ""  # the lot's recipe: its ARD refines later lots of that recipe only
    t_submit: float = field(default_factory=time.monotonic)


class Refiner:
    """ARD refinement + background PGT (see the module docstring). Thread-safe: ``refine`` and
    ``submit`` may be called from the lot-closer thread while the worker trains."""

    def __init__(self, cfg, feat_dim: int, extract: Extract, scorer: Scorer,
                 on_model: Callable[..., None] | None = None, selector: Selector | None = None,
                 skip_sigma: float | None = None):
        self.cfg = cfg
        self.feat_dim = int(feat_dim)
        self.extract = extract
        self.scorer = scorer  # the engine's: PGT samples are scored as tier 2 scores frames
        self.on_model = on_model
        self.selector = selector
        self.run_id = f"{int(time.time()):x}{secrets.token_hex(3)}"
        self._rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        from ..engines.zeroshot import SMOOTH_SIGMA_CELLS

        # untrained: returns the coarse map as is (blurred like the engine's coarse maps: ``skip_sigma``
        # is the engine's ``smooth_cells``)
        sigma = SMOOTH_SIGMA_CELLS if skip_sigma is None else float(skip_sigma)
        self._base = ARD(self.feat_dim, width=cfg.width, skip_sigma=sigma, delta_max=cfg.delta_max,
                         gate_units=cfg.gate_units, raise_max=cfg.raise_max, peak_window=cfg.peak_window_px)
        self._base.eval()
        self._current: dict[str, ARDVersion] = {}  # recipe -> its ARD, least recently trained first
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: LotJob | None = None
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.trained = 0  # ARD versions released
        self.skipped = 0  # lots replaced while pending (never trained on)
        self.failed = 0  # rounds that raised
        self.last_report: dict[str, Any] = {}
        self.pseudo_normals: dict[str, list[int]] = {}  # lot id -> indices used (the latest few)

    # ------------------------------------------------------------------------ inference
    def current(self, recipe: str = "") -> ARDVersion | None:
        """The ARD that refines lots of ``recipe`` now (None before a lot of it was trained on)."""
        with self._lock:
            return self._current.get(recipe)

    def refine(self, images: Sequence[np.ndarray], feats: Sequence[torch.Tensor], zs: Sequence[torch.Tensor],
               ard: ARDVersion | None) -> list[np.ndarray]:
        """Logit maps (float32, working geometry) of frames with normalised coarse grids ``zs``.
        With ``ard`` None (no ARD trained yet): what the untrained decoder returns, the coarse map
        normalised and upsampled, computed without running the decoder (identical output; on
        640 x 256 Kolektor frames, 1 CPU thread: 1.2 ms per frame instead of 116)."""
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape, []).append(i)
        with torch.inference_mode():
            for idx in groups.values():
                for s in range(0, len(idx), 8):
                    part = idx[s:s + 8]
                    z = torch.stack([zs[i] for i in part])[:, None]
                    if ard is None:
                        logits = self._base.coarse(z, images[part[0]].shape[:2])[:, 0].float().numpy()
                    else:
                        img = preprocess(np.stack([images[i] for i in part]))
                        feat = torch.stack([feats[i] for i in part])
                        logits = ard.module(img, feat, z)[:, 0].float().numpy()
                    for i, m in zip(part, logits):
                        out[i] = m
        return out  # type: ignore[return-value]

    @staticmethod
    def to_frame(logit: np.ndarray, height: int, width: int) -> np.ndarray:
        """A working-geometry map resized (bilinear) to the frame's pixel grid."""
        if logit.shape == (height, width):
            return logit.astype(np.float32, copy=False)
        t = torch.from_numpy(np.ascontiguousarray(logit))[None, None]
        return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()

    # ------------------------------------------------------------------------ training
    def submit(self, job: LotJob) -> None:
        """Hand a closed lot to the worker (replaces a pending lot that has not started)."""
        with self._lock:
            if self._stop:
                return
            if self._pending is not None:
                self.skipped += 1
                logger.info("PGT busy: lot %s replaced by lot %s before training", self._pending.lot_id, job.lot_id)
            self._pending = job
            if self._thread is None:
                # not a daemon thread: a torch op cut short by interpreter teardown aborts the
                # process; close(), or the main thread's end, makes a round stop at its next step
                self._thread = threading.Thread(target=self._run, name="pgt", daemon=False)
                self._thread.start()
            self._wake.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no lot is pending or in training (for evaluation and tests)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (a round in progress stops at its next step)."""
        with self._lock:
            self._stop = True
            self._pending = None
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _stopping(self) -> bool:
        """close() was called, or the program is ending (its main thread finished without it:
        a daemon that could not close its engine must still exit)."""
        return self._stop or not threading.main_thread().is_alive()

    def _run(self) -> None:
        lower_priority(TIER2_NICE)  # test-time training is background work, like tier 2
        while True:
            with self._lock:
                while self._pending is None and not self._stopping():
                    self._wake.wait(1.0)
                if self._stopping():
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._round(job)
            except Exception:  # noqa: BLE001 - a failed round keeps the current ARD; counted, logged
                self.failed += 1
                logger.exception("PGT on lot %s failed; the current ARD stays in use", job.lot_id)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _round(self, job: LotJob) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        if not (all(bool(torch.isfinite(g).all()) for g in job.z) and np.isfinite(job.image_scores).all()
                and math.isfinite(job.scale) and job.scale > 0):
            self.failed += 1
            logger.error("PGT: lot %s has non-finite coarse scores; not trained on", job.lot_id)
            return
        if self.selector is not None:
            normals = list(self.selector(job.lot_id, job.image_scores, cfg.pseudo_normal_fraction))
        else:
            normals = select_pseudo_normals(job.image_scores, cfg.pseudo_normal_fraction, cfg.min_pseudo_normals)
        if len(normals) < cfg.min_pseudo_normals:
            logger.info("PGT: lot %s has %d pseudo-normal frames (< %d); not trained on", job.lot_id,
                        len(normals), cfg.min_pseudo_normals)
            return
        self.pseudo_normals[job.lot_id] = normals
        while len(self.pseudo_normals) > 64:
            self.pseudo_normals.pop(next(iter(self.pseudo_normals)))
        sample_deadline = t0 + cfg.time_budget_s * SAMPLE_BUDGET_SHARE
        samples = make_samples(job.images, job.feats, job.refs, job.z, normals, job.scale, cfg.samples_per_lot,
                               self.extract, self.scorer, self._rng, references=cfg.references,
                               border=job.border, position=job.position, drawn_share=cfg.drawn_share,
                               memory=job.memory if cfg.sample_memory else (),
                               should_stop=lambda: self._stopping() or time.monotonic() > sample_deadline)
        t1 = time.monotonic()
        if self._stopping():  # shutting down or swapped: nothing is trained, released or recorded
            return
        if not samples:
            logger.info("PGT: no training sample fitted the budget for lot %s", job.lot_id)
            return
        if len(samples) < cfg.samples_per_lot:
            logger.info("PGT: %d of %d samples for lot %s fitted half the time budget", len(samples),
                        cfg.samples_per_lot, job.lot_id)
        prev = self.current(job.recipe)
        ard = copy.deepcopy(prev.module if prev is not None else self._base)
        for p in ard.parameters():  # a released ARD is frozen; its copy trains
            p.requires_grad_(True)
        budget = max(0.0, cfg.time_budget_s - (t1 - t0))
        report = train_ard(ard, samples, cfg.steps, budget, self._rng, batch_size=cfg.batch_size,
                           crop_px=cfg.crop_px, lr=cfg.lr, cpu_share=cfg.cpu_share,
                           should_stop=self._stopping, loss_kind=cfg.loss)
        if report.stopped_by == "stop":  # shutting down or swapped: nothing is released or recorded
            return
        if report.stopped_by == "nonfinite" or not all(bool(torch.isfinite(p).all()) for p in ard.parameters()):
            self.failed += 1
            logger.error("PGT on lot %s diverged (non-finite loss or weights); %s stays in use", job.lot_id,
                         prev.version if prev is not None else "the coarse map")
            return
        if report.steps == 0:
            logger.info("PGT: no training step fitted the budget for lot %s", job.lot_id)
            return
        for p in ard.parameters():
            p.requires_grad_(False)
        n = self.trained + 1
        release = ARDVersion(ard, f"{ARD_NAME}-{self.run_id}-{n}", job.lot_id, job.recipe)
        details = {"trained_on_lot": job.lot_id, "recipe": job.recipe, "previous": prev.version if prev else None,
                   "pseudo_normals": len(normals), "samples": len(samples), "steps": report.steps,
                   "stopped_by": report.stopped_by, "loss_first": round(report.loss_first, 5),
                   "loss_last": round(report.loss_last, 5), "synth_s": round(t1 - t0, 3),
                   "train_s": round(report.seconds, 3), "width": cfg.width}
        with self._lock:
            self._current.pop(job.recipe, None)
            self._current[job.recipe] = release  # the most recently trained last
            while len(self._current) > MAX_RECIPES:
                forgotten = self._current.pop(next(iter(self._current)))
                logger.info("PGT: %s (recipe %r) forgotten: more than %d recipes", forgotten.version,
                            forgotten.recipe, MAX_RECIPES)
            self.trained = n
            self.last_report = details
        logger.info("PGT: %s trained on lot %s (%d steps, %.1f s, loss %.3f -> %.3f)", release.version,
                    job.lot_id, report.steps, time.monotonic() - t0, report.loss_first, report.loss_last)
        if self.on_model is not None:
            try:
                self.on_model(ARD_NAME, release.version, "ard", details, job.lot_id)
            except ValueError:
                logger.exception("could not record %s", release.version)
