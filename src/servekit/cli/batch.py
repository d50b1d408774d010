"""`servekit batch`: score a dataset offline with a model folder, locally or on Apache Spark."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path),
              required=True,
              help="A Parquet, CSV, JSON Lines or .npy file, or a folder of them.")  # fmt: skip
@click.option("--output", "output_path", type=click.Path(file_okay=False, path_type=Path),
              required=True,
              help="Folder for the predictions (Parquet) and _errors/ (JSON Lines).")  # fmt: skip
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local",
              show_default=True, help="Processes on this machine, or Apache Spark.")  # fmt: skip
@click.option("--version", type=click.IntRange(min=0),
              help="Version to use (default: the highest).")  # fmt: skip
@click.option("--input-columns",
              help="Comma-separated columns stacked, in order, into the model's one "
                   "input (default: columns named after the inputs).")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Rows per model call and per batch read; memory grows with it.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes (local) or local[N] threads (spark); 0 is one per core.")  # fmt: skip
@click.option("--master", help="Spark master URL (default: local[--workers]).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first rejected row.")
@click.option("--allow-pickle", "--allow_pickle", "allow_pickle", is_flag=True,
              help="Load pickled or PyTorch model files, which run code when loaded.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar on stderr.")  # fmt: skip
def batch(input_columns: str | None, engine: str, **options: Any) -> None:
    """Score every row of --input with MODEL_DIR and write the predictions to --output."""
    from servekit.tools.batch.local import RejectedRowError, run_local
    from servekit.tools.batch.settings import BatchSettings

    columns = None
    if input_columns is not None:
        columns = tuple(name.strip() for name in input_columns.split(",") if name.strip())
        if not columns:
            raise click.UsageError("--input-columns names no column")
    settings = BatchSettings(input_columns=columns, **options)
    try:
        if engine == "spark":
            from servekit.tools.batch.spark import run_spark

            try:
                report = run_spark(settings)
            except (ImportError, RejectedRowError, ValueError, OSError):
                raise
            except Exception as exc:
                # Spark's own errors carry a Java stack trace, whose first line names the failure.
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise click.ClickException(f"the Spark job failed: {first[:500]}") from None
        else:
            with _ProgressBar(settings.progress) as progress:
                report = run_local(settings, progress)
    except ImportError as exc:
        extra = "spark" if engine == "spark" else "batch"
        raise click.ClickException(
            f"batch inference needs {exc.name}: pip install 'servekit[{extra}]'"
        ) from None
    except (RejectedRowError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(
        {"rows": report.rows, "rejected": report.rejected, "seconds": round(report.seconds, 3),
         "rows_per_second": round(report.rows / report.seconds, 1) if report.seconds else None,
         "files_written": report.files_written, "files_skipped": report.files_skipped},
        indent=2,
    ))  # fmt: skip


class _ProgressBar:
    """A rich progress bar of rows scored, with rows per second and time left when known."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> Callable[[int, int | None], None] | None:
        if not self._enabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(),
            transient=True,
        )  # fmt: skip
        self._bar.start()
        self._task = self._bar.add_task("rows", total=None, rate="-")
        self._started = time.monotonic()
        return self._update

    def _update(self, rows: int, total: int | None) -> None:
        elapsed = time.monotonic() - self._started
        rate = f"{rows / elapsed:,.0f}" if elapsed > 0 else "-"
        self._bar.update(self._task, completed=rows, total=total, rate=rate)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
