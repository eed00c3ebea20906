"""ZeroMQ results publisher: the wire format and the one thread that owns the PUB socket.

Message: multipart ``[topic, header]`` or ``[topic, header, payload]``.
- topic: ``linewatch.<line>.<kind>``, kind in frame | lot | heartbeat | fault (UTF-8)
- header: UTF-8 JSON; always ``seq`` (increases by one per message of this publisher, so a
  subscriber sees gaps), ``kind``, ``line``, ``t_publish``; per kind the fields in README.md
- payload: a PNG (mask 0/255, or the score map scaled to 0..255) when ``header.payload`` names it
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq
from PIL import Image

from .frames import LotEvent, Result

logger = logging.getLogger(__name__)

WIRE_VERSION = 1


class EndpointError(Exception):
    """A ZeroMQ endpoint cannot be bound (in use, malformed, no permission)."""


def bind(sock: zmq.Socket, endpoint: str, what: str) -> None:
    """Bind with a one-line error that names the endpoint and the config key."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise EndpointError(f"{what} = '{endpoint}': cannot bind: {exc.strerror}") from None


def topic(line: str, kind: str) -> bytes:
    return f"linewatch.{line}.{kind}".encode()


def encode_png(arr: np.ndarray) -> bytes:
    """A bool mask -> 0/255 PNG; a float map -> 8-bit PNG scaled by its own max."""
    if arr.dtype == bool:
        img = arr.astype(np.uint8) * 255
    else:
        peak = float(np.max(arr)) if arr.size else 0.0
        img = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8) if peak > 0 else np.zeros(arr.shape, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def frame_header(r: Result, line: str) -> dict[str, Any]:
    m = r.frame
    return {
        "kind": "frame", "line": line, "camera": m.camera, "lot_id": m.lot_id,
        "recipe": m.recipe, "frame_id": m.frame_id, "t_capture": m.t_capture,
        "t_inspected": r.t_inspected, "tier": r.tier, "verdict": r.verdict.value,
        "score": None if r.score is None else round(float(r.score), 6),
        "threshold": None if r.threshold is None else round(float(r.threshold), 6),
        "reason": r.reason, "regions": [g.to_json() for g in r.regions], "model": r.model,
    }


def lot_header(ev: LotEvent, line: str, refined: list[Result] | None = None,
               summary: dict[str, int] | None = None) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "lot", "line": line, "event": ev.kind.value,
                         "lot_id": ev.lot_id, "recipe": ev.recipe, "reason": ev.reason, "t_event": ev.t,
                         "n_frames": ev.n_frames}
    if summary is not None:
        h["summary"] = summary
    if refined is not None:
        h["refined"] = [{"frame_id": r.frame.frame_id, "camera": r.frame.camera,
                         "verdict": r.verdict.value,
                         "score": None if r.score is None else round(float(r.score), 6),
                         "regions": [g.to_json() for g in r.regions]} for r in refined]
        h["model"] = refined[0].model if refined else {}
    return h


@dataclass(slots=True)
class _Rebind:
    """A request to move the PUB socket, answered by the publisher thread."""

    endpoint: str
    sndhwm: int
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


QUEUE_MAX_BYTES = 256 * 1024 * 1024  # payload maps waiting to be encoded and sent, at most


