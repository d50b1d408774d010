"""The settings and the report of one batch-inference job, whichever engine runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# File types read as input, by suffix.
INPUT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".npy")
# Rejected rows go to this folder of the output, as JSON Lines of {"id": ..., "reason": ...};
# the underscore makes Spark and pyarrow skip it when they read the output as a dataset.
ERRORS_FOLDER = "_errors"


@dataclass(frozen=True)
class BatchSettings:
    """The data to score, the model to score it with, and the engine's settings."""

    model_dir: Path
    input_path: Path
    output_path: Path
    version: int | None = None
    input_columns: tuple[str, ...] | None = None
    # Rows per call to the model, and per Arrow batch read; memory grows with it, not the data.
    batch_size: int = 8192
    # Processes of the local engine, or the N of Spark's local[N]; 0 means one per core.
    workers: int = 0
    fail_fast: bool = False
    allow_pickle: bool = False
    # Spark's master URL; None runs local[workers] on this machine.
    master: str | None = None
    progress: bool = True


@dataclass
class BatchReport:
    """The outcome of a job: rows scored and rejected, files written and skipped."""

    rows: int = 0
    rejected: int = 0
    seconds: float = 0.0
    files_written: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)
