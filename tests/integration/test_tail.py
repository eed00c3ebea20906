"""`linewatch tail` against a real PUB socket: prints each message and reports seq gaps."""

from __future__ import annotations

import json
import threading
import time

import pytest
import zmq

from linewatch.cli import main

pytestmark = pytest.mark.integration


def _tail_of(tmp_path, headers, argv_extra=()):
    """Run `linewatch tail` against a real PUB socket that sends ``headers`` as frame messages."""
    endpoint = f"ipc://{tmp_path}/pub"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    rc: list[int] = []
    argv = ["tail", endpoint, "--count", str(len(headers)), "--seconds", "20", *argv_extra]
    t = threading.Thread(target=lambda: rc.append(main(argv)))
    t.start()
    try:
        time.sleep(0.5)  # let the subscription reach the publisher
        for h in headers:
            pub.send_multipart([b"linewatch.line1.frame", json.dumps(h).encode()])
        t.join(20)
    finally:
        pub.close(linger=0)
        ctx.term()
    assert rc == [0]


def _frame(seq: int, **kw) -> dict:
    return {"kind": "frame", "line": "line1", "seq": seq, "lot_id": "L", "frame_id": seq, "tier": 1,
            "verdict": "OK", "score": 0.1, "regions": [], "reason": "", **kw}


def test_tail_prints_results_and_reports_a_seq_gap(tmp_path, capsys):
    _tail_of(tmp_path, [_frame(seq, verdict="NG", score=2.5, regions=[{"bbox": [0, 0, 2, 2]}])
                        for seq in (1, 2, 5)])
    out, err = capsys.readouterr()
    assert out.count("linewatch.line1.frame") == 3 and "NG" in out and "regions=1" in out
    assert "seq gap: 2 message(s) missing before seq 5" in out
    assert "3 messages, 2 missing" in err


def test_tail_reports_a_restarted_publisher_not_a_negative_gap(tmp_path, capsys):
    """Regression: a restarted daemon numbers from 1 again; tail printed a gap of -5000."""
    _tail_of(tmp_path, [_frame(seq) for seq in (4999, 5000, 1, 2)])
    out, err = capsys.readouterr()
    assert "publisher restarted (seq 5000 -> 1)" in out and "seq gap" not in out
    assert "4 messages, 0 missing (seq gaps), 1 publisher restarts" in err


def test_tail_on_one_kind_of_message_counts_no_gaps(tmp_path, capsys):
    """seq counts every message of a line: heartbeats and lot messages fall between frames."""
    _tail_of(tmp_path, [_frame(seq) for seq in (1, 3, 7)], ["--topic", "linewatch.line1.frame"])
    out, err = capsys.readouterr()
    assert "seq gap" not in out and "seq gaps not counted" in err
