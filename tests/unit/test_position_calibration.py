"""Tier-2 position calibration: each cell of a frame's score grid is measured against the same cell
of the lot's frames of the same geometry, so a place that is hot on every part (a hole, a bevel, a
reflection) stops outranking real defects, while a defect at that very place still stands out."""

from __future__ import annotations

import numpy as np
import torch

from linewatch.frames import FrameMeta
from linewatch.models import zeroshot as zs


def _lot(n=12, h=20, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = [torch.rand(h, w, generator=g) for _ in range(n)]
    for t in grids:  # the same place is hot on every part (the fixture's normal)
        t[4:7, 5:8] += 3.0
    return grids, [(160, 128)] * n


def test_frames_within_three_percent_share_a_geometry():
    groups = zs.geometry_groups([(1260, 500), (1240, 500), (1300, 500), (1263, 505), (300, 200), (303, 200)])
    assert groups == [[0, 1, 3], [2], [4, 5]]  # 1300 is 3.2 % above the group's first frame
    assert zs.geometry_groups([]) == []


def test_a_place_hot_on_every_frame_is_brought_to_the_level_of_the_rest():
    grids, hws = _lot()
    stats = zs.position_stats(grids, hws, 8)
    assert len(stats) == 1 and stats[0].frame_hw == (160, 128)
    out = [zs.apply_position(t, hw, stats) for t, hw in zip(grids, hws)]
    hot = torch.stack([t[4:7, 5:8] for t in out])
    rest = torch.stack([t[10:, :] for t in out])
    assert float(torch.stack([t[4:7, 5:8] for t in grids]).min()) > float(torch.stack([t[10:, :] for t in grids]).max())
    assert abs(float(hot.median() - rest.median())) < 0.15
    assert float(hot.max()) < float(rest.max()) + 0.3
    # the offsets are centred: a place that is not special keeps its level
    assert abs(float(stats[0].offset.median())) < 1e-6


def test_a_defect_on_the_hot_place_still_stands_out():
    """Regression guard: the calibration must not hide a defect where every part is hot anyway."""
    grids, hws = _lot()
    grids[5][5, 6] += 2.0  # a defect on the hot place of one part
    grids[8][15, 3] += 2.0  # and one elsewhere on another part
    stats = zs.position_stats(grids, hws, 8)
    out = [zs.apply_position(t, hw, stats) for t, hw in zip(grids, hws)]
    ranked = sorted(((float(t.max()), i) for i, t in enumerate(out)), reverse=True)
    assert {ranked[0][1], ranked[1][1]} == {5, 8}
    assert tuple(np.unravel_index(int(out[5].argmax()), out[5].shape)) == (5, 6)


def test_a_defect_on_a_minority_of_frames_is_not_calibrated_away():
    """The per-cell median ignores a defect at one place on fewer than half the frames."""
    grids, hws = _lot(n=12)
    for i in (1, 4, 9):  # the same defect at the same place on 3 of 12 parts
        grids[i][14, 10] += 2.5
    stats = zs.position_stats(grids, hws, 8)
    out = [zs.apply_position(t, hw, stats) for t, hw in zip(grids, hws)]
    for i in (1, 4, 9):
        assert tuple(np.unravel_index(int(out[i].argmax()), out[i].shape)) == (14, 10)
        assert float(out[i][14, 10]) > 2.3


def test_mixed_sizes_or_too_few_frames_are_left_alone():
    grids, _ = _lot(n=12)
    mixed = [(160 + 20 * i, 128) for i in range(12)]  # every frame another size (magnetic_tile)
    assert zs.position_stats(grids, mixed, 8) == []
    _, hws = _lot(n=12)
    assert zs.position_stats(grids[:7], hws[:7], 8) == []
    assert zs.position_stats(grids, hws, 0) == []  # off
    t = grids[0]
    assert zs.apply_position(t, (160, 128), []) is t
    stats = zs.position_stats(grids, hws, 8)
    assert zs.apply_position(t, (400, 128), stats) is t  # another geometry: no offset
    assert zs.position_offset(stats, (400, 128), t.shape) is None


def test_a_member_with_another_grid_shape_gets_the_offset_resized():
    grids, hws = _lot(n=10)
    grids.append(torch.nn.functional.interpolate(grids[0][None, None], size=(22, 16), mode="bilinear",
                                                 align_corners=False)[0, 0])
    hws.append((164, 128))  # 2.5 % taller: same geometry, a grid two cells longer
    stats = zs.position_stats(grids, hws, 8)
    assert len(stats) == 1 and stats[0].offset.shape == (20, 16)
    out = zs.apply_position(grids[-1], hws[-1], stats)
    assert out.shape == (22, 16)
    assert float(out.max()) < float(grids[-1].max()) - 2.0  # its hot place was calibrated too


# ---------------------------------------------------------------------------- in the engine
class _Extractor:
    """Features = 8x8 average of the input (C = 3)."""

    version = "fake-1"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return torch.nn.functional.avg_pool2d(torch.from_numpy(batch), 8).numpy()


class _Cfg:
    backend = "torch"
    device = "cpu"
    input_size = 64
    tile = True
    reference_frames = 8
    topk_fraction = 0.3
    feature_dim = 0
    threads = 0
    tier2_references = 16
    tier2_ref_stride = 1
    border_bands = 0
    position_min_frames = 8


def _parts(n, rng, defect_at=None):
    """Fixtured parts: the same bright spot (a feature of the part) in every frame, a random
    small shift of brightness per frame, texture noise; one part with a real defect elsewhere."""
    out = []
    for i in range(n):
        im = rng.integers(95, 105, (64, 64, 3)).astype(np.uint8)
        im[8:16, 40:48] = 200 + rng.integers(0, 50)  # the part's own feature, brightness varies
        if i == defect_at:
            im[40:48, 16:24] = 20
        out.append(im)
    return out


def test_engine_tier2_and_next_tier1_use_the_position_calibration():
    from linewatch.engines.zeroshot import ZeroShotEngine

    rng = np.random.default_rng(0)
    on = ZeroShotEngine(_Cfg(), extractor=_Extractor())
    off_cfg = _Cfg()
    off_cfg.position_min_frames = 0
    off = ZeroShotEngine(off_cfg, extractor=_Extractor())
    frames = _parts(12, rng, defect_at=7)
    metas = [FrameMeta(i, 0.0, "cam", 64, 64, lot_id="a") for i in range(12)]
    results = {}
    for name, eng in (("on", on), ("off", off)):
        eng.infer(frames, metas)
        results[name] = eng.lot_closed("a")
    assert on.version.endswith("-p8") and off.version.endswith("-p0")
    for name in ("on", "off"):  # the defective part is the top-scored one either way
        t2 = results[name]
        assert max(t2, key=lambda k: t2[k].image_score) == 7
    # with the calibration the part's own bright feature scores far less against the defect (tier-2
    # maps are in lot units, whose scale the calibration changes: compare within each run)
    feature = lambda o: float(o.score_map[8:16, 40:48].mean())  # noqa: E731
    ratio = {name: max(feature(t2[i]) for i in range(12) if i != 7) / float(t2[7].score_map[40:48, 16:24].mean())
             for name, t2 in results.items()}
    assert ratio["on"] < 0.6 * ratio["off"]
    # tier 1 of the next lot is calibrated with the closed lot's tier-1 statistics
    position, _ = on._tier1_calibration
    assert len(position) == 1 and position[0].frame_hw == (64, 64)
    nxt = _parts(4, rng)
    m2 = [FrameMeta(20 + i, 0.0, "cam", 64, 64, lot_id="b") for i in range(4)]
    t1_on, t1_off = on.infer(nxt, m2), off.infer(nxt, m2)
    assert np.mean([feature(o) for o in t1_on]) < np.mean([feature(o) for o in t1_off])
