"""The inspector never fails open: engine errors, wrong answers, NaN scores and deadline overruns
are FAULT; an uncalibrated threshold is NOT_INSPECTED; batches respect size and lot events."""

from __future__ import annotations

import threading
import time

import numpy as np

from linewatch.config import InspectConfig, ThresholdConfig
from linewatch.decision import Threshold
from linewatch.frames import EngineOutput, FrameMeta, LotEvent, LotEventKind, Verdict
from linewatch.inspector import Inspector, decide
from linewatch.ring import FrameRing

H = W = 8


class RecordingEngine:
    """Scores a frame by its mean pixel value; records every batch; can be told to misbehave."""

    name, version = "fake", "1"

    def __init__(self, mode: str = "ok", delay_s: float = 0.0):
        self.mode = mode
        self.delay_s = delay_s
        self.batches: list[list[int]] = []

    def warmup(self, height, width, channels):
        pass

    def infer(self, images, metas):
        self.batches.append([m.frame_id for m in metas])
        time.sleep(self.delay_s)
        if self.mode == "raise":
            raise RuntimeError("CUDA error: an illegal memory access")
        outs = [EngineOutput(np.full((H, W), float(im.mean()), np.float32), float(im.mean())) for im in images]
        if self.mode == "short":
            return outs[:-1]
        if self.mode == "nan":
            return [EngineOutput(o.score_map, float("nan")) for o in outs]
        if self.mode == "shape":
            return [EngineOutput(np.zeros((2, 2), np.float32), o.image_score) for o in outs]
        if self.mode == "no_map":  # malformed: decide() cannot even read the map's shape
            outs[0] = EngineOutput(None, outs[0].image_score)
            return outs
        if self.mode == "nan_map":  # a finite score over a map with a NaN: no region, a silent OK
            outs[0].score_map[0, 0] = np.nan
            return outs
        return outs

    def lot_closed(self, lot_id):
        return {}

    def close(self):
        pass


def run_frames(engine, values, *, deadline_ms=0.0, batch_size=4, thr=None, capture_age_s=0.0):
    ring = FrameRing(16, H, W, 1, "block", 1.0)
    results, lots = [], []
    thr = thr or ThresholdConfig(mode="fixed", value=100.0, min_region_px=0)
    ins = Inspector(ring, engine, InspectConfig(batch_size=batch_size, batch_wait_ms=50, deadline_ms=deadline_ms),
                    thr, results.append, lots.append)
    for i, v in enumerate(values):
        ring.put(np.full((H, W, 1), v, np.uint8),
                 FrameMeta(i, time.time() - capture_age_s, "c", H, W, lot_id="L"))
    ring.put_event(LotEvent(LotEventKind.CLOSED, "L", "r", "part_count", time.time()))
    ins.start()
    deadline = time.monotonic() + 10
    while (len(results) < len(values) or not lots) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ins.stop(5.0)
    return results, lots


def verdicts(results):
    return [r.verdict for r in sorted(results, key=lambda r: r.frame.frame_id)]


def test_scores_above_the_threshold_are_ng_with_regions_below_ok():
    results, lots = run_frames(RecordingEngine(), [50, 150, 60])
    assert verdicts(results) == [Verdict.OK, Verdict.NG, Verdict.OK]
    ng = next(r for r in results if r.verdict is Verdict.NG)
    assert ng.regions and ng.regions[0].bbox == (0, 0, W, H) and ng.threshold == 100.0
    assert [e.kind for e in lots] == [LotEventKind.CLOSED]


def test_batches_are_capped_and_events_come_after_their_frames():
    eng = RecordingEngine()
    results, lots = run_frames(eng, [10] * 6, batch_size=4)
    assert [len(b) for b in eng.batches] == [4, 2]
    assert sorted(f for b in eng.batches for f in b) == list(range(6))


def test_engine_exception_is_fault_for_every_frame_of_the_batch():
    results, _ = run_frames(RecordingEngine("raise"), [10, 20, 30])
    assert verdicts(results) == [Verdict.FAULT] * 3
    assert all("engine error: RuntimeError: CUDA error" in r.reason for r in results)


