"""The local engine of `servekit batch`: every core of one machine, and files that resume.

Each input file (one file, or every Parquet, CSV, JSON Lines or `.npy` file of a folder, in name
order) becomes `OUTPUT/<file stem>.parquet`, with the rows it rejected in
`OUTPUT/_errors/<file stem>.jsonl`. The work goes to a pool of worker processes (one per core
by default, forked on Linux), each of which loads the model once, with one runtime thread. A
Parquet file is shared out by row group: each worker reads its row groups itself,
`batch_size` rows at a time, so the main process only writes. Other files are read by the main
process and sent out batch by batch. At most two tasks per worker are in flight, so memory
follows the batch size (and the row-group size), not the size of the data. Results are written
in input order.

Both files of an input are written under hidden `.partial` names and renamed when complete, the
predictions last, so a `.parquet` in the output is always whole. A rerun skips the inputs whose
predictions exist and redoes the others from their start, so a crash or a kill costs at most the
files that were in progress, and never leaves duplicated or missing rows. Rows without an `id`
column are numbered from 0 within their file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from servekit.tools.batch.scoring import ID_COLUMN, RejectedRow, Scorer, ScoringOptions
from servekit.tools.batch.scoring import version_directory as find_version
from servekit.tools.batch.settings import ERRORS_FOLDER, INPUT_SUFFIXES, BatchReport, BatchSettings

PARTIAL = ".partial"
# Workers are forked where the platform can, because spawning one re-imports numpy, pyarrow
# and the runtime, which costs more than scoring a million rows of a small model. Each worker
# still loads the model itself, so it shares no runtime state with this process.
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
# How often a worker checks that the main process is alive.
_PARENT_POLL_SECONDS = 1.0
# Batches in flight per worker: one running, one waiting, so no worker idles between them.
_IN_FLIGHT_PER_WORKER = 2


class RejectedRowError(Exception):
    """A row was rejected while --fail-fast was on."""


def input_files(path: Path) -> list[Path]:
    """Return the files to score: `path` itself, or its readable files in name order."""
    if path.is_file():
        if path.suffix.lower() not in INPUT_SUFFIXES:
            raise ValueError(f"cannot read {path}: use {', '.join(INPUT_SUFFIXES)} files")
        return [path]
    if not path.is_dir():
        raise ValueError(f"input {path} does not exist")
    files = sorted(
        child
        for child in path.iterdir()
        if child.is_file()
        and child.suffix.lower() in INPUT_SUFFIXES
        and not child.name.startswith((".", "_"))
    )
    if not files:
        raise ValueError(f"{path} contains no {', '.join(INPUT_SUFFIXES)} file")
    stems: dict[str, Path] = {}
    for file in files:
        other = stems.setdefault(file.stem, file)
        if other is not file:
            # Both would be written to the same <stem>.parquet.
            raise ValueError(
                f"{other.name} and {file.name} would both be written as {file.stem}.parquet; "
                "rename one, or score them separately"
            )
    return files


def run_local(
    settings: BatchSettings, progress: Callable[[int, int | None], None] | None = None
) -> BatchReport:
    """Score every input file into the output folder; `progress(rows, total)` follows along."""
    started = time.monotonic()
    directory = find_version(settings.model_dir, settings.version)
    files = input_files(settings.input_path)
    if settings.input_path.resolve() == settings.output_path.resolve():
        raise ValueError("--output must be another folder than --input")
    options = ScoringOptions(settings.input_columns, 1, settings.allow_pickle)
    # Loaded here too, so a model or mapping problem fails before any worker starts.
    scorer = Scorer(directory, options)
    input_names = list(scorer.signature.input_names)
    columns = scorer.required_columns()
    output = settings.output_path
    (output / ERRORS_FOLDER).mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    pending = []
    for file in files:
        if (output / f"{file.stem}.parquet").exists():
            report.files_skipped.append(file.name)
        else:
            pending.append(file)
    total = sum(_row_count(file) or 0 for file in pending) or None
    workers = settings.workers or os.cpu_count() or 1
    pool = _pool(directory, options, workers) if workers > 1 else None
    try:
        global _worker_scorer
        _worker_scorer = scorer
        for file in pending:
            tasks = _tasks(file, settings.batch_size, columns, input_names)
            try:
                rows, rejected = _score_file(
                    tasks, pool, workers, file, output, settings.fail_fast,
                    lambda done: progress(report.rows + done, total) if progress else None,
                )  # fmt: skip
            except (pa.ArrowException, ValueError, OSError) as exc:
                # The files before this one are complete; a rerun after a fix skips them.
                raise ValueError(f"cannot score {file}: {exc}") from None
            report.rows += rows
            report.rejected += rejected
            report.files_written.append(f"{file.stem}.parquet")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        scorer.close()
    report.seconds = time.monotonic() - started
    return report


def _score_file(
    tasks: Iterator[_Task],
    pool: concurrent.futures.ProcessPoolExecutor | None,
    workers: int,
    file: Path,
    output: Path,
    fail_fast: bool,
    progress: Callable[[int], None],
) -> tuple[int, int]:
    """Score one file into its partial outputs, then rename them; return rows and rejections."""
    target = output / f"{file.stem}.parquet"
    errors_target = output / ERRORS_FOLDER / f"{file.stem}.jsonl"
    partial = target.with_name(f".{target.name}{PARTIAL}")
    errors_partial = errors_target.with_name(f".{errors_target.name}{PARTIAL}")
    writer: pq.ParquetWriter | None = None
    scored = rejected = 0
    try:
        with errors_partial.open("w") as errors:
            for result, failures in _results(tasks, pool, workers):
                for row in failures:
                    if fail_fast:
                        raise RejectedRowError(
                            f"{file.name}: row {row.id!r} was rejected: {row.reason}"
                        )
                    errors.write(json.dumps({ID_COLUMN: _plain(row.id), "reason": row.reason}))
                    errors.write("\n")
                if writer is None:
                    writer = _writer(partial, result.schema)
                writer.write_batch(result)
                scored += result.num_rows
                rejected += len(failures)
                progress(scored + rejected)
        if writer is None:
            assert _worker_scorer is not None
            writer = _writer(partial, _worker_scorer.output_schema())
        writer.close()
        writer = None
        os.replace(errors_partial, errors_target)
        os.replace(partial, target)
    finally:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        errors_partial.unlink(missing_ok=True)
    return scored, rejected


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Dictionary encoding gains nothing on scores and ids, and it took most of the writing time
    # (0.6 of 0.8 s for a million rows of ten probabilities, in one measurement on 2 cores).
    return pq.ParquetWriter(path, schema, use_dictionary=False)


# A function run in a worker (or in this process), and its arguments.
_Task = tuple[Callable[..., list[tuple[pa.RecordBatch, list[RejectedRow]]]], tuple[Any, ...]]


def _tasks(
    path: Path, batch_size: int, columns: list[str], input_names: list[str]
) -> Iterator[_Task]:
    """Yield the work for one file: its Parquet row groups, or the batches read here."""
    if path.suffix.lower() == ".parquet":
        metadata = pq.ParquetFile(path).metadata
        first_row = 0
        for group in range(metadata.num_row_groups):
            yield _score_row_group, (path, group, batch_size, columns, first_row)
            first_row += metadata.row_group(group).num_rows
        return
    first_row = 0
    for batch in _read(path, batch_size, columns, input_names):
        yield _score_batch, (batch, first_row)
        first_row += batch.num_rows


def _results(
    tasks: Iterator[_Task],
    pool: concurrent.futures.ProcessPoolExecutor | None,
    workers: int,
) -> Iterator[tuple[pa.RecordBatch, list[RejectedRow]]]:
    """Run the tasks in order, in the pool when there is one, with a bounded number in flight."""
    if pool is None:
        for function, arguments in tasks:
            yield from function(*arguments)
        return
    waiting: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
    for function, arguments in tasks:
        waiting.append(pool.submit(function, *arguments))
        if len(waiting) >= workers * _IN_FLIGHT_PER_WORKER:
            yield from waiting.popleft().result()
    while waiting:
        yield from waiting.popleft().result()


# The scorer of a worker process, loaded once by the pool's initializer.
_worker_scorer: Scorer | None = None


def _pool(
    directory: Path, options: ScoringOptions, workers: int
) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(_START_METHOD),
        initializer=_load_in_worker,
        initargs=(directory, options, os.getpid()),
    )


def _load_in_worker(directory: Path, options: ScoringOptions, parent: int) -> None:
    global _worker_scorer
    # A worker whose main process was killed (kill -9) stops too, instead of lingering.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _worker_scorer = Scorer(directory, options)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)


def _score_batch(
    batch: pa.RecordBatch, first_row: int
) -> list[tuple[pa.RecordBatch, list[RejectedRow]]]:
    assert _worker_scorer is not None
    return [_worker_scorer.score(batch, first_row)]


def _score_row_group(
    path: Path, group: int, batch_size: int, columns: list[str], first_row: int
) -> list[tuple[pa.RecordBatch, list[RejectedRow]]]:
    """Read one row group of a Parquet file and score it, `batch_size` rows at a time."""
    assert _worker_scorer is not None
    parquet = pq.ParquetFile(path)
    present = [name for name in (ID_COLUMN, *columns) if name in parquet.schema_arrow.names]
    results = []
    for batch in parquet.iter_batches(batch_size, row_groups=[group], columns=present):
        results.append(_worker_scorer.score(batch, first_row))
        first_row += batch.num_rows
    return results


def _row_count(path: Path) -> int | None:
    """Return the number of rows when the file's metadata gives it, and None otherwise.

    A file that cannot be opened counts as unknown here, so that it fails in its turn, with
    its name, after the files before it are written.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        if suffix == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    except (pa.ArrowException, ValueError, OSError):
        return None
    return None


