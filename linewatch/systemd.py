"""systemd notification protocol (sd_notify) without dependencies: ready, reloading, stopping,
status and watchdog pings. Every call is a no-op when not run under systemd (no NOTIFY_SOCKET)."""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


NOTIFY_WAIT_S = 1.0  # how long a state notification waits for room in a full notify socket

class Notifier:
    """Sends state lines to the socket named by ``$NOTIFY_SOCKET`` (Type=notify units)."""

    def __init__(self, address: str | None = None):
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            # a leading '@' is Linux's abstract namespace
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # never blocking: a notify socket nobody reads (its queue holds 10 datagrams on many
            # systems) must not stall the daemon's main loop, which serves reloads and stops
            self._sock.setblocking(False)
        self.dropped = 0  # notifications not sent because the socket's queue was full

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str, wait_s: float = NOTIFY_WAIT_S) -> bool:
        """Send one notification; with the socket's queue full, retry for up to ``wait_s`` (a state
        change: READY, RELOADING, STOPPING), else drop it and count it (a watchdog ping: the next
        one follows soon)."""
        if self._sock is None or self._addr is None:
            return False
        data = "\n".join(lines).encode()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._sock.sendto(data, self._addr)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.dropped += 1
                    logger.warning("sd_notify: the notify socket's queue is full; %r not sent", lines[0])
                    return False
                time.sleep(0.01)
            except OSError as exc:
                logger.warning("sd_notify failed: %s", exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload to this notification
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog_ping(self) -> bool:
        return self.notify("WATCHDOG=1", wait_s=0.0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_period_s() -> float | None:
    """Half the watchdog interval systemd asked for (``$WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