def test_missing_output_nan_score_and_wrong_map_shape_are_faults():
    for mode, why in (("short", "outputs for"), ("nan", "non-finite"), ("shape", "map for a")):
        results, _ = run_frames(RecordingEngine(mode), [10, 20])
        assert verdicts(results) == [Verdict.FAULT] * 2, mode
        assert all(why in r.reason for r in results), (mode, [r.reason for r in results])
    results, _ = run_frames(RecordingEngine("no_map"), [150, 20])
    first, second = sorted(results, key=lambda r: r.frame.frame_id)
    assert first.verdict is Verdict.FAULT and first.reason.startswith("engine returned an unusable output")
    assert second.verdict is Verdict.OK  # the inspector thread lives on and judges the rest of the batch
    results, _ = run_frames(RecordingEngine("nan_map"), [150, 20])
    first, second = sorted(results, key=lambda r: r.frame.frame_id)
    assert first.verdict is Verdict.FAULT and first.reason == "engine returned a non-finite score map"
    assert second.verdict is Verdict.OK


def test_a_lot_tier_2_cannot_judge_is_published_not_inspected_and_a_failure_fault():
    from linewatch.engines.base import Tier2Unavailable
    from linewatch.inspector import LotCloser, LotLedger

    class LotEngine(RecordingEngine):
        def lot_closed(self, lot_id):
            if lot_id == "small":
                raise Tier2Unavailable("lot 'small' has 1 frame(s)")
            raise RuntimeError("out of memory")

    published = []
    closer = LotCloser(LotEngine, ThresholdConfig(mode="fixed", value=1.0), LotLedger(),
                       lambda ev, refined, summary: published.append((ev.lot_id, refined, summary)))
    closer.start()
    for lot in ("small", "big"):
        closer.submit(LotEvent(LotEventKind.CLOSED, lot, "r", "part_count", time.time()))
    deadline = time.monotonic() + 10
    while len(published) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closer.stop(5.0)
    assert [p[0] for p in published] == ["small", "big"] and all(p[1] == [] for p in published)
    assert published[0][2]["tier2"] == "NOT_INSPECTED: lot 'small' has 1 frame(s)"
    assert published[1][2]["tier2"] == "FAULT: RuntimeError: out of memory"


def test_frames_without_a_tier_2_result_are_reported_not_inspected():
    """A lot whose frames the engine kept no features for (engine swapped, lot evicted) must say
    so in its lot message, not close as if tier 2 had judged it."""
    from linewatch.frames import FrameMeta
    from linewatch.inspector import LotCloser, LotLedger

    class Forgetful(RecordingEngine):
        has_tier2 = True

        def lot_closed(self, lot_id):
            return {}

    ledger = LotLedger()
    for lot in ("L", "M"):
        for fid in (1, 2):
            ledger.add(FrameMeta(fid, time.time(), "cam", 8, 8, lot_id=lot))
    published = []
    engine = [Forgetful()]
    closer = LotCloser(lambda: engine[0], ThresholdConfig(mode="fixed", value=1.0), ledger,
                       lambda ev, refined, summary: published.append((ev.lot_id, refined, summary)))
    closer.start()
    closer.submit(LotEvent(LotEventKind.CLOSED, "L", "r", "part_count", time.time()))
    deadline = time.monotonic() + 10
    while not published and time.monotonic() < deadline:
        time.sleep(0.01)
    engine[0] = RecordingEngine()  # a tier-1-only engine (DQFormer, CLIP): {} is all there is
    closer.submit(LotEvent(LotEventKind.CLOSED, "M", "r", "part_count", time.time()))
    while len(published) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closer.stop(5.0)
    assert published[0][1] == [] and published[0][2]["tier2"].startswith("NOT_INSPECTED: 2 of 2 frame(s)")
    assert "tier2" not in published[1][2]
    assert closer.refined_lots == 0


def test_a_lot_skipped_by_a_closer_behind_is_said_so_and_let_go_by_the_engine():
    from linewatch.inspector import LotCloser, LotLedger

    release = threading.Event()
    let_go = []

    class Slow(RecordingEngine):
        def lot_closed(self, lot_id):
            release.wait(10)
            return {}

        def lot_skipped(self, lot_id):
            let_go.append(lot_id)

    published = []
    closer = LotCloser(Slow, ThresholdConfig(mode="fixed", value=1.0), LotLedger(),
                       lambda ev, refined, summary: published.append((ev.lot_id, summary)), queue_max=1)
    closer.start()
    closer.submit(LotEvent(LotEventKind.CLOSED, "a", "r", "part_count", time.time()))
    deadline = time.monotonic() + 10
    while closer._q.qsize() and time.monotonic() < deadline:  # "a" taken: the closer is busy with it
        time.sleep(0.01)
    closer.submit(LotEvent(LotEventKind.CLOSED, "b", "r", "part_count", time.time()))  # queued
    closer.submit(LotEvent(LotEventKind.CLOSED, "c", "r", "part_count", time.time()))  # no room
    assert let_go == ["c"] and closer.skipped == 1
    assert published[0][0] == "c" and published[0][1]["tier2"] == "skipped: lot closer behind"
    release.set()
    assert closer.stop(5.0)
    assert [p[0] for p in published] == ["c", "a", "b"]


