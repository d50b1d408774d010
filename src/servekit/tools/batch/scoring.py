"""Scoring Arrow record batches with a model version: shared by the local and Spark engines.

A `Scorer` loads one version with the runtime that serves it, once, and turns each record batch
into an output batch (the `id` column and one column per model output) and a list of rejected
rows. Columns map to inputs by name, or, with `input_columns`, several scalar columns are
stacked in that order into the model's one input. A list column fills an input with more than
one value per row (its length must be the input's values per row). Rows that cannot become the
input (a null, also inside a list, a value that is not a number, a list of the wrong length) are
rejected with their id and the reason before the model runs. NaN is a number: it reaches the
model, which decides what it means. If the model still fails on a batch, the batch is split
in halves until the failing rows are found, so one bad row never costs the others their
predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import Runtime, RuntimeOptions, runtime_for

ID_COLUMN = "id"
_ARROW_TYPES = {
    DataType.BOOL: pa.bool_(),
    DataType.UINT8: pa.uint8(),
    DataType.UINT16: pa.uint16(),
    DataType.UINT32: pa.uint32(),
    DataType.UINT64: pa.uint64(),
    DataType.INT8: pa.int8(),
    DataType.INT16: pa.int16(),
    DataType.INT32: pa.int32(),
    DataType.INT64: pa.int64(),
    DataType.FP16: pa.float16(),
    DataType.FP32: pa.float32(),
    DataType.FP64: pa.float64(),
    DataType.BYTES: pa.binary(),
}


@dataclass(frozen=True)
class RejectedRow:
    """A row the model could not score, and why."""

    id: Any
    reason: str


@dataclass(frozen=True)
class ScoringOptions:
    """The mapping of columns to the model's inputs, and the runtime's settings."""

    # Scalar columns stacked, in this order, into the model's one input; None maps by name.
    input_columns: tuple[str, ...] | None = None
    intra_op_threads: int = 1
    allow_pickle: bool = False


def version_directory(model_dir: Path, version: int | None) -> Path:
    """Return the directory of `version`, or of the highest version when it is None."""
    if version is not None:
        directory = model_dir / str(version)
        if not directory.is_dir():
            raise ValueError(f"{model_dir} has no version {version}")
        return directory
    if not model_dir.is_dir():
        raise ValueError(f"model folder {model_dir} does not exist")
    versions = [int(child.name) for child in model_dir.iterdir() if child.name.isdigit()]
    if not versions:
        raise ValueError(f"{model_dir} has no version directory (such as {model_dir}/1)")
    return model_dir / str(max(versions))


class Scorer:
    """One loaded model version that scores record batches."""

    def __init__(self, directory: Path, options: ScoringOptions) -> None:
        runtime_options = RuntimeOptions(
            intra_op_threads=options.intra_op_threads,
            inter_op_threads=1,
            allow_pickle=options.allow_pickle,
        )
        self._runtime: Runtime = runtime_for(directory, runtime_options)
        self.signature: Signature = self._runtime.load(directory)
        self._options = options
        columns = options.input_columns
        if columns is not None:
            if len(self.signature.inputs) != 1:
                raise ValueError(
                    f"--input-columns builds one input, but the model takes "
                    f"{len(self.signature.inputs)}: {', '.join(self.signature.input_names)}"
                )
            spec = self.signature.inputs[0]
            if spec.shape[1:] not in ((len(columns),), (-1,)):
                raise ValueError(
                    f"--input-columns names {len(columns)} columns, but input {spec.name!r} "
                    f"has shape {list(spec.shape)}"
                )

    def close(self) -> None:
        self._runtime.unload()

    def output_schema(self, id_type: pa.DataType | None = None) -> pa.Schema:
        """Return the schema of scored batches: `id` (int64 by default), then the outputs."""
        fields = [pa.field(ID_COLUMN, id_type or pa.int64())]
        fields += [pa.field(spec.name, _arrow_type(spec)) for spec in self.signature.outputs]
        return pa.schema(fields)

    def required_columns(self) -> list[str]:
        """Return the input columns the model reads."""
        if self._options.input_columns is not None:
            return list(self._options.input_columns)
        return list(self.signature.input_names)

    def score(
        self, batch: pa.RecordBatch, first_row: int
    ) -> tuple[pa.RecordBatch, list[RejectedRow]]:
        """Score one batch; `first_row` numbers the rows when the input has no `id` column."""
        missing = [name for name in self.required_columns() if name not in batch.schema.names]
        if missing:
            raise ValueError(
                f"the input has no column {missing[0]!r}; it has {', '.join(batch.schema.names)}"
            )
        ids = _ids(batch, first_row)
        reasons: dict[int, str] = {}
        inputs = self._inputs(batch, reasons)
        valid = np.ones(batch.num_rows, dtype=bool)
        valid[list(reasons)] = False
        positions = np.flatnonzero(valid)
        feed = inputs
        if reasons:
            feed = {name: array[positions] for name, array in inputs.items()}
        done, outputs = self._predict(feed, positions, reasons)
        rejected = [
            RejectedRow(ids[row].as_py(), reason) for row, reason in sorted(reasons.items())
        ]
        kept = ids if len(done) == len(ids) else ids.take(pa.array(done, type=pa.int64()))
        columns = [kept]
        columns += [_arrow_column(outputs[spec.name], spec) for spec in self.signature.outputs]
        schema = self.output_schema(ids.type)
        return pa.RecordBatch.from_arrays(columns, schema=schema), rejected

    def _inputs(
        self, batch: pa.RecordBatch, reasons: dict[int, str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Build every input for all rows; record the rows that cannot be built in `reasons`."""
        specs = self.signature.inputs
        if self._options.input_columns is None:
            return {spec.name: _tensor(batch, spec.name, spec, reasons) for spec in specs}
        spec = specs[0]
        scalar = TensorSpec(spec.name, spec.datatype, (-1,))
        parts = [_tensor(batch, name, scalar, reasons) for name in self._options.input_columns]
        return {spec.name: np.stack(parts, axis=1)}

    def _predict(
        self,
        inputs: dict[str, np.ndarray[Any, Any]],
        positions: np.ndarray[Any, Any],
        reasons: dict[int, str],
    ) -> tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]]]:
        """Run the rows at `positions`; on failure, split them to find the failing rows.

        Returns the positions that were scored and their outputs, in order.
        """
        if len(positions) == 0:
            return positions, {spec.name: _empty(spec) for spec in self.signature.outputs}
        try:
            outputs = self._runtime.predict(inputs, self.signature.output_names)
            return positions, outputs
        except Exception as exc:
            if len(positions) == 1:
                reasons[int(positions[0])] = f"the model failed on this row: {exc}"
                return positions[:0], {spec.name: _empty(spec) for spec in self.signature.outputs}
        half = len(positions) // 2
        first = self._predict({n: a[:half] for n, a in inputs.items()}, positions[:half], reasons)
        second = self._predict({n: a[half:] for n, a in inputs.items()}, positions[half:], reasons)
        joined = {name: np.concatenate([first[1][name], second[1][name]]) for name in first[1]}
        return np.concatenate([first[0], second[0]]), joined


