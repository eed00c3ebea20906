"""The publisher thread outlives a message it cannot build or send (real ZeroMQ sockets)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from linewatch.publish import EndpointError, Publisher


def test_a_bad_heartbeat_or_payload_is_counted_and_publishing_goes_on(tmp_path):
    calls = []

    def status():
        calls.append(1)
        if len(calls) == 1:
            raise AttributeError("'NoneType' object has no attribute 'lot_id'")  # a lot closing meanwhile
        return {"ready": True}

    ctx = zmq.Context.instance()
    pub = Publisher(ctx, f"ipc://{tmp_path}/pub", "l1", 1000, heartbeat_s=0.05, status=status)
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.l1.")
    pub.start()
    try:
        time.sleep(0.3)  # the subscription reaches the PUB socket; heartbeats run meanwhile
        pub.send("frame", {"kind": "frame", "n": 1}, np.zeros((2, 2, 2, 2), np.float32))  # no PNG of 4-D
        pub.send("frame", {"kind": "frame", "n": 2})
        got, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and not any(h.get("n") == 2 for h in got):
            if sub.poll(100):
                got.append(json.loads(sub.recv_multipart()[1]))
        assert any(h.get("n") == 2 for h in got), got
        assert any(h["kind"] == "heartbeat" for h in got)  # heartbeats after the failed one
        assert pub.failed == 2 and pub.dropped == 0
        # the frame whose map could not be encoded still went out, without its payload
        bad = [h for h in got if h.get("n") == 1]
        assert len(bad) == 1 and "payload" not in bad[0] and "TypeError" in bad[0]["payload_error"]
        seqs = [h["seq"] for h in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap: nothing was lost
        # every header, heartbeats included, carries the wire version
        assert {h["v"] for h in got} == {1} and all(list(h)[0] == "v" for h in got)
    finally:
        pub.stop(2.0)
        sub.close(linger=0)
    pub.send("frame", {"kind": "frame", "n": 3})  # after stop: nothing would send it
    assert pub.dropped == 1


def test_messages_dropped_on_a_full_queue_leave_a_seq_gap(tmp_path):
    """A subscriber must be able to tell that messages were lost before they reached the socket."""
    ctx = zmq.Context.instance()
    pub = Publisher(ctx, f"ipc://{tmp_path}/pub", "l1", 1000, heartbeat_s=60.0, status=lambda: {},
                    queue_max=1)
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.l1.")  # every topic: every seq number is seen
    try:
        for n in (1, 2, 3):  # the thread is not running yet: the queue holds one, two are dropped
            pub.send("frame", {"kind": "frame", "n": n})
        assert pub.dropped == 2
        time.sleep(0.3)  # the subscription reaches the PUB socket
        pub.start()
        time.sleep(0.2)
        pub.send("frame", {"kind": "frame", "n": 4})
        got, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and not any(h.get("n") == 4 for h in got):
            if sub.poll(100):
                got.append(json.loads(sub.recv_multipart()[1]))
        assert [h["n"] for h in got if h["kind"] == "frame"] == [1, 4]
        seqs = [h["seq"] for h in got]
        assert seqs == sorted(seqs)
        # numbering starts at 1: the numbers nobody received are the two dropped messages
        assert seqs[-1] - len(got) == 2, seqs
    finally:
        pub.stop(2.0)
        sub.close(linger=0)


def test_payload_maps_are_bounded_in_bytes_in_the_queue(tmp_path):
    """Large score maps must not fill memory while the publisher thread falls behind."""
    ctx = zmq.Context.instance()
    pub = Publisher(ctx, f"ipc://{tmp_path}/pub", "l1", 1000, heartbeat_s=60.0, status=lambda: {},
                    queue_max_bytes=10_000)
    try:
        big = np.zeros((40, 50), np.float32)  # 8000 bytes
        pub.send("frame", {"kind": "frame", "n": 1}, big)
        pub.send("frame", {"kind": "frame", "n": 2}, big)  # would hold 16000 bytes: dropped
        pub.send("frame", {"kind": "frame", "n": 3})  # no payload: fits
        assert pub.dropped == 1 and pub._queued_bytes == 8000
        pub.start()
        deadline = time.monotonic() + 5
        while pub._queued_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub._queued_bytes == 0  # given back as the thread takes them
    finally:
        pub.stop(2.0)
    # a map larger than the bound on its own still goes out when nothing else waits
    lone = Publisher(ctx, f"ipc://{tmp_path}/pub2", "l1", 1000, heartbeat_s=60.0, status=lambda: {},
                     queue_max_bytes=10_000)
    try:
        lone.send("frame", {"kind": "frame", "n": 1}, np.zeros((200, 200), np.float32))
        assert lone.dropped == 0 and lone._queued_bytes == 160_000
        lone.send("frame", {"kind": "frame", "n": 2}, big)
        assert lone.dropped == 1
    finally:
        lone._sock.close(linger=0)  # never started: nothing to stop


def test_a_message_sent_as_the_thread_takes_its_last_look_still_goes_out(tmp_path):
    """Regression: send() checked for a stopped thread, then queued. A message queued just after
    the thread's last look at the queue (a stage overrunning its stop timeout at shutdown) stayed
    in the queue for ever: neither sent nor counted as dropped."""
    import queue as queue_mod

    ctx = zmq.Context.instance()
    pub = Publisher(ctx, f"ipc://{tmp_path}/pub", "l1", 1000, heartbeat_s=60.0, status=lambda: {})
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.l1.frame")
    real_get, late = pub._q.get, []

    def get_then_a_late_send(block=True, timeout=None):
        try:
            return real_get(block, timeout)
        except queue_mod.Empty:
            if pub._stop.is_set() and not late:
                late.append(1)
                pub.send("frame", {"kind": "frame", "n": 9})  # lands after the empty look
            raise

    pub._q.get = get_then_a_late_send
    try:
        time.sleep(0.3)  # the subscription reaches the PUB socket
        pub.start()
        pub.stop(2.0)
        assert late, "the late send was made"
        got = [json.loads(sub.recv_multipart()[1]) for _ in range(1) if sub.poll(2000)]
        assert [h.get("n") for h in got] == [9]
        assert pub._q.empty() and pub.dropped == 0
        pub.send("frame", {"kind": "frame", "n": 10})  # after the thread's end: counted, not queued
        assert pub.dropped == 1 and pub._q.empty()
    finally:
        sub.close(linger=0)


def _collect(sub, want, timeout_s=5.0):
    got, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(h.get("n") == want for h in got):
        if sub.poll(100):
            got.append(json.loads(sub.recv_multipart()[1]))
    return got


def test_a_reload_moves_the_pub_socket_and_seq_goes_on(tmp_path):
    """[publish] endpoint and sndhwm apply on reload: the publisher moves between two messages,
    keeps its seq numbering; an address it cannot bind leaves the old socket publishing."""
    ctx = zmq.Context.instance()
    pub = Publisher(ctx, f"ipc://{tmp_path}/a", "l1", 1000, heartbeat_s=60.0, status=lambda: {})
    pub.start()
    subs = []
    try:
        def subscribe(endpoint):
            sub = ctx.socket(zmq.SUB)
            sub.connect(endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.l1.")
            subs.append(sub)
            time.sleep(0.3)  # the subscription reaches the PUB socket
            return sub

        a = subscribe(f"ipc://{tmp_path}/a")
        pub.send("frame", {"kind": "frame", "n": 1})
        first = _collect(a, 1)
        assert [h["n"] for h in first if h["kind"] == "frame"] == [1]
        assert pub.rebind(f"ipc://{tmp_path}/b", 500) == f"ipc://{tmp_path}/b"
        b = subscribe(f"ipc://{tmp_path}/b")
        pub.send("frame", {"kind": "frame", "n": 2})
        second = _collect(b, 2)
        assert [h["n"] for h in second if h["kind"] == "frame"] == [2]
        assert second[-1]["seq"] == first[-1]["seq"] + 1  # the numbering goes on
        # the same address with another high-water mark: the socket stays bound (closing and
        # binding a TCP port again at once fails: the address is still in use)
        assert pub.rebind(f"ipc://{tmp_path}/b", 800) == f"ipc://{tmp_path}/b"
        # a value ZeroMQ refuses is an error; the publisher thread goes on
        with pytest.raises(EndpointError, match="cannot move"):
            pub.rebind(f"ipc://{tmp_path}/d", 2**31)
        assert pub._thread.is_alive() and pub.endpoint == f"ipc://{tmp_path}/b"
        # an address taken by another socket: refused, and the publisher stays where it was
        blocker = ctx.socket(zmq.PUB)
        blocker.bind("tcp://127.0.0.1:*")  # (an ipc path is taken over by a second bind; a port is not)
        subs.append(blocker)
        with pytest.raises(EndpointError, match="cannot bind"):
            pub.rebind(blocker.getsockopt_string(zmq.LAST_ENDPOINT), 800)
        assert pub.endpoint == f"ipc://{tmp_path}/b"
        time.sleep(0.3)  # the SUB reconnects to the address bound again
        pub.send("frame", {"kind": "frame", "n": 3})
        third = _collect(b, 3)
        assert [h["n"] for h in third if h["kind"] == "frame"] == [3] and third[-1]["seq"] == second[-1]["seq"] + 1
    finally:
        pub.stop(2.0)
        for s in subs:
            s.close(linger=0)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="stopping"):  # after stop: refused at once, nothing bound
        pub.rebind(f"ipc://{tmp_path}/e", 800)
    assert time.monotonic() - t0 < 1.0


def test_a_same_tcp_address_with_a_new_high_water_mark_keeps_publishing(tmp_path):
    ctx = zmq.Context.instance()
    pub = Publisher(ctx, "tcp://127.0.0.1:*", "l1", 1000, heartbeat_s=60.0, status=lambda: {})
    pub.start()
    sub = ctx.socket(zmq.SUB)
    try:
        endpoint = pub.endpoint
        sub.connect(endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"linewatch.l1.")
        time.sleep(0.3)
        assert pub.rebind("tcp://127.0.0.1:*", 500) == endpoint  # the configured string: same address
        pub.send("frame", {"kind": "frame", "n": 1})
        assert [h["n"] for h in _collect(sub, 1) if h["kind"] == "frame"] == [1]
        assert pub.failed == 0
    finally:
        pub.stop(2.0)
        sub.close(linger=0)
