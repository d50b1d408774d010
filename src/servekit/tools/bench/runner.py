"""A `servekit bench` run: prepare the requests, run each step of the sweep, collect results.

With a latency threshold, a concurrency sweep runs upwards and stops at the first step whose
p99 is over the threshold (or that has errors). A rate sweep is searched by bisection over its
values, because the p99 grows with the rate. Either way the result names the best step that met
the threshold.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from servekit.tools.bench.load import StepPlan, run_step
from servekit.tools.bench.requests import (
    FILE_POOL_SIZE,
    Target,
    encode_pool,
    fetch_inputs,
    file_inputs,
    random_inputs,
)
from servekit.tools.bench.server_metrics import difference, scrape


@dataclass(frozen=True)
class BenchSettings:
    url: str
    model: str
    protocol: str = "v2-binary"
    version: str = ""
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    arrivals: str = "constant"
    duration: float = 10.0
    requests: int | None = None
    warmup: float = 2.0
    rows: int = 1
    input_file: Path | None = None
    processes: int = 1
    latency_threshold_ms: float | None = None
    metrics_url: str | None = None
    timeout: float = 30.0
    seed: int = 0

    @property
    def mode(self) -> str:
        return "open" if self.rates else "closed"

    @property
    def loads(self) -> tuple[float, ...]:
        return self.rates if self.rates else tuple(float(count) for count in self.concurrency)


# Called before each step with the step's load and length, for a progress display.
StepStarted = Callable[[float, float], None]


def run_bench(settings: BenchSettings, on_step: StepStarted | None = None) -> dict[str, Any]:
    """Run the sweep and return the report document."""
    target = Target(settings.url.rstrip("/"), settings.protocol, settings.model, settings.version)
    specs = fetch_inputs(target)
    if settings.input_file is not None:
        arrays = file_inputs(settings.input_file, specs)
        payloads = encode_pool(target, specs, arrays, settings.rows, FILE_POOL_SIZE)
    else:
        arrays = random_inputs(specs, settings.rows, settings.seed)
        payloads = encode_pool(target, specs, arrays, settings.rows)

    def measure(load: float) -> dict[str, Any]:
        plan = StepPlan(
            mode=settings.mode,
            load=load,
            duration=settings.duration,
            warmup=settings.warmup,
            requests=settings.requests,
            arrivals=settings.arrivals,
            timeout=settings.timeout,
            seed=settings.seed,
        )
        if on_step is not None:
            on_step(load, settings.warmup + settings.duration)
        before = scrape(settings.metrics_url, settings.model)
        result = run_step(target, payloads, plan, settings.processes)
        summary = result.summary()
        summary.update(difference(before, scrape(settings.metrics_url, settings.model)))
        summary["rows_per_request"] = settings.rows
        return summary

    steps, best = _sweep(settings, measure)
    document: dict[str, Any] = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(settings).items()
        },
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": sorted(steps, key=lambda step: step["load"]),
    }
    if settings.latency_threshold_ms is not None:
        document["best"] = best
    return document


def _sweep(
    settings: BenchSettings, measure: Callable[[float], dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    threshold = settings.latency_threshold_ms
    loads = sorted(settings.loads)
    steps: list[dict[str, Any]] = []
    if threshold is None:
        return [measure(load) for load in loads], None
    best: dict[str, Any] | None = None

    def meets(step: dict[str, Any]) -> bool:
        return not step["errors"] and step["p99_ms"] <= threshold

    if settings.mode == "closed":
        for load in loads:
            step = measure(load)
            steps.append(step)
            if not meets(step):
                break
            if best is None or step["throughput"] > best["throughput"]:
                best = step
        return steps, best
    low, high = 0, len(loads) - 1
    while low <= high:
        middle = (low + high) // 2
        step = measure(loads[middle])
        steps.append(step)
        if meets(step):
            best = step if best is None or step["load"] > best["load"] else best
            low = middle + 1
        else:
            high = middle - 1
    return steps, best


def machine() -> dict[str, Any]:
    """Describe the machine the client ran on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
