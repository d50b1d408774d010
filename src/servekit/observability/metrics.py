"""Prometheus metrics.

Label values come only from models the server has loaded: a request naming an unknown model is
counted under `UNKNOWN_MODEL`, so junk URLs cannot create new time series.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

UNKNOWN_MODEL = "__unknown__"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds, from a fast in-memory model (about 100 us) to a slow one (10 s).
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_STATES = ["START", "LOADING", "AVAILABLE", "UNLOADING", "END"]


class Metrics:
    """The server's metrics, kept in a registry of their own."""

    def __init__(self) -> None:
        # The `_created` series double the output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "servekit_requests",
            "Inference requests, by model, version, protocol and HTTP status code.",
            ["model", "version", "protocol", "code"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "servekit_request_duration_seconds",
            "Time from the request's arrival to its response, in seconds.",
            ["model", "version", "protocol", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "servekit_inference_duration_seconds",
            "Time the runtime spent computing one call, in seconds.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.version_state = Enum(
            "servekit_model_version_state",
            "Lifecycle state of each model version the server knows of.",
            ["model", "version"],
            states=_STATES,
            registry=self.registry,
        )
        self.queue_rows = Gauge(
            "servekit_queue_rows",
            "Rows waiting in the batcher's queue.",
            ["model", "version"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "servekit_inflight_requests",
            "Inference requests accepted and not yet answered.",
            ["model", "version"],
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "servekit_queue_duration_seconds",
            "Time a request waited in the queue before its first rows ran, in seconds.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "servekit_batch_size_rows",
            "Rows in each call to the runtime.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.rejected = Counter(
            "servekit_rejected_requests",
            "Requests rejected by the batcher: queue_full (429) or deadline (504).",
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self.load_duration = Gauge(
            "servekit_model_load_duration_seconds",
            "Time the last successful load of each version took, in seconds.",
            ["model", "version"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
