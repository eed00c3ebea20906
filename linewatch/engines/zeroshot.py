"""The default engine: zero-shot, lot-aware mutual scoring on EfficientNet-Lite0 patch features.

Tier 1 (``infer``): each frame is compared with up to ``reference_frames`` other frames, most
recent first, preferring its own lot: the other frames of the same lot in this batch, then the
frames of this lot seen so far, then the previous lot. The very first frame ever, alone in its
batch with nothing seen before, is scored against itself with each patch's neighbourhood
excluded (``self_scores``): a patch with no look-alike elsewhere in its own image is suspicious.
That is weaker than mutual scoring but never a fake "all clear".

Tier 2 (``lot_closed``): the whole lot is mutually scored (every frame against the others, at most
``tier2_references``), each cell is calibrated against the same cell of the lot's frames of the
same geometry (``position_min_frames``, ``linewatch.models.zeroshot.position_stats``: on a
fixtured part a place that is hot on every frame is normal there), the rings of cells at the frame
edge are calibrated against the lot's interior (``border_bands``,
``linewatch.models.zeroshot.border_stats``) and the lot's features become the "previous lot"
references. With ``tier2_memory_frames`` > 0 the reference patches of that many frames of earlier
lots (the most recent) also take part, while the number of nearest distances averaged stays the
lot's: a look that recurs on a few frames of every lot (a pen mark, a grinding pattern) is normal
once the lot and the memory together show it often enough. Tier 1 calibrates positions and edges
the same way with the statistics of the last closed lot's tier-1 grids (none before the first lot
closes). Tier-2 maps are in lot score units (``linewatch.models.ard.normalise_grid``: minus the
lot's median patch score, divided by the lot's typical 50-99th percentile span), which makes
scores comparable from lot to lot and product to product; the image score is the mean of the top
``IMAGE_TOP_FRACTION`` of the map, as at tier 1. (Before the edge calibration, tier 2 took the top
5 %: hot frame edges then filled the top 1 % of defect-free frames. On the calibrated maps the top
1 % ranks frames better: image-AUROC Kolektor 0.902 -> 0.911, magnetic_tile 0.770 -> 0.808 on the
same grids, bench/RESULTS.md.) With
refinement enabled (``enable_refinement``, config ``[refine]``), the coarse lot maps are then
refined by the AnoRefiner decoder trained on an earlier lot, and this lot is handed to the PGT
worker (``linewatch.refine.worker``); the engine then also keeps each frame resized to its working
geometry until the lot closes. Tier-2 maps are in the ARD's logit units then (also before the
first ARD exists: the untrained decoder returns the normalised coarse map), and
``last_tier2_model`` names the ARD version that produced the last lot's maps.

``infer`` (inspector thread) and ``lot_closed`` (lot-closer thread) run concurrently: the lot
banks and the previous-lot references are touched only under ``_lock``; the heavy work runs
outside it.

Geometry: with ``tile=True`` a frame keeps its aspect ratio: its shorter side is resized to
``input_size``, the longer to a multiple of 16, and the result is cut into overlapping square
``input_size`` tiles whose feature grids are stitched (weighted average in the overlaps). Every
call to the feature extractor therefore sees one fixed shape, which suits exported engines.
With ``tile=False`` frames are squashed to ``input_size`` x ``input_size``.

Scoring goes through one ``linewatch.models.zeroshot.Scorer`` (tier 1, tier 2 and the PGT
samples alike). With ``context_weight`` > 0 the extractor also returns the backbone's stride-32
stage after the patch-level channels, and every score adds that context level's own mutual score,
computed on its coarse grid (large defects whose patches each have a look-alike somewhere); the ARD
still sees the patch level only.

The feature extractor is a swappable callable (float32 N x 3 x S x S normalised numpy batch in,
float32 N x C x S/8 x S/8 numpy features out), so ONNX Runtime or TensorRT extractors can replace
the torch one without touching the scoring.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..frames import EngineOutput, FrameMeta
from ..models import zeroshot as zs
from ..models.ard import grid_scale, lot_median, normalise_grid
from ..models.backbone import (CONTEXT_CHANNELS, FEATURE_CHANNELS, STRIDE, SIZE_MULTIPLE, PatchFeatures, patch_channels,
                               preprocess, resize_uint8)
from .base import Tier2Unavailable

logger = logging.getLogger(__name__)

FeatureExtractor = Callable[[np.ndarray], np.ndarray]

TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour
# lots whose features are kept until lot_closed: the open one plus closed lots still queued for the
# lot closer (its queue holds 8; beyond that it skips a lot explicitly). An older one is rolled over.
MAX_OPEN_LOTS = 10
MAX_LOT_FRAMES = 256  # frames of one lot kept for tier 2 (oldest dropped beyond, and counted)
SMOOTH_SIGMA_CELLS = 0.5  # default Gaussian blur of the patch-score grid (4 px of the resized frame)
IMAGE_TOP_FRACTION = 0.01  # image score = mean of the top 1 % of the map
# a lot with fewer frames borrows the score scale of the last larger lot: its own scale would be
# its own frames' spread (a lot of one: its own defect sets the unit and vanishes in it); from 3
# frames on, the median of the frames' spreads is not set by one defective frame
MIN_SCALE_FRAMES = 3


class TorchExtractor:
    """``PatchFeatures`` in torch, traced and frozen (BN folded) for fast CPU inference."""

    def __init__(self, out_dim: int, device: str = "cpu", threads: int = 0, aggregate: bool = True,
                 jit: bool = True, context: bool = False):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.module = PatchFeatures(out_dim=out_dim, aggregate=aggregate, context=context).to(self.device)
        self.name = self.module.name
        self.version = self.module.version
        self.out_dim = self.module.out_dim
        self._jit = jit
        self._compiled: dict[tuple[int, ...], Callable] = {}

    def _runner(self, shape: tuple[int, ...]) -> Callable:
        if not self._jit:
            return self.module
        key = tuple(shape[1:])
        fn = self._compiled.get(key)
        if fn is None:
            example = torch.zeros((1, *key), device=self.device)
            with torch.inference_mode():
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(
                    torch.jit.trace(self.module, example, check_trace=False)))
            self._compiled[key] = fn
        return fn

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self._runner(tuple(x.shape))(x)
        return out.float().cpu().numpy()


@dataclass(slots=True)
class _Entry:
    """One frame's features kept for later reference (and for tier 2)."""

    frame_id: int
    feat: torch.Tensor  # C x h x w
    ref: zs.Reference  # the subsampled reference patches (and context cells)
    frame_hw: tuple[int, int]
    image: np.ndarray | None = None  # the frame in working geometry, kept only for refinement
    tier1: torch.Tensor | None = None  # its tier-1 score grid (before edge calibration)
    recipe: str = ""  # its lot's recipe (refinement keeps one ARD per recipe)


