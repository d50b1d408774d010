"""`servekit batch` on Spark: the digits example scored in local mode, checked against onnxruntime.

Needs the `spark` extra (pyspark and Java 17), so it runs under `make test-extras`. pyspark is
imported inside the fixtures and tests, so the main environment still collects this file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from servekit.examples import EXAMPLE_REPOSITORY
from servekit.tools.batch.settings import ERRORS_FOLDER, BatchSettings

pytestmark = pytest.mark.extras

DIGITS = EXAMPLE_REPOSITORY / "digits"
PIXEL_COLUMNS = tuple(f"p{index}" for index in range(64))
# Small enough that Spark splits each test file into several blocks, which are numbered apart.
SPLIT_BYTES = "16k"


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    from servekit.tools.batch.spark import spark_session

    settings = BatchSettings(DIGITS, Path("unused"), Path("unused"), workers=2, progress=False)
    session = spark_session(settings)
    yield session
    session.stop()


@pytest.fixture
def small_splits(spark: Any) -> Iterator[None]:
    spark.conf.set("spark.sql.files.maxPartitionBytes", SPLIT_BYTES)
    yield
    spark.conf.unset("spark.sql.files.maxPartitionBytes")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray[Any, Any]:
    """3594 rows: scikit-learn's digits, then the same rows in reverse order."""
    from sklearn.datasets import load_digits

    data = load_digits().data
    return np.concatenate([data, data[::-1]])