def _read(
    path: Path, batch_size: int, columns: list[str], input_names: list[str]
) -> Iterator[pa.RecordBatch]:
    """Read a CSV, JSON Lines or `.npy` file in batches of at most `batch_size` rows."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # Model columns stay text until they are converted, so one stray word rejects its own
        # row rather than the whole block.
        convert = pa_csv.ConvertOptions(
            column_types=dict.fromkeys(columns, pa.string()),
            strings_can_be_null=True,
            # Only an empty cell is missing; "NaN" is a number, as Spark reads it.
            null_values=[""],
        )
        reader = pa_csv.open_csv(
            path, pa_csv.ReadOptions(block_size=1 << 22), convert_options=convert
        )
        for batch in reader:
            yield from _split(batch, batch_size)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _read_json_lines(path, batch_size)
    else:
        yield from _read_npy(path, batch_size, input_names)


def _split(batch: pa.RecordBatch, size: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, size):
        yield batch.slice(start, size)


def _read_json_lines(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    rows: list[dict[str, Any]] = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number} is not a JSON object")
            rows.append(row)
            if len(rows) == batch_size:
                yield pa.RecordBatch.from_pylist(rows)
                rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows)


def _read_npy(path: Path, batch_size: int, input_names: list[str]) -> Iterator[pa.RecordBatch]:
    if len(input_names) != 1:
        raise ValueError(
            f"{path} contains one array, but the model takes {len(input_names)} inputs; "
            "use Parquet with one column per input"
        )
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    for start in range(0, array.shape[0], batch_size):
        rows = np.ascontiguousarray(array[start : start + batch_size])
        width = int(np.prod(rows.shape[1:])) if rows.ndim > 1 else 1
        values = pa.array(rows.reshape(-1))
        column = values if rows.ndim == 1 else pa.FixedSizeListArray.from_arrays(values, width)
        yield pa.RecordBatch.from_arrays([column], names=[input_names[0]])


def _plain(value: Any) -> Any:
    """Return an id ready for JSON: bytes as text, everything else unchanged."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
