"""Summaries of one load step: throughput, latency percentiles and errors by status."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def percentile(samples: np.ndarray[Any, Any], rank: float) -> float:
    """Return the `rank`-th percentile of `samples`, interpolating linearly between neighbours.

    This is numpy's default ("linear") method: the percentile sits at position
    `rank / 100 * (n - 1)` of the sorted samples.
    """
    if samples.size == 0:
        return float("nan")
    return float(np.percentile(samples, rank))


@dataclass
class StepResult:
    """The measurements of one load step: per-request latencies (seconds) and outcomes."""

    # The closed-loop concurrency or the open-loop request rate of the step.
    load: float
    mode: str
    duration: float
    latencies: np.ndarray[Any, Any]
    statuses: Counter[str] = field(default_factory=Counter)
    # Every response of the step, warm-up included, by status.
    answered: Counter[str] = field(default_factory=Counter)
    server: dict[str, float] = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return self.statuses.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: count for code, count in sorted(self.statuses.items()) if code != "OK"}

    @property
    def throughput(self) -> float:
        """Successful requests per second over the step."""
        return self.succeeded / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Return the step as a flat dict of numbers, latencies in milliseconds."""
        row: dict[str, Any] = {
            "mode": self.mode,
            "load": self.load,
            "requests": int(sum(self.statuses.values())),
            "succeeded": self.succeeded,
            "throughput": self.throughput,
        }
        for rank in PERCENTILES:
            row[f"p{rank}_ms"] = percentile(self.latencies, rank) * 1000
        row["max_ms"] = float(self.latencies.max()) * 1000 if self.latencies.size else float("nan")
        row["errors"] = self.errors
        row["answered_ok"] = self.answered.get("OK", 0)
        row["answered"] = int(sum(self.answered.values()))
        row.update(self.server)
        return row


def merge(parts: list[StepResult]) -> StepResult:
    """Combine the results of the client processes that ran one step together."""
    statuses: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    for part in parts:
        statuses.update(part.statuses)
        answered.update(part.answered)
    return StepResult(
        load=sum(part.load for part in parts),
        mode=parts[0].mode,
        duration=max(part.duration for part in parts),
        latencies=np.concatenate([part.latencies for part in parts]),
        statuses=statuses,
        answered=answered,
    )
