"""AnoRefiner's Anomaly Refinement Decoder (ARD): backbone features + coarse score grid -> pixel map.

Inputs, for a batch of frames resized to H x W (multiples of 8, the engine's working geometry):
- ``image``: normalised float32 N x 3 x H x W (``linewatch.models.backbone.preprocess``);
- ``feat``: the engine's patch features N x C x H/8 x W/8;
- ``z``: the zero-shot patch scores N x 1 x H/8 x W/8, normalised per lot (``normalise_grid``)
  so that the decoder sees the same units whatever the product.

Structure (small enough to train on a CPU in seconds, following the AnoRefiner paper's parts):
1. anomaly attention: features are projected and re-weighted by an attention map computed from
   the coarse scores (``F * (1 + sigmoid(conv(z)))``), so features where the zero-shot model sees
   something are amplified;
2. a bidirectional interaction block at 1/8: the feature branch is gated by the score branch and
   the score branch is updated from the features (both directions, residual);
3. refinement blocks while upsampling 1/8 -> 1/4 -> 1/2 -> 1, each fed with a light image stem at
   its scale (pixel detail the patch grid lacks) and the upsampled coarse scores; the full-scale
   block also gets the frame's *detail maps* (``detail_maps``: how much darker and how much
   brighter each pixel is than its ``DETAIL_WINDOW`` neighbourhood, in units of the frame's own
   contrast), which the head can also add directly with a learned gain per map (zero at start).
   This is the pixel-level cue that tells a defect from the halo of its blurred patch cell: on the
   cached KolektorSDD tier-2 maps, adding ``0.5 tanh(dark + bright)`` by hand raises pixel-AP
   from 0.146 to 0.18, adding ``0.5 tanh(dark)`` to 0.21 (bench/RESULTS.md); PGT has to learn
   how far to trust each map for the product at hand (on magnetic_tile neither helps by hand);
4. output: a score map ``up(z) + gate(up(z)) * delta`` in lot units: the coarse map (blurred like
   the engine's coarse maps, ``skip_sigma``) is a fixed skip and the decoder learns a bounded
   correction ``delta`` with zero median over each frame (at most ``delta_max`` units, config
   ``[refine] delta_max``: sharper edges, suppressed false alarms, boosted misses). The head
   starts at zero, so an untrained ARD returns the normalised, upsampled coarse map.
   ``gate`` (config ``[refine] gate_units``; off at 0) is a *fixed* ramp ``clamp(up(z) / g, 0,
   1)``: pixels the coarse map calls cold (the bulk of every normal surface) keep their score, so
   sharpening a defect cannot raise the dark texture of good frames (on Kolektor the ungated
   decoder raised pixel-AP but lowered pixel-AUROC, 0.930 vs 0.952; gated, both rose, in one
   replay with seed 0). A *learned* gate was tried before and failed: it made a constant
   correction z-dependent (``z - 2 sigmoid(4 (z - 0.5))`` falls as z rises), which inverted the
   ranking (refined pixel-AUROC 0.24); the fixed ramp keeps a constant correction monotonic while
   ``delta_max <= g``.
   Two more bounds, both fixed (config ``[refine] raise_max`` and ``peak_window_px``):
   ``raise_max`` caps an *increase* (shipped 0: the decoder only lowers scores). Raising let dark
   normal texture in hot cells climb above real defect pixels: on the Kolektor replays pixel-AUROC
   fell below coarse in 3 of 4 seeds; lowering only kept it level at the same pixel-AP gain.
   ``peak_window`` lets a pixel fall at most by how far it lies below the highest coarse score in
   its neighbourhood: the halo around a hot spot can be trimmed, the inside of a large defect (as
   hot as its own peak, no local contrast) cannot be hollowed out, which is what cost
   magnetic_tile's frays and breaks their pixel-AP (bench/RESULTS.md). It also caps a rise (where
   ``raise_max`` allows one) at that same peak: inside a hot region the decoder may lift the parts
   that look like the defect up to the region's own peak, never above it and never out of a cold
   neighbourhood, so dark normal texture cannot climb above the defects it surrounds (raising
   without this cap cost Kolektor pixel-AUROC).
   Training (``linewatch.refine.train``) ranks anomaly pixels against the hardest normal ones;
   the learned bias ``beta`` only serves the optional per-pixel loss and is left out of the map,
   so maps from ARD versions trained on different lots stay comparable.

No batch norm (a test-time-trained decoder sees tiny batches; train and eval behave the same).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

GRID_STRIDE = 8  # the coarse grid and the features are at 1/8 of the ARD input
DELTA_MAX = 0.5  # default bound of the correction, lot score units (the daemon passes [refine] delta_max)
DETAIL_WINDOW = 31  # px of the working geometry: the neighbourhood a pixel's grey level is compared with
DETAIL_CLIP = 2.0  # detail maps are clipped at this many units of the frame's contrast
DETAIL_MAPS = 2  # darker than the neighbourhood, brighter than it


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1, inplace=True))


class AnomalyAttention(nn.Module):
    """Re-weights projected features by an attention map computed from the coarse scores."""

    def __init__(self, feat_dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(feat_dim, width, 1), nn.LeakyReLU(0.1, inplace=True))
        self.att = nn.Sequential(nn.Conv2d(1, width // 2, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                                 nn.Conv2d(width // 2, width, 1))

    def forward(self, feat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.proj(feat) * (1.0 + torch.sigmoid(self.att(z)))


class BidirectionalInteraction(nn.Module):
    """Feature branch <-> score branch exchange at the patch scale (both residual)."""

    def __init__(self, width: int, score_width: int):
        super().__init__()
        self.score_in = _conv(1, score_width)
        self.gate = nn.Conv2d(score_width, width, 3, padding=1)
        self.f_update = _conv(width + score_width, width)
        self.s_update = _conv(width + score_width, score_width)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score_in(z)
        f = f + self.f_update(torch.cat([f, s], 1)) * torch.sigmoid(self.gate(s))  # scores -> features
        s = s + self.s_update(torch.cat([f, s], 1))  # features -> scores
        return f, s


class RefineBlock(nn.Module):
    """Upsample x2, concatenate the skip inputs, two 3x3 convolutions."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv(cin, cout), _conv(cout, cout))

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skips[0].shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, *skips], 1))


