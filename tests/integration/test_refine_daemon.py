"""The whole daemon with AnoRefiner on (config ``[refine]`` alone turns it on): refined lot results
reach the ZeroMQ ``lot`` topic and SQLite carrying the ARD version, and the ARD version is
recorded with the lot it was trained on."""

from __future__ import annotations

import pytest

from linewatch.store import query

from daemon_harness import config, run_daemon

pytestmark = pytest.mark.integration

SOURCE = {"kind": "synthetic", "width": 128, "height": 128, "seed": 5, "defect_rate": 0.3,
          "fps": 8.0, "n_frames": 64}
REFINE = {"enabled": True, "steps": 2, "samples_per_lot": 2, "batch_size": 2, "crop_px": 64, "width": 8,
          "cpu_share": 1.0, "time_budget_s": 30.0}


def test_refined_lots_carry_the_ard_trained_on_an_earlier_lot(tmp_path):
    cfg = config(tmp_path, SOURCE, lots={"policy": "count", "part_count": 8}, refine=REFINE,
                 inspect={"deadline_ms": 0})
    run = run_daemon(cfg)
    assert run.rc == 0
    closed = run.lots("closed")
    assert len(closed) == 8 and all(h.get("refined") for h in closed)
    by_ard = [h for h in closed if h["model"].get("name") == "ard"]
    assert by_ard, f"no lot was refined by an ARD: {[h['model'] for h in closed]}"
    assert closed[0]["model"]["name"] == "zeroshot"  # the first lot: no ARD trained yet
    models = {m["version"]: m for m in query.fetch_models(cfg.store.url) if m["name"] == "ard"}
    order = [h["lot_id"] for h in closed]
    for h in by_ard:
        version = h["model"]["version"]
        assert version in models, f"{version} published but not recorded"
        trained_on = models[version]["trained_on_lot"]
        assert order.index(trained_on) < order.index(h["lot_id"])  # trained on an earlier lot
        rows = [r for r in query.fetch_results(cfg.store.url, h["lot_id"]) if r["tier"] == 2]
        assert rows and {r["model"]["version"] for r in rows} == {version}
