"""Mutual scoring functions and the zero-shot engine's reference bookkeeping, with a fake extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.config import ZeroShotEngine as EngineCfg
from linewatch.engines.zeroshot import ZeroShotEngine, plan_geometry
from linewatch.frames import FrameMeta
from linewatch.models import zeroshot as zs


def test_nn_distance_matches_cdist():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(50, 7, generator=g), torch.randn(33, 7, generator=g)
    ref = torch.cdist(q, r).amin(1)
    assert torch.allclose(zs.nn_distance(q, r), ref, atol=1e-4)
    assert torch.allclose(zs.nn_distance(q, r, chunk=8), ref, atol=1e-4)
    a, b = zs.pair_nn_distances(q, r)
    assert torch.allclose(a, ref, atol=1e-4)
    assert torch.allclose(b, torch.cdist(r, q).amin(1), atol=1e-4)


def test_topk_mean_takes_smallest_fraction():
    d = torch.tensor([[4.0, 1.0, 3.0, 2.0, 100.0]])
    assert zs.topk_mean(d, 0.4).item() == pytest.approx(1.5)  # k = 2 -> (1 + 2) / 2
    assert zs.topk_mean(d, 0.01).item() == pytest.approx(1.0)  # at least one
    assert zs.topk_mean(d, 1.0).item() == pytest.approx(22.0)


def _grids(n=5, c=4, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, h, w, generator=g)
    return [base + 0.01 * torch.randn(c, h, w, generator=g) for _ in range(n)]


@pytest.mark.parametrize("ref_stride", [1, 2])
def test_lot_scores_single_out_the_odd_patch(ref_stride):
    grids = _grids()
    grids[2][:, 3, 4] += 5.0  # one anomalous patch in image 2
    out = zs.lot_mutual_scores(grids, topk_fraction=0.5, ref_stride=ref_stride)
    assert len(out) == 5 and out[2].shape == (6, 6)
    assert torch.argmax(out[2]).item() == 3 * 6 + 4
    assert out[2][3, 4] > 10 * max(float(o.max()) for i, o in enumerate(out) if i != 2) or ref_stride > 1
    assert out[2][3, 4] > 3 * float(out[0].max())


def test_lot_scores_tolerate_a_defective_reference():
    """Regression: with top-k over references, the same defect in two images still stands out."""
    grids = _grids(n=8)
    grids[1][:, 2, 2] += 5.0
    grids[5][:, 2, 2] += 5.0  # the same defect at the same place in a second image
    out = zs.lot_mutual_scores(grids, topk_fraction=0.3)
    assert out[1][2, 2] > 3 * float(out[0].max())


def test_lot_scores_bounded_references():
    grids = _grids(n=10)
    full = zs.lot_mutual_scores(grids, 0.3)
    bounded = zs.lot_mutual_scores(grids, 0.3, max_references=3)
    assert [b.shape for b in bounded] == [f.shape for f in full]


def test_self_scores_excludes_neighbourhood():
    c, h, w = 3, 12, 12
    grid = torch.zeros(c, h, w)
    grid[0] = torch.arange(w).float().repeat(h, 1) % 4  # a repeating texture
    grid[:, 6, 6] += 4.0
    s = zs.self_scores(grid, exclude_radius=1)
    assert torch.argmax(s).item() == 6 * w + 6
    assert float(s.min()) >= 0.0


def test_pixel_map_and_image_score():
    grid = torch.zeros(4, 5)
    grid[1, 3] = 1.0
    m = zs.to_pixel_map(grid, 32, 40, sigma_cells=0.5)
    assert m.shape == (32, 40) and m.dtype == np.float32
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 8 <= y < 16 and 24 <= x < 32
    flat = np.arange(1000, dtype=np.float32).reshape(25, 40)
    assert zs.image_score(flat, 0.01) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert zs.image_score(flat, 0.0) == 999.0


def test_regions_from_mask():
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:9] = True  # 18 px
    mask[10:12, 20:21] = True  # 2 px
    score = np.zeros((20, 30), np.float32)
    score[3, 4] = 0.9
    score[11, 20] = 0.5
    regions = zs.regions_from_mask(mask, score, min_area_px=0)
    assert [r.bbox for r in regions] == [(3, 2, 9, 5), (20, 10, 21, 12)]
    assert [r.area_px for r in regions] == [18, 2]
    assert regions[0].score == pytest.approx(0.9)
    assert len(zs.regions_from_mask(mask, score, min_area_px=5)) == 1
    assert zs.regions_from_mask(np.zeros_like(mask), score) == []


def test_plan_geometry_keeps_aspect_ratio_with_overlapping_tiles():
    g = plan_geometry(1263, 500, 256, tile=True)
    assert (g.width, g.size) == (256, 256) and g.height % 16 == 0 and g.height > 600
    assert len(g.offsets) >= 3 and g.offsets[0] == (0, 0) and g.offsets[-1][0] == g.height - 256
    assert all(y % 8 == 0 for y, _ in g.offsets)
    assert plan_geometry(300, 300, 256, tile=True).offsets == ((0, 0),)
    assert plan_geometry(1263, 500, 256, tile=False).height == 256


class FakeExtractor:
    """Features = 8x8 average of the input channels (C = 3), recording each call's batch shape."""

    version = "fake-1"

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        t = torch.from_numpy(batch)
        return torch.nn.functional.avg_pool2d(t, 8).numpy()