class ARD(nn.Module):
    """The Anomaly Refinement Decoder (see the module docstring). Returns N x 1 x H x W score
    maps; ``map + beta`` are the logits of the optional per-pixel training loss."""

    def __init__(self, feat_dim: int, width: int = 24, skip_sigma: float = 0.0, delta_max: float = DELTA_MAX,
                 gate_units: float = 0.0, raise_max: float | None = None, peak_window: int = 0):
        super().__init__()
        self.feat_dim = int(feat_dim)
        self.width = int(width)
        if not delta_max > 0:
            raise ValueError(f"delta_max must be > 0, got {delta_max}")
        self.delta_max = float(delta_max)  # bound of the correction, lot score units
        # bound of an *increase* (None: delta_max, symmetric); 0 = the decoder only lowers scores
        self.raise_max = self.delta_max if raise_max is None else float(raise_max)
        if self.raise_max < 0:
            raise ValueError(f"raise_max must be >= 0, got {raise_max}")
        # > 0: a pixel is lowered at most by how far it lies below the highest coarse score within
        # this window (px), so the halo around a hot spot can be trimmed but the inside of a large
        # defect, as hot as its own peak, cannot be hollowed out
        if peak_window < 0 or (peak_window and peak_window % 2 == 0):
            raise ValueError(f"peak_window must be 0 or an odd number of pixels, got {peak_window}")
        self.peak_window = int(peak_window)
        # > 0: the correction is scaled by clamp(coarse / gate_units, 0, 1), so cold pixels (the
        # bulk of every normal surface) keep their coarse score; a constant correction stays
        # monotonic in the coarse score as long as delta_max <= gate_units
        self.gate_units = float(gate_units)
        # Gaussian blur (grid cells) of the coarse skip: the engine's coarse maps are blurred the
        # same way (``SMOOTH_SIGMA_CELLS``), so an untrained ARD reproduces them exactly
        self.skip_sigma = float(skip_sigma)
        sw = max(4, width // 3)
        self.attention = AnomalyAttention(feat_dim, width)
        self.interact = BidirectionalInteraction(width, sw)
        self.stem2 = _conv(3, 8, stride=2)  # image detail at 1/2
        self.stem4 = _conv(8, 16, stride=2)  # and at 1/4
        self.up4 = RefineBlock(width + sw + 16 + 1, width)
        self.up2 = RefineBlock(width + 8 + 1, 16)
        self.up1 = RefineBlock(16 + 3 + 1 + DETAIL_MAPS, 8)
        self.head = nn.Conv2d(8, 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.detail_gain = nn.Parameter(torch.zeros(DETAIL_MAPS))  # direct use of each detail map
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, image: torch.Tensor, feat: torch.Tensor, z: torch.Tensor,
                detail: torch.Tensor | None = None) -> torch.Tensor:
        """``detail``: the frame's ``detail_maps`` (N x 2 x H x W); computed from ``image`` when
        None, which is right for whole frames (training crops pass the whole frame's maps, cropped)."""
        h, w = image.shape[-2:]
        if detail is None:
            detail = detail_maps(image)
        if feat.shape[-2:] != z.shape[-2:] or (h // GRID_STRIDE, w // GRID_STRIDE) != tuple(z.shape[-2:]):
            raise ValueError(f"ARD inputs disagree: image {tuple(image.shape)}, features {tuple(feat.shape)}, "
                             f"scores {tuple(z.shape)} (grids must be 1/{GRID_STRIDE} of the image)")
        f, s = self.interact(self.attention(feat, z), z)
        i2 = self.stem2(image)
        i4 = self.stem4(i2)
        z4 = F.interpolate(z, size=i4.shape[-2:], mode="bilinear", align_corners=False)
        z2 = F.interpolate(z, size=i2.shape[-2:], mode="bilinear", align_corners=False)
        z1 = self.coarse(z, (h, w))
        x = self.up4(torch.cat([f, s], 1), i4, z4)
        x = self.up2(x, i2, z2)
        x = self.up1(x, image, z1, detail)
        # the head output is centred on its median over each frame (median of the row medians)
        # before the bound: the decoder reshapes a frame's map but cannot shift the whole frame up
        # or down (a per-frame shift reorders pixels across frames and lots), and a constant in the
        # head output has no effect at all (no drift into the saturated part of tanh)
        h = self.head(x) + (self.detail_gain.view(1, -1, 1, 1) * detail).sum(1, keepdim=True)
        h = h - _lower_median(_lower_median(h, -1), -2)
        delta = self.delta_max * torch.tanh(h / self.delta_max)
        if self.raise_max < self.delta_max:
            delta = delta.clamp_max(self.raise_max)
        if self.peak_window:  # neither below nor above what the neighbourhood's peak allows
            peak = _local_peak(z1, self.peak_window)
            delta = torch.minimum(torch.maximum(delta, z1 - peak), peak - z1)
        if self.gate_units > 0:
            delta = delta * (z1 / self.gate_units).clamp(0.0, 1.0)
        return z1 + delta

    def coarse(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The fixed skip: coarse grids N x 1 x h x w blurred (``skip_sigma``) and upsampled to
        ``size``. It is also the whole output of an untrained ARD (zero head, zero gains)."""
        return F.interpolate(_smooth(z, self.skip_sigma), size=size, mode="bilinear", align_corners=False)


def detail_maps(image: torch.Tensor, window: int = DETAIL_WINDOW) -> torch.Tensor:
    """N x 3 x H x W normalised frames -> N x 2 x H x W: how much darker and how much brighter
    each pixel's grey level is than the mean of its ``window`` x ``window`` neighbourhood (after a
    3 x 3 blur), divided by the frame's 99th percentile of that absolute difference and clipped at
    ``DETAIL_CLIP``. Computed on whole frames: a crop would change the percentile. (Not centred:
    the ARD centres its whole correction per frame.)"""
    grey = F.avg_pool2d(image.mean(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=False)
    r = window // 2  # separable box mean (the valid counts multiply, so borders are exact too)
    local = F.avg_pool2d(grey, (1, window), stride=1, padding=(0, r), count_include_pad=False)
    local = F.avg_pool2d(local, (window, 1), stride=1, padding=(r, 0), count_include_pad=False)
    diff = local - grey  # > 0: darker than around it
    n = diff.shape[0]
    flat = diff.abs().reshape(n, -1)
    top = flat.topk(flat.shape[1] // 100 + 1, dim=1).values  # the top 1 % (topk exports to ONNX)
    q = top[:, -1:].view(n, 1, 1, 1) + 1e-6
    return (torch.cat([diff.clamp_min(0.0), (-diff).clamp_min(0.0)], 1) / q).clamp_max(DETAIL_CLIP)


def _local_peak(z: torch.Tensor, window: int) -> torch.Tensor:
    """The maximum of N x 1 x H x W maps over each pixel's ``window`` x ``window`` neighbourhood
    (separable max pooling; borders see only the pixels inside the map)."""
    r = window // 2
    m = F.max_pool2d(z, (1, window), stride=1, padding=(0, r))
    return F.max_pool2d(m, (window, 1), stride=1, padding=(r, 0))


def _smooth(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N x 1 x h x w grids (replicate borders), as ``zeroshot.smooth_grid``."""
    if sigma <= 0:
        return z
    from .zeroshot import _gaussian_kernel

    k = _gaussian_kernel(sigma).to(z.device, z.dtype)
    r = k.numel() // 2
    m = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


# ------------------------------------------------------------------------------ score units
def grid_scale(grids: list[torch.Tensor]) -> float:
    """The lot's score scale: the median over its grids of (99th - 50th percentile) of each grid.
    A robust unit: a few defective frames barely move it."""
    spans = []
    for g in grids:
        q = torch.quantile(g.float().reshape(-1), torch.tensor([0.5, 0.99]))
        spans.append(float(q[1] - q[0]))
    return max(float(np.median(spans)), 1e-6)


def _lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.median(dim, keepdim=True).values`` (the lower middle value) written with ``sort``, which
    exports to ONNX (``aten::median`` has no ONNX export at opset 17)."""
    n = x.shape[dim]
    return x.sort(dim=dim).values.narrow(dim, (n - 1) // 2, 1)


def lot_median(grids: list[torch.Tensor]) -> float:
    """Median patch score over the whole lot (the zero of the lot score units)."""
    return float(torch.cat([g.float().reshape(-1) for g in grids]).median())


def normalise_grid(grid: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Patch scores -> lot score units: ``(grid - offset) / scale`` (offset = ``lot_median``)."""
    return (grid.float() - offset) / scale
