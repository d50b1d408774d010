"""Batch inference over a million rows: servekit's local and Spark engines against a plain loop.

    python benchmarks/run_batch.py [--rows 1000000] [--spark-python .venv-extras/bin/python]

The input is one Parquet file of scikit-learn's digits repeated to `--rows` rows (a list column
`pixels` of 64 FP32 values), scored with the example `digits` model. Three ways, in turn:

- a plain loop, as one would write it by hand: pyarrow reads 8,192-row batches, onnxruntime
  scores them, and a ParquetWriter writes the id and both outputs, in one process;
- `servekit batch` with the local engine (a worker process per core);
- `servekit batch --engine spark` in `local[N]` mode (N = cores), run by `--spark-python`,
  an interpreter with the `spark` extra; skipped when it has no pyspark.

Each runs as a command of its own (this script with `--plain-loop` for the loop), so every
figure includes starting Python, importing the libraries and loading the model. For each: wall
time, rows per second, and CPU seconds per million rows (user + system of the finished child
processes, which for Spark covers its Python workers and the JVM).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from servekit.examples import EXAMPLE_REPOSITORY

MODEL = EXAMPLE_REPOSITORY / "digits"
BATCH = 8192


def write_input(path: Path, rows: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits().data.astype(np.float32)
    with pq.ParquetWriter(path, pa.schema([("pixels", pa.list_(pa.float32(), 64))])) as writer:
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            block = digits[np.arange(start, start + count) % len(digits)]
            column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), 64)
            writer.write_table(pa.table({"pixels": column}))


def plain_loop(source: Path, target: Path) -> None:
    session = ort.InferenceSession(str(MODEL / "1" / "model.onnx"))
    schema = pa.schema([("id", pa.int64()), ("label", pa.int64()),
                        ("probabilities", pa.list_(pa.float32()))])  # fmt: skip
    row = 0
    with pq.ParquetWriter(target, schema) as writer:
        for batch in pq.ParquetFile(source).iter_batches(BATCH, columns=["pixels"]):
            pixels = np.asarray(batch.column(0).flatten()).reshape(-1, 64)
            labels, probabilities = session.run(None, {"pixels": pixels})
            offsets = pa.array(np.arange(len(labels) + 1, dtype=np.int32) * 10)
            ids = pa.array(np.arange(row, row + len(labels)))
            scores = pa.ListArray.from_arrays(offsets, pa.array(probabilities.reshape(-1)))
            writer.write_batch(pa.record_batch([ids, pa.array(labels), scores], schema=schema))
            row += len(labels)


def timed(command: list[str]) -> dict[str, float]:
    """Run a command; return its wall time and the CPU time of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    seconds = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu": cpu}


def engine(python: str, source: Path, target: Path, extra: list[str]) -> dict[str, float]:
    return timed(
        [python, "-m", "servekit", "batch", str(MODEL), "--input", str(source),
         "--output", str(target), "--no-progress", *extra]
    )  # fmt: skip


def has_pyspark(python: str) -> bool:
    try:
        found = subprocess.run([python, "-c", "import pyspark"], capture_output=True)
    except OSError:
        return False
    return found.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--spark-python", default=".venv-extras/bin/python")
    parser.add_argument("--plain-loop", nargs=2, type=Path, metavar=("SOURCE", "TARGET"),
                        help="run only the plain loop (used by this script)")  # fmt: skip
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(*args.plain_loop)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        source = directory / "digits.parquet"
        write_input(source, args.rows)
        results["plain loop (pyarrow + onnxruntime, 1 process)"] = timed(
            [sys.executable, __file__, "--plain-loop", str(source), str(directory / "p.parquet")]
        )
        results["servekit batch, local engine"] = engine(
            sys.executable, source, directory / "local", []
        )
        if has_pyspark(args.spark_python):
            results["servekit batch, Spark local[N]"] = engine(
                args.spark_python, source, directory / "spark", ["--engine", "spark"]
            )
    # Imported here, so the plain loop's own command imports only what it uses.
    sys.path.insert(0, str(Path(__file__).parent))
    from run_throughput import machine

    print(json.dumps(machine()))
    print(f"\n| {args.rows:,} rows | seconds | rows/s | CPU s per million rows | vs plain loop |")
    print("|---|---|---|---|---|")
    baseline = args.rows / results["plain loop (pyarrow + onnxruntime, 1 process)"]["seconds"]
    for label, result in results.items():
        rate = args.rows / result["seconds"]
        cpu = result["cpu"] / args.rows * 1_000_000
        print(f"| {label} | {result['seconds']:.1f} | {rate:,.0f} | {cpu:.1f} | "
              f"{rate / baseline:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
