"""The Anomaly Refinement Decoder: shapes, the identity start, score units, one training round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.models.backbone import preprocess
from linewatch.models.ard import ARD, detail_maps, grid_scale, lot_median, normalise_grid
from linewatch.refine.synth import Sample
from linewatch.refine.train import train_ard


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and the CPU is shared)
    yield
    torch.set_num_threads(n)


def _inputs(n=2, h=64, w=96, c=12):
    torch.manual_seed(0)
    return torch.randn(n, 3, h, w), torch.randn(n, c, h // 8, w // 8), torch.randn(n, 1, h // 8, w // 8)


def test_output_is_a_full_resolution_logit_map():
    img, feat, z = _inputs()
    out = ARD(feat_dim=12, width=8)(img, feat, z)
    assert out.shape == (2, 1, 64, 96)
    assert torch.isfinite(out).all()


def test_untrained_decoder_returns_the_coarse_map_upsampled():
    """Guards against an untrained ARD (the first lot, before any PGT) changing the coarse ranking."""
    img, feat, z = _inputs()
    with torch.inference_mode():
        out = ARD(feat_dim=12, width=8)(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(out, up, atol=1e-6)


def test_untrained_decoder_with_skip_blur_returns_the_engine_coarse_map():
    """With ``skip_sigma`` the untrained ARD reproduces the engine's blurred coarse map."""
    from linewatch.models.zeroshot import to_pixel_map

    img, feat, z = _inputs()
    with torch.inference_mode():
        out = ARD(feat_dim=12, width=8, skip_sigma=0.5)(img, feat, z)
    for k in range(2):
        ref = torch.from_numpy(to_pixel_map(z[k, 0], 64, 96, 0.5))
        assert torch.allclose(out[k, 0], ref, atol=1e-5)


def _frame_with_a_dark_line(h=64, w=96):
    rng = np.random.default_rng(0)
    img = np.clip(128 + rng.normal(0, 3, (h, w, 1)), 0, 255).repeat(3, -1).astype(np.uint8)
    img[20:44, 40:42] = 70  # a thin dark crack
    return img


def test_detail_maps_mark_a_dark_line_and_nothing_else():
    img = _frame_with_a_dark_line()
    with torch.inference_mode():
        d = detail_maps(preprocess(img[None]))[0]
    assert d.shape == (2, 64, 96)
    dark, bright = d[0], d[1]
    line = torch.zeros(64, 96, dtype=torch.bool)
    line[20:44, 40:42] = True
    assert dark[line].mean() > 1.5  # about the clip: the crack is the frame's strongest contrast
    assert dark[~line].median() < 0.05 and bright[line].max() == 0.0
    assert float(d.min()) >= 0.0 and float(d.max()) <= 2.0


def test_detail_gain_sharpens_a_coarse_blob_onto_the_line():
    """A positive gain on the dark map moves the score from the blurred cell onto the crack."""
    img = _frame_with_a_dark_line()
    z = torch.zeros(1, 1, 8, 12)
    z[0, 0, 2:6, 4:6] = 2.0  # the coarse cells around the crack
    feat = torch.zeros(1, 12, 8, 12)
    ard = ARD(feat_dim=12, width=8)
    with torch.inference_mode():
        before = ard(preprocess(img[None]), feat, z)[0, 0]
        ard.detail_gain.copy_(torch.tensor([0.5, 0.0]))
        after = ard(preprocess(img[None]), feat, z)[0, 0]
    halo = (slice(24, 40), slice(34, 38))  # inside the hot cells, beside the crack
    assert after[20:44, 40:42].mean() > before[20:44, 40:42].mean() + 0.3
    assert after[halo].mean() <= before[halo].mean() + 0.05


def test_correction_cannot_shift_a_whole_frame():
    """A constant head output (a per-frame bias) is removed: the map stays the coarse map."""
    img, feat, z = _inputs()
    ard = ARD(feat_dim=12, width=8)
    torch.nn.init.constant_(ard.head.bias, 0.7)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(out, up, atol=1e-5)


