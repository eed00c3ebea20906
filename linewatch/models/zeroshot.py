"""MuSc-style mutual scoring: pure functions on patch features, score maps and regions.

A patch is anomalous when it has no close match in the other images of the lot. For each patch
of a frame we take its nearest-patch (L2) distance to each reference image, then average the
smallest ``topk_fraction`` of those per-reference distances, so that a few defective references
(which may contain the same kind of defect elsewhere) do not hide a defect.

Features are torch tensors C x h x w (one image) or N x C x h x w; distances use one matrix
product per reference (``|a|^2 + |b|^2 - 2 a.b``), the fast path on CPU and GPU alike.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..frames import Region

logger = logging.getLogger(__name__)

# Patches within this many grid cells of a patch are "itself" when an image is scored against
# itself (the first frame ever, with no other frame to compare with): 3x3 aggregated features of
# neighbouring cells overlap, so they would match trivially.
SELF_EXCLUDE_RADIUS = 3


def flat_patches(feat: torch.Tensor) -> torch.Tensor:
    """C x h x w -> (h*w) x C, contiguous."""
    return feat.reshape(feat.shape[0], -1).T.contiguous()


def subsample_reference(feat: torch.Tensor, stride: int, phase: int = 0) -> torch.Tensor:
    """Keep every ``stride``-th cell of a C x h x w reference grid, shifted by ``phase`` (0 ..
    stride^2-1) so that different references cover different sub-grids. Returns M x C."""
    if stride <= 1:
        return flat_patches(feat)
    oy, ox = divmod(phase % (stride * stride), stride)
    return flat_patches(feat[:, oy::stride, ox::stride])


def nn_distance(query: torch.Tensor, ref: torch.Tensor, query_sq: torch.Tensor | None = None,
                chunk: int = 8192) -> torch.Tensor:
    """For each row of ``query`` (P x C) the L2 distance to its nearest row of ``ref`` (M x C).

    ``query_sq`` (the rows' squared norms) may be passed in when the same query meets many refs.
    """
    rn = (ref * ref).sum(1).unsqueeze(0)
    qn = (query * query).sum(1) if query_sq is None else query_sq
    out = torch.empty(query.shape[0], dtype=query.dtype, device=query.device)
    for s in range(0, query.shape[0], chunk):
        # min over refs of |r|^2 - 2 q.r, then add |q|^2: one GEMM, one reduction
        out[s:s + chunk] = torch.addmm(rn, query[s:s + chunk], ref.T, beta=1.0, alpha=-2.0).amin(1)
    return out.add_(qn).clamp_min_(0).sqrt_()


def pair_nn_distances(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions at once for two flattened grids: (for each row of a, its nearest distance
    in b; for each row of b, its nearest distance in a). One GEMM instead of two."""
    an, bn = (a * a).sum(1), (b * b).sum(1)
    d2 = torch.addmm(bn.unsqueeze(0), a, b.T, beta=1.0, alpha=-2.0).add_(an.unsqueeze(1))
    return d2.amin(1).clamp_min_(0).sqrt_(), d2.amin(0).clamp_min_(0).sqrt_()


def topk_mean(dists: torch.Tensor, topk_fraction: float, counted: int | None = None) -> torch.Tensor:
    """P x R per-reference distances -> P scores: mean of the smallest ceil-ish fraction of
    ``counted`` references (None: all R). With ``counted`` < R the number averaged stays that of
    the first ``counted`` references while the others join the choice (``lot_mutual_scores``'
    memory)."""
    r = dists.shape[1]
    k = max(1, min(r, int(round(topk_fraction * (r if counted is None else counted)))))
    if k == r:
        return dists.mean(1)
    return dists.topk(k, dim=1, largest=False).values.mean(1)


def mutual_scores(query: torch.Tensor, refs: Sequence[torch.Tensor], topk_fraction: float) -> torch.Tensor:
    """Patch scores of flattened queries (P x C) against references (each M_r x C) -> P."""
    if not refs:
        raise ValueError("mutual_scores needs at least one reference")
    qn = (query * query).sum(1)
    d = torch.stack([nn_distance(query, r, qn) for r in refs], dim=1)
    return topk_mean(d, topk_fraction)


def self_scores(feat: torch.Tensor, exclude_radius: int = SELF_EXCLUDE_RADIUS) -> torch.Tensor:
    """Score a C x h x w grid against itself, excluding each patch's (2r+1)^2 neighbourhood.

    Used when there is no other image at all: defects are rare within an image, so a patch with no
    close match elsewhere in the same image is suspicious. Returns h x w.
    """
    c, h, w = feat.shape
    x = flat_patches(feat)
    n = x.shape[0]
    d2 = (x * x).sum(1, keepdim=True) + (x * x).sum(1).unsqueeze(0) - 2.0 * (x @ x.T)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    near = ((yy[:, None] - yy[None, :]).abs() <= exclude_radius) & \
           ((xx[:, None] - xx[None, :]).abs() <= exclude_radius)
    if bool(near.all()):  # the grid is too small to exclude anything: fall back to plain self-NN
        near = torch.eye(n, dtype=torch.bool)
    d2 = d2.masked_fill(near.to(d2.device), float("inf"))
    return d2.amin(1).clamp_min(0).sqrt().reshape(h, w)


def lot_mutual_scores(feats: Sequence[torch.Tensor], topk_fraction: float, max_references: int = 0,
                      ref_stride: int = 1, memory: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Whole-lot scoring (tier 2): each C x h_i x w_i grid against all the others.

    ``max_references`` > 0 bounds the references per image (evenly spread over the lot, so the
    cost grows linearly with the lot, not quadratically). ``ref_stride`` > 1 subsamples each
    reference grid (a different phase per image). Grids may differ in size. Returns one h_i x w_i
    score grid per image. A lot of one image is scored against itself (``self_scores``).

    ``memory``: reference rows (M_r x C each) of frames of earlier lots, extra references for every
    image. The number of nearest distances averaged stays the lot's (``topk_mean``'s ``counted``),
    so a patch counts as normal once its look-alikes recur in that many frames of the lot and the
    memory together.
    """
    n = len(feats)
    if n == 1:
        return [self_scores(feats[0])]
    refs_of = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if max_references and len(others) > max_references:
            step = len(others) / max_references
            others = [others[int(k * step)] for k in range(max_references)]
        refs_of.append(others)
    flats = [flat_patches(f) for f in feats]
    dist: dict[tuple[int, int], torch.Tensor] = {}  # (query, ref) -> nearest distance per query patch
    if ref_stride <= 1:  # full grids: each pair's distance matrix serves both directions
        for i in range(n):
            for j in refs_of[i]:
                if (i, j) not in dist:
                    dist[(i, j)], dist[(j, i)] = pair_nn_distances(flats[i], flats[j])
    else:
        subs = [subsample_reference(f, ref_stride, i) for i, f in enumerate(feats)]
        for i in range(n):
            qn = (flats[i] * flats[i]).sum(1)
            for j in refs_of[i]:
                dist[(i, j)] = nn_distance(flats[i], subs[j], qn)
    out = []
    for i in range(n):
        cols = [dist[(i, j)] for j in refs_of[i]]
        if memory:
            qn = (flats[i] * flats[i]).sum(1)
            cols.extend(nn_distance(flats[i], m, qn) for m in memory)
        d = torch.stack(cols, dim=1)
        out.append(topk_mean(d, topk_fraction, counted=len(refs_of[i])).reshape(feats[i].shape[1:]))
    return out


# ---------------------------------------------------------------------------- context level
# The context level (the backbone's stride-32 stage, upsampled onto the stride-8 grid with the
# other levels) is scored on every CONTEXT_STRIDE-th cell of the grid: its native resolution, so
# its distances cost about 1/256 of the patch level's.
CONTEXT_STRIDE = 4


@dataclass(frozen=True, slots=True)
class Reference:
    """What a frame lends as a reference: its (subsampled) patch rows M x C and, with a context
    level, its context cells M' x C' (None without one)."""

    patches: torch.Tensor
    context: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Scorer:
    """Mutual scoring of whole feature grids, with an optional context level.

    A feature grid's first ``fine_channels`` channels are the patch level (None: all of them).
    The remaining channels, when ``context_weight`` > 0, are the context level: scored the same way
    on its own coarse grid (``CONTEXT_STRIDE``), upsampled and added with ``context_weight``. A
    patch in a large defect (a break, a fray, a stain) can match some patch of another frame while
    its neighbourhood does not; a thin crack is the reverse, and the coarse level only blurs it.
    """

    topk_fraction: float
    fine_channels: int | None = None
    context_weight: float = 0.0

    @property
    def has_context(self) -> bool:
        return self.context_weight > 0 and self.fine_channels is not None

    def fine(self, feat: torch.Tensor) -> torch.Tensor:
        """The patch-level channels of a C x h x w (or N x C x h x w) grid: a view."""
        if self.fine_channels is None:
            return feat
        return feat.narrow(-3, 0, self.fine_channels)

    def context(self, feat: torch.Tensor) -> torch.Tensor:
        """The context level of a C x h x w grid at its native resolution: C' x h' x w'."""
        o = CONTEXT_STRIDE // 2
        return feat[self.fine_channels:, o::CONTEXT_STRIDE, o::CONTEXT_STRIDE]

    def reference(self, feat: torch.Tensor, stride: int = 1, phase: int = 0) -> Reference:
        """A frame's reference: its patch rows subsampled by ``stride`` (``subsample_reference``)
        and its context cells."""
        ctx = flat_patches(self.context(feat)) if self.has_context else None
        return Reference(subsample_reference(self.fine(feat), stride, phase), ctx)

    def _with_context(self, grid: torch.Tensor, ctx_grid: torch.Tensor) -> torch.Tensor:
        return grid + self.context_weight * _resize_grid(ctx_grid, grid.shape)

    def score(self, feat: torch.Tensor, refs: Sequence[Reference]) -> torch.Tensor:
        """The h x w score grid of a C x h x w grid against ``refs`` (at least one)."""
        fine = self.fine(feat)
        grid = mutual_scores(flat_patches(fine), [r.patches for r in refs], self.topk_fraction)
        grid = grid.reshape(fine.shape[1:])
        if not self.has_context:
            return grid
        ctx = self.context(feat)
        cg = mutual_scores(flat_patches(ctx), [r.context for r in refs], self.topk_fraction)
        return self._with_context(grid, cg.reshape(ctx.shape[1:]))

    def score_self(self, feat: torch.Tensor) -> torch.Tensor:
        """``self_scores`` of a grid (nothing else to compare with), both levels."""
        grid = self_scores(self.fine(feat))
        if not self.has_context:
            return grid
        exclude = max(1, SELF_EXCLUDE_RADIUS // CONTEXT_STRIDE)
        return self._with_context(grid, self_scores(self.context(feat), exclude))

    def score_lot(self, feats: Sequence[torch.Tensor], max_references: int = 0,
                  ref_stride: int = 1, memory: Sequence[Reference] = ()) -> list[torch.Tensor]:
        """``lot_mutual_scores`` of whole grids, with the ``memory`` of earlier frames' references
        (both levels); the context level always with full grids."""
        grids = lot_mutual_scores([self.fine(f) for f in feats], self.topk_fraction, max_references, ref_stride,
                                  [r.patches for r in memory])
        if not self.has_context:
            return grids
        ctx = lot_mutual_scores([self.context(f) for f in feats], self.topk_fraction, max_references,
                                memory=[r.context for r in memory])
        return [self._with_context(g, c) for g, c in zip(grids, ctx)]


# ------------------------------------------------------------------------ border calibration
BORDER_MIN_CELLS = 32  # a band (or the interior) with fewer cells in the lot is left as it is
# the spread of a band: its 90th percentile above its median (the 99th was as good on KolektorSDD
# and magnetic_tile but followed the defects on the synthetic line, where 60 % of frames have one)
BORDER_SPREAD_QUANTILE = 0.9


@functools.lru_cache(maxsize=32)
def border_bands(height: int, width: int, bands: int) -> torch.Tensor:
    """h x w long tensor: each cell's distance (in cells) to the nearest grid edge, capped at
    ``bands`` (``bands`` = the interior). Cached per shape: do not modify the result."""
    i = torch.arange(height)
    j = torch.arange(width)
    di = torch.minimum(i, i.flip(0))[:, None]
    dj = torch.minimum(j, j.flip(0))[None, :]
    return torch.minimum(torch.minimum(di, dj), torch.tensor(bands))


BorderStats = dict[int, tuple[float, float]]  # band -> (scale, offset): calibrated = s * scale + offset


def border_stats(grids: Sequence[torch.Tensor], bands: int) -> BorderStats:
    """How to bring each border band of a lot's score grids to the interior's distribution.

    Patches near the frame edge score high on every frame (zero padding in the backbone, a part
    that sits a little differently in each frame): on KolektorSDD and magnetic_tile the highest
    cell of 99 % of the defect-free frames lies on the outermost ring. For each band b < ``bands``
    (cells b cells from the edge) the affine map that sends the lot's median and 90th percentile
    of that band onto those of the interior is returned, for bands whose median lies above the
    interior's and with a slope of at most 1 (a calm ring is never stretched: with a long
    defect inflating the interior's spread, stretching made an edge outrank the defect). It is learned from the lot itself, so a
    defect at the edge still stands out against the same band of the other frames. Bands (or an
    interior) with fewer than ``BORDER_MIN_CELLS`` cells in the lot get no entry."""
    if bands <= 0 or not grids:
        return {}
    vals = torch.cat([g.float().reshape(-1) for g in grids])
    band = torch.cat([border_bands(g.shape[-2], g.shape[-1], bands).reshape(-1) for g in grids])
    q = torch.tensor([0.5, BORDER_SPREAD_QUANTILE])

    def quantiles(b: int) -> tuple[float, float] | None:
        v = vals[band == b]
        if v.numel() < BORDER_MIN_CELLS:
            return None
        m, hi = torch.quantile(v, q).tolist()
        return m, max(hi - m, 1e-6)

    inner = quantiles(bands)
    if inner is None:
        return {}
    stats: BorderStats = {}
    for b in range(bands):
        qb = quantiles(b)
        if qb is not None and qb[0] > inner[0]:  # only a ring that runs hot is corrected
            scale = min(1.0, inner[1] / qb[1])  # compress a hot ring, never amplify it
            stats[b] = (scale, inner[0] - qb[0] * scale)
    return stats


def apply_border(grid: torch.Tensor, stats: BorderStats | None) -> torch.Tensor:
    """``grid`` with each border band mapped by ``stats`` (see ``border_stats``); a new tensor.
    Cells farther from the edge than the deepest corrected band stay as they are."""
    if not stats:
        return grid
    depth = max(stats) + 1  # cells at this distance or more are not corrected
    scale = torch.ones(depth + 1)
    offset = torch.zeros(depth + 1)
    for b, (sc, off) in stats.items():
        scale[b], offset[b] = sc, off
    band = border_bands(grid.shape[-2], grid.shape[-1], depth)
    return grid.float() * scale[band] + offset[band]


# ---------------------------------------------------------------------- position calibration
# Frames within this share of each other's height and width show the part in the same place (a
# fixed camera ROI, a fixtured part: KolektorSDD's heights vary by 1-2 %); their grids are compared
# cell by cell.
POSITION_TOLERANCE = 0.03


@dataclass(frozen=True, slots=True)
class PositionGroup:
    """The position calibration of one frame geometry: frames of about ``frame_hw`` pixels get
    ``offset`` (a grid of cell scores, resized to their grid) subtracted from their score grid."""

    frame_hw: tuple[int, int]
    offset: torch.Tensor  # h x w, centred: its median is 0

    def matches(self, frame_hw: Sequence[int]) -> bool:
        """Whether a frame of ``frame_hw`` pixels has this group's geometry."""
        return same_geometry(frame_hw, self.frame_hw)


PositionStats = list[PositionGroup]


def same_geometry(frame_hw: Sequence[int], reference_hw: Sequence[int], tolerance: float = POSITION_TOLERANCE) -> bool:
    """Whether a frame of ``frame_hw`` pixels is within ``tolerance`` of ``reference_hw`` in height
    and in width."""
    return all(abs(int(a) - int(b)) <= tolerance * int(b) for a, b in zip(frame_hw, reference_hw))


def geometry_groups(frame_hws: Sequence[Sequence[int]], tolerance: float = POSITION_TOLERANCE) -> list[list[int]]:
    """Indices of frames grouped by geometry: a frame joins the first group whose first frame it
    matches within ``tolerance`` in height and width, else starts a group."""
    groups: list[tuple[Sequence[int], list[int]]] = []
    for i, hw in enumerate(frame_hws):
        for first, members in groups:
            if same_geometry(hw, first, tolerance):
                members.append(i)
                break
        else:
            groups.append((hw, [i]))
    return [members for _, members in groups]


def _resize_grid(grid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(grid.shape) == tuple(shape):
        return grid.float()
    return F.interpolate(grid.float()[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]


def position_stats(grids: Sequence[torch.Tensor], frame_hws: Sequence[Sequence[int]],
                   min_frames: int) -> PositionStats:
    """What each cell of the frame scores on the lot's frames of the same geometry.

    On a fixtured line every frame shows the part in the same place, and some places score high
    on every frame (a hole, a bevel, a reflection, lighting falloff toward the edge): that level is
    their normal, and a defect is what rises above it. For each geometry group of at least
    ``min_frames`` frames (``geometry_groups``) the per-cell median over the group's grids (resized
    to the group's most common grid shape), less its own median, is the offset that
    ``apply_position`` subtracts. The median ignores a defect present on fewer than half of the
    group's frames; mutual scoring already hides one present on 30 % of the references
    (``topk_fraction``), so this hides nothing that scoring did not. Frames of mixed sizes (no group
    of ``min_frames``) get no entry. ``min_frames`` <= 0 turns it off."""
    if min_frames <= 0:
        return []
    out: PositionStats = []
    for members in geometry_groups(frame_hws):
        if len(members) < max(min_frames, 2):
            continue
        shapes = [tuple(grids[i].shape) for i in members]
        shape = max(set(shapes), key=shapes.count)
        stack = torch.stack([_resize_grid(grids[i], shape) for i in members]).reshape(len(members), -1)
        cell = torch.quantile(stack, 0.5, dim=0).reshape(shape)
        first = frame_hws[members[0]]
        out.append(PositionGroup((int(first[0]), int(first[1])), cell - cell.median()))
    return out


def position_offset(stats: PositionStats | None, frame_hw: Sequence[int], shape: Sequence[int]) -> torch.Tensor | None:
    """The offset grid (``shape``) for a frame of ``frame_hw`` pixels; None when no group matches."""
    for group in stats or ():
        if group.matches(frame_hw):
            return _resize_grid(group.offset, shape)
    return None


def subtract_offset(grid: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """``grid`` less a ``position_offset`` of its shape; ``grid`` itself when ``offset`` is None."""
    return grid if offset is None else grid.float() - offset


def apply_position(grid: torch.Tensor, frame_hw: Sequence[int], stats: PositionStats | None) -> torch.Tensor:
    """``grid`` less its geometry's offset (``position_stats``); ``grid`` itself when none applies."""
    return subtract_offset(grid, position_offset(stats, frame_hw, grid.shape))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth_grid(patch_scores: torch.Tensor, sigma_cells: float) -> torch.Tensor:
    """Separable Gaussian blur of an h x w grid (replicate borders); sigma in grid cells."""
    if sigma_cells <= 0:
        return patch_scores
    k = _gaussian_kernel(sigma_cells).to(patch_scores.device)
    r = k.numel() // 2
    m = patch_scores[None, None].float()
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m[0, 0]


def to_pixel_map(patch_scores: torch.Tensor, height: int, width: int, sigma_cells: float = 0.5) -> np.ndarray:
    """h x w patch scores -> float32 height x width map: a light Gaussian blur on the patch grid
    (``sigma_cells`` grid cells, 0 = none; blurring the grid instead of the full-size map costs
    nothing and is the same up to interpolation), then bilinear upsampling."""
    m = smooth_grid(patch_scores.float(), sigma_cells)
    m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return m[0, 0].cpu().numpy().astype(np.float32, copy=False)


def image_score(score_map: np.ndarray, top_fraction: float = 0.01) -> float:
    """Image score: mean of the highest ``top_fraction`` of the map's pixels (0 = the maximum)."""
    flat = np.asarray(score_map, dtype=np.float32).ravel()
    if flat.size == 0:
        raise ValueError("empty score map")
    k = int(round(top_fraction * flat.size))
    if k <= 1:
        return float(flat.max())
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def regions_from_mask(mask: np.ndarray, score_map: np.ndarray, min_area_px: int = 0,
                      label: str = "anomaly") -> list[Region]:
    """Connected components (8-connected) of a bool mask -> Regions (bbox, area, max score),
    largest score first; components smaller than ``min_area_px`` are dropped."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != score_map.shape:
        raise ValueError(f"mask {mask.shape} and score map {score_map.shape} differ in shape")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, idx).astype(int)
    maxes = ndimage.maximum(score_map, labels, idx)
    slices = ndimage.find_objects(labels)
    out = []
    for area, mx, sl in zip(areas, maxes, slices):
        if area < min_area_px or sl is None:
            continue
        bbox = (int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop))
        out.append(Region(bbox=bbox, area_px=int(area), score=float(mx), label=label))
    out.sort(key=lambda r: r.score, reverse=True)
    return out
