"""The Spark engine of `servekit batch`: the same scoring as the local engine, on Apache Spark.

Spark reads the input: a Parquet, CSV or JSON Lines file, or a folder of files of one of those
kinds, picked as the local engine picks them. `mapInArrow` hands the rows to Python in Arrow
batches of `batch_size` rows. Each Python worker process loads the model version once,
keeps it in a module-level cache for every later task it runs, and passes each batch to
`Scorer.score`. Scored and rejected rows leave the workers together and are written once to a
temporary folder beside the output (`OUTPUT.spark-temporary-*`, removed at the end). From there,
the predictions become Parquet part files in the output folder (Spark's layout, replacing what
was there) and the rejected rows become JSON Lines of `{"id": ..., "reason": ...}` in
`OUTPUT/_errors/`. A job that fails leaves an earlier output as it was. With `fail_fast`, the first
rejected row fails the job and raises `RejectedRowError` with its file, id and reason.

Rows of an input without an `id` column are numbered from 0 within their file, as the local
engine numbers them. Spark splits large files into blocks that Python workers receive in no set
order, so a first job counts the rows of each block (`_metadata.file_block_start`), and each
worker numbers its rows from the rows of the file's earlier blocks.

With no master URL, `run_spark` runs `local[workers]` with every service on 127.0.0.1. When a
SparkSession is already active (under `spark-submit`, or in a notebook), it is used as it is,
and only the Arrow settings change for the job. On a cluster, the Python workers need servekit
in their environment (`PYSPARK_PYTHON`). The driver lists the input files, so the input and
output paths must be on a filesystem that the driver and every executor mount at the same path.
The model folder may be on that filesystem too, or shipped with the job: a worker that does not
find the driver's path looks for `MODEL_NAME/VERSION` in its working directory and in the
SparkFiles root. For example, with `zip -r digits.zip 1` in the model folder:

    spark-submit --master yarn --archives digits.zip#digits \\
        --conf spark.pyspark.python=/opt/servekit/bin/python score.py

where `score.py` creates the session and calls `run_spark`:

    from pathlib import Path
    from pyspark.sql import SparkSession
    from servekit.tools.batch.settings import BatchSettings
    from servekit.tools.batch.spark import run_spark

    SparkSession.builder.getOrCreate()
    run_spark(BatchSettings(Path("models/digits"), Path("/shared/in"), Path("/shared/out")))

The driver resolves and loads the model version itself, to check it and to learn its outputs,
so it needs the model folder at `model_dir` as well.

NOTE: the tests run Spark in local mode only; the cluster setup above has not been tried.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.core.files import SparkFiles
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_type
from pyspark.sql.types import DataType, LongType, StringType, StructField, StructType

from servekit.tools.batch.local import RejectedRowError, input_files
from servekit.tools.batch.scoring import (
    ID_COLUMN,
    RejectedRow,
    Scorer,
    ScoringOptions,
    version_directory,
)
from servekit.tools.batch.settings import ERRORS_FOLDER, BatchReport, BatchSettings

# Columns that exist only inside the job: each row's file and block, and why it was rejected.
_FILE = "__servekit_file"
_BLOCK = "__servekit_block"
_REASON = "__servekit_reason"
# Prefixes the message of a rejected row raised in a worker, so the driver can find it again in
# the Python traceback that Spark wraps around it.
_REJECTED_MARKER = "servekit-rejected-row:"
_READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
# Output types that Spark has no type for, and the wider types their values are written as.
_WIDER_TYPES = {
    pa.float16(): pa.float32(),
    pa.uint8(): pa.int16(),
    pa.uint16(): pa.int32(),
    pa.uint32(): pa.int64(),
    pa.uint64(): pa.decimal128(20, 0),
}


def run_spark(settings: BatchSettings) -> BatchReport:
    """Score every input row with Spark into `settings.output_path`, and count the rows."""
    started = time.monotonic()
    files = input_files(settings.input_path)
    reader = _reader_for(files)

    directory = version_directory(settings.model_dir, settings.version)
    options = ScoringOptions(settings.input_columns, 1, settings.allow_pickle)
    # Loaded on the driver as well, so that a model or column-mapping problem fails before Spark
    # starts, and for the output columns.
    scorer = Scorer(directory, options)
    try:
        columns = scorer.required_columns()
        outputs = [
            pa.field(field.name, _spark_arrow_type(field.type))
            for field in list(scorer.output_schema())[1:]
        ]
    finally:
        scorer.close()
    job = _Job(
        directory=str(directory.resolve()),
        model_name=settings.model_dir.resolve().name,
        version=directory.name,
        options=options,
        fail_fast=settings.fail_fast,
        output_types=tuple(field.type for field in outputs),
    )

    session = SparkSession.getActiveSession()
    started_here = session is None
    if session is None:
        session = spark_session(settings)
    try:
        arrow = {
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.batch_size),
        }
        with _session_conf(session, arrow):
            report = _run(session, settings, files, reader, columns, outputs, job)
    finally:
        if started_here:
            session.stop()
    report.seconds = time.monotonic() - started
    return report


def spark_session(settings: BatchSettings) -> SparkSession:
    """Start a SparkSession for `settings`: local[workers] on 127.0.0.1 unless a master is set."""
    cores = settings.workers or os.cpu_count() or 1
    master = settings.master or f"local[{cores}]"
    builder = (
        SparkSession.builder.master(master)
        .appName("servekit batch")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", str(settings.progress).lower())
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.batch_size))
    )
    if master.startswith("local"):
        builder = (
            builder.config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.host", "127.0.0.1")
            # The default of 200 shuffle partitions only slows the small row-count job down.
            .config("spark.sql.shuffle.partitions", str(cores))
        )
        # PySpark starts its Python workers with PYSPARK_PYTHON, `python3` by default, which
        # need not be the environment servekit is installed in. SPARK_LOCAL_IP keeps the JVM
        # from picking the address of a network interface as this machine's host name.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


@dataclass(frozen=True)
class _Job:
    """The model and options that each Python worker scores with, pickled into every task."""

    directory: str
    model_name: str
    version: str
    options: ScoringOptions
    fail_fast: bool
    # The Arrow type of each model output as Spark stores it (see `_spark_arrow_type`).
    output_types: tuple[pa.DataType, ...]
    # The number of the first row of each (file, block), or None when the input has ids.
    offsets: dict[tuple[str, int], int] | None = None


def _run(
    session: SparkSession,
    settings: BatchSettings,
    files: list[Path],
    reader: str,
    columns: list[str],
    outputs: list[pa.Field],
    job: _Job,
) -> BatchReport:
    frame = _read(session, reader, files, columns)
    id_type: DataType
    if ID_COLUMN not in frame.columns:
        job = replace(job, offsets=_block_offsets(frame))
        id_type = LongType()
    else:
        id_type = frame.schema[ID_COLUMN].dataType
    schema = StructType(
        [
            StructField(ID_COLUMN, id_type),
            *(StructField(field.name, from_arrow_type(field.type)) for field in outputs),
            StructField(_REASON, StringType()),
        ]
    )
    output = settings.output_path
    output.parent.mkdir(parents=True, exist_ok=True)
    # The name is not hidden, because Spark warns that it ignores hidden paths even as it
    # reads them.
    temporary = output.parent / f"{output.name}.spark-temporary-{uuid.uuid4().hex[:12]}"
    try:
        _score(frame.mapInArrow(_PartitionScorer(job), schema), temporary)
        return _write(session, temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _reader_for(files: list[Path]) -> str:
    """The Spark reader for `files`, which must all be of one kind that Spark reads."""
    kinds = {path.suffix.lower() for path in files}
    unreadable = [path for path in files if path.suffix.lower() not in _READERS]
    if unreadable:
        raise ValueError(
            f"the Spark engine cannot read {unreadable[0].suffix} files such as "
            f"{unreadable[0].name}: use the local engine (--engine local), or convert them to "
            "Parquet"
        )
    readers = {_READERS[kind] for kind in kinds}
    if len(readers) > 1:
        raise ValueError(
            f"the Spark engine reads one kind of file per job, but {len(files)} input files mix "
            f"{', '.join(sorted(kinds))}; put each kind in a folder of its own"
        )
    return readers.pop()


def _read(session: SparkSession, reader: str, files: list[Path], columns: list[str]) -> DataFrame:
    """Read `files`: the `id` column if there is one, the model's columns, and row positions."""
    paths = [str(path.resolve()) for path in files]
    if reader == "parquet":
        frame = session.read.parquet(*paths)
    elif reader == "csv":
        frame = session.read.csv(paths, header=True, inferSchema=True)
    else:
        frame = session.read.json(paths)
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(
            f"the input has no column {missing[0]!r}; it has {', '.join(frame.columns)}"
        )
    keep = [name for name in (ID_COLUMN, *columns) if name in frame.columns]
    if ID_COLUMN in frame.columns and reader == "csv":
        from pyspark.sql.types import IntegerType, LongType

        # CSV ids that fit 32 bits are inferred as int; the local engine reads them as int64.
        if isinstance(frame.schema[ID_COLUMN].dataType, IntegerType):
            frame = frame.withColumn(ID_COLUMN, frame[ID_COLUMN].cast(LongType()))
    # `metadataColumn` finds Spark's file metadata even when the data has a `_metadata` column.
    metadata = frame.metadataColumn("_metadata")
    return frame.select(
        *(_column(name) for name in dict.fromkeys(keep)),
        metadata.getField("file_path").alias(_FILE),
        metadata.getField("file_block_start").alias(_BLOCK),
    )


