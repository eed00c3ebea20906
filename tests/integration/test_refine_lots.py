"""AnoRefiner end to end on real Kolektor images with the real backbone: PGT on lot k yields an
ARD that refines lot k+1, the refined lot results carry that ARD's version, and the SQLite store
records the version with the lot it was trained on."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.config import RefineConfig, StoreConfig, ThresholdConfig
from linewatch.config import ZeroShotEngine as EngineCfg
from linewatch.datasets import load_image
from linewatch.engines.zeroshot import ZeroShotEngine
from linewatch.frames import FrameMeta, LotEvent, LotEventKind, Verdict
from linewatch.inspector import LotCloser, LotLedger
from linewatch.store import StoreWriter
from linewatch.store.query import fetch_models, fetch_results

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kolektorsdd"
SMALL = dict(steps=2, samples_per_lot=3, batch_size=2, crop_px=64, width=8, cpu_share=1.0,
             time_budget_s=600.0, pseudo_normal_fraction=0.5)


@pytest.fixture(scope="module")
def lots():
    if not DATA.is_dir():
        pytest.skip(f"real images not found at {DATA}")
    out = []
    for item in ("kos01", "kos02"):
        out.append([load_image(DATA / item / f"Part{k}.jpg", 3) for k in range(4)])
    return out


@pytest.fixture
def engine():
    n = torch.get_num_threads()
    eng = ZeroShotEngine(EngineCfg(input_size=96, threads=1))
    yield eng
    eng.close()
    torch.set_num_threads(n)


def _feed(engine, images, lot_id, first_id, ledger=None, recipe=""):
    metas = [FrameMeta(first_id + i, time.time(), "cam0", im.shape[0], im.shape[1], lot_id=lot_id, recipe=recipe)
             for i, im in enumerate(images)]
    engine.infer(images, metas)
    if ledger is not None:
        for m in metas:
            ledger.count(lot_id, Verdict.OK)
            ledger.add(m)
    return metas


def test_lot_k_trains_the_ard_that_refines_lot_k_plus_1(engine, lots):
    recorded = []
    engine.enable_refinement(RefineConfig(**SMALL), on_model=lambda *a: recorded.append(a))
    engine.keep_coarse = True
    _feed(engine, lots[0], "lot0", 0)
    out0 = engine.lot_closed("lot0")
    assert sorted(out0) == [0, 1, 2, 3]
    assert engine.last_tier2_model["name"] == "zeroshot"  # no ARD yet: the normalised coarse map
    assert engine.refiner.wait_idle(300)
    assert engine.refiner.failed == 0
    ard = engine.refiner.current()
    assert ard is not None and ard.trained_on_lot == "lot0"
    assert [(r[0], r[1], r[2], r[4]) for r in recorded] == [("ard", ard.version, "ard", "lot0")]

    _feed(engine, lots[1], "lot1", 4)
    out1 = engine.lot_closed("lot1")
    assert engine.last_tier2_model == {"name": "ard", "version": ard.version, "kind": "ard"}
    for fid, im in zip(range(4, 8), lots[1]):
        m = out1[fid].score_map
        assert m.shape == im.shape[:2] and np.isfinite(m).all()
        assert np.isfinite(out1[fid].image_score)
    coarse = engine.last_coarse  # what the refinement started from
    assert sorted(coarse) == sorted(out1)
    assert engine.refiner.wait_idle(300)
    assert engine.refiner.current().trained_on_lot == "lot1"

    # a lot of another product is not refined by this product's ARD: its coarse maps go out
    _feed(engine, lots[0], "lot2", 8, recipe="housing")
    out2 = engine.lot_closed("lot2")
    assert sorted(out2) == [8, 9, 10, 11] and engine.last_tier2_model["name"] == "zeroshot"
    assert engine.refiner.wait_idle(300)
    assert engine.refiner.current("housing").trained_on_lot == "lot2"
    assert engine.refiner.current().trained_on_lot == "lot1"


def test_refined_lot_results_reach_sql_with_the_ard_version(engine, lots, tmp_path):
    store = StoreWriter(StoreConfig(url=f"sqlite:///{tmp_path}/lw.db", spool_dir=tmp_path / "spool",
                                    flush_interval_s=0.05), "line1")
    store.start()
    try:
        engine.enable_refinement(RefineConfig(**SMALL), on_model=store.register_model)
        ledger = LotLedger()
        published = []
        closer = LotCloser(lambda: engine, ThresholdConfig(mode="fixed", value=1e9), ledger,
                           lambda ev, refined, summary: published.append((ev, refined, summary)))
        first = 0
        for k, images in enumerate(lots):
            _feed(engine, images, f"lot{k}", first, ledger)
            first += len(images)
            closer._close(LotEvent(LotEventKind.CLOSED, f"lot{k}", "default", "count", time.time(), len(images)))
            assert engine.refiner.wait_idle(300)
        ev, refined, _ = published[1]
        assert ev.lot_id == "lot1" and len(refined) == 4
        ard_version = refined[0].model["version"]
        assert refined[0].model["name"] == "ard" and all(r.tier == 2 for r in refined)
        for r in refined:
            store.submit_result(r, time.time())
    finally:
        assert store.stop(10)
    url = f"sqlite:///{tmp_path}/lw.db"
    models = {(m["name"], m["version"]): m for m in fetch_models(url)}
    assert models[("ard", ard_version)]["trained_on_lot"] == "lot0"
    assert models[("ard", ard_version)]["kind"] == "ard"
    rows = [r for r in fetch_results(url, "lot1") if r["tier"] == 2]
    assert len(rows) == 4 and {r["model"]["version"] for r in rows} == {ard_version}