def _ids(batch: pa.RecordBatch, first_row: int) -> pa.Array:
    if ID_COLUMN in batch.schema.names:
        return batch.column(ID_COLUMN)
    return pa.array(np.arange(first_row, first_row + batch.num_rows, dtype=np.int64))


def _tensor(
    batch: pa.RecordBatch, name: str, spec: TensorSpec, reasons: dict[int, str]
) -> np.ndarray[Any, Any]:
    """Turn column `name` into the rows of input `spec`; bad rows get a reason and zeros."""
    column = batch.column(name)
    width = math.prod(size for size in spec.shape[1:]) if len(spec.shape) > 1 else 1
    if any(size < 0 for size in spec.shape[1:]):
        raise ValueError(
            f"input {spec.name!r} has shape {list(spec.shape)}; batch inference needs every "
            "dimension but the first to be fixed"
        )
    rows = batch.num_rows
    if column.null_count:
        for row in np.flatnonzero(np.asarray(column.is_null(), dtype=bool)):
            reasons.setdefault(int(row), f"column {name!r} is empty")
    whole_rows = pa.types.is_fixed_size_list(column.type) and column.type.list_size == width
    if whole_rows and not column.null_count and not _list_values(column).null_count:
        # Every row has the input's values: they are read in place, without a copy.
        values = _numbers(_list_values(column), spec, name, None)
        return values.reshape((rows, *spec.shape[1:]))
    if (
        pa.types.is_list(column.type)
        or pa.types.is_fixed_size_list(column.type)
        or (pa.types.is_large_list(column.type))
    ):
        lengths = np.asarray(pc.fill_null(pc.list_value_length(column), 0), dtype=np.int64)
        for row in np.flatnonzero(lengths != width):
            if int(row) not in reasons:
                reasons[int(row)] = (
                    f"column {name!r} has {lengths[row]} values, but input {spec.name!r} takes "
                    f"{width} per row"
                )
        flat = pc.list_flatten(column)
        if flat.null_count:
            # A missing value inside a list rejects its row, as a missing list does.
            parents = np.asarray(pc.list_parent_indices(column))
            for row in np.unique(parents[np.asarray(flat.is_null(), dtype=bool)]):
                reasons.setdefault(int(row), f"column {name!r} has an empty value in its list")
        if not column.null_count and not flat.null_count and bool((lengths == width).all()):
            # Every row is whole, so the flattened values are the input.
            values = _numbers(flat, spec, name, None)
            return values.reshape((rows, *spec.shape[1:]))
        good = np.ones(rows, dtype=bool)
        good[list(reasons)] = False
        values = _numbers(pc.list_flatten(column.filter(pa.array(good))), spec, name, None)
        result = np.zeros((rows, width), dtype=spec.datatype.numpy_dtype)
        result[good] = values.reshape(-1, width)
        return result.reshape((rows, *spec.shape[1:]))
    if width != 1:
        raise ValueError(
            f"column {name!r} has one value per row, but input {spec.name!r} takes {width}; "
            "use a list column or --input-columns"
        )
    values = _numbers(column, spec, name, reasons)
    return values.reshape((rows, *spec.shape[1:]))