def _frames(n, seed=0, size=64, defect_at=None):
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 110, (size, size, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        im = base.copy()
        if defect_at is not None and i == defect_at:
            im[24:40, 24:40] = 255
        out.append(im)
    return out


def _metas(start, n, lot):
    return [FrameMeta(start + i, 0.0, "cam", 64, 64, lot_id=lot) for i in range(n)]


def _engine(**kw):
    cfg = EngineCfg(input_size=64, reference_frames=kw.pop("reference_frames", 4), topk_fraction=0.5)
    return ZeroShotEngine(cfg, extractor=FakeExtractor(), **kw)


def test_first_frame_alone_is_self_scored_not_zero():
    eng = _engine()
    out = eng.infer(_frames(1, defect_at=0), _metas(0, 1, "a"))
    assert eng.self_scored_frames == 1
    assert out[0].score_map.shape == (64, 64)
    assert out[0].image_score > 0
    y, x = np.unravel_index(np.argmax(out[0].score_map), (64, 64))
    assert 16 <= y < 48 and 16 <= x < 48


def test_batch_peers_then_bank_then_previous_lot():
    eng = _engine()
    frames = _frames(4, defect_at=2)
    out = eng.infer(frames, _metas(0, 4, "a"))
    assert eng.self_scored_frames == 0  # peers in the batch are references
    scores = [o.image_score for o in out]
    assert int(np.argmax(scores)) == 2
    tier2 = eng.lot_closed("a")
    assert sorted(tier2) == [0, 1, 2, 3]
    assert max(tier2, key=lambda k: tier2[k].image_score) == 2
    # a new lot, one frame: the previous lot's frames are its references
    out = eng.infer(_frames(1, defect_at=0), _metas(10, 1, "b"))
    assert eng.self_scored_frames == 0
    assert out[0].image_score > 2 * scores[0]
    assert eng.lot_closed("nope") == {}


def test_references_prefer_same_lot_most_recent_first_and_are_bounded():
    eng = _engine(reference_frames=3)
    eng.infer(_frames(4), _metas(0, 4, "a"))
    eng.lot_closed("a")
    eng.infer(_frames(2), _metas(4, 2, "b"))
    metas = _metas(6, 2, "b")
    entries = [eng._entry(m, f, (64, 64)) for m, f in zip(metas, eng.features(_frames(2)))]
    refs = eng._references(0, metas, entries, [True] * len(entries))
    assert len(refs) == 3
    assert refs[0] is entries[1].ref  # the batch peer first
    bank = list(eng._lots["b"])
    assert refs[1] is bank[-1].ref and refs[2] is bank[-2].ref  # then this lot, newest first


def test_lot_bank_is_bounded_and_counts_drops():
    eng = _engine(max_lot_frames=3)
    eng.infer(_frames(5), _metas(0, 5, "a"))
    assert eng.dropped_bank_frames == 2
    assert sorted(eng.lot_closed("a")) == [2, 3, 4]


def test_unclosed_lots_are_rolled_over():
    """Lots past MAX_OPEN_LOTS that were never closed become the previous-lot references; up to
    MAX_OPEN_LOTS stay (closed lots waiting for a lot closer that is behind keep their features)."""
    from linewatch.engines.zeroshot import MAX_OPEN_LOTS

    eng = _engine()
    lots = [f"lot{k}" for k in range(MAX_OPEN_LOTS + 1)]
    for k, lot in enumerate(lots):
        eng.infer(_frames(3), _metas(3 * k, 3, lot))
    assert set(eng._lots) == set(lots[1:])
    assert [e.frame_id for e in eng._previous] == [0, 1, 2]
    assert eng.lot_closed(lots[1])  # still there for a late lot closer


def test_tiles_share_one_extractor_shape():
    eng = _engine()
    tall = np.full((160, 64, 3), 100, np.uint8)
    out = eng.infer([tall, _frames(1)[0]], [FrameMeta(0, 0.0, "c", 160, 64, lot_id="a"),
                                            FrameMeta(1, 0.0, "c", 64, 64, lot_id="a")])
    assert out[0].score_map.shape == (160, 64) and out[1].score_map.shape == (64, 64)
    assert len(eng.extractor.calls) == 1 and eng.extractor.calls[0][1:] == (3, 64, 64)
    assert eng.extractor.calls[0][0] >= 3  # the tall frame became several tiles


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_tensorrt_backend_without_tensorrt_names_the_package():
    """Guards against a bare ImportError (or a silent torch fallback) for backend='tensorrt'.
    (onnxruntime is covered end to end in tests/integration/test_onnx_runtime.py.)"""
    from linewatch.engines import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="'tensorrt'"):
        ZeroShotEngine(EngineCfg(backend="tensorrt"))