def predict(rows: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Labels and probabilities from onnxruntime, without servekit."""
    session = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"))
    label, probabilities = session.run(None, {"pixels": rows.astype(np.float32)})
    return label, probabilities


def read_predictions(output: Path) -> pa.Table:
    files = sorted(output.glob("part-*.parquet"))
    assert files, f"no Parquet part files in {output}"
    return pa.concat_tables(pq.read_table(path) for path in files)


def read_errors(output: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((output / ERRORS_FOLDER).glob("part-*.json")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines


def settings(model_input: Path, output: Path, **options: Any) -> BatchSettings:
    return BatchSettings(DIGITS, model_input, output, workers=2, progress=False, **options)


def write_json_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def bad_rows(pixels: np.ndarray[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 rows as JSON Lines with string ids; row-7 has no pixels, row-42 has 63 of them."""
    rows: list[dict[str, Any]] = [
        {"id": f"row-{index}", "pixels": pixels[index].tolist()} for index in range(300)
    ]
    rows[7]["pixels"] = None
    rows[42]["pixels"] = rows[42]["pixels"][:63]
    path = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    write_json_lines(path, rows)
    return path


def test_session_is_local_on_loopback(spark: Any) -> None:
    conf = spark.sparkContext.getConf()
    assert spark.sparkContext.master == "local[2]"
    assert conf.get("spark.driver.bindAddress") == "127.0.0.1"
    assert conf.get("spark.driver.host") == "127.0.0.1"
    assert conf.get("spark.ui.enabled") == "false"


def test_parquet_list_column_matches_onnxruntime(
    spark: Any, small_splits: None, pixels: np.ndarray[Any, Any], tmp_path: Path
) -> None:
    from servekit.tools.batch.spark import run_spark

    source = tmp_path / "digits.parquet"
    table = pa.table({"pixels": pa.array(pixels.tolist(), type=pa.list_(pa.float64()))})
    pq.write_table(table, source, row_group_size=300)
    assert spark.read.parquet(str(source)).rdd.getNumPartitions() > 2
    output = tmp_path / "out"

    report = run_spark(settings(source, output, batch_size=256))

    assert report.rows == len(pixels)
    assert report.rejected == 0
    assert report.files_written
    assert read_errors(output) == []
    result = read_predictions(output).sort_by("id")
    assert result.column_names == ["id", "label", "probabilities"]
    np.testing.assert_array_equal(result["id"].to_numpy(), np.arange(len(pixels)))
    label, probabilities = predict(pixels)
    np.testing.assert_array_equal(result["label"].to_numpy(), label)
    scored = np.array(result["probabilities"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(scored, probabilities, rtol=1e-5, atol=1e-6)


def test_csv_folder_numbers_rows_per_file(
    spark: Any, small_splits: None, pixels: np.ndarray[Any, Any], tmp_path: Path
) -> None:
    """Two CSV files of 64 scalar columns: a.csv contains the first 600 rows of b.csv.

    Each file numbers its rows from 0, so ids below 600 come twice, with the same prediction.
    """
    from servekit.tools.batch.spark import run_spark

    folder = tmp_path / "csv"
    folder.mkdir()
    rows = pixels[:1797]
    for name, part in (("a.csv", rows[:600]), ("b.csv", rows)):
        columns = {name: part[:, index] for index, name in enumerate(PIXEL_COLUMNS)}
        columns["note"] = np.array(["unused text"] * len(part))
        pa_csv.write_csv(pa.table(columns), folder / name)
    assert spark.read.csv(str(folder)).rdd.getNumPartitions() > 2
    output = tmp_path / "out"

    report = run_spark(settings(folder, output, input_columns=PIXEL_COLUMNS, batch_size=500))

    assert report.rows == 600 + 1797
    assert report.rejected == 0
    result = read_predictions(output)
    ids = result["id"].to_numpy()
    counts = np.bincount(ids, minlength=1797)
    assert counts[:600].tolist() == [2] * 600
    assert counts[600:].tolist() == [1] * 1197
    label, probabilities = predict(rows)
    np.testing.assert_array_equal(result["label"].to_numpy(), label[ids])
    scored = np.array(result["probabilities"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(scored, probabilities[ids], rtol=1e-5, atol=1e-6)


def test_bad_rows_go_to_errors_folder(
    spark: Any, pixels: np.ndarray[Any, Any], bad_rows: Path, tmp_path: Path
) -> None:
    from servekit.tools.batch.spark import run_spark

    output = tmp_path / "out"

    report = run_spark(settings(bad_rows, output))

    assert report.rows == 298
    assert report.rejected == 2
    errors = sorted(read_errors(output), key=lambda row: str(row["id"]))
    assert [row["id"] for row in errors] == ["row-42", "row-7"]
    wrong_length = "column 'pixels' has 63 values, but input 'pixels' takes 64 per row"
    assert errors[0]["reason"] == wrong_length
    assert errors[1]["reason"] == "column 'pixels' is empty"
    result = read_predictions(output)
    positions = np.array([int(row_id.removeprefix("row-")) for row_id in result["id"].to_pylist()])
    assert sorted(positions.tolist()) == sorted(set(range(300)) - {7, 42})
    label, _ = predict(pixels[:300])
    np.testing.assert_array_equal(result["label"].to_numpy(), label[positions])


def test_fail_fast_raises_on_first_rejected_row(spark: Any, bad_rows: Path, tmp_path: Path) -> None:
    from servekit.tools.batch.local import RejectedRowError
    from servekit.tools.batch.spark import run_spark

    with pytest.raises(RejectedRowError) as raised:
        run_spark(settings(bad_rows, tmp_path / "out", fail_fast=True))

    assert str(raised.value) == "bad.jsonl: row 'row-7' was rejected: column 'pixels' is empty"
    assert list(tmp_path.iterdir()) == [], "the temporary folder was left behind"


def test_workers_keep_model_loaded(spark: Any, bad_rows: Path, tmp_path: Path) -> None:
    """After a job, the Python workers that ran it still hold the model in the module cache."""
    from servekit.tools.batch.spark import run_spark

    run_spark(settings(bad_rows, tmp_path / "out", batch_size=16))

    def count_models(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from servekit.tools.batch import spark as engine

        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "models": [len(engine._SCORERS)]})

    probe = spark.range(0, 8, 1, 4).mapInArrow(count_models, "pid long, models long")
    models = [row["models"] for row in probe.collect()]
    assert max(models) >= 1, models


NARROW_TYPES_MODEL = """
import numpy as np


class Model:
    inputs = [("x", "FP32", [-1, 2])]
    outputs = [("half", "FP16", [-1, 2]), ("small", "UINT8", [-1]), ("big", "UINT64", [-1])]

    def predict(self, inputs):
        x = inputs["x"]
        return {
            "half": x.astype(np.float16),
            "small": x[:, 0].astype(np.uint8),
            "big": np.full(len(x), 2**64 - 1, dtype=np.uint64),
        }
"""


def test_outputs_without_spark_type_are_widened(spark: Any, tmp_path: Path) -> None:
    from servekit.tools.batch.spark import run_spark

    model = tmp_path / "narrow"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(NARROW_TYPES_MODEL)
    source = tmp_path / "x.parquet"
    pq.write_table(pa.table({"x": [[float(row), row + 0.5] for row in range(10)]}), source)
    output = tmp_path / "out"

    report = run_spark(replace(settings(source, output), model_dir=model))

    assert report.rows == 10
    result = read_predictions(output).sort_by("id")
    assert result.schema.field("half").type == pa.list_(pa.float32())
    assert result.schema.field("small").type == pa.int16()
    assert result.schema.field("big").type == pa.decimal128(20, 0)
    assert result["half"].to_pylist() == [[float(row), row + 0.5] for row in range(10)]
    assert result["small"].to_pylist() == list(range(10))
    assert set(result["big"].to_pylist()) == {2**64 - 1}


def test_npy_input_is_rejected(tmp_path: Path) -> None:
    from servekit.tools.batch.spark import run_spark

    source = tmp_path / "digits.npy"
    np.save(source, np.zeros((4, 64), dtype=np.float32))

    with pytest.raises(ValueError, match=r"cannot read \.npy files .* use the local engine"):
        run_spark(settings(source, tmp_path / "out"))


def test_local_and_spark_engines_agree(
    spark: Any, small_splits: None, pixels: np.ndarray[Any, Any], tmp_path: Path
) -> None:
    """The same Parquet file gives the same ids and predictions with either engine."""
    from servekit.tools.batch.local import run_local
    from servekit.tools.batch.spark import run_spark

    column = pa.FixedSizeListArray.from_arrays(pa.array(pixels.astype(np.float32).ravel()), 64)
    pq.write_table(pa.table({"pixels": column}), tmp_path / "digits.parquet", row_group_size=700)
    source = tmp_path / "digits.parquet"
    run_local(settings(source, tmp_path / "local", batch_size=256))
    run_spark(settings(source, tmp_path / "spark", batch_size=256))
    local = pq.read_table(tmp_path / "local" / "digits.parquet")
    distributed = read_predictions(tmp_path / "spark").sort_by("id")
    assert local.column("id").to_pylist() == list(range(len(pixels)))
    assert distributed.column("id").to_pylist() == local.column("id").to_pylist()
    assert distributed.column("label").to_pylist() == local.column("label").to_pylist()
    assert np.array_equal(
        np.array(distributed.column("probabilities").to_pylist()),
        np.array(local.column("probabilities").to_pylist()),
    )


def test_csv_ids_are_int64_like_the_local_engine(
    spark: Any, pixels: np.ndarray[Any, Any], tmp_path: Path
) -> None:
    from servekit.tools.batch.spark import run_spark

    rows = pixels[:20]
    table = pa.table(
        {
            "id": pa.array(range(100, 120), pa.int64()),
            **{name: rows[:, index] for index, name in enumerate(PIXEL_COLUMNS)},
        }
    )
    pa_csv.write_csv(table, tmp_path / "ids.csv")
    run_spark(settings(tmp_path / "ids.csv", tmp_path / "out", input_columns=PIXEL_COLUMNS))
    result = read_predictions(tmp_path / "out")
    assert result.schema.field("id").type == pa.int64()
    assert sorted(result.column("id").to_pylist()) == list(range(100, 120))