def _list_values(column: pa.Array) -> pa.Array:
    """Return the values of a list column without nulls as one flat array over its rows."""
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        return column.values.slice(column.offset * size, len(column) * size)
    return column.flatten()


def _numbers(
    column: pa.Array, spec: TensorSpec, name: str, reasons: dict[int, str] | None
) -> np.ndarray[Any, Any]:
    """Convert a column to the input's datatype; unconvertible values are reasons and zeros."""
    target = spec.datatype
    if target.is_bytes:
        return np.array(
            [b"" if value is None else _as_bytes(value) for value in column.to_pylist()],
            dtype=object,
        )
    if (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or (pa.types.is_boolean(column.type))
    ):
        filled = pc.fill_null(column, 0) if column.null_count else column
        values = np.asarray(filled.to_numpy(zero_copy_only=False))
        return values.astype(target.numpy_dtype, copy=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            numbers = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        else:
            return _numbers(numbers, spec, name, reasons)
    # Text with a value that is not a number (a stray word in a CSV column, say): convert value
    # by value, so that only the rows with such values are rejected.
    result = np.zeros(len(column), dtype=target.numpy_dtype)
    for row, value in enumerate(column.to_pylist()):
        if value is None:
            continue
        try:
            result[row] = float(value) if target.numpy_dtype.kind == "f" else int(value)
        except (TypeError, ValueError, OverflowError):
            if reasons is not None:
                reasons.setdefault(
                    row, f"column {name!r} has {str(value)[:40]!r}, which is not a number"
                )
    return result


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _arrow_type(spec: TensorSpec) -> pa.DataType:
    """Return the Arrow type of an output: a scalar for one value per row, else a list."""
    scalar = _ARROW_TYPES[spec.datatype]
    return scalar if all(size == 1 for size in spec.shape[1:]) else pa.list_(scalar)


def _arrow_column(array: np.ndarray[Any, Any], spec: TensorSpec) -> pa.Array:
    scalar = _ARROW_TYPES[spec.datatype]
    rows = array.shape[0]
    flat = array.reshape(rows, int(np.prod(array.shape[1:], dtype=np.int64)))
    if _arrow_type(spec) == scalar:
        return pa.array(flat[:, 0], type=scalar)
    values = pa.array(flat.reshape(-1), type=scalar)
    offsets = pa.array(np.arange(0, rows + 1, dtype=np.int32) * flat.shape[1], type=pa.int32())
    return pa.ListArray.from_arrays(offsets, values)


def _empty(spec: TensorSpec) -> np.ndarray[Any, Any]:
    shape = [0, *(max(size, 1) for size in spec.shape[1:])]
    return np.zeros(shape, dtype=spec.datatype.numpy_dtype)
