"""Prometheus metrics.

Label values come only from models the server has loaded: a request naming an unknown model is
counted under `UNKNOWN_MODEL`, so junk URLs cannot create new time series.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
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


def multiprocess_directory() -> str | None:
    """Return the directory where worker processes share metric values, if there is one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class Metrics:
    """The server's metrics, kept in a registry of their own.

    With several workers, prometheus_client's multiprocess mode keeps each worker's values in
    files under PROMETHEUS_MULTIPROC_DIR (set by the supervisor before the workers start), and
    every worker's /metrics merges all of them. The standard process collectors only read the
    process that serves the scrape there, so each worker publishes its own memory and CPU time.
    """

    def __init__(self) -> None:
        # The `_created` series double the output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_directory() is not None
        self.registry: CollectorRegistry | None = None
        if not self.multiprocess:
            self.registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        # Labelled children by (model, version, protocol, code), to skip labels() per request.
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
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
        self.version_state = Gauge(
            "servekit_model_version_state",
            "1 for the lifecycle state each model version is in, 0 for the others.",
            ["model", "version", "state"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.queue_rows = Gauge(
            "servekit_queue_rows",
            "Rows waiting in the batcher's queue.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "servekit_inflight_requests",
            "Inference requests accepted and not yet answered.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livesum",
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
        self.load_failures = Counter(
            "servekit_model_load_failures",
            "Failed attempts to load a version, by model.",
            ["model"],
            registry=self.registry,
        )
        self.load_duration = Gauge(
            "servekit_model_load_duration_seconds",
            "Time the last successful load of each version took, in seconds.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        # Only with several workers; a single process has the standard process_* metrics.
        self.worker_memory = Gauge(
            "servekit_worker_resident_memory_bytes",
            "Resident memory of each worker process, in bytes.",
            registry=None,
            multiprocess_mode="liveall",
        )
        self.worker_cpu = Gauge(
            "servekit_worker_cpu_seconds",
            "CPU time each worker process has used, in seconds.",
            registry=None,
            multiprocess_mode="liveall",
        )

    def observe_request(
        self, model: str, version: str, protocol: str, code: int, elapsed: float
    ) -> None:
        """Count one completed request and its latency.

        `code` is the HTTP status, or for gRPC the HTTP status of the same outcome (200 for OK,
        404 for NOT_FOUND, ...), so one query covers both transports.
        """
        key = (model, version, protocol, code)
        children = self._request_children.get(key)
        if children is None:
            labels = (model, version, protocol, str(code))
            children = (self.requests.labels(*labels), self.request_duration.labels(*labels))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(elapsed)

    def set_state(self, model: str, version: str, state: str) -> None:
        """Mark `state` as the current lifecycle state of one version."""
        for name in _STATES:
            self.version_state.labels(model, version, name).set(1 if name == state else 0)

    def sample_process(self) -> None:
        """Record this process's memory and CPU time (what the process collectors report)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.worker_cpu.set(usage.ru_utime + usage.ru_stime)
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        self.worker_memory.set(pages * os.sysconf("SC_PAGE_SIZE"))

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric, merged across workers."""
        if self.registry is not None:
            return generate_latest(self.registry)
        self.sample_process()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