def test_deadline_overrun_before_and_after_the_engine_is_fault():
    """Regression guard for the peer anti-pattern: a timed-out detector must not pass the part."""
    results, _ = run_frames(RecordingEngine(), [10, 20], deadline_ms=100, capture_age_s=0.5)
    assert verdicts(results) == [Verdict.FAULT] * 2 and all("waited" in r.reason for r in results)
    results, _ = run_frames(RecordingEngine(delay_s=0.3), [10, 20], deadline_ms=150)
    assert verdicts(results) == [Verdict.FAULT] * 2 and all("inspected" in r.reason for r in results)


def test_calibrating_threshold_is_not_inspected_never_ok():
    thr = ThresholdConfig(mode="calibrated", min_scores=3, min_region_px=0)
    results, _ = run_frames(RecordingEngine(), [10, 11, 12, 10, 11, 200], thr=thr, batch_size=1)
    v = verdicts(results)
    assert v[:1] == [Verdict.NOT_INSPECTED] and results[0].reason == "threshold calibrating"
    assert v[-1] is Verdict.NG and Verdict.OK in v


def test_threshold_free_engine_decides_by_its_mask():
    meta = FrameMeta(0, time.time(), "c", H, W)
    mask = np.zeros((H, W), bool)
    mask[2:4, 2:5] = True
    out = EngineOutput(np.zeros((H, W), np.float32), 0.3, mask=mask)
    r = decide(out, meta, Threshold(ThresholdConfig(min_region_px=0)), 0, {"name": "x", "version": "1"})
    assert r.verdict is Verdict.NG and r.regions[0].bbox == (2, 2, 5, 4) and r.regions[0].area_px == 6
    out = EngineOutput(np.zeros((H, W), np.float32), 0.0, mask=np.zeros((H, W), bool))
    assert decide(out, meta, Threshold(ThresholdConfig()), 0, {}).verdict is Verdict.OK


def test_regions_match_the_scipy_reference_on_random_masks():
    """Guards the fast per-label area/peak path against the plain ndimage reference."""
    from scipy import ndimage

    from linewatch.decision import regions_from_mask

    rng = np.random.default_rng(1)
    for _ in range(30):
        m = ndimage.binary_dilation(rng.random((40, 50)) > 0.97, iterations=int(rng.integers(0, 3)))
        s = rng.random((40, 50)).astype(np.float32)
        got = regions_from_mask(m, s, 3)
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        idx = np.arange(1, n + 1)
        areas = ndimage.sum_labels(np.ones_like(lab), lab, idx)
        peaks = ndimage.maximum(s, lab, idx)
        ref = sorted(((int(a), float(p)) for a, p in zip(areas, peaks) if a >= 3), key=lambda x: -x[0])
        assert [r.area_px for r in got] == [a for a, _ in ref]
        assert np.allclose(sorted(r.score for r in got), sorted(p for _, p in ref))


def test_lots_still_queued_at_shutdown_are_closed_not_inspected():
    from linewatch.inspector import LotCloser, LotLedger

    class SlowEngine(RecordingEngine):
        def lot_closed(self, lot_id):
            time.sleep(0.5)
            return {}

    published = []
    closer = LotCloser(SlowEngine, ThresholdConfig(mode="fixed", value=1.0), LotLedger(),
                       lambda ev, refined, summary: published.append((ev.lot_id, summary)))
    closer.start()
    for lot in ("a", "b", "c"):
        closer.submit(LotEvent(LotEventKind.CLOSED, lot, "r", "part_count", time.time()))
    time.sleep(0.1)  # "a" is in progress
    assert not closer.stop(0.2)
    deadline = time.monotonic() + 5
    while len(published) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    by_lot = dict(published)
    assert sorted(by_lot) == ["a", "b", "c"]  # every lot closed once
    assert "tier2" not in by_lot["a"]  # finished after stop gave up waiting
    assert by_lot["b"]["tier2"].startswith("NOT_INSPECTED: shutdown") and by_lot["c"] == by_lot["b"]


