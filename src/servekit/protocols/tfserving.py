"""TF Serving REST codec: predict bodies, predict responses, model status and metadata.

Only translation lives here; model lookup and validation against the signature happen in the
core. Message texts follow TF Serving where its clients or tests match on them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from servekit.core.errors import InvalidInputError, shorten
from servekit.core.servable import VersionStatus
from servekit.core.types import InferenceRequest, InferenceResponse, Signature, TensorSpec
from servekit.protocols.tensors import array_from_json, is_b64_object, object_array_to_lists

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


@dataclass(slots=True)
class PredictBody:
    """A predict body that passed the checks TF Serving makes before the model lookup."""

    document: dict[str, Any]
    signature_name: str


def parse_predict_body(document: Any) -> PredictBody:
    """Check the top-level form of a predict body: an object with a string signature name."""
    if not isinstance(document, dict):
        raise InvalidInputError("the request body must be a JSON object")
    signature_name = document.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature_name, str):
        raise InvalidInputError("'signature_name' key must be a string value.")
    return PredictBody(document, signature_name)


def check_signature_name(signature_name: str) -> None:
    """Raise InvalidInputError unless `signature_name` names the one signature servekit has."""
    if signature_name != DEFAULT_SIGNATURE:
        raise InvalidInputError(
            f'Serving signature name: "{shorten(signature_name)}" not found in signature def'
        )


def decode_examples(body: PredictBody, verb: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check a classify or regress body and return its examples and context."""
    document = body.document
    if "examples" not in document:
        raise InvalidInputError(
            f"When method is {verb}, key 'examples' is expected and was not found"
        )
    examples = document["examples"]
    if not isinstance(examples, list):
        raise InvalidInputError("'examples' must be a JSON array of objects")
    if not examples:
        raise InvalidInputError("'examples' must not be empty")
    for index, example in enumerate(examples):
        if not isinstance(example, dict):
            raise InvalidInputError(f"examples[{index}] must be an object of features")
    context = document.get("context", {})
    if not isinstance(context, dict):
        raise InvalidInputError("'context' must be an object of features")
    return examples, context


def decode_predict(body: PredictBody, signature: Signature) -> tuple[InferenceRequest, bool]:
    """Build the request from `instances` (row format) or `inputs` (columnar format).

    Returns the request and whether it used the row format, which shapes the response.
    """
    document = body.document
    if "instances" in document and "inputs" in document:
        raise InvalidInputError("Only one of 'instances' or 'inputs' may be given, not both")
    if "instances" in document:
        return InferenceRequest(_decode_rows(document["instances"], signature)), True
    if "inputs" in document:
        return InferenceRequest(_decode_columns(document["inputs"], signature)), False
    raise InvalidInputError("Missing 'inputs' or 'instances' key")


def _decode_rows(instances: Any, signature: Signature) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(instances, list):
        raise InvalidInputError("'instances' must be a JSON array, one element per row")
    if not instances:
        raise InvalidInputError("No values in 'instances' array")
    if len(signature.inputs) == 1 and not all(_is_named(row) for row in instances):
        spec = signature.inputs[0]
        return {spec.name: _array(instances, spec, " in 'instances'")}
    for index, row in enumerate(instances):
        if not isinstance(row, dict):
            raise InvalidInputError(
                f"instances[{index}] is not an object; a model with several inputs expects "
                f"each instance to be an object keyed by input name ({_names(signature)})"
            )
        if set(row) != set(signature.input_names):
            raise InvalidInputError(
                f"instances[{index}] has keys {_quoted(sorted(row))}, but the model's inputs "
                f"are {_names(signature)}; every instance must name each input exactly once"
            )
    return {
        spec.name: _array([row[spec.name] for row in instances], spec, " in 'instances'")
        for spec in signature.inputs
    }


def _is_named(value: Any) -> bool:
    # A single-input model may still receive {input_name: value} objects. Objects that are
    # b64 values are values, not names.
    return isinstance(value, dict) and not is_b64_object(value)


