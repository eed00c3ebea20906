"""Prometheus metrics of the daemon: frames in/out, drops by cause, latency, queue depths, lots."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


KNOWN_DROP_CAUSES = ("ring_full_oldest", "ring_full_newest", "ring_full_timeout", "camera_loss",
                     "threshold calibrating", "shutdown", "source restart")

class Telemetry:
    """One registry per daemon (so tests can run several daemons in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_in = Counter("linewatch_frames_in", "Frames received from the source", registry=r)
        self.results = Counter("linewatch_results", "Tier-1 results published, by verdict",
                               ["verdict"], registry=r)
        self.drops = Counter("linewatch_drops", "Frames published NOT_INSPECTED, by cause (the reason's "
                             "first word: ring_full_oldest, ring_full_newest, ring_full_timeout, "
                             "camera_loss, threshold calibrating, shutdown, ...)", ["cause"], registry=r)
        self.camera_loss = Counter("linewatch_camera_lost_frames", "Frame-id gaps from the camera",
                                   registry=r)
        self.latency = Histogram("linewatch_capture_to_publish_seconds",
                                 "Capture to hand-over to the publisher of tier-1 results: OK, NG, "
                                 "FAULT and calibrating frames (not dropped or lost ones)",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.engine_s = Histogram("linewatch_engine_batch_seconds", "Engine time per batch",
                                  buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("linewatch_queue_depth", "Items waiting, by queue", ["queue"], registry=r)
        self.lots = Counter("linewatch_lots", "Lots opened/closed", ["event"], registry=r)
        self.store_spooled = Gauge("linewatch_store_spooled_rows", "Rows waiting in the disk spool",
                                   registry=r)
        self.source_connected = Gauge("linewatch_source_connected", "1 when the source delivers",
                                      registry=r)
        self._server = None
        # every series exists from the start at 0, so that increase() sees the first one after a start
        for verdict in ("OK", "NG", "NOT_INSPECTED", "FAULT"):
            self.results.labels(verdict)
        for cause in KNOWN_DROP_CAUSES:
            self.drops.labels(cause)
        for event in ("opened", "closed"):
            self.lots.labels(event)

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP endpoint; raises OSError (address in use) for the caller to report."""
        if port:
            self._server = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