@dataclass(frozen=True, slots=True)
class _Geometry:
    """How one frame is resized and cut: resized to (height, width), tiles at ``offsets``
    (y, x) in resized pixels, each ``size`` square."""

    height: int
    width: int
    size: int
    offsets: tuple[tuple[int, int], ...]


def plan_geometry(height: int, width: int, input_size: int, tile: bool) -> _Geometry:
    """Resize / tiling plan for a frame of ``height`` x ``width`` pixels."""
    s = int(input_size) // SIZE_MULTIPLE * SIZE_MULTIPLE
    if not tile or height == width:
        return _Geometry(s, s, s, ((0, 0),))
    long_px = max(height, width) * s / min(height, width)
    long_px = max(s, int(round(long_px / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    step = s * (1.0 - TILE_OVERLAP)
    n = max(1, math.ceil((long_px - s) / step) + 1)
    starts = [0] if n == 1 else [int(round(i * (long_px - s) / (n - 1) / STRIDE)) * STRIDE for i in range(n)]
    if height > width:
        return _Geometry(long_px, s, s, tuple((y, 0) for y in starts))
    return _Geometry(s, long_px, s, tuple((0, x) for x in starts))


def _tile_weight(cells: int) -> np.ndarray:
    """Per-cell stitching weight of a tile: low at the borders (zero padding there), 1 inside."""
    ramp = np.minimum(np.arange(cells) + 1, np.arange(cells)[::-1] + 1).astype(np.float32)
    w1 = np.minimum(ramp / 3.0, 1.0)
    return np.outer(w1, w1)


class ZeroShotEngine:
    """Zero-shot, lot-aware anomaly scoring (implements ``linewatch.engines.base.Engine``).

    ``extractor`` overrides the feature extractor (for another runtime or a test fake); it must
    map a float32 N x 3 x S x S batch to float32 N x C x S/8 x S/8 features. Without one,
    ``cfg.backend`` picks it (``linewatch.runtime.create_extractor``); ``batch_size`` is the batch
    a TensorRT plan is optimised for.
    """

    def __init__(self, cfg, extractor: FeatureExtractor | None = None, *, ref_stride: int = 2,
                 tier2_ref_stride: int | None = None, tier2_references: int | None = None,
                 max_lot_frames: int = MAX_LOT_FRAMES, batch_size: int = 4):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # the context level: the extractor's channels after the patch level's (see zs.Scorer)
        context = float(getattr(cfg, "context_weight", 0.0))
        # tier 2: frames of earlier lots lending their reference patches (0 = none)
        self.memory_frames = int(getattr(cfg, "tier2_memory_frames", 0))
        if extractor is None:  # onnxruntime / tensorrt: exported (and built) on first use
            from ..runtime import create_extractor

            extractor = create_extractor(cfg, batch_size=batch_size)
        self.extractor = extractor
        self.name = "zeroshot"
        self.has_tier2 = True  # every lot's frames are judged again at lot end (Engine protocol)
        ext_version = getattr(extractor, "version", type(extractor).__name__)
        self.border_bands = int(getattr(cfg, "border_bands", 0))  # edge rings calibrated per lot
        # frames of one geometry needed for the per-cell position calibration (0 = off)
        self.position_min_frames = int(getattr(cfg, "position_min_frames", 0))
        # blur of the published maps (grid cells); the ARD's coarse skip is blurred the same way
        self.smooth_cells = float(getattr(cfg, "smooth_cells", SMOOTH_SIGMA_CELLS))
        self.scorer = zs.Scorer(float(cfg.topk_fraction), patch_channels(cfg.feature_dim) if context > 0 else None,
                                context)
        self.version = (f"{ext_version}-{'tile' if cfg.tile else 'sq'}{cfg.input_size}-r{cfg.reference_frames}"
                        f"-k{cfg.topk_fraction:g}-rs{ref_stride}-b{self.border_bands}-p{self.position_min_frames}"
                        + (f"-c{context:g}" if context > 0 else "")
                        + (f"-m{self.memory_frames}" if self.memory_frames else "")
                        + (f"-s{self.smooth_cells:g}" if self.smooth_cells != SMOOTH_SIGMA_CELLS else ""))
        self.ref_stride = int(ref_stride)
        # tier-2 budget: the config's unless given here (tests, evaluation)
        self.tier2_ref_stride = int(tier2_ref_stride or getattr(cfg, "tier2_ref_stride", 1))
        self.tier2_references = int(tier2_references or getattr(cfg, "tier2_references", 32))
        self.max_lot_frames = int(max_lot_frames)
        self._lots: dict[str, deque[_Entry]] = {}
        self._previous: list[_Entry] = []
        # their reference patches, the newest memory_frames (guarded by _lock, like _previous)
        self._memory: deque[zs.Reference] = deque(maxlen=max(1, self.memory_frames))
        self.dropped_bank_frames = 0  # frames pushed out of a full lot bank (no tier-2 output)
        self.self_scored_frames = 0  # frames scored against themselves (nothing else to compare)
        self.nonfinite_frames = 0  # frames with non-finite features (FAULT; never kept as references)
        self._lock = threading.Lock()  # guards _lots, _previous, _memory (infer vs lot_closed threads)
        self.refiner = None  # linewatch.refine.worker.Refiner when refinement is enabled
        self.last_tier2_model: dict[str, str] | None = None  # model behind the last lot_closed maps
        # the last lot's coarse maps when refined, kept only for evaluation (``keep_coarse``)
        self.keep_coarse = False
        self.last_coarse: dict[int, EngineOutput] = {}
        # (scale, offset) of the last lot with at least MIN_SCALE_FRAMES frames: a smaller lot
        # borrows it (its own would measure its own defect as the norm)
        self._norm: tuple[float, float] | None = None
        # tier-1 position and edge calibration, from the last closed lot's tier-1 grids (one
        # attribute: the lot closer replaces both at once while the inspector reads them)
        self._tier1_calibration: tuple[zs.PositionStats, zs.BorderStats] = ([], {})

    # ------------------------------------------------------------------------------ features
    def features(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Patch features (C x h x w torch tensors) of uint8 H x W x C frames, tiles stitched."""
        plans = [plan_geometry(im.shape[0], im.shape[1], self.cfg.input_size, self.cfg.tile) for im in images]
        crops = []
        for im, g in zip(images, plans):
            if im.ndim == 2:
                im = im[..., None]
            r = resize_uint8(im, g.height, g.width)
            crops.extend(r[y:y + g.size, x:x + g.size] for y, x in g.offsets)
        batch = preprocess(np.stack(crops)).numpy()
        feats = np.asarray(self.extractor(batch), dtype=np.float32)
        if self.scorer.has_context and feats.shape[1] != self.scorer.fine_channels + CONTEXT_CHANNELS:
            raise RuntimeError(f"the feature extractor gives {feats.shape[1]} channels; with context_weight > 0 "
                               f"the engine needs {self.scorer.fine_channels} patch-level channels followed by "
                               f"{CONTEXT_CHANNELS} context channels (re-export the backbone)")
        out, i = [], 0
        for g in plans:
            n = len(g.offsets)
            if n == 1:
                out.append(torch.from_numpy(feats[i].copy()))
            else:
                out.append(torch.from_numpy(self._stitch(feats[i:i + n], g)))
            i += n
        return out

    @staticmethod
    def _stitch(tiles: np.ndarray, g: _Geometry) -> np.ndarray:
        c, th, tw = tiles.shape[1:]
        acc = np.zeros((c, g.height // STRIDE, g.width // STRIDE), dtype=np.float32)
        wsum = np.zeros(acc.shape[1:], dtype=np.float32)
        w = _tile_weight(th)
        for t, (y, x) in zip(tiles, g.offsets):
            ys, xs = y // STRIDE, x // STRIDE
            acc[:, ys:ys + th, xs:xs + tw] += t * w
            wsum[ys:ys + th, xs:xs + tw] += w
        return acc / np.maximum(wsum, 1e-6)

    def _entry(self, meta: FrameMeta, feat: torch.Tensor, hw: tuple[int, int]) -> _Entry:
        return _Entry(meta.frame_id, feat, self.scorer.reference(feat, self.ref_stride, meta.frame_id), hw,
                      recipe=meta.recipe)

    def _output(self, patch_scores: torch.Tensor, hw: tuple[int, int]) -> EngineOutput:
        smap = zs.to_pixel_map(patch_scores, hw[0], hw[1], self.smooth_cells)
        return EngineOutput(score_map=smap, image_score=zs.image_score(smap, IMAGE_TOP_FRACTION))

    # -------------------------------------------------------------------------------- engine
    def warmup(self, height: int, width: int, channels: int) -> None:
        """Run the extractor once at this frame size (compiles / traces; keeps no state)."""
        dummy = np.full((height, width, channels), 128, dtype=np.uint8)
        self.features([dummy, dummy])

    def infer(self, images: Sequence[np.ndarray], metas: Sequence[FrameMeta]) -> list[EngineOutput]:
        """Tier-1 scores for a batch (see the module docstring for the choice of references)."""
        if len(images) != len(metas):
            raise ValueError(f"{len(images)} images but {len(metas)} metas")
        if not images:
            return []
        feats = self.features(images)
        entries = [self._entry(m, f, (im.shape[0], im.shape[1])) for im, m, f in zip(images, metas, feats)]
        # a frame with non-finite features (a broken backbone run) gets a NaN score, so FAULT at
        # tier 1; it must be no other frame's reference, nor reach tier 2's calibrations and scale,
        # or one bad frame would turn a whole lot (and the next lot's tier 1) into FAULT
        finite = [bool(torch.isfinite(e.feat).all()) for e in entries]
        if not all(finite):
            self.nonfinite_frames += finite.count(False)
            logger.warning("%d frame(s) with non-finite features: not kept as references or for tier 2",
                           finite.count(False))
        if self.refiner is not None:
            for im, e in zip(images, entries):
                e.image = self.working_image(im)
        outputs = []
        for i, (meta, e) in enumerate(zip(metas, entries)):
            with self._lock:
                refs = self._references(i, metas, entries, finite)
            if refs:
                s = self.scorer.score(e.feat, refs)
            else:
                self.self_scored_frames += 1
                s = self.scorer.score_self(e.feat)
            e.tier1 = s
            position, border = self._tier1_calibration
            s = zs.apply_border(zs.apply_position(s, e.frame_hw, position), border)
            outputs.append(self._output(s, e.frame_hw))
        with self._lock:
            for meta, e, ok in zip(metas, entries, finite):
                if ok:
                    self._bank(meta.lot_id).append(e)
        return outputs

    def working_image(self, image: np.ndarray) -> np.ndarray:
        """A frame resized to the engine's working geometry (what the ARD sees), uint8 H x W x C."""
        if image.ndim == 2:
            image = image[..., None]
        g = plan_geometry(image.shape[0], image.shape[1], self.cfg.input_size, self.cfg.tile)
        out = resize_uint8(image, g.height, g.width)
        return out.copy() if np.shares_memory(out, image) else out  # never keep a view of the ring

    def _references(self, i: int, metas: Sequence[FrameMeta], entries: list[_Entry],
                    finite: Sequence[bool]) -> list[zs.Reference]:
        """Frame ``i``'s references: the batch's other frames of its lot (``finite`` ones only),
        newest first, then its lot's kept frames, then the previous lot's, up to the cap."""
        cap = self.cfg.reference_frames
        lot = metas[i].lot_id
        refs = [entries[j].ref for j in range(len(entries) - 1, -1, -1)
                if j != i and metas[j].lot_id == lot and finite[j]][:cap]
        if len(refs) < cap:
            bank = self._lots.get(lot, ())
            refs.extend(e.ref for e in list(bank)[::-1][:cap - len(refs)])
        if len(refs) < cap:
            refs.extend(e.ref for e in self._previous[::-1][:cap - len(refs)])
        return refs

    def _bank(self, lot_id: str) -> deque[_Entry]:
        bank = self._lots.get(lot_id)
        if bank is None:
            while len(self._lots) >= MAX_OPEN_LOTS:
                stale = next(iter(self._lots))
                logger.warning("lot %r left without tier 2 (never closed, or its tier 2 was skipped); its "
                               "features become the previous lot", stale)
                self._roll(self._lots.pop(stale))
            bank = self._lots[lot_id] = deque()
        if len(bank) >= self.max_lot_frames:
            bank.popleft()
            self.dropped_bank_frames += 1
        return bank

    def _roll(self, entries: Sequence[_Entry]) -> None:
        """A lot leaves (closed, skipped or evicted; under ``_lock``): its last frames become the
        previous lot's references and its frames join the tier-2 memory."""
        if entries:
            self._previous = list(entries)[-self.cfg.reference_frames:]
            if self.memory_frames:
                self._memory.extend(e.ref for e in entries)

    def lot_skipped(self, lot_id: str) -> None:
        """A closed lot whose tier 2 will not run (the lot closer is behind): its frames become the
        next frames' references (and memory) as at a lot close, and its bank is let go, so that
        it does not later push out the bank of a lot still waiting for its tier 2."""
        with self._lock:
            bank = self._lots.pop(lot_id, None)
            if bank:
                self._roll(bank)

    def lot_closed(self, lot_id: str) -> dict[int, EngineOutput]:
        """Tier 2: the whole lot (as kept in the bank) mutually scored, keyed by frame id; refined
        by the ARD when refinement is enabled (see the module docstring)."""
        with self._lock:
            bank = self._lots.pop(lot_id, None)
            previous = self._previous
            memory = list(self._memory)
        if not bank:
            return {}
        entries = list(bank)
        scores = self.scorer.score_lot([e.feat for e in entries], max_references=self.tier2_references,
                                       ref_stride=self.tier2_ref_stride, memory=memory)
        if len(entries) == 1 and previous:  # a lot of one: the previous lot is a better reference
            scores = [self.scorer.score(entries[0].feat, [e.ref for e in previous])]
        # each cell against the same cell of the lot's frames of the same geometry, then the edge
        # rings against the interior
        position = zs.position_stats(scores, [e.frame_hw for e in entries], self.position_min_frames)
        offsets = [zs.position_offset(position, e.frame_hw, s.shape) for e, s in zip(entries, scores)]
        scores = [zs.subtract_offset(s, o) for s, o in zip(scores, offsets)]
        border = zs.border_stats(scores, self.border_bands)
        scores = [zs.apply_border(s, border) for s in scores]
        # tier 1 is calibrated with what this lot's tier-1 grids showed (for the next frames)
        tier1 = [e for e in entries if e.tier1 is not None]
        if len(tier1) >= 2:
            t1_position = zs.position_stats([e.tier1 for e in tier1], [e.frame_hw for e in tier1],
                                            self.position_min_frames)
            t1_grids = [zs.apply_position(e.tier1, e.frame_hw, t1_position) for e in tier1]
            self._tier1_calibration = (t1_position, zs.border_stats(t1_grids, self.border_bands))
        # the lot's frames become the next frames' references (and memory) even when its tier 2
        # cannot be judged below
        with self._lock:
            self._roll(entries)
        if len(scores) >= MIN_SCALE_FRAMES:
            scale, offset = grid_scale(scores), lot_median(scores)
            if math.isfinite(scale) and math.isfinite(offset):
                self._norm = (scale, offset)
            elif self._norm is not None:  # a non-finite grid spoilt the lot's own: borrow the last
                logger.warning("lot %r has a non-finite score scale; the last lot's is used", lot_id)
                scale, offset = self._norm
            else:
                raise Tier2Unavailable(f"lot {lot_id!r} has a non-finite score scale and no earlier lot lends "
                                       f"one; tier 1 stands")
        elif self._norm is not None:
            scale, offset = self._norm
        else:
            raise Tier2Unavailable(f"lot {lot_id!r} has {len(scores)} frame(s), too few to set its score scale "
                                   f"(< {MIN_SCALE_FRAMES}), and no earlier lot lends one; tier 1 stands")
        z = [normalise_grid(s, scale, offset) for s in scores]
        coarse = {e.frame_id: self._output(g, e.frame_hw) for e, g in zip(entries, z)}
        if self.refiner is None or any(e.image is None for e in entries):
            self.last_tier2_model = {"name": self.name, "version": self.version}
            return coarse
        return self._refine_lot(lot_id, entries, z, scale, coarse, offsets, border, memory)

    # ------------------------------------------------------------------------- refinement
    def enable_refinement(self, refine_cfg, on_model=None, selector=None) -> None:
        """Refine tier 2 with AnoRefiner (``refine_cfg``: config ``[refine]``). ``on_model`` is
        called as ``(name, version, kind, details, trained_on_lot)`` for each new ARD version;
        ``selector`` overrides the pseudo-normal choice (evaluation only)."""
        from ..refine.worker import Refiner

        if self.refiner is not None:
            self.refiner.close()
        # the ARD sees the patch level only
        dim = (self.scorer.fine_channels or getattr(self.extractor, "out_dim", 0) or self.cfg.feature_dim
               or FEATURE_CHANNELS)
        self.refiner = Refiner(refine_cfg, dim, self.features, self.scorer, on_model=on_model, selector=selector,
                               skip_sigma=self.smooth_cells)

    def _refine_lot(self, lot_id: str, entries: list[_Entry], z: list[torch.Tensor], scale: float,
                    coarse: dict[int, EngineOutput], offsets: list[torch.Tensor | None],
                    border: zs.BorderStats, memory: list[zs.Reference]) -> dict[int, EngineOutput]:
        from ..refine.worker import LotJob

        refiner = self.refiner
        recipe = entries[0].recipe
        ard = refiner.current(recipe)  # trained on an earlier lot of this recipe (None before one was)
        logits = refiner.refine([e.image for e in entries], [self.scorer.fine(e.feat) for e in entries], z, ard)
        self.last_coarse = coarse if self.keep_coarse else {}
        if not all(np.isfinite(m).all() for m in logits):
            # a broken decoder must not turn the lot's maps into NaN (no regions: a silent OK)
            logger.error("ARD %s gave non-finite maps for lot %s: its coarse maps are published",
                         ard.version if ard is not None else "(none)", lot_id)
            self.last_tier2_model = {"name": self.name, "version": self.version}
            return coarse
        out = {}
        for e, m in zip(entries, logits):
            smap = refiner.to_frame(m, e.frame_hw[0], e.frame_hw[1])
            # the ARD refines localisation; the frame's score stays the coarse one (the refined
            # maps' top-1 % mean ranked frames worse: Kolektor image-AUROC 0.77 vs 0.85 coarse),
            # but never above the refined map's peak: an NG score must have a region above the
            # threshold in the map it is published with (with the shipped peak bound the peak is
            # the coarse one, which is never below the coarse score, so this changes nothing)
            score = min(coarse[e.frame_id].image_score, float(smap.max()))
            out[e.frame_id] = EngineOutput(score_map=smap, image_score=score)
        self.last_tier2_model = ard.model if ard is not None else {"name": self.name, "version": self.version}
        refiner.submit(LotJob(lot_id, [e.image for e in entries], [self.scorer.fine(e.feat) for e in entries],
                              [e.ref for e in entries], z, [coarse[e.frame_id].image_score for e in entries],
                              scale, border, offsets, memory, recipe=recipe))
        return out

    def close(self) -> None:
        """Forget all kept features; tell the PGT worker to stop (without waiting for it: close
        runs on the inspector thread when the engine is swapped, and must not stall tier 1)."""
        if self.refiner is not None:
            self.refiner.close(timeout_s=0.0)
        with self._lock:
            self._lots.clear()
            self._previous = []
            self._memory.clear()
