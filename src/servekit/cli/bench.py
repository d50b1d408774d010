"""`servekit bench`: drive a model server and report throughput and latency."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from servekit.tools.bench.requests import PROTOCOLS


def _numbers(text: str | None, kind: type, option: str) -> tuple[Any, ...]:
    """Read `a,b,c` or `START:STOP:STEP` (STOP included when the steps reach it)."""
    if not text:
        return ()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise click.BadParameter("a range is START:STOP:STEP", param_hint=option)
            start, stop, step = (kind(part) for part in parts)
            if step <= 0 or stop < start:
                raise click.BadParameter(
                    f"{text!r}: STEP must be positive and STOP >= START", param_hint=option
                )
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = tuple(start + index * step for index in range(count))
        else:
            values = tuple(kind(item) for item in text.split(","))
    except ValueError:
        expected = "whole numbers" if kind is int else "numbers"
        raise click.BadParameter(f"{text!r}: expected {expected}", param_hint=option) from None
    if any(not math.isfinite(value) or value <= 0 for value in values):
        raise click.BadParameter(f"{text!r}: every value must be positive", param_hint=option)
    return values


def check_extra() -> None:
    """Raise a one-line error unless the bench extra's packages are installed."""
    try:
        import aiohttp  # noqa: F401
        import matplotlib  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"this command needs the bench extra ({exc.name} is missing): "
            "pip install 'servekit[bench]'"
        ) from None


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.is_dir():
        raise click.BadParameter(f"folder {path.parent} does not exist", param_hint=option)


@click.command()
@click.argument("url")
@click.option("--model", required=True, help="Model to send the requests to.")
@click.option("--model-version", default="", help="Version (or V2 label); default the latest.")
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="v2-binary",
    show_default=True,
    help="TF Serving REST JSON, V2 REST JSON, V2 REST binary, or V2 gRPC (URL is HOST:PORT).",
)
@click.option("--concurrency", help="Closed loop: callers, e.g. 1,4,16,64 (default 1,4,16).")
@click.option("--rate", help="Open loop: requests per second, e.g. 100:2000:100 or 50,100.")
@click.option(
    "--arrivals",
    type=click.Choice(["constant", "poisson"]),
    default="constant",
    show_default=True,
    help="Open loop: evenly spaced or Poisson-distributed send times.",
)
@click.option("--duration", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds measured per step.")  # fmt: skip
@click.option("--requests", "request_count", type=click.IntRange(min=1),
              help="Measure this many requests per step instead of a duration.")  # fmt: skip
@click.option("--warmup", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds of load before each step's measurement.")  # fmt: skip
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per request.")  # fmt: skip
@click.option("--input", "input_file",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Real inputs: .npy, .npz, .jsonl or .parquet (default random).")  # fmt: skip
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Client processes sharing the load.")  # fmt: skip
@click.option("--latency-threshold", type=click.FloatRange(min=0, min_open=True),
              help="Find the highest load whose p99 (ms) stays under this.")  # fmt: skip
@click.option("--metrics-url", help="Prometheus endpoint for server-side figures "
              "(default URL/metrics for REST protocols).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds before a request counts as timed out.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG of latency percentiles against throughput.")  # fmt: skip
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML report with the plot and the table.")  # fmt: skip
def bench(url: str, **options: Any) -> None:
    """Drive URL with load and report throughput, latency percentiles and errors.

    Works against servekit or any server speaking TF Serving REST or KServe V2 (REST or gRPC).
    """
    check_extra()
    for option, key in (("--json", "json_file"), ("--csv", "csv_file"), ("--plot", "plot_file"),
                        ("--html", "html_file")):  # fmt: skip
        _check_output(options[key], option)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from servekit.tools.bench import report
    from servekit.tools.bench.runner import BenchSettings, run_bench

    if options["concurrency"] and options["rate"]:
        raise click.UsageError("give --concurrency or --rate, not both")
    rates = _numbers(options["rate"], float, "--rate")
    concurrency = _numbers(options["concurrency"], int, "--concurrency")
    if not concurrency and not rates:
        concurrency = (1, 4, 16)
    protocol = options["protocol"]
    if protocol != "grpc" and not url.startswith(("http://", "https://")):
        url = "http://" + url
    metrics_url = options["metrics_url"]
    if metrics_url is None and protocol != "grpc":
        metrics_url = url.rstrip("/") + "/metrics"
    settings = BenchSettings(
        url=url,
        model=options["model"],
        protocol=protocol,
        version=options["model_version"],
        concurrency=concurrency,
        rates=rates,
        arrivals=options["arrivals"],
        duration=options["duration"],
        requests=options["request_count"],
        warmup=options["warmup"],
        rows=options["rows"],
        input_file=options["input_file"],
        processes=options["processes"],
        latency_threshold_ms=options["latency_threshold"],
        metrics_url=metrics_url,
        timeout=options["timeout"],
        seed=options["seed"],
    )
    console = Console(stderr=True)
    unit = "req/s" if rates else "callers"
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("preparing", total=None)

        def on_step(load: float, seconds: float) -> None:
            progress.reset(task, total=seconds, description=f"{load:g} {unit}")
            progress.start_task(task)

        try:
            document = _run_with_ticks(run_bench, settings, on_step, progress, task)
        except (OSError, ValueError, KeyError) as exc:
            raise click.ClickException(f"cannot run the benchmark: {exc}") from None
    title = f"{settings.model} over {protocol}, {settings.rows} row(s) per request"
    # Wide enough for every column when the output is a file or a pipe.
    output = Console() if sys.stdout.isatty() else Console(width=160)
    report.print_table(document["steps"], output, title)
    best = document.get("best")
    if settings.latency_threshold_ms is not None:
        if best is None:
            click.echo(f"no load kept p99 under {settings.latency_threshold_ms:g} ms")
        else:
            click.echo(
                f"highest load with p99 under {settings.latency_threshold_ms:g} ms: "
                f"{best['load']:g} {unit} ({best['throughput']:,.1f} req/s, "
                f"p99 {best['p99_ms']:.2f} ms)"
            )
    if options["json_file"]:
        report.write_json(options["json_file"], document)
    if options["csv_file"]:
        report.write_csv(options["csv_file"], document["steps"])
    if options["plot_file"] or options["html_file"]:
        png = report.plot_png(document["steps"], title)
        if options["plot_file"]:
            options["plot_file"].write_bytes(png)
        if options["html_file"]:
            report.write_html(options["html_file"], document, png)
    if not any(step["succeeded"] for step in document["steps"]):
        raise click.ClickException("no request succeeded; see the errors column")


def _run_with_ticks(run: Any, settings: Any, on_step: Any, progress: Any, task: Any) -> Any:
    """Run the benchmark in a thread while the progress bar advances with the clock."""
    import threading
    import time

    outcome: dict[str, Any] = {}
    started = {"at": time.monotonic()}

    def step_started(load: float, seconds: float) -> None:
        started["at"] = time.monotonic()
        on_step(load, seconds)

    def target() -> None:
        try:
            outcome["document"] = run(settings, step_started)
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    while worker.is_alive():
        progress.update(task, completed=time.monotonic() - started["at"])
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["document"]