def _column(name: str) -> Column:
    """Return the top-level column `name`, even when the name contains dots or backquotes."""
    return F.col("`" + name.replace("`", "``") + "`")


def _block_offsets(frame: DataFrame) -> dict[tuple[str, int], int]:
    """Count the rows of each block of each file, and number each block's first row in its file."""
    counts = frame.groupBy(_FILE, _BLOCK).count().collect()
    offsets: dict[tuple[str, int], int] = {}
    rows_before: dict[str, int] = {}
    for path, block, count in sorted((row[0], row[1], row[2]) for row in counts):
        offsets[(path, block)] = rows_before.get(path, 0)
        rows_before[path] = rows_before.get(path, 0) + count
    return offsets


def _score(scored: DataFrame, temporary: Path) -> None:
    """Run the scoring job into `temporary`, raising RejectedRowError for a fail-fast rejection."""
    try:
        scored.write.mode("overwrite").parquet(str(temporary))
    except Exception as exc:
        # Spark raises the worker's error as its own exception type, with the Python traceback
        # as text. The marker distinguishes a fail-fast rejection from any other failure.
        message = _rejection_message(str(exc))
        if message is None:
            raise
        raise RejectedRowError(message) from None


def _rejection_message(text: str) -> str | None:
    start = text.find(_REJECTED_MARKER)
    if start < 0:
        return None
    try:
        message, _ = json.JSONDecoder().raw_decode(text, start + len(_REJECTED_MARKER))
    except json.JSONDecodeError:
        return None
    return str(message)