class Publisher:
    """Owns the PUB socket in its own thread; other threads hand it messages through a queue.

    The internal queue is bounded in messages (``queue_max``) and in the bytes of the payload
    maps it holds (``queue_max_bytes``: a score map of a large camera is megabytes); when either
    is reached the message is dropped and counted (``dropped``), and the next message sent skips
    its seq number, so subscribers see the gap. PUB itself never blocks: beyond ``sndhwm`` ZeroMQ drops for the slow subscriber only, who
    also sees a seq gap.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, line: str, sndhwm: int,
                 heartbeat_s: float, status: Callable[[], dict[str, Any]], queue_max: int = 100_000,
                 queue_max_bytes: int = QUEUE_MAX_BYTES):
        self.line = line
        self.heartbeat_s = heartbeat_s
        self._status = status
        self._q: queue.Queue[tuple[str, dict[str, Any], np.ndarray | None]] = queue.Queue(queue_max)
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self._gap = 0  # messages dropped before reaching the thread since the last one sent
        self._queued_bytes = 0  # payload bytes waiting in the queue
        self.queue_max_bytes = int(queue_max_bytes)
        self._drop_lock = threading.Lock()  # dropped and _gap are counted from any thread
        self.failed = 0  # messages that could not be encoded or sent (logged), not counted as dropped
        self.cpu_s = 0.0  # CPU seconds of the publisher thread spent encoding and sending
        self.t_heartbeat = time.monotonic()  # stage heartbeat for the watchdog
        self._stop = threading.Event()
        self._closed = False  # the thread took its last message: later ones are dropped
        self._ctx = ctx
        self._sock = self._bound(endpoint, sndhwm)
        self._bound_as = endpoint  # as configured (LAST_ENDPOINT resolves wildcards)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._rebind: _Rebind | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def _bound(self, endpoint: str, sndhwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, 1000)
        bind(sock, endpoint, "publish.endpoint")
        return sock

    def rebind(self, endpoint: str, sndhwm: int, timeout_s: float = 10.0) -> str:
        """Publish on ``endpoint`` with ``sndhwm`` from now on (a reload). The publisher thread
        moves between two messages: every message queued goes out, in order, and the seq numbers
        go on. On the same endpoint only the high-water mark changes, for subscribers that connect
        from then on (the socket stays bound: a TCP port closed and bound again at once is still
        in use, and connected subscribers would lose messages). Returns the endpoint bound; raises
        EndpointError (one line) when it cannot bind, and the old socket keeps publishing."""
        req = _Rebind(endpoint, sndhwm)
        if self._stop.is_set():
            raise EndpointError(f"publish.endpoint = '{endpoint}': the publisher is stopping")
        if self._thread.is_alive():
            with self._drop_lock:
                self._rebind = req
            if not req.done.wait(timeout_s):
                with self._drop_lock:
                    if self._rebind is req:  # never taken: it must not happen after the reply
                        self._rebind = None
                if not req.done.is_set():
                    raise EndpointError(f"publish.endpoint = '{endpoint}': the publisher did not move within "
                                        f"{timeout_s:g} s")
        else:  # not started yet: nothing else uses the socket
            self._do_rebind(req)
        if req.error is not None:
            raise req.error
        return self.endpoint

    def _do_rebind(self, req: "_Rebind") -> None:
        old, new = self._sock, None
        try:
            if req.endpoint == self._bound_as:
                old.setsockopt(zmq.SNDHWM, req.sndhwm)  # pipes made from now on
            else:
                new = self._bound(req.endpoint, req.sndhwm)  # fails with the old one still serving
                self._sock, new = new, None
                old.close(linger=1000)
                self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._bound_as = req.endpoint
            logger.info("publishing on %s (sndhwm %d)", self.endpoint, req.sndhwm)
        except Exception as exc:  # noqa: BLE001 - a bad value must not end the publisher thread
            if new is not None:
                new.close(linger=0)
            req.error = exc if isinstance(exc, EndpointError) else EndpointError(
                f"publish.endpoint = '{req.endpoint}': cannot move the publisher: {type(exc).__name__}: {exc}")
        finally:
            req.done.set()

    def start(self) -> None:
        self._thread.start()

    def send(self, kind: str, header: dict[str, Any], payload: np.ndarray | None = None) -> None:
        """Queue one message (any thread). ``payload`` is encoded as PNG in the publisher thread.
        After the thread has taken its last message (``stop``), a message is counted as dropped:
        nothing would send it. The check and the put are one step under the lock, so a message
        cannot slip into the queue after the thread's last look."""
        size = 0 if payload is None else int(payload.nbytes)
        with self._drop_lock:
            if self._closed:
                self.dropped += 1
                return
            if self._queued_bytes + size > self.queue_max_bytes and self._queued_bytes:
                self.dropped += 1
                self._gap += 1  # its seq number is skipped by the next message sent
                return
            try:
                self._q.put_nowait((kind, header, payload))
            except queue.Full:
                self.dropped += 1
                self._gap += 1
                return
            self._queued_bytes += size

    def _run(self) -> None:
        next_hb = time.monotonic()
        while True:
            now = time.monotonic()
            self.t_heartbeat = now
            if self._rebind is not None:
                with self._drop_lock:
                    req, self._rebind = self._rebind, None
                self._do_rebind(req)
            if now >= next_hb:
                next_hb = now + self.heartbeat_s
                try:
                    self._emit("heartbeat", {"kind": "heartbeat", "line": self.line, **self._status()}, None)
                except Exception:  # noqa: BLE001 - one bad heartbeat must not end publishing
                    self.failed += 1
                    logger.exception("heartbeat could not be built or sent")
            try:
                item = self._q.get(timeout=min(0.2, max(0.0, next_hb - now)))
            except queue.Empty:
                if self._stop.is_set():
                    break
                continue
            self._publish(*item)
        with self._drop_lock:
            self._closed = True
            req, self._rebind = self._rebind, None
        if req is not None:  # asked for as the thread stopped: answered, not left waiting
            req.error = EndpointError(f"publish.endpoint = '{req.endpoint}': the publisher is stopping")
            req.done.set()
        while True:  # what was queued between the last look and closing still goes out
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            self._publish(*item)
        self._sock.close(linger=1000)

    def _publish(self, kind: str, header: dict[str, Any], payload: np.ndarray | None) -> None:
        if payload is not None:
            with self._drop_lock:
                self._queued_bytes -= int(payload.nbytes)
        c0 = time.thread_time()
        try:
            self._emit(kind, header, payload)
        except Exception:  # noqa: BLE001 - e.g. a map PNG cannot encode: counted, the rest goes on
            self.failed += 1
            logger.exception("could not publish a %s message", kind)
        self.cpu_s += time.thread_time() - c0

    def _emit(self, kind: str, header: dict[str, Any], payload: np.ndarray | None) -> None:
        header = {"v": WIRE_VERSION, **header}  # every header, whoever built it, names the wire version
        png = None
        if payload is not None:
            try:
                png = encode_png(payload)
            except Exception as exc:  # noqa: BLE001 - the verdict still goes out, without its map
                self.failed += 1
                logger.exception("could not encode the %s payload; the header is sent without it", kind)
                header["payload_error"] = f"{type(exc).__name__}: {exc}"
        with self._drop_lock:
            gap, self._gap = self._gap, 0
        self.seq += 1 + gap
        header.update(seq=self.seq, t_publish=time.time())
        parts = [topic(self.line, kind)]
        if png is not None:
            header["payload"] = "png-mask" if payload.dtype == bool else "png-score"
            parts += [json.dumps(header).encode(), png]
        else:
            parts.append(json.dumps(header).encode())
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            with self._drop_lock:
                self.dropped += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then close the socket."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("publisher did not stop within %.1f s; %d messages left", timeout_s, self._q.qsize())

    def depth(self) -> int:
        return self._q.qsize()
