"""The whole daemon on real parts: synthetic line and the simulated GenTL camera -> ring -> lots ->
zero-shot engine -> ZeroMQ (a real SUB socket) + SQLite. The invariant under test: every frame
id the source produced gets exactly one tier-1 answer, on the wire and in the database, also
when the line outruns the inspector and frames are dropped."""

from __future__ import annotations

import io
import socket
import time
import urllib.request

import pytest
from PIL import Image

from linewatch.acquire.genicam import find_simulated_cti
from linewatch.store import query

from daemon_harness import answers_per_frame, config, run_daemon

pytestmark = pytest.mark.integration

SMALL = {"kind": "synthetic", "width": 128, "height": 128, "seed": 3, "defect_rate": 0.3}


def check_one_answer_each(run, expected_ids: set[int]) -> None:
    wire = answers_per_frame(run.frames())
    db = answers_per_frame(run.db_frames())
    assert set(wire) == expected_ids, f"wire ids differ: missing {sorted(expected_ids - set(wire))[:10]}"
    assert max(wire.values()) == 1, f"frames answered twice on the wire: {[k for k, v in wire.items() if v > 1]}"
    assert db == wire, "the database does not hold the same answers as the wire"
    seqs = run.seqs()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq gap on loopback"


def test_synthetic_line_every_frame_answered_once_on_wire_and_in_db(tmp_path):
    n = 40
    cfg = config(tmp_path, {**SMALL, "fps": 0, "n_frames": n},
                 ring={"policy": "block", "block_timeout_s": 60.0},
                 lots={"policy": "count", "part_count": 16},
                 inspect={"deadline_ms": 0})
    run = run_daemon(cfg)
    assert run.rc == 0
    check_one_answer_each(run, set(range(n)))
    verdicts = {h["verdict"] for h in run.frames()}
    assert verdicts & {"OK", "NG"}, f"nothing was inspected: {verdicts}"
    assert "FAULT" not in verdicts
    # lots: opened and closed by part count (the last one at the source's end), tier 2 published
    closed = run.lots("closed")
    assert [h["reason"] for h in closed] == ["part_count", "part_count", "source_end"]
    assert sum(h["n_frames"] for h in closed) == n
    assert any(h.get("refined") for h in closed), "no tier-2 results on the lot topic"
    db_lots = query.fetch_lots(cfg.store.url)
    assert len(db_lots) == 3 and all(row["closed_at"] is not None for row in db_lots)
    assert sum(row["n_ok"] + row["n_ng"] + row["n_not_inspected"] + row["n_fault"] for row in db_lots) == n
    # the mask payload is a PNG of the frame's size, sent with NG frames only
    assert {h["verdict"] for t, h, p in run.messages if p is not None} == {"NG"}
    png = run.payloads()[0]
    assert Image.open(io.BytesIO(png)).size == (128, 128)


def test_overload_drops_are_answered_not_inspected(tmp_path):
    """Regression guard: a frame dropped by the ring must still get its answer (never silence)."""
    n = 80
    cfg = config(tmp_path, {**SMALL, "fps": 0, "n_frames": n},
                 ring={"slots": 3, "policy": "drop_oldest"},
                 lots={"policy": "count", "part_count": 32},
                 inspect={"batch_size": 2})
    run = run_daemon(cfg)
    check_one_answer_each(run, set(range(n)))
    dropped = [h for h in run.frames() if h["verdict"] == "NOT_INSPECTED" and "dropped" in h["reason"]]
    assert dropped, "the source outran a 3-slot ring but nothing was dropped"
    status = run.daemon.status_brief()
    assert sum(status["drops"].values()) == len(dropped)
    inspected = [h for h in run.frames() if "dropped" not in h["reason"]]
    assert inspected, "every frame was dropped: the inspector never got one"


CTI = find_simulated_cti()


@pytest.mark.skipif(CTI is None, reason="no simulated GenTL producer (.cti) in the installed genicam wheel")
@pytest.mark.parametrize("slots,policy", [(32, "block"), (2, "drop_newest")], ids=["normal", "overload"])
def test_genicam_camera_every_frame_id_answered_once(tmp_path, slots, policy):
    source = {"kind": "genicam", "cti": str(CTI), "width": 128, "height": 128,
              "nodes": {"Width": 320, "Height": 240, "PixelFormat": "Mono8", "AcquisitionFrameRate": 60.0}}
    cfg = config(tmp_path, source, ring={"slots": slots, "policy": policy, "block_timeout_s": 30.0},
                 lots={"policy": "count", "part_count": 20}, inspect={"deadline_ms": 0})
    run = run_daemon(cfg, stop_after_s=4.0, exit_at_source_end=False)
    assert run.rc == 0
    ids = answers_per_frame(run.frames())
    assert len(ids) >= 20
    check_one_answer_each(run, set(range(min(ids), max(ids) + 1)))
    verdicts = [h["verdict"] for h in run.frames()]
    assert {"OK", "NG"} & set(verdicts)
    if policy == "drop_newest":
        assert verdicts.count("NOT_INSPECTED") > 0


def test_prometheus_metrics_are_served_while_running(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, {**SMALL, "fps": 30}, metrics={"port": port})

    def scrape(_daemon) -> str:
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    run = run_daemon(cfg, stop_after_s=2.0, exit_at_source_end=False, while_running=scrape)
    text = run.observed
    for name in ("linewatch_frames_in_total", "linewatch_results_total", "linewatch_capture_to_publish_seconds_bucket",
                 "linewatch_queue_depth", "linewatch_lots_total", "linewatch_source_connected"):
        assert name in text, f"{name} missing from /metrics"
    frames_in = [ln for ln in text.splitlines() if ln.startswith("linewatch_frames_in_total")]
    assert float(frames_in[0].split()[-1]) > 0

    def value(name: str) -> float:
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(line.split()[-1])

    # regression: the engine-time histogram was declared but never observed
    assert value("linewatch_engine_batch_seconds_count") > 0
    assert value("linewatch_store_spooled_rows") == 0  # the database is up: nothing waits on disk
