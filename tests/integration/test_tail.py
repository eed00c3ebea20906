"""`linewatch tail` against a real PUB socket: prints each message and reports seq gaps."""

from __future__ import annotations

import json
import threading
import time

import pytest
import zmq

from linewatch.cli import main

pytestmark = pytest.mark.integration


def test_tail_prints_results_and_reports_a_seq_gap(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/pub"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["tail", endpoint, "--count", "3", "--seconds", "20"])))
    t.start()
    try:
        time.sleep(0.5)  # let the subscription reach the publisher
        for seq in (1, 2, 5):
            h = {"kind": "frame", "seq": seq, "lot_id": "L", "frame_id": seq, "tier": 1, "verdict": "NG",
                 "score": 2.5, "regions": [{"bbox": [0, 0, 2, 2]}], "reason": ""}
            pub.send_multipart([b"linewatch.line1.frame", json.dumps(h).encode()])
        t.join(20)
    finally:
        pub.close(linger=0)
        ctx.term()
    assert rc == [0]
    out, err = capsys.readouterr()
    assert out.count("linewatch.line1.frame") == 3 and "NG" in out and "regions=1" in out
    assert "seq gap: 2 message(s) missing before seq 5" in out
    assert "3 messages, 2 missing" in err
