"""Server-side figures for a load step, from the Prometheus metrics scraped before and after it.

Works with servekit's metric names; for a server without them, no figures are reported.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Histogram name -> the report column of its mean over the step.
_MEANS = {
    "servekit_queue_duration_seconds": ("server_queue_ms", 1000.0),
    "servekit_inference_duration_seconds": ("server_compute_ms", 1000.0),
    "servekit_batch_size_rows": ("server_batch_rows", 1.0),
}


def scrape(url: str | None, model: str) -> dict[str, float] | None:
    """Sum the model's counters and histogram sums and counts; None if unreachable."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "servekit_requests_total":
                key = "requests_ok" if sample.labels.get("code") == "200" else "requests_failed"
                totals[key] = totals.get(key, 0.0) + sample.value
            elif sample.name.endswith(("_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def difference(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """Return the step's server figures: requests served and mean queue, compute and batch."""
    if before is None or after is None:
        return {}
    figures: dict[str, Any] = {
        "server_requests": after.get("requests_ok", 0.0) - before.get("requests_ok", 0.0),
        "server_failed": after.get("requests_failed", 0.0) - before.get("requests_failed", 0.0),
    }
    for name, (column, scale) in _MEANS.items():
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        if count > 0:
            figures[column] = total / count * scale
    return figures
