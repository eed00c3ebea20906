"""The control socket (ZeroMQ REP): PLC and operator commands, one thread owns the socket.

Requests are one UTF-8 line; replies are JSON with ``ok`` (bool) and either the result or
``error``:
    lot start <lot_id> [recipe]   close the open lot (if any) and open <lot_id>
    lot end                       close the open lot
    status                        counters, stage states, current lot
    reload                        re-read config.toml (validated first; a bad file changes nothing)
    ping                          liveness
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from typing import Any, Callable

import zmq

from .publish import bind

logger = logging.getLogger(__name__)

RELOAD_WAIT_S = 60.0  # the control thread waits this long for a reload to finish before replying


class ControlServer:
    """Serves control commands; ``handlers`` map a command word to a function of its args."""

    def __init__(self, ctx: zmq.Context, endpoint: str,
                 handlers: dict[str, Callable[[list[str]], dict[str, Any]]]):
        self.handlers = handlers
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        bind(self._sock, endpoint, "publish.control_endpoint")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self.t_heartbeat = time.monotonic()
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def handle(self, text: str) -> dict[str, Any]:
        """Parse and run one command line (also used directly by tests and the CLI)."""
        try:
            words = shlex.split(text)
        except ValueError as exc:
            return {"ok": False, "error": f"cannot parse command: {exc}"}
        if not words:
            return {"ok": False, "error": "empty command"}
        if words[0] == "lot" and len(words) >= 2:
            cmd, args = f"lot {words[1]}", words[2:]
        else:
            cmd, args = words[0], words[1:]
        fn = self.handlers.get(cmd)
        if fn is None:
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(sorted(self.handlers))}"}
        try:
            out = fn(args)
        except (ValueError, KeyError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the control thread must answer and live on
            logger.exception("control: %r failed", text)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        return {"ok": True, **out}

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self.t_heartbeat = time.monotonic()
                if not dict(poller.poll(200)):
                    continue
                try:
                    self._serve_one()
                except zmq.ZMQError as exc:  # the thread lives on: a PLC's next request is answered
                    logger.error("control: request not served: %s", exc)
        finally:
            self._sock.close(linger=0)

    def _serve_one(self) -> None:
        """Receive one request (all its parts: a REP socket must take the whole message before it
        may reply) and send one reply."""
        parts = self._sock.recv_multipart()
        self.requests += 1
        if len(parts) != 1:
            reply = {"ok": False, "error": f"one-part message expected, got {len(parts)} parts"}
        else:
            try:
                text = parts[0].decode("utf-8")
            except UnicodeDecodeError:
                reply = {"ok": False, "error": "command is not UTF-8"}
            else:
                reply = self.handle(text.strip())
                logger.info("control: %s -> %s", text.strip(), "ok" if reply.get("ok") else reply.get("error"))
        self._sock.send(json.dumps(reply, default=str).encode())

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


def request(endpoint: str, command: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one control command and return the decoded reply (for the CLI and tests)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        sock.send(command.encode())
        return json.loads(sock.recv())
    except zmq.Again:
        raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s") from None
    finally:
        sock.close(linger=0)
