"""Warmup: requests a version runs before it takes traffic.

A version directory may contain a `warmup/` folder of JSON files, each a request in the V2
(`{"inputs": [...]}`) or TF Serving (`{"instances": ...}` or `{"inputs": {...}}`) format. A
file may add `"expected_outputs": {"name": <nested list>}` and `"tolerance"` (absolute,
default 1e-5); an output that differs by more fails the load. Without a warmup folder, one
synthetic request of one row of zeros runs, which catches models that load but cannot compute.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature

WARMUP_FOLDER = "warmup"
_DEFAULT_TOLERANCE = 1e-5

Arrays = dict[str, np.ndarray[Any, Any]]
Predict = Callable[[Arrays, Sequence[str]], Arrays]


class WarmupError(Exception):
    """A warmup request failed or returned other outputs than expected."""


def run_warmup(directory: Path, signature: Signature, predict: Predict) -> int:
    """Run the version's warmup requests (or a synthetic one); return how many ran."""
    folder = directory / WARMUP_FOLDER
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        _run(predict, synthetic_inputs(signature), signature.output_names, "synthetic request")
        return 1
    for path in files:
        _run_file(path, signature, predict)
    return len(files)


def synthetic_inputs(signature: Signature) -> Arrays:
    """Build one row of zeros (empty strings for BYTES) that fits the signature."""
    inputs = {}
    for spec in signature.inputs:
        shape = tuple(1 if dim == -1 else dim for dim in spec.shape)
        if spec.datatype is DataType.BYTES:
            array = np.full(shape, b"", dtype=object)
        else:
            array = np.zeros(shape, dtype=spec.datatype.numpy_dtype)
        inputs[spec.name] = array
    return inputs


def _run_file(path: Path, signature: Signature, predict: Predict) -> None:
    from servekit.core.errors import ServekitError
    from servekit.protocols import tfserving, v2

    try:
        document = json.loads(path.read_text())
        if isinstance(document.get("inputs"), list):
            request, _ = v2.decode_infer(path.read_bytes(), None)
        else:
            body = tfserving.parse_predict_body(document)
            request, _ = tfserving.decode_predict(body, signature)
    except (OSError, ValueError, ServekitError) as exc:
        raise WarmupError(f"warmup file {path.name} is not a valid request: {exc}") from None
    outputs = request.outputs or signature.output_names
    results = _run(predict, request.inputs, outputs, f"warmup file {path.name}")
    tolerance = float(document.get("tolerance", _DEFAULT_TOLERANCE))
    for name, expected in (document.get("expected_outputs") or {}).items():
        _compare(path.name, name, results.get(name), expected, tolerance)


def _run(predict: Predict, inputs: Arrays, outputs: Sequence[str], what: str) -> Arrays:
    try:
        return predict(inputs, tuple(outputs))
    except Exception as exc:
        raise WarmupError(f"{what} failed: {exc}") from None


def _compare(file: str, name: str, actual: Any, expected: Any, tolerance: float) -> None:
    if actual is None:
        raise WarmupError(f"warmup file {file} expects output {name!r}, which was not returned")
    wanted = np.asarray(expected)
    if actual.dtype == object or wanted.dtype.kind in "OSU":
        same = actual.tolist() == [
            item.encode() if isinstance(item, str) else item for item in wanted.ravel().tolist()
        ]
        if not same:
            raise WarmupError(f"warmup file {file}: output {name!r} differs from expected")
        return
    if actual.size != wanted.size:
        raise WarmupError(
            f"warmup file {file}: output {name!r} has {actual.size} values, expected {wanted.size}"
        )
    difference = float(np.max(np.abs(actual.astype(np.float64).ravel() - wanted.ravel())))
    if difference > tolerance:
        raise WarmupError(
            f"warmup file {file}: output {name!r} differs from expected by {difference:.3g} "
            f"(tolerance {tolerance:g})"
        )
