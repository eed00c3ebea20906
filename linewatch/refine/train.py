"""The ARD training loop of PGT: random crops of the samples (with their whole-frame detail maps),
a pairwise ranking loss (or per-pixel focal + dice), step/time budget."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..models.ard import ARD, GRID_STRIDE
from ..models.backbone import preprocess
from .synth import Sample

logger = logging.getLogger(__name__)

HARD_FRACTION = 0.05  # the ranking loss pairs anomaly pixels with the top 5 % of normal pixels
RANK_PAIRS = 1024  # pixel pairs per training step


@dataclass(slots=True)
class TrainReport:
    """What one PGT round did."""

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    stopped_by: str  # "steps" | "time" | "stop" | "nonfinite" (a NaN / inf loss: the round is void)


def _crop(sample: Sample, crop_px: int, rng: np.random.Generator, on_anomaly: bool):
    """A crop (multiple of the grid stride) of one sample: image, features, scores, mask tensors."""
    h, w = sample.image.shape[:2]
    ch, cw = min(crop_px, h) // GRID_STRIDE, min(crop_px, w) // GRID_STRIDE
    gh, gw = h // GRID_STRIDE, w // GRID_STRIDE
    if on_anomaly and sample.mask.any():
        ys, xs = np.nonzero(sample.mask)
        k = int(rng.integers(len(ys)))
        cy = int(np.clip(ys[k] // GRID_STRIDE - int(rng.integers(ch)), 0, gh - ch))
        cx = int(np.clip(xs[k] // GRID_STRIDE - int(rng.integers(cw)), 0, gw - cw))
    else:
        cy, cx = int(rng.integers(gh - ch + 1)), int(rng.integers(gw - cw + 1))
    py, px, ph, pw = cy * GRID_STRIDE, cx * GRID_STRIDE, ch * GRID_STRIDE, cw * GRID_STRIDE
    img = sample.image[py:py + ph, px:px + pw]
    feat = sample.feat[:, cy:cy + ch, cx:cx + cw]
    z = sample.z[cy:cy + ch, cx:cx + cw]
    mask = sample.mask[py:py + ph, px:px + pw]
    detail = sample.detail[:, py:py + ph, px:px + pw]
    ignore = sample.ignore[py:py + ph, px:px + pw]
    if rng.random() < 0.5:  # horizontal flip
        img, feat, z, mask, detail = img[:, ::-1], feat.flip(-1), z.flip(-1), mask[:, ::-1], detail.flip(-1)
        ignore = ignore[:, ::-1]
    return (np.ascontiguousarray(img), feat, z, torch.from_numpy(np.ascontiguousarray(mask)), detail,
            torch.from_numpy(np.ascontiguousarray(ignore)))


def _rank_loss(scores: torch.Tensor, target: torch.Tensor, gen: torch.Generator,
               hard_fraction: float = HARD_FRACTION, pairs: int = RANK_PAIRS,
               ignore: torch.Tensor | None = None) -> torch.Tensor | None:
    """Pairwise ranking loss: ``softplus(negative - positive)`` over random pairs of an anomaly
    pixel and one of the batch's hardest normal pixels (its top ``hard_fraction`` by score: the
    halo of blurred patch cells and the normal hot spots; ``ignore`` pixels are neither). None
    when the batch has no anomaly.

    Why not the per-pixel focal + dice loss: pixel-AP is about ranking, and a per-pixel loss on
    maps in lot units is dominated by the many normal pixels near 0 (sigmoid 0.5); on Kolektor
    PGT samples it preferred a *negative* weight on the darker-than-surroundings map although a
    positive one raises the samples' pixel-AP (0.289 -> 0.317). This loss points the right way.
    """
    s = scores.reshape(-1)
    t = target.reshape(-1) > 0.5
    keep = torch.ones_like(t) if ignore is None else ~ignore.reshape(-1)
    pos, neg = s[t], s[~t & keep]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    hard = neg.topk(max(1, int(hard_fraction * neg.numel()))).values
    i = torch.randint(pos.numel(), (pairs,), generator=gen)
    j = torch.randint(hard.numel(), (pairs,), generator=gen)
    return F.softplus(hard[j] - pos[i]).mean()


def _loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (the anomaly is a small share of the pixels) plus soft dice."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    pt = p * target + (1 - p) * (1 - target)
    focal = ((1 - pt) ** gamma * bce).mean()
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return focal * 10.0 + dice


def _pause(seconds: float, deadline: float, should_stop: Callable[[], bool]) -> None:
    """Sleep ``seconds``, but not past ``deadline`` (monotonic) nor beyond a stop (checked every 0.1 s)."""
    end = min(time.monotonic() + seconds, deadline)
    while not should_stop():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def train_ard(ard: ARD, samples: Sequence[Sample], steps: int, time_budget_s: float, rng: np.random.Generator,
              batch_size: int = 8, crop_px: int = 128, lr: float = 2e-3, cpu_share: float = 1.0,
              should_stop: Callable[[], bool] = lambda: False, loss_kind: str = "rank") -> TrainReport:
    """Train ``ard`` in place on crops of ``samples`` for ``steps`` steps or ``time_budget_s``
    seconds, whichever ends first (or at the first non-finite loss: ``stopped_by`` "nonfinite",
    and the caller must not use the ARD). ``cpu_share`` < 1 pauses after each step so that training
    runs about that share of the time (each step uses torch's threads, as many as the engine's;
    the daemon's tier 1 keeps the rest); a pause ends early at the budget's end or a stop. ``loss_kind``:
    "rank" (``_rank_loss``; a batch without anomaly pixels is skipped but counts as a step) or
    "focal_dice" (``_loss``, which does not honour the samples' ``ignore`` pixels)."""
    if loss_kind not in ("rank", "focal_dice"):
        raise ValueError(f"unknown PGT loss {loss_kind!r} (rank, focal_dice)")
    ard.train()
    opt = torch.optim.Adam(ard.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    t0 = time.monotonic()
    first = last = float("nan")
    done, why = 0, "steps"
    # crops from different samples may differ in size only when a frame is smaller than crop_px
    min_h = min(s.image.shape[0] for s in samples)
    min_w = min(s.image.shape[1] for s in samples)
    crop = max(GRID_STRIDE * 2, min(crop_px, min_h, min_w) // GRID_STRIDE * GRID_STRIDE)
    for step in range(steps):
        if should_stop():
            why = "stop"
            break
        if time.monotonic() - t0 > time_budget_s:
            why = "time"
            break
        ts = time.monotonic()
        idx = rng.integers(len(samples), size=batch_size)
        parts = [_crop(samples[int(i)], crop, rng, on_anomaly=rng.random() < 0.7) for i in idx]
        img = preprocess(np.stack([p[0] for p in parts]))
        feat = torch.stack([p[1] for p in parts])
        z = torch.stack([p[2] for p in parts])[:, None]
        target = torch.stack([p[3] for p in parts])[:, None].float()
        detail = torch.stack([p[4] for p in parts])
        ignore = torch.stack([p[5] for p in parts])[:, None]
        scores = ard(img, feat, z, detail)
        if loss_kind == "rank":
            loss = _rank_loss(scores, target, gen, ignore=ignore)
            if loss is None:  # no anomaly in this batch: nothing to rank
                continue
        else:
            loss = _loss(scores + ard.beta, target)
        if not torch.isfinite(loss):  # non-finite inputs or a diverged step: never step on it
            why = "nonfinite"
            last = float(loss.detach())
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if done == 0:
            first = last
        done += 1
        if cpu_share < 1.0:
            _pause((time.monotonic() - ts) * (1.0 / max(cpu_share, 0.05) - 1.0), t0 + time_budget_s, should_stop)
    ard.eval()
    return TrainReport(done, time.monotonic() - t0, first, last, why)
