"""PGT training samples: pseudo-normal frames with synthetic anomalies, scored as at test time.

Each sample is a pseudo-normal frame (in the engine's working geometry) with one synthetic
anomaly: either a defect drawn by the line simulator (``linewatch.acquire.defects.apply_defect``:
a scratch, a crack, a spot or a missing chunk; share ``drawn_share``) or a noise-shaped paste
(``paste_noise_anomaly``: a Perlin mask filled with another frame of the lot, flipped, or with
fractal-noise texture, after a random intensity change). The drawn shapes carry what the pastes
lack: thin, dark or bright lines and pits, the look of real cracks and scratches (on Kolektor
replays, pastes alone taught the ARD cues that lowered real pixel-AP). Its backbone features come
from the engine's own extractor and its coarse scores from the same mutual scoring as tier 2
(against other frames of the lot), normalised with the lot's scale, so the decoder trains on
exactly the kind of input it refines. A share of the samples keep
no anomaly, so the decoder also learns to leave normal surfaces alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..acquire.defects import DEFECT_KINDS, apply_defect, paste_noise_anomaly, perlin_mask
from ..models import zeroshot as zs
from ..models.ard import GRID_STRIDE, detail_maps
from ..models.backbone import preprocess

# ``extract(images)``: uint8 H x W x C frames -> C x H/8 x W/8 feature tensors (the engine's)
Extract = Callable[[Sequence[np.ndarray]], list[torch.Tensor]]

MASK_AREA = (0.002, 0.06)  # pasted anomaly area, as a fraction of the frame
# A pseudo-normal frame's cells hotter than this (lot units) are left out of training as normal
# pixels: a defective frame among the pseudo-normals would otherwise teach the decoder that its
# real defect is normal. On Kolektor about 1 % of the pixels of good frames exceed 1.0 and three
# quarters of the defect pixels do; with 10 % defective pseudo-normals the refined pixel-AP was
# 0.150 with 1.5, 0.198 with 1.0 and 0.147 with 0.5 (coarse 0.146; bench/RESULTS.md).
IGNORE_UNITS = 1.0
FEATURE_BATCH = 4


@dataclass(slots=True)
class Sample:
    """One training sample: the frame (uint8 H x W x C), its features (C x H/8 x W/8), its
    normalised coarse scores (H/8 x W/8), the anomaly mask (bool H x W, empty for a normal one) and
    the frame's detail maps (``linewatch.models.ard.detail_maps``, 2 x H x W; None: computed here)."""

    image: np.ndarray
    feat: torch.Tensor
    z: torch.Tensor
    mask: np.ndarray
    detail: torch.Tensor | None = None
    # pixels that count as neither anomaly nor normal in training: where the source frame's own
    # coarse map was already hot (``IGNORE_UNITS``), which may be a real defect in a pseudo-normal
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.detail is None:  # on the whole frame: a training crop would change its percentile
            with torch.no_grad():
                self.detail = detail_maps(preprocess(self.image[None]))[0]
        if self.ignore is None:
            self.ignore = np.zeros(self.mask.shape, dtype=bool)


def _source_for(images: Sequence[np.ndarray], i: int, rng: np.random.Generator) -> np.ndarray | None:
    """Foreign texture for frame ``i``: another frame of the lot, flipped, or None (fractal noise)."""
    h, w = images[i].shape[:2]
    others = [j for j in range(len(images)) if j != i and images[j].shape[:2] == (h, w)]
    if not others or rng.random() < 0.5:
        return None
    src = images[int(rng.choice(others))]
    if rng.random() < 0.5:
        src = src[::-1]
    if rng.random() < 0.5:
        src = src[:, ::-1]
    return np.ascontiguousarray(src)


def make_samples(images: Sequence[np.ndarray], feats: Sequence[torch.Tensor], refs: Sequence[zs.Reference],
                 test_z: Sequence[torch.Tensor], normals: Sequence[int], scale: float, n_samples: int, extract: Extract,
                 scorer: zs.Scorer,
                 rng: np.random.Generator, references: int = 6, normal_share: float = 0.2,
                 border: zs.BorderStats | None = None, drawn_share: float = 0.0,
                 position: Sequence[torch.Tensor | None] | None = None,
                 memory: Sequence[zs.Reference] = (),
                 should_stop: Callable[[], bool] | None = None) -> list[Sample]:
    """``n_samples`` training samples built on the frames ``normals`` of a lot.

    ``images`` / ``feats`` / ``refs`` are the whole lot (working geometry, features and subsampled
    reference patches as computed at tier 1); each sample's coarse scores use the subsampled
    patches of up to ``references`` other frames of the lot (four times cheaper than full grids),
    scored by the engine's ``scorer`` (both levels); the sample keeps the patch-level features.
    Fewer, subsampled references shift all distances up, so a sample's scores are put in lot units
    by matching its median to the median of its source frame's tier-2 grid ``test_z`` (the pasted
    anomaly covers too little of the frame to move a median), after the lot's calibrations as at
    tier 2: its source frame's position offset ``position[i]`` (``zeroshot.position_offset``, None
    where none applies) and the edge calibration ``border`` (``zeroshot.border_stats``). The
    ``memory`` references (earlier lots' frames) the lot was scored with at tier 2 are references
    of every sample too. ``should_stop`` is asked before each batch of ``FEATURE_BATCH`` samples:
    when it answers True the samples built so far are returned (fewer than ``n_samples``).
    """
    if not normals:
        return []
    picks = [int(normals[k % len(normals)]) for k in range(n_samples)]
    rng.shuffle(picks)
    frames, masks = [], []
    for i in picks:
        img = images[i]
        if rng.random() < normal_share:
            frames.append(img)
            masks.append(np.zeros(img.shape[:2], dtype=bool))
            continue
        h, w = img.shape[:2]
        if rng.random() < drawn_share:  # a defect shape the line simulator draws
            kind = str(rng.choice(DEFECT_KINDS))
            out, mask, _ = apply_defect(img.copy(), kind, rng)
        else:
            mask = perlin_mask(rng, h, w, threshold=float(rng.uniform(0.35, 0.6)),
                               min_area_frac=MASK_AREA[0], max_area_frac=MASK_AREA[1])
            out, mask = paste_noise_anomaly(img, rng, source=_source_for(images, i, rng), mask=mask)
        frames.append(out)
        masks.append(mask)
    samples = []
    for start in range(0, len(frames), FEATURE_BATCH):
        if should_stop is not None and should_stop():
            break
        batch = slice(start, start + FEATURE_BATCH)
        for i, img, f, m in zip(picks[batch], frames[batch], extract(frames[batch]), masks[batch]):
            others = [j for j in range(len(feats)) if j != i]
            if len(others) > references:
                others = [int(j) for j in rng.choice(others, references, replace=False)]
            against = [refs[j] for j in others] + list(memory)  # the tier-2 memory, as at tier 2
            grid = scorer.score(f, against) if against else scorer.score_self(f)
            if position:  # the source frame's position offset, as tier 2
                grid = zs.subtract_offset(grid, position[i])
            grid = zs.apply_border(grid, border)  # the lot's edge calibration, as tier 2
            zg = (grid.float() - grid.float().median()) / scale + test_z[i].float().median()
            hot = (test_z[i] > IGNORE_UNITS).numpy().repeat(GRID_STRIDE, 0).repeat(GRID_STRIDE, 1)
            samples.append(Sample(img, scorer.fine(f), zg, m, ignore=hot[:m.shape[0], :m.shape[1]] & ~m))
    return samples