def test_a_ring_swapped_during_a_batch_takes_no_stale_release():
    """A reload gives the inspector a new ring while it holds a batch of the old one: the batch
    goes back to its own ring, and the inspector carries on with the new one."""
    old = FrameRing(4, H, W, 1, "block", 1.0)
    results = []
    ins = Inspector(old, RecordingEngine(delay_s=0.3), InspectConfig(batch_size=4, batch_wait_ms=10),
                    ThresholdConfig(mode="fixed", value=100.0, min_region_px=0), results.append, lambda ev: None)
    for i in range(2):
        old.put(np.full((H, W, 1), 10, np.uint8), FrameMeta(i, time.time(), "c", H, W, lot_id="L"))
    ins.start()
    time.sleep(0.1)  # the batch is in the engine
    new = FrameRing(4, H, W, 1, "block", 1.0)
    ins.ring = new
    for i in range(2, 4):
        new.put(np.full((H, W, 1), 150, np.uint8), FrameMeta(i, time.time(), "c", H, W, lot_id="L"))
    deadline = time.monotonic() + 5
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ins.stop(5.0)
    assert verdicts(results) == [Verdict.OK, Verdict.OK, Verdict.NG, Verdict.NG]
    assert new.depth() == 0 and len(new._free) == 4 and len(old._free) == 4  # every slot back home


def test_an_engine_swap_and_a_new_recipe_calibrate_afresh_never_on_old_scores():
    """A reload that rebuilds the engine left the threshold calibrated on the old engine's scores
    (a defect of the new engine's scale passed as OK for dozens of frames); a product change did
    the same with the old product's scores. Now each starts NOT_INSPECTED until it has its own."""
    ring = FrameRing(64, H, W, 1, "block", 1.0)
    results = []
    thr = ThresholdConfig(mode="calibrated", min_scores=4, window=16, min_region_px=0)
    ins = Inspector(ring, RecordingEngine(), InspectConfig(batch_size=1, batch_wait_ms=0), thr,
                    results.append, lambda ev: None)
    ins.start()

    def feed(values, recipe, first):
        for i, v in enumerate(values):
            ring.put(np.full((H, W, 1), v, np.uint8), FrameMeta(first + i, time.time(), "c", H, W, lot_id="L",
                                                                 recipe=recipe))
        deadline = time.monotonic() + 10
        while len(results) < first + len(values) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [r.verdict for r in sorted(results, key=lambda r: r.frame.frame_id)][first:]

    try:
        assert feed([200, 201, 202, 200, 201, 202], "bracket", 0)[-1] is Verdict.OK  # calibrated near 200
        # a new product scoring near 40: its defect (120) would be OK under the bracket's threshold
        assert feed([40, 120], "housing", 6) == [Verdict.NOT_INSPECTED] * 2
        assert feed([41, 40, 42], "housing", 8)[-1] is Verdict.OK
        assert feed([120], "housing", 11) == [Verdict.NG]
        assert feed([201], "bracket", 12) == [Verdict.OK]  # the bracket keeps its own threshold
        new = RecordingEngine()
        ins.swap_engine(new)
        deadline = time.monotonic() + 5
        while ins.engine is not new and time.monotonic() < deadline:  # taken at the inspector's next look
            time.sleep(0.01)
        assert feed([201], "bracket", 13) == [Verdict.NOT_INSPECTED]  # the new engine calibrates afresh
    finally:
        assert ins.stop(5.0)


def test_frames_sharing_an_id_in_a_lot_get_no_tier_2_result_and_the_lot_says_so():
    """A camera reopened mid-lot numbers afresh: lot [0, 1, 2, 0, 1] came back with 3 tier-2
    results for 5 frames and no note (the earlier duplicates were overwritten)."""
    from linewatch.inspector import LotCloser, LotLedger

    class Whole(RecordingEngine):
        has_tier2 = True

        def lot_closed(self, lot_id):
            return {fid: EngineOutput(np.zeros((H, W), np.float32), 0.1) for fid in (0, 1, 2)}

    ledger = LotLedger()
    for fid in (0, 1, 2, 0, 1):
        ledger.add(FrameMeta(fid, time.time(), "cam", H, W, lot_id="L"))
    published = []
    closer = LotCloser(lambda: Whole(), ThresholdConfig(mode="fixed", value=1.0, min_region_px=0), ledger,
                       lambda ev, refined, summary: published.append((refined, summary)))
    closer.start()
    closer.submit(LotEvent(LotEventKind.CLOSED, "L", "r", "part_count", time.time()))
    deadline = time.monotonic() + 10
    while not published and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closer.stop(5.0)
    refined, summary = published[0]
    assert [r.frame.frame_id for r in refined] == [2]
    assert summary["tier2"] == ("NOT_INSPECTED: 4 of 5 frame(s) share a frame id with another frame of the lot "
                                "(the source numbered afresh)")


