"""Tier-2 edge calibration: rings of cells at the frame edge are mapped onto the lot's interior
distribution, so an edge that scores high on every frame stops outranking real defects, while an
edge defect still stands out against the same ring of the other frames."""

from __future__ import annotations

import numpy as np
import torch

from linewatch.models import zeroshot as zs


def test_bands_are_the_distance_to_the_nearest_edge_capped():
    b = zs.border_bands(5, 7, 2)
    assert b[0].tolist() == [0] * 7 and b[:, 0].tolist() == [0] * 5
    assert b[1, 1] == 1 and b[2, 3] == 2 and b[2, 1] == 1
    assert int(b.max()) == 2


def _lot(n=12, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = [torch.rand(h, w, generator=g) for _ in range(n)]
    ring = zs.border_bands(h, w, 1) == 0
    for t in grids:  # every frame's outer ring scores high (the artefact)
        t[ring] += 3.0
    return grids


def test_a_ring_that_is_high_on_every_frame_is_brought_to_the_interior():
    grids = _lot()
    stats = zs.border_stats(grids, 3)
    assert set(stats) == {0, 1, 2}
    out = [zs.apply_border(t, stats) for t in grids]
    ring = torch.cat([torch.cat([t[0], t[-1], t[:, 0], t[:, -1]]) for t in out])
    inner = torch.cat([t[3:-3, 3:-3].reshape(-1) for t in out])
    assert abs(float(ring.median() - inner.median())) < 0.1
    assert float(ring.max()) < float(inner.max()) + 0.3
    assert abs(float(ring.quantile(0.9) - inner.quantile(0.9))) < 0.05
    ring_before = torch.cat([torch.cat([t[0], t[-1]]) for t in grids])
    assert float(ring_before.min()) > float(inner.max())  # before: every ring cell outranked the interior
    assert torch.equal(out[0][3:-3, 3:-3], grids[0][3:-3, 3:-3])  # interior untouched


def test_an_edge_defect_still_stands_out_after_calibration():
    grids = _lot()
    grids[5][0, 10] += 4.0  # a real defect on the edge of one frame
    stats = zs.border_stats(grids, 3)
    out = [zs.apply_border(t, stats) for t in grids]
    top = max(range(len(out)), key=lambda i: float(out[i].max()))
    assert top == 5 and tuple(np.unravel_index(int(out[5].argmax()), out[5].shape)) == (0, 10)


def test_off_or_too_small_leaves_grids_alone():
    grids = _lot(n=2, h=6, w=6)
    assert zs.border_stats(grids, 0) == {}
    assert zs.border_stats(grids, 3) == {}  # a 6 x 6 grid has no interior at distance 3
    t = grids[0]
    assert zs.apply_border(t, {}) is t