def _write(session: SparkSession, temporary: Path, output: Path) -> BatchReport:
    """Split the scored rows in `temporary` into the predictions and the errors folder."""
    results = session.read.parquet(str(temporary))
    reason = F.col(_REASON)
    counts = results.agg(
        F.count(F.when(reason.isNull(), 1)).alias("rows"),
        F.count(reason).alias("rejected"),
    ).first()
    assert counts is not None
    report = BatchReport(rows=counts["rows"], rejected=counts["rejected"])
    results.filter(reason.isNull()).drop(_REASON).write.mode("overwrite").parquet(str(output))
    errors = output / ERRORS_FOLDER
    if report.rejected:
        rejected = results.filter(reason.isNotNull()).select(ID_COLUMN, reason.alias("reason"))
        # Rejected rows are usually few, so they go to one file.
        rejected.coalesce(1).write.mode("overwrite").json(str(errors))
    else:
        errors.mkdir(exist_ok=True)
    report.files_written = sorted(path.name for path in output.glob("part-*.parquet"))
    return report


@contextmanager
def _session_conf(session: SparkSession, values: dict[str, str]) -> Iterator[None]:
    """Set runtime SQL settings for the job, and put back the earlier values afterwards."""
    earlier = {key: session.conf.get(key, None) for key in values}
    for key, value in values.items():
        session.conf.set(key, value)
    try:
        yield
    finally:
        for key, earlier_value in earlier.items():
            if earlier_value is None:
                session.conf.unset(key)
            else:
                session.conf.set(key, earlier_value)


# The scorers of this Python worker process. PySpark reuses a worker for many tasks
# (spark.python.worker.reuse, on by default), so each worker loads a model version once.
_SCORERS: dict[tuple[str, ScoringOptions], Scorer] = {}


def worker_scorer(job: _Job) -> Scorer:
    """Return this process's scorer for the job's model version, loading it the first time."""
    key = (job.directory, job.options)
    scorer = _SCORERS.get(key)
    if scorer is None:
        scorer = Scorer(_model_directory(job), job.options)
        _SCORERS[key] = scorer
    return scorer