def _decode_columns(inputs: Any, signature: Signature) -> dict[str, np.ndarray[Any, Any]]:
    if len(signature.inputs) == 1 and not _is_named(inputs):
        spec = signature.inputs[0]
        return {spec.name: _array(inputs, spec, "")}
    if not isinstance(inputs, dict):
        raise InvalidInputError(
            f"'inputs' must be an object keyed by input name ({_names(signature)})"
        )
    for name in inputs:
        if signature.input(name) is None:
            raise InvalidInputError(
                f"unknown input {shorten(name)!r} in 'inputs'; the model's inputs are "
                f"{_names(signature)}"
            )
    arrays = {}
    for spec in signature.inputs:
        if spec.name not in inputs:
            raise InvalidInputError(f"Missing named input: {spec.name} in 'inputs' object.")
        arrays[spec.name] = _array(inputs[spec.name], spec, "")
    return arrays


def _array(value: Any, spec: TensorSpec, where: str) -> np.ndarray[Any, Any]:
    return array_from_json(value, spec.datatype, f"input {spec.name!r}{where}", allow_b64=True)


def encode_predict(response: InferenceResponse, row_format: bool) -> dict[str, Any]:
    """Shape the outputs as `predictions` (row format) or `outputs` (columnar format)."""
    outputs = {name: _json_value(name, array) for name, array in response.outputs.items()}
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": next(iter(outputs.values()))}
        return {"outputs": outputs}
    rows = _batch_size(response.outputs)
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    return {
        "predictions": [{name: value[i] for name, value in outputs.items()} for i in range(rows)]
    }


def _batch_size(outputs: dict[str, np.ndarray[Any, Any]]) -> int:
    expected: int | None = None
    first = ""
    for name, array in outputs.items():
        if array.ndim == 0:
            raise InvalidInputError(
                f"output {name!r} has no batch dimension, so it cannot be returned in row "
                "format; send the request with 'inputs' (columnar format) instead"
            )
        if expected is None:
            expected, first = array.shape[0], name
        elif array.shape[0] != expected:
            raise InvalidInputError(
                f"output {name!r} has batch size {array.shape[0]} but output {first!r} has "
                f"{expected}, so they cannot be returned in row format; send the request with "
                "'inputs' (columnar format) instead"
            )
    return expected or 0


def _json_value(name: str, array: np.ndarray[Any, Any]) -> Any:
    if array.dtype != object:
        return array
    # Outputs named `*_bytes` are binary by TF Serving's convention. Other string outputs are
    # written as text, except elements that are not valid UTF-8, which fall back to the
    # lossless b64 form instead of being mangled.
    if name.endswith("_bytes"):
        return object_array_to_lists(array, _b64_object)
    return object_array_to_lists(array, _text_or_b64)


def _b64_object(element: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(element).decode()}


def _text_or_b64(element: bytes) -> str | dict[str, str]:
    try:
        return element.decode()
    except UnicodeDecodeError:
        return _b64_object(element)


def encode_status(statuses: list[VersionStatus]) -> dict[str, Any]:
    """Build a GetModelStatusResponse in TF Serving's JSON form."""
    return {
        "model_version_status": [
            {
                "version": str(status.version),
                "state": status.state.name,
                "status": {"error_code": status.error_code, "error_message": status.error_message},
            }
            for status in statuses
        ]
    }


def encode_metadata(name: str, version: int, signature: Signature) -> dict[str, Any]:
    """Build a GetModelMetadataResponse with the one `serving_default` signature."""
    signature_def = {
        "inputs": {spec.name: _tensor_info(spec) for spec in signature.inputs},
        "outputs": {spec.name: _tensor_info(spec) for spec in signature.outputs},
        "method_name": PREDICT_METHOD,
        "defaults": {},
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {DEFAULT_SIGNATURE: signature_def}}},
    }


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": spec.datatype.tf_name,
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in spec.shape],
            "unknown_rank": False,
        },
        "name": spec.name,
    }


def _names(signature: Signature) -> str:
    return _quoted(signature.input_names)


def _quoted(names: Any) -> str:
    return ", ".join(repr(shorten(str(name), 60)) for name in names)
