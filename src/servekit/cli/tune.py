"""`servekit tune`: right-size a model's settings for a p99 latency target."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from servekit.cli.bench import check_extra
from servekit.tools.bench.requests import PROTOCOLS


def _list(kind: type) -> Any:
    def convert(context: click.Context, parameter: click.Parameter, text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(item) for item in text.split(","))
        except ValueError:
            raise click.BadParameter(f"{text!r}: expected numbers separated by commas") from None
        if not values or any(not math.isfinite(value) or value < 0 for value in values):
            raise click.BadParameter(f"{text!r}: expected non-negative numbers")
        return values

    return convert


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--p99-ms", type=click.FloatRange(min=0, min_open=True), required=True,
              help="p99 latency target in milliseconds.")  # fmt: skip
@click.option("--workers", default="1,2", show_default=True, callback=_list(int),
              help="Worker processes to try.")  # fmt: skip
@click.option("--instances", default="1,2", show_default=True, callback=_list(int),
              help="Instances per version to try.")  # fmt: skip
@click.option("--max-batch-size", default="8,32", show_default=True, callback=_list(int),
              help="Batch sizes to try.")  # fmt: skip
@click.option("--max-queue-delay-ms", default="0,2", show_default=True, callback=_list(float),
              help="Queue delays to try.")  # fmt: skip
@click.option("--threads", default="0,1", show_default=True, callback=_list(int),
              help="Runtime intra-op threads to try (0 lets the runtime choose).")  # fmt: skip
@click.option("--protocol", type=click.Choice([p for p in PROTOCOLS if p != "grpc"]),
              default="v2-binary", show_default=True)  # fmt: skip
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per request.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds measured per step.")  # fmt: skip
@click.option("--warmup", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--max-concurrency", type=click.IntRange(min=1), default=64, show_default=True,
              help="Highest number of callers a ramp reaches.")  # fmt: skip
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Real inputs for the requests (.npy, .npz, .jsonl, .parquet).")  # fmt: skip
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for tune.json and tune.png (default tune-MODEL).")  # fmt: skip
def tune(model_dir: Path, **options: Any) -> None:
    """Find the settings of MODEL_DIR that give the most throughput with p99 under --p99-ms.

    Every candidate runs in its own server on 127.0.0.1. The winner's per-model settings are
    written to MODEL_DIR/servekit.yaml; the recommended --workers is printed.
    """
    from servekit.tools.tune import SearchSpace, TuneSettings, plot_png
    from servekit.tools.tune import tune as run_tune

    check_extra()
    for key in ("workers", "instances", "max_batch_size"):
        if any(value < 1 for value in options[key]):
            option = "--" + key.replace("_", "-")
            raise click.BadParameter("every value must be at least 1", param_hint=option)
    space = SearchSpace(
        workers=options["workers"],
        instances=options["instances"],
        max_batch_size=options["max_batch_size"],
        max_queue_delay_ms=options["max_queue_delay_ms"],
        intra_op_threads=options["threads"],
    )
    settings = TuneSettings(
        model_dir=model_dir.resolve(),
        p99_ms=options["p99_ms"],
        space=space,
        protocol=options["protocol"],
        rows=options["rows"],
        duration=options["duration"],
        warmup=options["warmup"],
        max_concurrency=options["max_concurrency"],
        input_file=options["input_file"],
    )
    try:
        report = run_tune(settings, progress=lambda line: click.echo(line, err=True))
    except (OSError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    folder = options["report_dir"] or Path(f"tune-{model_dir.resolve().name}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "tune.png").write_bytes(plot_png(report))
    best = report["best"]
    if "written" not in report:
        raise click.ClickException(
            f"no candidate kept p99 under {settings.p99_ms:g} ms; see {folder / 'tune.json'}"
        )
    click.echo(
        f"best: {best['throughput']:,.1f} req/s at p99 {best['p99_ms']:.2f} ms with "
        f"{json.dumps(best['settings'])}"
    )
    click.echo(f"wrote {report['written']}; serve with {report['server_flags']}")
    click.echo(f"report: {folder / 'tune.json'}, {folder / 'tune.png'}")