@pytest.mark.parametrize("delta_max", [0.5, 2.0])
def test_correction_is_bounded_by_delta_max(delta_max):
    """Whatever the head says, no pixel moves more than ``delta_max`` from the coarse map, and a
    large head output does reach close to the bound (the bound is the config's, not a constant)."""
    img, feat, z = _inputs()
    ard = ARD(feat_dim=12, width=8, delta_max=delta_max)
    torch.nn.init.normal_(ard.head.weight, std=50.0)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    change = (out - up).abs()
    assert float(change.max()) <= delta_max + 1e-5
    assert float(change.max()) > 0.9 * delta_max


def test_rank_loss_falls_as_anomaly_pixels_outrank_the_hardest_normal_ones():
    from linewatch.refine.train import _rank_loss

    target = torch.zeros(1, 1, 32, 32)
    target[..., 10:14, 10:14] = 1
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - same pairs for both maps
    scores = torch.rand(1, 1, 32, 32)
    good, bad = scores + 2 * target, scores - 2 * target
    assert _rank_loss(good, target, gen()) < 0.2 < 1.5 < _rank_loss(bad, target, gen())
    assert _rank_loss(scores, torch.zeros_like(target), gen()) is None  # nothing to rank
    # a real defect in a pseudo-normal frame (hot, marked ignore) is not taken as a hard normal
    hot = torch.zeros_like(target, dtype=torch.bool)
    hot[..., 20:24, 20:24] = True
    with_defect = good + 5 * hot
    assert _rank_loss(with_defect, target, gen()) > 1.0
    assert _rank_loss(with_defect, target, gen(), ignore=hot) < 0.2


def test_gate_leaves_cold_pixels_at_their_coarse_score():
    img, feat, _ = _inputs()
    z = torch.full((2, 1, 8, 12), -1.0)
    z[..., 2:5, 3:7] = 3.0  # a hot region; everything else cold (below 0 lot units)
    ard = ARD(feat_dim=12, width=8, delta_max=1.0, gate_units=1.0)
    torch.nn.init.normal_(ard.head.weight, std=50.0)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    change = (out - up).abs()
    assert float(change[up <= 0].max()) == 0.0
    assert float(change[up >= 1.0].max()) > 0.5


def test_config_refuses_a_correction_larger_than_the_gate():
    from linewatch.config import Config

    with pytest.raises(ValueError, match="gate_units"):
        Config.model_validate({"refine": {"delta_max": 2.0, "gate_units": 1.0}})
    assert Config.model_validate({"refine": {"delta_max": 2.0, "gate_units": 0.0}}).refine.delta_max == 2.0


def test_delta_max_must_be_positive():
    with pytest.raises(ValueError, match="delta_max"):
        ARD(feat_dim=12, width=8, delta_max=0.0)


def test_mismatched_grids_are_refused():
    img, feat, z = _inputs()
    with pytest.raises(ValueError, match="1/8"):
        ARD(feat_dim=12, width=8)(img, feat[..., :-1], z[..., :-1])


def test_score_units_are_robust_to_one_outlier_grid():
    grids = [torch.rand(8, 8) for _ in range(6)]
    base = grid_scale(grids)
    grids.append(torch.rand(8, 8) * 100)  # one defective frame with huge scores
    assert grid_scale(grids) < 2 * base
    off = lot_median(grids[:6])
    z = normalise_grid(grids[0], base, off)
    assert torch.allclose(z, (grids[0] - off) / base)


