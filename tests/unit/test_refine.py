"""PGT pieces with a tiny fake extractor: pseudo-normal choice, sample synthesis, the refiner's
worker (versions, on_model records, latest-lot-wins, failures), the contaminating selector."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from linewatch.config import RefineConfig
from linewatch.evaluate import ContaminatingSelector
from linewatch.models import zeroshot as zs
from linewatch.models.ard import grid_scale, lot_median, normalise_grid
from linewatch.refine.pseudo import select_pseudo_normals
from linewatch.refine.synth import make_samples
from linewatch.refine.worker import LotJob, Refiner

H, W = 32, 48


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeExtract:
    """Features = the image averaged over 8x8 cells (3 channels); records its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return list(F.avg_pool2d(x, 8))


def _lot(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(100, 120, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    ext = FakeExtract()
    feats = ext(images)
    grids = [torch.rand(H // 8, W // 8) for _ in range(n)]
    scale = grid_scale(grids)
    return images, feats, grids, scale


def _job(lot_id="lot0", seed=0):
    images, feats, grids, scale = _lot(seed=seed)
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    return LotJob(lot_id, images, feats, [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats], z,
                  [float(g.max()) for g in grids], scale)


def _cfg(**kw):
    base = dict(steps=3, samples_per_lot=4, batch_size=2, crop_px=32, width=8, cpu_share=1.0,
                time_budget_s=1e6, pseudo_normal_fraction=0.5)
    base.update(kw)
    return RefineConfig(**base)


def test_pseudo_normals_are_the_lowest_scores():
    assert select_pseudo_normals([5, 1, 9, 2, 7, 3], 0.5) == [1, 3, 5]
    assert select_pseudo_normals([5, 1], 0.1, min_count=2) == [1, 0]
    assert select_pseudo_normals([], 0.5) == []


def test_samples_have_features_scores_and_masks_of_the_frame():
    images, feats, grids, scale = _lot()
    refs = [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats]
    ext = FakeExtract()
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    out = make_samples(images, feats, refs, z, [0, 1, 2], scale, 6, ext, zs.Scorer(0.3), np.random.default_rng(0),
                       normal_share=0.0)
    assert len(out) == 6 and ext.calls >= 1
    for s in out:
        assert s.image.shape == (H, W, 3) and s.mask.shape == (H, W) and s.mask.any()
        assert s.feat.shape == (3, H // 8, W // 8) and s.z.shape == (H // 8, W // 8)
        assert s.detail.shape == (2, H, W)


def test_hot_cells_of_a_pseudo_normal_are_left_out_of_training():
    """A pseudo-normal frame's own hot cells may be a real defect: neither normal nor anomaly."""
    images, feats, grids, scale = _lot()
    refs = [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats]
    z = [torch.zeros(H // 8, W // 8) for _ in images]
    z[0][1, 2] = 3.0  # one hot cell in frame 0
    out = make_samples(images, feats, refs, z, [0], scale, 4, FakeExtract(), zs.Scorer(0.3), np.random.default_rng(0),
                       normal_share=0.0)
    for s in out:
        cell = np.zeros((H, W), bool)
        cell[8:16, 16:24] = True
        assert (s.ignore == (cell & ~s.mask)).all()


def test_samples_take_their_source_frames_position_offset_as_tier_2_does():
    """A sample's coarse scores are calibrated like its source frame's at tier 2: a place the lot's
    position calibration lowered is lowered on the sample too (else PGT trains on another map)."""
    images, feats, grids, scale = _lot()
    refs = [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats]
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    offset = torch.zeros(H // 8, W // 8)
    offset[1, 2] = 5.0 * scale
    plain = make_samples(images, feats, refs, z, [0, 1], scale, 4, FakeExtract(), zs.Scorer(0.3),
                         np.random.default_rng(0), normal_share=1.0)
    calibrated = make_samples(images, feats, refs, z, [0, 1], scale, 4, FakeExtract(), zs.Scorer(0.3),
                              np.random.default_rng(0), normal_share=1.0, position=[offset, None] + [None] * 4)
    for a, b in zip(plain, calibrated):
        d = (a.z - b.z).numpy()
        if (a.image == images[0]).all():  # frame 0 has the offset: its cell (1, 2) falls by 5 units
            assert d[1, 2] - np.median(d) == pytest.approx(5.0, abs=1e-4)
        else:
            assert np.allclose(d, 0.0)


def test_samples_are_scored_against_the_tier_2_memory_too():
    """Regression: with a tier-2 memory the lot's maps are scored against earlier lots' frames as
    well, but the PGT samples were scored against a few frames of the lot only (another map)."""
    images, feats, grids, scale = _lot()
    refs = [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats]
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    memory = [zs.Reference(torch.rand(20, 3)) for _ in range(3)]
    seen = []

    class SpyScorer(zs.Scorer):
        __slots__ = ()

        def score(self, feat, against):
            seen.append(list(against))
            return super(SpyScorer, self).score(feat, against)

    scorer = SpyScorer(0.3)
    out = make_samples(images, feats, refs, z, [0, 1], scale, 4, FakeExtract(), scorer, np.random.default_rng(0),
                       references=2, memory=memory)
    assert len(out) == 4 and len(seen) == 4
    for against in seen:
        assert len(against) == 2 + 3 and all(any(m is r for r in against) for m in memory)


def test_drawn_share_mixes_simulator_defects_with_pastes(monkeypatch):
    from linewatch.refine import synth

    calls = {"drawn": 0, "paste": 0}
    real_draw, real_paste = synth.apply_defect, synth.paste_noise_anomaly

    def draw(*a, **k):
        calls["drawn"] += 1
        return real_draw(*a, **k)

    def paste(*a, **k):
        calls["paste"] += 1
        return real_paste(*a, **k)

    monkeypatch.setattr(synth, "apply_defect", draw)
    monkeypatch.setattr(synth, "paste_noise_anomaly", paste)
    images, feats, grids, scale = _lot()
    refs = [zs.Reference(f.reshape(3, -1).T.contiguous()) for f in feats]
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    out = make_samples(images, feats, refs, z, [0, 1, 2], scale, 40, FakeExtract(), zs.Scorer(0.3),
                       np.random.default_rng(1), normal_share=0.0, drawn_share=0.5)
    assert calls["drawn"] + calls["paste"] == 40 and 10 < calls["drawn"] < 30
    for s in out:  # only the anomaly's own pixels changed
        assert s.mask.any() and any((im[~s.mask] == s.image[~s.mask]).all() for im in images)


def test_a_round_releases_a_version_recorded_with_its_lot():
    calls = []
    r = Refiner(_cfg(), 3, FakeExtract(), zs.Scorer(0.3), on_model=lambda *a: calls.append(a))
    try:
        assert r.current() is None
        r.submit(_job("lot0"))
        assert r.wait_idle(120)
        ard = r.current()
        assert ard is not None and ard.trained_on_lot == "lot0"
        assert ard.model == {"name": "ard", "version": ard.version, "kind": "ard"}
        name, version, kind, details, lot = calls[0]
        assert (name, version, kind, lot) == ("ard", ard.version, "ard", "lot0")
        assert details["trained_on_lot"] == "lot0" and details["steps"] == 3
        r.submit(_job("lot1", seed=1))
        assert r.wait_idle(120)
        assert r.current().trained_on_lot == "lot1" and r.current().version != ard.version
        assert r.last_report["previous"] == ard.version  # progressive: trained on from the last ARD
        assert all(not p.requires_grad for p in ard.module.parameters())  # a released ARD is frozen
    finally:
        r.close()


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_refine_uses_the_given_version_and_maps_to_the_frame_grid(sigma):
    images, feats, grids, scale = _lot()
    r = Refiner(_cfg(), 3, FakeExtract(), zs.Scorer(0.3), skip_sigma=sigma)
    z = [normalise_grid(g, scale, lot_median(grids)) for g in grids]
    maps = r.refine(images, feats, z, None)
    from linewatch.engines.zeroshot import SMOOTH_SIGMA_CELLS
    from linewatch.models.zeroshot import to_pixel_map

    # no ARD yet: the engine's coarse map as is, blurred as the engine's smooth_cells says
    up = np.stack([to_pixel_map(g, H, W, SMOOTH_SIGMA_CELLS if sigma is None else sigma) for g in z])
    assert np.allclose(np.stack(maps), up, atol=1e-5)
    from linewatch.runtime.models import ARD_SPEC

    assert ARD_SPEC.defaults["skip_sigma"] == SMOOTH_SIGMA_CELLS  # an exported ARD blurs as the engine
    full = Refiner.to_frame(maps[0], 64, 96)
    assert full.shape == (64, 96) and full.dtype == np.float32
    # without an ARD the decoder is not run; its shortcut must be what the untrained decoder returns
    from linewatch.models.backbone import preprocess

    with torch.inference_mode():
        decoded = r._base(preprocess(np.stack(images)), torch.stack(feats), torch.stack(z)[:, None])[:, 0]
    assert np.allclose(np.stack(maps), decoded.numpy(), atol=1e-5)


def test_a_newer_lot_replaces_a_pending_one():
    """Guards against PGT queueing lots without bound when training is slower than the line."""
    gate = threading.Event()

    class SlowExtract(FakeExtract):
        def __call__(self, images):
            gate.wait(30)
            return super().__call__(images)

    r = Refiner(_cfg(), 3, SlowExtract(), zs.Scorer(0.3))
    try:
        r.submit(_job("lot0"))
        r.submit(_job("lot1"))
        r.submit(_job("lot2"))
        gate.set()
        assert r.wait_idle(120)
        assert r.skipped >= 1
        assert r.current().trained_on_lot == "lot2"
    finally:
        r.close()


def test_a_failed_round_keeps_the_current_ard():
    class Broken(FakeExtract):
        def __call__(self, images):
            raise RuntimeError("extractor down")

    r = Refiner(_cfg(), 3, Broken(), zs.Scorer(0.3))
    try:
        r.submit(_job())
        assert r.wait_idle(60)
        assert r.failed == 1 and r.current() is None
    finally:
        r.close()


def test_contaminating_selector_puts_the_asked_share_of_defective_frames():
    sel = ContaminatingSelector(0.1, 2, seed=0)
    for k in range(40):
        sel.labels[f"l{k}"] = [i < 3 for i in range(32)]  # 3 defective of 32
        scores = list(np.linspace(1, 0, 32))  # defective frames scored highest
        picked = sel(f"l{k}", scores, 0.5)
        assert len(picked) == 16 and len(set(picked)) == 16
    share = sel.picked_defective / sel.picked
    assert 0.06 < share < 0.14


def test_non_finite_lots_and_diverged_rounds_release_no_ard():
    """A NaN in a lot must not reach a released decoder: a NaN ARD would turn every later lot's
    maps into NaN (no region above any threshold: a silent OK)."""
    class Flaky(FakeExtract):  # an extractor that overflows (fp16 engines can) on its first calls
        def __call__(self, images):
            feats = super().__call__(images)
            return [f * float("nan") for f in feats] if self.calls <= self.bad_calls else feats

    extract = Flaky()
    extract.bad_calls = 0
    r = Refiner(_cfg(), 3, extract, zs.Scorer(0.3))
    try:
        job = _job()
        job.z[0][0, 0] = float("nan")  # the lot's coarse scores
        r.submit(job)
        assert r.wait_idle(60)
        assert r.failed == 1 and r.current() is None and extract.calls == 0  # not even sampled
        extract.bad_calls = 1000  # finite coarse scores, NaN features of the training samples
        r.submit(_job("lot1"))
        assert r.wait_idle(60)
        assert extract.calls > 0 and r.failed == 2 and r.current() is None and r.trained == 0
        extract.bad_calls = 0
        r.submit(_job("lot2"))  # a sound lot still trains
        assert r.wait_idle(60)
        assert r.current() is not None and r.current().trained_on_lot == "lot2"
    finally:
        r.close()


def _recipe_job(lot_id, recipe, seed=0):
    job = _job(lot_id, seed=seed)
    job.recipe = recipe
    return job


def test_each_recipe_has_its_own_ard_and_another_recipe_gets_none():
    """An ARD learned on one product never refines another's lots; a new product's first ARD
    starts from the untrained decoder, not from the other product's weights."""
    r = Refiner(_cfg(), 3, FakeExtract(), zs.Scorer(0.3))
    try:
        r.submit(_recipe_job("a0", "bracket"))
        assert r.wait_idle(120)
        a = r.current("bracket")
        assert a is not None and a.recipe == "bracket" and r.current("housing") is None and r.current() is None
        r.submit(_recipe_job("h0", "housing", seed=1))
        assert r.wait_idle(120)
        assert r.current("housing").trained_on_lot == "h0" and r.last_report["previous"] is None
        assert r.last_report["recipe"] == "housing"
        assert r.current("bracket") is a  # untouched by the other product's round
    finally:
        r.close()


def test_two_refiners_started_together_name_their_versions_apart():
    """ARD versions are unique in the model-versions table (name, version): two refiners built in
    the same second (a reload just after start, two lines on one database) must not share one."""
    runs = {Refiner(_cfg(), 3, FakeExtract(), zs.Scorer(0.3)).run_id for _ in range(20)}
    assert len(runs) == 20


class SlowExtract(FakeExtract):
    def __call__(self, images):
        import time

        time.sleep(0.3)
        return super().__call__(images)


def test_building_samples_counts_against_the_time_budget():
    """Sample building stops at half the budget with the samples built so far; a round no longer
    overruns its budget by the whole build (32 samples at 0.3 s per batch of 4 = 2.4 s)."""
    import time

    r = Refiner(_cfg(samples_per_lot=32, time_budget_s=1.0, steps=100000), 3, SlowExtract(), zs.Scorer(0.3))
    try:
        t0 = time.monotonic()
        r.submit(_job("lot0"))
        assert r.wait_idle(120)
        took = time.monotonic() - t0
        assert took < 2.0, took
        assert 0 < r.last_report["samples"] < 32 and r.current() is not None
    finally:
        r.close()


def test_close_interrupts_sample_building():
    import time

    r = Refiner(_cfg(samples_per_lot=64), 3, SlowExtract(), zs.Scorer(0.3))
    r.submit(_job("lot0"))
    time.sleep(0.5)  # inside the build (16 batches at 0.3 s)
    t0 = time.monotonic()
    r.close(timeout_s=10.0)
    assert time.monotonic() - t0 < 1.5 and not r._thread.is_alive()
    assert r.current() is None and r.trained == 0


@pytest.mark.parametrize("steps, wait", [(3, "r.wait_idle(60)"), (100000, "time.sleep(1.0)")],
                         ids=["idle", "training"])
def test_the_worker_ends_with_the_program_when_close_was_never_called(tmp_path, steps, wait):
    """A daemon that could not close its engine (its inspector thread would not drain) still
    exits: the training thread ends when the main thread has finished, idle or mid-round."""
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "exit_without_close.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import test_refine as t
        from linewatch.models import zeroshot as zs
        from linewatch.refine.worker import Refiner
        r = Refiner(t._cfg(steps={steps}), 3, t.FakeExtract(), zs.Scorer(0.3))
        r.submit(t._job("lot0"))
        {wait}
        sys.exit(3)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