def test_the_published_mask_holds_only_the_listed_regions():
    """A 4-px blob below min_region_px was left out of the regions but published in the mask."""
    smap = np.zeros((32, 32), np.float32)
    smap[2:12, 2:12] = 5.0  # 100 px
    smap[20:22, 20:22] = 5.0  # 4 px
    out = EngineOutput(smap, 5.0)
    r = decide(out, FrameMeta(0, time.time(), "c", 32, 32), Threshold(ThresholdConfig(mode="fixed", value=1.0)),
               16, {})
    assert r.verdict is Verdict.NG and [g.area_px for g in r.regions] == [100]
    assert r.mask.sum() == 100 and not r.mask[20:22, 20:22].any()


def test_deadline_is_measured_on_the_monotonic_clock():
    """A wall-clock step after capture (NTP at boot) must not turn a fresh frame into a deadline
    FAULT, nor a late one into a verdict."""
    meta = FrameMeta(0, time.time(), "c", H, W)
    assert meta.age_s() < 0.1
    old = FrameMeta(1, time.time() - 2.0, "c", H, W)  # captured 2 s ago
    assert 1.9 < old.age_s() < 2.5
    import unittest.mock as mock

    with mock.patch("time.time", return_value=time.time() + 3600):  # the wall clock jumps an hour
        assert meta.age_s() < 0.1
    # and through the inspector: frames captured, then the wall clock steps an hour forward
    real = time.time
    jump = [0.0]
    with mock.patch("time.time", side_effect=lambda: real() + jump[0]):
        ring = FrameRing(16, H, W, 1, "block", 1.0)
        results = []
        ins = Inspector(ring, RecordingEngine(), InspectConfig(batch_size=2, batch_wait_ms=0, deadline_ms=1000),
                        ThresholdConfig(mode="fixed", value=100.0, min_region_px=0), results.append, lambda ev: None)
        for i in range(2):
            ring.put(np.full((H, W, 1), 10, np.uint8), FrameMeta(i, time.time(), "c", H, W, lot_id="L"))
        jump[0] = 3600.0
        ins.start()
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ins.stop(5.0)
    assert verdicts(results) == [Verdict.OK, Verdict.OK], [r.reason for r in results]


def test_metric_series_exist_at_zero_from_the_start():
    """increase() alerts missed the first FAULT after every start: the series did not exist yet."""
    from prometheus_client import generate_latest

    from linewatch.telemetry import Telemetry

    text = generate_latest(Telemetry().registry).decode()
    assert 'linewatch_results_total{verdict="FAULT"} 0.0' in text
    assert 'linewatch_drops_total{cause="camera_loss"} 0.0' in text


def test_the_latency_histogram_counts_inspected_frames_not_instant_drops():
    """Dropped and lost frames are answered at once; counted in the capture-to-publish histogram
    they made its percentiles look better the more frames were dropped."""
    from types import SimpleNamespace

    from linewatch.daemon import Dispatcher
    from linewatch.frames import Result
    from linewatch.telemetry import Telemetry

    sent = []
    d = SimpleNamespace(telemetry=Telemetry(), publisher=SimpleNamespace(send=lambda *a: sent.append(a)),
                        store=SimpleNamespace(submit_result=lambda r, t: None),
                        cfg=SimpleNamespace(publish=SimpleNamespace(payload="none"), daemon=SimpleNamespace(line="l1")))
    disp = Dispatcher(d)
    old = FrameMeta(0, time.time() - 0.5, "c", H, W, lot_id="L")
    disp.result(Result(old, Verdict.OK, 0.1, [], {}, threshold=1.0, t_inspected=time.time()))
    for i, reason in enumerate(("ring_full_oldest: dropped", "camera_loss: frame id never arrived"), start=1):
        disp.result(Result(FrameMeta(i, time.time(), "c", H, W, lot_id="L"), Verdict.NOT_INSPECTED, None, [], {},
                           reason=reason, t_inspected=time.time()))
    disp.result(Result(FrameMeta(3, time.time(), "c", H, W, lot_id="L"), Verdict.NOT_INSPECTED, 0.2, [], {},
                       reason="threshold calibrating", t_inspected=time.time()))
    assert d.telemetry.latency._sum.get() >= 0.5  # the OK frame's half second
    count = sum(b.get() for b in d.telemetry.latency._buckets)
    assert count == 2  # the OK frame and the calibrating one; not the dropped or lost frame
    assert len(sent) == 4
