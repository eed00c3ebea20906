"""systemd notification protocol (sd_notify) without dependencies: ready, reloading, stopping,
status and watchdog pings. Every call is a no-op when not run under systemd (no NOTIFY_SOCKET)."""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


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

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
            return True
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
        return self.notify("WATCHDOG=1")

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