def test_a_small_lot_borrows_the_score_scale_of_the_last_larger_lot():
    """A lot of one measured in its own units would make its own defect the norm; with no
    earlier lot to borrow from, tier 2 declines (Tier2Unavailable: NOT_INSPECTED) instead."""
    from linewatch.engines.base import Tier2Unavailable

    eng = _engine()
    eng.infer(_frames(1, defect_at=0), _metas(0, 1, "first"))
    with pytest.raises(Tier2Unavailable, match="too few"):
        eng.lot_closed("first")
    assert [e.frame_id for e in eng._previous] == [0]  # its features still serve the next lot
    eng.infer(_frames(4), _metas(1, 4, "good"))
    good = eng.lot_closed("good")
    eng.infer(_frames(1, defect_at=0), _metas(5, 1, "one"))
    one = eng.lot_closed("one")
    assert one[5].image_score > 3 * max(o.image_score for o in good.values())


def test_non_finite_refined_maps_fall_back_to_the_coarse_maps():
    from linewatch.config import RefineConfig

    eng = _engine()
    eng.enable_refinement(RefineConfig(steps=1, samples_per_lot=2, batch_size=1, crop_px=32, width=4))
    try:
        eng.refiner.refine = lambda images, feats, z, ard: [np.full(im.shape[:2], np.nan, np.float32) for im in images]
        eng.refiner.submit = lambda job: None  # no training here
        eng.keep_coarse = True
        eng.infer(_frames(4, defect_at=1), _metas(0, 4, "a"))
        out = eng.lot_closed("a")
        assert sorted(eng.last_coarse) == [0, 1, 2, 3]  # evaluation reads this lot's coarse maps
        assert sorted(out) == [0, 1, 2, 3]
        assert all(np.isfinite(o.score_map).all() for o in out.values())
        assert eng.last_tier2_model == {"name": eng.name, "version": eng.version}
        assert out[1].image_score > max(out[i].image_score for i in (0, 2, 3))
    finally:
        eng.close()


