"""Merging request inputs into one batch and splitting the outputs back, in numpy."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from servekit.batching.config import BatchingConfig, PadSpec
from servekit.core.types import Signature

Arrays = dict[str, np.ndarray[Any, Any]]
# Requests share a batch only when their keys are equal; None means "never merge".
BatchKey = tuple[tuple[str, str, tuple[int | None, ...]], ...] | None


class NotRowAlignedError(Exception):
    """A batch output whose rows do not match the batch's input rows one to one."""


def batch_key(inputs: Arrays, config: BatchingConfig) -> BatchKey:
    """Describe what must match for two requests to share a batch: dtypes and shapes.

    Padded axes are left out, because padding makes them equal.
    """
    key = []
    for name in sorted(inputs):
        array = inputs[name]
        spec = config.pad_spec(name, array.ndim)
        axes = spec.axes if spec is not None else ()
        shape = tuple(None if axis in axes else dim for axis, dim in enumerate(array.shape))
        key.append((name, array.dtype.str, shape[1:]))
    return tuple(key)


def batch_outputs(signature: Signature) -> frozenset[str]:
    """Name the outputs with a variable first dimension, which carry one entry per row."""
    return frozenset(spec.name for spec in signature.outputs if spec.shape and spec.shape[0] == -1)


def merge_inputs(pieces: list[Arrays], config: BatchingConfig) -> tuple[Arrays, int]:
    """Concatenate the pieces row-wise, padding where configured; return inputs and rows."""
    rows = sum(int(next(iter(piece.values())).shape[0]) for piece in pieces)
    target = rows
    if config.allowed_batch_sizes:
        sizes = config.allowed_batch_sizes
        target = sizes[bisect.bisect_left(sizes, rows)]
    merged: Arrays = {}
    for name in pieces[0]:
        arrays = [piece[name] for piece in pieces]
        spec = config.pad_spec(name, arrays[0].ndim)
        if spec is not None:
            arrays = _pad_to_common_shape(arrays, spec)
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        if target > rows:
            # Extra rows repeat the first row, which is valid data for any model.
            filler = np.repeat(array[:1], target - rows, axis=0)
            array = np.concatenate([array, filler])
        merged[name] = array
    return merged, target


def _pad_to_common_shape(
    arrays: list[np.ndarray[Any, Any]], spec: PadSpec
) -> list[np.ndarray[Any, Any]]:
    widths = {axis: max(array.shape[axis] for array in arrays) for axis in spec.axes}
    padded = []
    for array in arrays:
        pad = [(0, 0)] * array.ndim
        for axis, width in widths.items():
            pad[axis] = (0, width - array.shape[axis])
        if any(after for _, after in pad):
            value: Any = b"" if array.dtype == object else spec.value
            array = np.pad(array, pad, constant_values=value)
        padded.append(array)
    return padded


def split_outputs(
    results: Arrays, sizes: list[int], rows: int, batch_names: frozenset[str]
) -> list[Arrays]:
    """Cut each batch output into one slice per piece; other outputs go whole to every piece."""
    for name in batch_names.intersection(results):
        array = results[name]
        if array.ndim == 0 or array.shape[0] != rows:
            actual = array.shape[0] if array.ndim else "no"
            raise NotRowAlignedError(
                f"output {name!r} has {actual} rows for a batch of {rows} input rows"
            )
    split: list[Arrays] = []
    offset = 0
    for size in sizes:
        split.append(
            {
                name: array[offset : offset + size] if name in batch_names else array
                for name, array in results.items()
            }
        )
        offset += size
    return split
