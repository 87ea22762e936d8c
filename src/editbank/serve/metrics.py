"""Prometheus metrics of one app (its own registry) and the ASGI middleware that counts requests and logs them."""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("editbank.access")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("editbank_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("editbank_request_seconds", "HTTP request latency (to the last byte sent)",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram("editbank_batch_rows", "rows per generate batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("editbank_batch_seconds", "seconds per generate batch", buckets=_LATENCY,
                                       registry=r)
        self.queue_depth = Gauge("editbank_queue_depth", "completion jobs waiting for a batch", registry=r)
        self.edits = Counter("editbank_edits_applied", "edits applied (acknowledged)", registry=r)
        self.undos = Counter("editbank_edits_undone", "edits undone (acknowledged)", registry=r)
        self.active = Gauge("editbank_active_edits", "active edits in the store", registry=r)
        self.edit_seconds = Histogram("editbank_edit_seconds", "seconds per edit or undo call",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)


class Observe:
    """ASGI middleware: request count and latency by route template, and one JSON access-log line per request."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({"ts": round(time.time(), 3), "client": client[0],
                                            "method": scope["method"], "path": scope["path"],
                                            "endpoint": endpoint, "status": status[0],
                                            "ms": round(seconds * 1000, 2)}))