def test_a_refined_score_is_never_above_its_refined_map():
    """A decoder that lowers a frame's whole hot spot (possible without the peak bound) must not
    leave a coarse NG score over a map with no region above it (the inspector would call it OK)."""
    from linewatch.config import RefineConfig

    eng = _engine()
    eng.enable_refinement(RefineConfig(steps=1, samples_per_lot=2, batch_size=1, crop_px=32, width=4))
    try:
        eng.refiner.refine = lambda images, feats, z, ard: [np.zeros(im.shape[:2], np.float32) for im in images]
        eng.refiner.submit = lambda job: None  # no training here
        eng.keep_coarse = True
        eng.infer(_frames(4, defect_at=1), _metas(0, 4, "a"))
        out = eng.lot_closed("a")
        assert eng.last_coarse[1].image_score > 0
        assert all(o.image_score <= float(o.score_map.max()) for o in out.values())
    finally:
        eng.close()


def test_topk_mean_can_keep_the_count_of_the_first_references():
    d = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.25]])
    # k = round(0.5 * 4) = 2 of all six columns: the two memory columns win the choice
    assert zs.topk_mean(d, 0.5, counted=4).item() == pytest.approx(0.375)
    assert zs.topk_mean(d, 0.5).item() == pytest.approx((0.25 + 0.5 + 1.0) / 3)  # k = 3 of six


def test_lot_memory_makes_a_recurring_look_normal_and_keeps_the_lot_count():
    """A patch that no other frame of the lot shows scores high; with earlier frames that show it
    in memory it is normal, and the count averaged is the lot's (a brute-force check)."""
    grids = _grids(n=6)
    mark = torch.full((4,), 3.0)
    grids[2][:, 1, 1] += mark  # a pen mark on one frame of this lot
    earlier = _grids(n=4, seed=1)
    for g in earlier:  # ... and on every frame of the earlier lots
        g[:, 4, 4] += grids[2][:, 1, 1] - g[:, 4, 4]
    memory = [zs.flat_patches(g) for g in earlier]
    plain = zs.lot_mutual_scores(grids, 0.4)
    with_mem = zs.lot_mutual_scores(grids, 0.4, memory=memory)
    assert plain[2][1, 1] > 5 * float(plain[0].max())
    assert with_mem[2][1, 1] < 0.1 * float(plain[2][1, 1])
    # brute force: nearest distance per reference (5 of the lot, 4 in memory), k = round(0.4 * 5) = 2
    q = zs.flat_patches(grids[2])
    cols = [torch.cdist(q, zs.flat_patches(grids[j])).amin(1) for j in range(6) if j != 2]
    cols += [torch.cdist(q, m).amin(1) for m in memory]
    expect = torch.stack(cols, 1).topk(2, dim=1, largest=False).values.mean(1).reshape(6, 6)
    assert torch.allclose(with_mem[2], expect, atol=1e-4)
    # no memory: the same as before
    assert all(torch.equal(a, b) for a, b in zip(zs.lot_mutual_scores(grids, 0.4, memory=[]), plain))


def test_engine_memory_holds_the_last_frames_of_earlier_lots():
    cfg = EngineCfg(input_size=64, reference_frames=4, topk_fraction=0.5, tier2_memory_frames=6)
    eng = ZeroShotEngine(cfg, extractor=FakeExtractor())
    assert eng.version.endswith("-m6")
    marked = _frames(4, defect_at=1)
    eng.infer(marked, _metas(0, 4, "a"))
    first = eng.lot_closed("a")  # nothing in memory yet: the bright square stands out
    assert max(first, key=lambda k: first[k].image_score) == 1
    assert len(eng._memory) == 4
    for lot, start in (("b", 4), ("c", 8)):  # lots whose every frame carries the square
        eng.infer(_frames(4, defect_at=0)[:1] * 4, _metas(start, 4, lot))
        eng.lot_closed(lot)
    assert len(eng._memory) == 6  # bounded: the newest six frames
    plain = _engine()
    plain.infer(marked, _metas(0, 4, "d"))
    without = plain.lot_closed("d")
    eng.infer(marked, _metas(20, 4, "d"))
    with_mem = eng.lot_closed("d")
    # the square is in every memory frame now: the marked frame's score falls towards its peers'
    assert with_mem[21].image_score < 0.5 * without[1].image_score
    eng.close()
    assert len(eng._memory) == 0


