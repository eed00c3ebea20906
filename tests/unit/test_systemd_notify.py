"""sd_notify never blocks the daemon: a notify socket nobody reads fills up (10 datagrams on many
systems), and a blocking send stalled the main loop, so reloads and stops were never served."""

from __future__ import annotations

import socket
import time

from linewatch.systemd import Notifier


def test_a_full_notify_socket_drops_pings_and_never_blocks(tmp_path):
    path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    n = Notifier(path)
    try:
        t0 = time.monotonic()
        sent = [n.watchdog_ping() for _ in range(5000)]  # far beyond any datagram queue
        assert time.monotonic() - t0 < 2.0
        assert sent[0] and not all(sent) and n.dropped == sent.count(False)
        t0 = time.monotonic()
        assert not n.ready("running")  # a state change waits a little for room, then gives up
        assert 0.9 < time.monotonic() - t0 < 3.0
        sink.recv(4096)  # room again
        assert n.stopping()
    finally:
        n.close()
        sink.close()
