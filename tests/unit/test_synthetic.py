"""The synthetic line: determinism, exact masks, defect rate, pacing, n_frames; defect functions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from linewatch.acquire import defects
from linewatch.acquire.base import SourceFrame
from linewatch.acquire.synthetic import Pacer, SyntheticLine
from linewatch.config import SyntheticSource


def make_line(**kw) -> SyntheticLine:
    cfg = SyntheticSource(**{"width": 96, "height": 80, "fps": 0, **kw})
    line = SyntheticLine(cfg)
    line.open()
    return line


def take(line: SyntheticLine, n: int | None = None) -> list[SourceFrame]:
    stop = threading.Event()
    out = []
    for f in line.frames(stop):
        out.append(f)
        if n is not None and len(out) >= n:
            stop.set()
    return out


def test_same_seed_same_frames_and_masks():
    a = take(make_line(seed=7, defect_rate=0.5), 12)
    b = take(make_line(seed=7, defect_rate=0.5), 12)
    c = take(make_line(seed=8, defect_rate=0.5), 12)
    for fa, fb in zip(a, b):
        assert np.array_equal(fa.image, fb.image)
        assert np.array_equal(fa.gt, fb.gt)
        assert fa.meta.extra == fb.meta.extra
    assert not all(np.array_equal(fa.image, fc.image) for fa, fc in zip(a, c))


def test_frames_shape_ids_and_meta():
    frames = take(make_line(channels=1, n_frames=5))
    assert [f.meta.frame_id for f in frames] == [0, 1, 2, 3, 4]
    for f in frames:
        assert f.image.shape == (80, 96, 1) and f.image.dtype == np.uint8
        assert f.gt.shape == (80, 96) and f.gt.dtype == bool
        assert f.meta.has_gt and (f.meta.height, f.meta.width) == (80, 96)
        assert f.meta.t_capture > 0


def test_normal_parts_are_not_identical():
    line = make_line(defect_rate=0.0)
    a, _, _ = line.render(0)
    b, _, _ = line.render(1)
    assert not np.array_equal(a, b)
    assert abs(float(a.mean()) - float(b.mean())) < 40  # same product, small variations


@pytest.mark.parametrize("product", ["brushed_metal", "woven", "speckled"])
def test_mask_is_exactly_the_changed_pixels(product):
    line = make_line(product=product, defect_rate=1.0, width=128, height=128)
    for i in range(30):
        image, mask, extra = line.render(i)
        clean, clean_mask, clean_extra = line.render(i, defects=False)
        assert not clean_mask.any() and clean_extra["defect_kinds"] == []
        changed = (image != clean).any(axis=-1)
        assert mask.any()
        assert not (changed & ~mask).any(), "pixels changed outside the mask"
        assert changed[mask].mean() > 0.9, "masked pixels that do not differ"
        assert len(extra["defect_kinds"]) in (1, 2)
        assert len(extra["defect_boxes"]) == len(extra["defect_kinds"]) == len(extra["defect_positions"])


def test_boxes_and_positions_match_the_mask():
    line = make_line(defect_rate=1.0, width=128, height=128)
    for i in range(20):
        _, mask, extra = line.render(i)
        for (x0, y0, x1, y1), pos in zip(extra["defect_boxes"], extra["defect_positions"]):
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert mask[y0:y1, x0:x1].any()
            assert pos in {"top-left", "top", "top-right", "left", "center", "right",
                           "bottom-left", "bottom", "bottom-right"}


def test_defect_rate_roughly_honoured():
    line = make_line(defect_rate=0.25, width=64, height=64)
    n_bad = sum(bool(line.render(i)[2]["defect_kinds"]) for i in range(400))
    assert 60 <= n_bad <= 140  # 100 expected; binomial sd ~ 8.7


def test_only_configured_kinds_are_drawn():
    line = make_line(defect_rate=1.0, defect_kinds=["spot", "missing"], width=64, height=64)
    kinds = {k for i in range(60) for k in line.render(i)[2]["defect_kinds"]}
    assert kinds == {"spot", "missing"}


def test_n_frames_ends_the_stream():
    frames = take(make_line(n_frames=7))
    assert len(frames) == 7


def test_fps_paces_frames():
    line = make_line(fps=200.0, n_frames=20)
    t0 = time.monotonic()
    frames = take(line)
    assert len(frames) == 20
    assert time.monotonic() - t0 >= 0.09  # 19 periods of 5 ms at least


def test_stop_event_ends_a_paced_stream():
    line = make_line(fps=2.0)
    stop = threading.Event()
    it = line.frames(stop)
    next(it)
    stop.set()
    assert list(it) == []


def test_pacer_does_not_wait_at_fps_zero():
    pacer = Pacer(0.0)
    stop = threading.Event()
    assert all(pacer.wait(stop) for _ in range(1000))
    stop.set()
    assert not pacer.wait(stop)


@pytest.mark.parametrize("kind", defects.DEFECT_KINDS)
def test_defect_area_in_range_and_visible(kind):
    rng = np.random.default_rng(3)
    image = np.full((128, 128, 3), 120, np.uint8)
    for _ in range(15):
        out, mask, info = defects.apply_defect(image.copy(), kind, rng)
        area = int(mask.sum())
        assert defects.MIN_AREA_FRAC * 128 * 128 <= area <= defects.MAX_AREA_FRAC * 128 * 128
        assert info.area_px == area and info.kind == kind
        diff = np.abs(out.astype(int) - image.astype(int)).max(axis=-1)
        assert np.median(diff[mask]) >= 20, "defect contrast too low to see"
        assert (diff[~mask] == 0).all()


def test_unknown_defect_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown defect kind"):
        defects.draw_defect(np.random.default_rng(0), "dent", 64, 64)


def test_position_word():
    assert defects.position_word((0, 0, 10, 10), 90, 90) == "top-left"
    assert defects.position_word((40, 40, 50, 50), 90, 90) == "center"
    assert defects.position_word((80, 40, 90, 50), 90, 90) == "right"
    assert defects.position_word((40, 80, 50, 90), 90, 90) == "bottom"


def test_perlin_noise_and_mask():
    rng = np.random.default_rng(0)
    n = defects.perlin_noise(rng, 64, 80, (4, 5))
    assert n.shape == (64, 80) and n.dtype == np.float32
    assert -1.5 < n.min() < 0 < n.max() < 1.5
    f = defects.fractal_noise(rng, 64, 64)
    assert f.std() > 0.05
    m = defects.perlin_mask(rng, 64, 64, min_area_frac=0.01, max_area_frac=0.3)
    assert m.dtype == bool and 0.01 * 4096 <= m.sum() <= 0.3 * 4096


def test_paste_noise_anomaly_changes_only_the_mask():
    rng = np.random.default_rng(1)
    image = np.full((64, 64, 1), 100, np.uint8)
    out, mask = defects.paste_noise_anomaly(image, rng, beta_range=(0.0, 0.2))
    assert out.shape == image.shape and mask.any()
    assert (out[~mask] == 100).all()
    assert (out[mask] != 100).mean() > 0.5
