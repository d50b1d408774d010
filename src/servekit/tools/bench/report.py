"""Reports of a run: a terminal table, JSON, CSV, a latency-throughput plot and an HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = (
    ("load", "load", "{:g}"),
    ("throughput", "req/s", "{:,.1f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p95_ms", "p95 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.2f}"),
    ("server_queue_ms", "queue ms", "{:.2f}"),
    ("server_compute_ms", "compute ms", "{:.2f}"),
    ("server_batch_rows", "batch rows", "{:.1f}"),
)


def print_table(rows: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table(title=title)
    for _, heading, _ in COLUMNS:
        table.add_column(heading, justify="right")
    table.add_column("errors")
    for row in rows:
        cells = [_cell(row.get(key), form) for key, _, form in COLUMNS]
        errors = ", ".join(f"{code}: {count}" for code, count in row["errors"].items()) or "-"
        table.add_row(*cells, errors)
    console.print(table)


def _cell(value: Any, form: str) -> str:
    if value is None or value != value:  # missing or NaN
        return "-"
    return form.format(value)


def write_json(path: Path, document: dict[str, Any]) -> None:
    # Standard JSON has no NaN (a step without successes has no percentiles): null instead.
    path.write_text(json.dumps(without_nan(document), indent=2, allow_nan=False) + "\n")


def without_nan(value: Any) -> Any:
    """Return a copy of a JSON-like value with every NaN float replaced by None."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = ["mode", "requests", "succeeded", *[key for key, _, _ in COLUMNS], "errors"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "errors": json.dumps(row["errors"])})


def plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """Draw p50, p90 and p99 latency against throughput across the steps."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=110)
    throughput = [row["throughput"] for row in rows]
    for rank, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
        axes.plot(throughput, [row[f"{rank}_ms"] for row in rows], style, label=rank)
    for row in rows:
        axes.annotate(f"{row['load']:g}", (row["throughput"], row["p99_ms"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 4))  # fmt: skip
    axes.set_xlabel("throughput (successful requests per second)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def write_html(path: Path, document: dict[str, Any], png: bytes) -> None:
    rows = document["steps"]
    head = "".join(f"<th>{html.escape(heading)}</th>" for _, heading, _ in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_cell(row.get(key), form)}</td>" for key, _, form in COLUMNS)
        + f"<td>{html.escape(json.dumps(row['errors']))}</td></tr>"
        for row in rows
    )
    image = base64.b64encode(png).decode()
    settings = html.escape(json.dumps(document["settings"], indent=2))
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>servekit bench</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style>"
        f"<h1>servekit bench</h1><img src='data:image/png;base64,{image}' alt='latency plot'>"
        f"<table><tr>{head}<th>errors</th></tr>{body}</table><pre>{settings}</pre>\n"
    )
