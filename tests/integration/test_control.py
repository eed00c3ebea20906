"""The control socket against real ZeroMQ sockets: malformed requests get an answer and the
thread lives on; the CLI keeps a quoted lot id one word."""

from __future__ import annotations

import json

import pytest
import zmq

from linewatch.control import ControlServer, request

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    seen: list[list[str]] = []
    ctx = zmq.Context()
    srv = ControlServer(ctx, f"ipc://{tmp_path}/ctl", {
        "ping": lambda a: {"pong": True},
        "lot start": lambda a: (seen.append(a), {"lot_id": a[0]})[1]})
    srv.start()
    yield srv, seen
    srv.stop()
    ctx.destroy(linger=0)


def test_a_multi_part_request_is_answered_and_the_thread_lives_on(server):
    """Regression: a request of two parts (a gateway sending frames of an array) made the reply
    fail with a ZMQError that killed the control thread: no later command was answered."""
    srv, _ = server
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(srv.endpoint)
        sock.send_multipart([b"lot start L1", b""])
        reply = json.loads(sock.recv())
    finally:
        sock.close(linger=0)
    assert not reply["ok"] and "one-part" in reply["error"]
    assert request(srv.endpoint, "ping", timeout_s=5)["pong"]


def test_ctl_keeps_a_quoted_lot_id_one_word(server, capsys):
    """Regression: `ctl lot start "LOT 42" bracket` joined its words with spaces, so the daemon
    opened lot 'LOT' with recipe '42'."""
    from linewatch.cli import main

    srv, seen = server
    assert main(["ctl", "--endpoint", srv.endpoint, "lot", "start", "LOT 42", "bracket v2"]) == 0
    assert seen == [["LOT 42", "bracket v2"]]
