"""Metrics checked against independent references: scikit-learn, and brute force loops."""

from __future__ import annotations

import numpy as np
import pytest

from linewatch import metrics

sk = pytest.importorskip("sklearn.metrics")


def _labels_scores(seed: int, n: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_ap_match_sklearn(seed, ties):
    y, s = _labels_scores(seed, ties=ties)
    assert metrics.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def _f1max_brute(y, s):
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_f1max_matches_brute_force(seed, ties):
    y, s = _labels_scores(seed, ties=ties)
    assert metrics.f1_max(y, s) == pytest.approx(_f1max_brute(y, s), abs=1e-12)


def test_image_metrics_perfect_and_inverted():
    y = np.array([0, 0, 1, 1])
    assert metrics.image_metrics(y, [0.1, 0.2, 0.8, 0.9])["image_auroc"] == 1.0
    assert metrics.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    with pytest.raises(ValueError):
        metrics.auroc([1, 1], [0.1, 0.2])


def _random_maps(seed, n=4, h=24, w=20):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        m = np.zeros((h, w), bool)
        if i % 2 == 0:
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            m[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = True
            m[rng.integers(0, h), rng.integers(0, w)] = True  # a second, one-pixel region
        s = rng.random((h, w)) + 0.7 * m
        maps.append(s.astype(np.float32))
        masks.append(m)
    return maps, masks


def _aupro_brute(maps, masks, limit=0.3):
    """One threshold at a time: overlap per connected region, FPR on normal pixels."""
    from scipy import ndimage

    all_s = np.concatenate([m.ravel() for m in maps])
    normal = np.concatenate([~g.ravel() for g in masks])
    pts = [(0.0, 0.0)]
    for t in np.sort(np.unique(all_s))[::-1]:
        fpr = np.sum((all_s >= t) & normal) / normal.sum()
        pros = []
        for m, g in zip(maps, masks):
            lab, n = ndimage.label(g, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                r = lab == k
                pros.append(np.sum((m >= t) & r) / r.sum())
        pts.append((fpr, float(np.mean(pros))))
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    # integrate to the limit with linear interpolation at the cut
    xs = np.r_[x[x <= limit], limit]
    ys = np.r_[y[x <= limit], np.interp(limit, x, y)]
    return float(np.trapezoid(ys, xs) / limit)


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_exact_matches_brute_force(seed):
    maps, masks = _random_maps(seed)
    assert metrics.aupro_exact(maps, masks) == pytest.approx(_aupro_brute(maps, masks), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_pixel_metrics_close_to_exact_and_sklearn(seed):
    maps, masks = _random_maps(seed)
    lo = min(m.min() for m in maps)
    hi = max(m.max() for m in maps)
    binned = metrics.pixel_metrics(maps, masks, lo, hi)
    exact = metrics.pixel_metrics_exact(maps, masks)
    y = np.concatenate([g.ravel() for g in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert exact["pixel_auroc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert exact["pixel_ap"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert exact["pixel_f1max"] == pytest.approx(_f1max_brute(y, s), abs=1e-12)
    for k in exact:
        assert binned[k] == pytest.approx(exact[k], abs=5e-3), k


def test_aupro_perfect_map_is_one():
    maps, masks = _random_maps(0)
    perfect = [g.astype(np.float32) for g in masks]
    assert metrics.aupro_exact(perfect, masks) == pytest.approx(1.0)
    assert metrics.pixel_metrics(perfect, masks, 0.0, 1.0)["aupro"] == pytest.approx(1.0)


def test_segmentation_metrics_by_hand():
    g1 = np.zeros((4, 4), bool); g1[:2, :2] = True   # 4 px
    p1 = np.zeros((4, 4), bool); p1[:2, :1] = True   # 2 px inside -> IoU 0.5
    g2 = np.zeros((4, 4), bool); g2[0, 0] = True
    p2 = g2.copy()                                   # IoU 1
    g3 = np.zeros((4, 4), bool); p3 = np.zeros((4, 4), bool); p3[3, 3] = True  # IoU 0
    out = metrics.segmentation_metrics([p1, p2, p3], [g1, g2, g3])
    assert out["miou"] == pytest.approx(0.5)
    assert out["oiou"] == pytest.approx((2 + 1 + 0) / (4 + 1 + 1))
    assert out["prec@0.5"] == pytest.approx(2 / 3)
    assert out["prec@0.7"] == pytest.approx(1 / 3)
    assert out["prec@0.9"] == pytest.approx(1 / 3)


def test_merged_accumulators_equal_one_accumulator_over_all_maps():
    maps, masks = _random_maps(0)
    lo = min(m.min() for m in maps)
    hi = max(m.max() for m in maps)
    one = metrics.PixelAccumulator(lo, hi)
    a, b = metrics.PixelAccumulator(lo, hi), metrics.PixelAccumulator(lo, hi)
    for i, (m, g) in enumerate(zip(maps, masks)):
        one.add(m, g)
        (a if i % 2 else b).add(m, g)
    assert a.merged(b).result() == pytest.approx(one.result(), abs=1e-12)
    with pytest.raises(ValueError, match="different bins"):
        a.merged(metrics.PixelAccumulator(lo, hi + 1.0))


def test_kind_breakdown_scores_each_kind_against_the_good_frames_only():
    from linewatch.evaluate import _kind_metrics

    maps, masks = _random_maps(1, n=9)
    n = len(maps)
    kinds = [("crack", "spot", "good")[i % 3] for i in range(n)]
    masks = [g if k != "good" else np.zeros_like(g) for g, k in zip(masks, kinds)]
    scores = [float(m.max()) for m in maps]
    lo = min(m.min() for m in maps)
    hi = max(m.max() for m in maps)
    by_kind = {k: metrics.PixelAccumulator(lo, hi) for k in dict.fromkeys(kinds)}
    for m, g, k in zip(maps, masks, kinds):
        by_kind[k].add(m, g)
    rows = _kind_metrics(by_kind, kinds, scores)
    assert set(rows) == {"crack", "spot"}
    assert rows["crack"]["pixel_share"] + rows["spot"]["pixel_share"] == pytest.approx(1.0)
    for k in ("crack", "spot"):
        sel = [i for i in range(n) if kinds[i] in (k, "good")]
        exact = metrics.pixel_metrics_exact([maps[i] for i in sel], [masks[i] for i in sel])
        assert rows[k]["pixel_ap"] == pytest.approx(exact["pixel_ap"], abs=5e-3)
        assert rows[k]["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=5e-3)
        assert rows[k]["image_auroc"] == pytest.approx(
            sk.roc_auc_score([kinds[i] == k for i in sel], [scores[i] for i in sel]), abs=1e-12)
        assert rows[k]["frames"] == kinds.count(k)
    assert _kind_metrics({"crack": by_kind["crack"], "good": by_kind["good"]}, kinds, scores) == {}


def test_false_alarm_places_match_brute_force():
    """Share of the normal pixels at or above the F1-max threshold per place, and the pixel-AP
    with a place's normal pixels left out, against sklearn on the kept pixels."""
    from linewatch.evaluate import _places

    rng = np.random.default_rng(3)
    masks, maps = [], []
    for i in range(8):
        g = np.zeros((40, 40), bool)
        if i % 2 == 0:
            y, x = rng.integers(4, 24, size=2)
            g[y:y + 10, x:x + 10] = True
        halo = metrics.near_defect(g)
        masks.append(g)  # scores overlap, and blur into a halo: false alarms at F1-max, most near defects
        maps.append((rng.normal(0, 0.3, g.shape) + 0.8 * g + 0.3 * halo).astype(np.float32))
    labels = [bool(g.any()) or i == 7 for i, g in enumerate(masks)]  # frame 7: defective, nothing marked
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
    acc = metrics.PixelAccumulator(lo, hi, n_bins=1 << 16)
    places = [_places(g, bad) for g, bad in zip(masks, labels)]
    for m, g, p in zip(maps, masks, places):
        acc.add(m, g, p)
    got = acc.false_alarms()
    assert set(got) == {"near_defect", "defective_frame", "good_frame"}
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([g.ravel() for g in masks])
    # the F1-max threshold, exactly
    t = max(np.unique(s), key=lambda t: 2 * np.sum(y & (s >= t)) / (np.sum(s >= t) + y.sum()))
    fp = ~y & (s >= t)
    shares = 0.0
    for name in got:
        where = np.concatenate([p.get(name, np.zeros(g.shape, bool)).ravel() for p, g in zip(places, masks)]) & ~y
        assert got[name]["share_at_f1max"] == pytest.approx(np.sum(fp & where) / fp.sum(), abs=0.02)
        keep = ~where
        assert got[name]["ap_without"] == pytest.approx(sk.average_precision_score(y[keep], s[keep]), abs=3e-3)
        shares += got[name]["share_at_f1max"]
    assert shares == pytest.approx(1.0)  # every normal pixel lies in exactly one place
    assert all(0.1 < v["share_at_f1max"] < 0.6 for v in got.values())  # the halo, and noise everywhere
    assert got["near_defect"]["ap_without"] > metrics.ap_from_counts(*acc.counts())
    # merging keeps the places
    half = metrics.PixelAccumulator(lo, hi, n_bins=1 << 16)
    rest = metrics.PixelAccumulator(lo, hi, n_bins=1 << 16)
    for i, (m, g, p) in enumerate(zip(maps, masks, places)):
        (half if i < 4 else rest).add(m, g, p)
    merged = half.merged(rest).false_alarms()
    assert {k: pytest.approx(v) for k, v in got.items()} == merged


def test_near_defect_is_a_ring_scaled_to_the_frame():
    m = np.zeros((100, 200), bool)
    m[50, 100] = True
    near = metrics.near_defect(m, fraction=0.05)  # 5 px of the shorter side (100)
    assert not near[50, 100]
    assert near[45, 95] and near[55, 105] and not near[44, 100] and not near[50, 106]
    assert near.sum() == 11 * 11 - 1


def test_non_finite_scores_are_an_error_not_a_rank():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.auroc([1, 0, 1, 0], [np.nan, np.nan, 0.9, 0.1])
    acc = metrics.PixelAccumulator(0.0, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(np.array([[0.5, np.inf]], np.float32), np.array([[True, False]]))


def test_kind_table_shows_a_kind_that_one_method_left_out():
    """The dqformer method scores only its held-out frames, which may lack a kind the zero-shot
    methods have: that kind's row for it says 0 frames and no figures (it once raised KeyError)."""
    from linewatch.eval_report import kind_table
    from linewatch.evaluate import MethodResult

    row = {"frames": 3.0, "pixel_share": 0.5, "pixel_auroc": 0.9, "pixel_ap": 0.2, "aupro": 0.8, "image_auroc": 0.7}
    coarse = MethodResult("coarse", by_kind={"crack": row, "fray": row})
    dq = MethodResult("dqformer", by_kind={"crack": row}, frames=[0, 1, 2])
    lines = kind_table({"coarse": coarse, "dqformer": dq}).splitlines()
    assert "| fray | 3 | 0.500 | coarse | 0.9000 | 0.2000 | 0.8000 | 0.7000 |" in lines
    assert "| fray | 0 | 0.000 | dqformer | - | - | - | - |" in lines