def _model_directory(job: _Job) -> Path:
    """The job's version directory on this machine: the driver's path, or a shipped copy."""
    directory = Path(job.directory)
    if directory.is_dir():
        return directory
    roots = [Path.cwd(), Path(SparkFiles.getRootDirectory())]
    for root in roots:
        candidate = root / job.model_name / job.version
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"model version {job.directory} is not on this executor, and neither is "
        f"{job.model_name}/{job.version} in {' or '.join(map(str, roots))}; put the model "
        f"folder on a shared filesystem or ship it with --archives MODEL.zip#{job.model_name}"
    )


class _PartitionScorer:
    """The `mapInArrow` function: scores each Arrow batch of one partition.

    A class rather than a closure, because cloudpickle pickles a closure's globals by value,
    which would give every task a fresh, empty copy of `_SCORERS`. An instance pickles only the
    job, and finds `_SCORERS` in the imported module.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = worker_scorer(self._job)
        rows_done: dict[tuple[str, int], int] = {}
        for batch in batches:
            if self._job.offsets is not None:
                batch = _with_row_numbers(batch, self._job.offsets, rows_done)
            scored, rejected = scorer.score(batch, 0)
            scored = _cast_outputs(scored, self._job.output_types)
            if rejected and self._job.fail_fast:
                row = rejected[0]
                message = f"{_file_of(batch, row.id)}: row {row.id!r} was rejected: {row.reason}"
                raise RejectedRowError(_REJECTED_MARKER + json.dumps(message))
            reasons = pa.nulls(scored.num_rows, pa.string())
            yield pa.RecordBatch.from_arrays(
                [*scored.columns, reasons], names=[*scored.schema.names, _REASON]
            )
            if rejected:
                yield _rejected_batch(scored.schema, rejected)


def _spark_arrow_type(arrow_type: pa.DataType) -> pa.DataType:
    """Return `arrow_type`, or a wider type where Spark has no type for it (in lists too)."""
    if pa.types.is_list(arrow_type):
        return pa.list_(_spark_arrow_type(arrow_type.value_type))
    return _WIDER_TYPES.get(arrow_type, arrow_type)


def _cast_outputs(scored: pa.RecordBatch, output_types: tuple[pa.DataType, ...]) -> pa.RecordBatch:
    """Cast the output columns after `id` to the types that Spark stores them as."""
    columns = [scored.column(0)]
    columns += [
        column.cast(output_type)
        for column, output_type in zip(scored.columns[1:], output_types, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, names=scored.schema.names)


def _with_row_numbers(
    batch: pa.RecordBatch,
    offsets: dict[tuple[str, int], int],
    rows_done: dict[tuple[str, int], int],
) -> pa.RecordBatch:
    """Add the `id` column: each row's number in its file, from its block's first row.

    A task reads its blocks in order and `rows_done` counts the rows seen of each block, so a
    batch that starts in the middle of a block continues where the last one stopped.
    """
    ids = np.empty(batch.num_rows, dtype=np.int64)
    if batch.num_rows:
        files = np.asarray(batch.column(_FILE).to_numpy(zero_copy_only=False))
        blocks = np.asarray(batch.column(_BLOCK).to_numpy(zero_copy_only=False))
        changes = np.flatnonzero((files[1:] != files[:-1]) | (blocks[1:] != blocks[:-1])) + 1
        edges = [0, *changes.tolist(), batch.num_rows]
        for begin, end in itertools.pairwise(edges):
            key = (str(files[begin]), int(blocks[begin]))
            done = rows_done.get(key, 0)
            first = offsets[key] + done
            ids[begin:end] = np.arange(first, first + end - begin)
            rows_done[key] = done + end - begin
    return pa.RecordBatch.from_arrays(
        [pa.array(ids), *batch.columns], names=[ID_COLUMN, *batch.schema.names]
    )


def _rejected_batch(schema: pa.Schema, rejected: list[RejectedRow]) -> pa.RecordBatch:
    """Rejected rows in the scored rows' schema: the id, null outputs and the reason."""
    count = len(rejected)
    columns = [pa.array([row.id for row in rejected], type=schema.field(ID_COLUMN).type)]
    columns += [pa.nulls(count, field.type) for field in list(schema)[1:]]
    columns.append(pa.array([row.reason for row in rejected], type=pa.string()))
    return pa.RecordBatch.from_arrays(columns, names=[*schema.names, _REASON])


def _file_of(batch: pa.RecordBatch, row_id: Any) -> str:
    """Return the name of the file that the row with `row_id` came from."""
    position = pc.index(batch.column(ID_COLUMN), pa.scalar(row_id, batch.column(ID_COLUMN).type))
    path = str(batch.column(_FILE)[max(position.as_py(), 0)].as_py())
    return urllib.parse.unquote(path.rsplit("/", 1)[-1])