def test_training_learns_a_pasted_square():
    """A few steps on crops with an obvious pasted square must lower the loss and raise the
    logits inside the square above those outside."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    samples = []
    for k in range(4):
        img = rng.integers(90, 110, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=bool)
        y, x = 8 * int(rng.integers(0, 3)), 8 * int(rng.integers(0, 3))
        mask[y:y + 16, x:x + 16] = True
        img[mask] = 250
        z = torch.zeros(4, 4)
        z[y // 8:(y + 16) // 8, x // 8:(x + 16) // 8] = 1.0
        samples.append(Sample(img, torch.randn(6, 4, 4) * 0.1, z, mask))
    ard = ARD(feat_dim=6, width=8)
    contrast_before = _contrast(ard, samples[0])
    rep = train_ard(ard, samples, steps=40, time_budget_s=1e6, rng=rng, batch_size=4, crop_px=32, lr=1e-2)
    assert rep.steps == 40 and rep.stopped_by == "steps"
    assert rep.loss_last < rep.loss_first
    assert _contrast(ard, samples[0]) > contrast_before + 0.5


def _contrast(ard, s):
    """Mean logit inside the anomaly minus outside."""
    with torch.inference_mode():
        out = ard(preprocess(s.image[None]), s.feat[None], s.z[None, None])[0, 0].numpy()
    return float(out[s.mask].mean() - out[~s.mask].mean())


def test_training_stops_on_request():
    rng = np.random.default_rng(1)
    s = Sample(np.zeros((32, 32, 3), np.uint8), torch.zeros(4, 4, 4), torch.zeros(4, 4), np.zeros((32, 32), bool))
    rep = train_ard(ARD(4, 8), [s], steps=100, time_budget_s=60, rng=rng, should_stop=lambda: True)
    assert rep.steps == 0 and rep.stopped_by == "stop"


def test_raise_max_zero_only_lowers_scores():
    img, feat, z = _inputs()
    ard = ARD(feat_dim=12, width=8, delta_max=1.0, raise_max=0.0)
    torch.nn.init.normal_(ard.head.weight, std=50.0)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    assert float((out - up).max()) <= 1e-6
    assert float((out - up).min()) < -0.5  # it does lower
    with pytest.raises(ValueError, match="raise_max"):
        ARD(feat_dim=12, width=8, raise_max=-0.1)


def test_peak_window_never_hollows_out_a_plateau_but_trims_its_halo():
    """Inside a hot plateau every pixel is its own neighbourhood's peak: the decoder may not lower
    it; around it (the halo of the upsampled cells) it may, at most to how far the pixel lies below
    the peak."""
    img, feat, _ = _inputs()
    z = torch.zeros(2, 1, 8, 12)
    z[..., 1:7, 2:10] = 3.0  # a large hot region
    ard = ARD(feat_dim=12, width=8, delta_max=2.0, peak_window=9)
    torch.nn.init.normal_(ard.head.weight, std=50.0)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    change = out - up
    plateau = up >= 3.0 - 1e-6
    assert float(change[plateau].min()) >= -1e-5
    peak = torch.nn.functional.max_pool2d(up, 9, stride=1, padding=4)
    assert bool((change >= -(peak - up) - 1e-5).all())
    assert float(change[~plateau].min()) < -0.2  # the halo is trimmed
    with pytest.raises(ValueError, match="peak_window"):
        ARD(feat_dim=12, width=8, peak_window=8)


def test_peak_window_caps_a_rise_at_the_neighbourhood_peak():
    """With raise_max > 0 the decoder may lift a pixel only up to the highest coarse score within
    its window: the outskirts of a hot region may rise towards its peak, nothing rises above a
    peak and a cold neighbourhood stays cold. (Uncapped rises let dark normal texture climb above
    real defects: Kolektor pixel-AUROC fell below coarse.)"""
    img, feat, _ = _inputs()
    z = torch.zeros(2, 1, 8, 12)
    z[..., 3:5, 4:6] = 3.0  # a small hot spot in a cold frame
    ard = ARD(feat_dim=12, width=8, delta_max=2.0, raise_max=2.0, peak_window=9)
    torch.nn.init.normal_(ard.head.weight, std=50.0)
    with torch.inference_mode():
        out = ard(img, feat, z)
    up = torch.nn.functional.interpolate(z, size=(64, 96), mode="bilinear", align_corners=False)
    peak = torch.nn.functional.max_pool2d(up, 9, stride=1, padding=4)
    change = out - up
    assert bool((out <= peak + 1e-5).all()) and float(out.max()) <= float(up.max()) + 1e-5
    assert float(change[peak <= 1e-6].abs().max()) <= 1e-6  # cold neighbourhoods: untouched
    outskirts = (up > 0.05) & (up < peak - 0.5)
    assert float(change[outskirts].max()) > 0.2  # but the spot's outskirts do rise


def test_config_refuses_an_even_peak_window():
    from linewatch.config import Config

    with pytest.raises(ValueError, match="peak_window_px"):
        Config.model_validate({"refine": {"peak_window_px": 24}})
    assert Config.model_validate({"refine": {"peak_window_px": 0}}).refine.peak_window_px == 0
