"""Classify and Regress: TF Serving's example-based APIs on top of an ordinary signature.

A request is a list of examples, each a map from feature name to a value or a list of values,
plus optional `context` features shared by every example. Each feature feeds the model input of
the same name, one row per example. The outputs are read as follows:

- Regress: the output named `outputs`, else the model's only float output, must have one value
  per example; the result is that value.
- Classify: the scores are the output named `scores` or `probabilities`, else the model's first
  float output. A score per example gives `[["", score]]`; several give one `[label, score]`
  pair each, labelled by the output `classes` if the model has one, else by the score's index.

Protocol adapters convert their wire format to these plain dicts and lists, so REST and gRPC
share this code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servekit.core.errors import InvalidInputError, shorten
from servekit.core.types import Signature
from servekit.protocols.tensors import array_from_json

Arrays = dict[str, np.ndarray[Any, Any]]


def examples_to_inputs(
    examples: list[dict[str, Any]], context: dict[str, Any], signature: Signature
) -> Arrays:
    """Stack the features of every example (with the context added) into model inputs."""
    for index, example in enumerate(examples):
        shared = set(example).intersection(context)
        if shared:
            raise InvalidInputError(
                f"examples[{index}] repeats context feature {shorten(sorted(shared)[0])!r}; a "
                "feature may be in the context or in the examples, not both"
            )
    rows = [{**context, **example} for example in examples]
    inputs = {}
    for spec in signature.inputs:
        missing = [index for index, row in enumerate(rows) if spec.name not in row]
        if missing:
            raise InvalidInputError(f"examples[{missing[0]}] is missing feature {spec.name!r}")
        values = [_feature(row[spec.name], len(spec.shape)) for row in rows]
        inputs[spec.name] = array_from_json(
            values, spec.datatype, f"feature {spec.name!r}", allow_b64=True
        )
    for index, row in enumerate(rows):
        unknown = sorted(set(row) - set(signature.input_names))
        if unknown:
            raise InvalidInputError(
                f"examples[{index}] has feature {shorten(unknown[0])!r}, which the model does "
                f"not take; its inputs are {', '.join(signature.input_names)}"
            )
    return inputs


def _feature(value: Any, rank: int) -> Any:
    # Features are lists in tf.Example; a rank-1 input takes one value per example.
    if rank <= 1 and isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def regression_results(outputs: Arrays, rows: int) -> list[float]:
    """Return one value per example from the model's regression output."""
    name, array = _pick(outputs, ("outputs",), "regress")
    if array.size != rows:
        raise InvalidInputError(
            f"output {name!r} has {array.size} values for {rows} examples; regress needs one "
            "value per example"
        )
    return [float(value) for value in array.reshape(rows)]


def classification_results(outputs: Arrays, rows: int) -> list[list[list[Any]]]:
    """Return, per example, a list of [label, score] pairs."""
    name, scores = _pick(outputs, ("scores", "probabilities"), "classify")
    if scores.ndim == 0 or scores.shape[0] != rows:
        raise InvalidInputError(f"output {name!r} does not have one row per example")
    if scores.ndim == 1 or scores[0].size == 1:
        return [[["", float(score)]] for score in scores.reshape(rows)]
    scores = scores.reshape(rows, -1)
    labels = _labels(outputs.get("classes"), scores.shape)
    return [
        [[label, float(score)] for label, score in zip(row_labels, row, strict=True)]
        for row_labels, row in zip(labels, scores, strict=True)
    ]


def _labels(classes: np.ndarray[Any, Any] | None, shape: tuple[int, ...]) -> list[list[str]]:
    if classes is None or classes.size != shape[0] * shape[1]:
        return [[str(index) for index in range(shape[1])] for _ in range(shape[0])]
    flat = [
        item.decode(errors="replace") if isinstance(item, bytes) else str(item)
        for item in classes.reshape(-1).tolist()
    ]
    return [flat[row * shape[1] : (row + 1) * shape[1]] for row in range(shape[0])]


def _pick(outputs: Arrays, names: tuple[str, ...], method: str) -> tuple[str, np.ndarray[Any, Any]]:
    for name in names:
        if name in outputs:
            return name, outputs[name]
    floats = [(name, array) for name, array in outputs.items() if array.dtype.kind == "f"]
    if not floats:
        raise InvalidInputError(f"the model has no float output that {method} can return")
    return floats[0]