def test_engine_smooth_cells_blurs_the_published_map_and_its_score():
    """``smooth_cells`` sets the blur of the maps; the image score is taken from the same map."""
    frames, metas = _frames(4, defect_at=1), _metas(0, 4, "a")
    sharp = ZeroShotEngine(EngineCfg(input_size=64, reference_frames=4, topk_fraction=0.5), extractor=FakeExtractor())
    wide = ZeroShotEngine(EngineCfg(input_size=64, reference_frames=4, topk_fraction=0.5, smooth_cells=3.0),
                          extractor=FakeExtractor())
    assert wide.version == sharp.version + "-s3"  # a map of another scale is another model version
    for eng in (sharp, wide):
        eng.infer(frames, metas)
    a, b = sharp.lot_closed("a")[1], wide.lot_closed("a")[1]
    assert b.score_map.max() < a.score_map.max()  # the peak is lower

    def half_max_area(m):
        return int((m > m.min() + 0.5 * (m.max() - m.min())).sum())

    assert half_max_area(b.score_map) > half_max_area(a.score_map)  # and spread wider
    for out in (a, b):
        assert out.image_score == pytest.approx(zs.image_score(out.score_map, 0.01))


def test_a_frame_with_nan_features_is_fault_and_spoils_no_other_frame():
    """One broken backbone run must not turn its batch, its lot's tier 2 or the next lot's tier 1
    into NaN (FAULT for every part): the frame is nobody's reference and is not kept."""

    class NaNForBlackFrames(FakeExtractor):
        def __call__(self, batch):
            out = super().__call__(batch)
            out[batch.reshape(len(batch), -1).mean(1) < -0.9] = np.nan  # a black frame
            return out

    eng = ZeroShotEngine(EngineCfg(input_size=64, reference_frames=4, topk_fraction=0.5),
                         extractor=NaNForBlackFrames())
    frames = _frames(6, defect_at=4)
    frames[2] = np.zeros_like(frames[2])  # the frame whose features come out NaN
    out = eng.infer(frames, _metas(0, 6, "a"))
    assert not np.isfinite(out[2].image_score)  # FAULT at tier 1 (the inspector's non-finite rule)
    assert all(np.isfinite(o.image_score) and np.isfinite(o.score_map).all() for k, o in enumerate(out) if k != 2)
    assert eng.nonfinite_frames == 1
    tier2 = eng.lot_closed("a")
    assert sorted(tier2) == [0, 1, 3, 4, 5]  # no tier-2 result for it: the lot closer reports the gap
    assert all(np.isfinite(o.score_map).all() for o in tier2.values())
    assert max(tier2, key=lambda k: tier2[k].image_score) == 4
    nxt = eng.infer(_frames(3, seed=1), _metas(10, 3, "b"))  # calibrated by lot a's tier-1 grids
    assert all(np.isfinite(o.score_map).all() for o in nxt)


def test_a_skipped_lot_is_let_go_and_becomes_the_previous_lot():
    eng = _engine()
    eng.infer(_frames(3), _metas(0, 3, "a"))
    eng.lot_skipped("a")
    assert "a" not in eng._lots and [e.frame_id for e in eng._previous] == [0, 1, 2]
    assert eng.lot_closed("a") == {}  # nothing left to judge: the lot closer says so
    eng.lot_skipped("never-seen")  # harmless
