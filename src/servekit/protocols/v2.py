"""KServe V2 (Open Inference Protocol) REST codec, with the binary tensor data extension.

With the extension, tensor bytes follow the JSON part of the body in the order the tensors
appear in the JSON, each little-endian and row-major. BYTES elements are each a 4-byte
little-endian length followed by that many bytes. The `Inference-Header-Content-Length` header
gives the size of the JSON part.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servekit import __version__
from servekit.core.errors import InvalidInputError, shorten
from servekit.core.types import DataType, InferenceRequest, InferenceResponse, Signature, TensorSpec
from servekit.protocols.jsoncodec import dump_json, parse_json
from servekit.protocols.tensors import array_from_json, check_dims, object_array_to_lists

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1
_LENGTH_PREFIX = struct.Struct("<I")
_DIGITS = re.compile("[0-9]+")


@dataclass(slots=True)
class OutputOptions:
    """The client's choice between JSON `data` and binary chunks for each output."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def server_metadata() -> dict[str, Any]:
    return {"name": "servekit", "version": __version__, "extensions": EXTENSIONS}


def encode_model_metadata(
    name: str, versions: list[int], platform: str, signature: Signature
) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(version) for version in versions],
        "platform": platform,
        "inputs": [_spec_metadata(spec) for spec in signature.inputs],
        "outputs": [_spec_metadata(spec) for spec in signature.outputs],
    }


def _spec_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype.v2_name, "shape": list(spec.shape)}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a body into its JSON part and its binary part, checking the header first."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not _DIGITS.fullmatch(text):
        raise InvalidInputError(
            f"invalid Inference-Header-Content-Length {shorten(header_length, 40)!r}: "
            "expected the byte length of the JSON part as a non-negative integer"
        )
    length = int(text)
    if length > _INT32_MAX or length > len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length {length} is larger than the body ({len(body)} bytes)"
        )
    if length == 0:
        raise InvalidInputError(
            "Inference-Header-Content-Length 0 (a raw binary request) is not supported; "
            "send a JSON inference header before the binary data"
        )
    return body[:length], memoryview(body)[length:]


def decode_infer(body: bytes, header_length: str | None) -> tuple[InferenceRequest, OutputOptions]:
    """Decode an inference request body into a request and the client's output options."""
    json_part, binary = split_body(body, header_length)
    try:
        document = parse_json(json_part)
    except InvalidInputError as exc:
        if header_length is not None or b"binary_data_size" not in json_part:
            raise
        raise InvalidInputError(
            f"{exc.message}; a body with binary tensor data needs the "
            "Inference-Header-Content-Length header"
        ) from None
    if not isinstance(document, dict):
        raise InvalidInputError("the request body must be a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string")
    parameters = _parameters(document.get("parameters"), "request 'parameters'")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError("parameter 'binary_data_output' must be true or false")
    reader = _BinaryReader(binary, header_given=header_length is not None)
    inputs = _decode_inputs(document.get("inputs"), reader)
    reader.finish()
    requested, options = _decode_outputs(document.get("outputs"), binary_default)
    request = InferenceRequest(inputs, requested, parameters, request_id)
    return request, options


def timeout_parameter(parameters: dict[str, Any]) -> float | None:
    """Read the request parameter `timeout` (microseconds, as Triton's) in seconds."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError("parameter 'timeout' must be a positive number of microseconds")
    return value / 1_000_000


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be an object")
    for key, item in value.items():
        if not isinstance(item, (str, int, float, bool)):
            raise InvalidInputError(f"{where} {shorten(key)!r} must be a string, number or boolean")
    return value


def _decode_inputs(value: Any, reader: _BinaryReader) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidInputError("'inputs' must be a non-empty list of tensors")
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(value):
        if not isinstance(tensor, dict):
            raise InvalidInputError(f"inputs[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInputError(f"inputs[{index}] needs a string 'name'")
        if name in arrays:
            raise InvalidInputError(f"input {shorten(name)!r} is given more than once")
        arrays[name] = _decode_tensor(tensor, f"input {shorten(name)!r}", reader)
    return arrays


def _decode_tensor(
    tensor: dict[str, Any], label: str, reader: _BinaryReader
) -> np.ndarray[Any, Any]:
    shape = check_shape(tensor.get("shape"), label)
    if "datatype" not in tensor:
        raise InvalidInputError(f"{label} is missing 'datatype'")
    datatype = DataType.from_v2(tensor["datatype"])
    parameters = _parameters(tensor.get("parameters"), f"{label} 'parameters'")
    count = math.prod(shape)
    if "binary_data_size" in parameters:
        if "data" in tensor:
            raise InvalidInputError(f"{label} has both 'data' and 'binary_data_size'")
        return reader.read(parameters["binary_data_size"], datatype, shape, label)
    if "data" not in tensor:
        raise InvalidInputError(f"{label} is missing 'data'")
    array = array_from_json(tensor["data"], datatype, label, allow_b64=False)
    if array.size != count:
        raise InvalidInputError(
            f"{label} has {array.size} data elements, but shape {list(shape)} needs {count}"
        )
    return array.reshape(shape)


def check_shape(value: Any, label: str) -> tuple[int, ...]:
    """Check that a shape is a list of non-negative integers and return it as a tuple."""
    if not isinstance(value, list):
        raise InvalidInputError(f"{label} needs 'shape' as a list of non-negative integers")
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _UINT64_MAX:
            raise InvalidInputError(
                f"{label} has invalid shape {shorten(str(value), 80)}: each dimension must be "
                "a non-negative integer"
            )
    shape = tuple(value)
    check_dims(shape, label)
    return shape


def _decode_outputs(
    value: Any, binary_default: bool
) -> tuple[tuple[str, ...] | None, OutputOptions]:
    options = OutputOptions(binary_default)
    if value is None:
        return None, options
    if not isinstance(value, list):
        raise InvalidInputError("'outputs' must be a list of objects with a 'name'")
    names: list[str] = []
    for index, output in enumerate(value):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidInputError(f"outputs[{index}] must be an object with a string 'name'")
        name = output["name"]
        if name in names:
            raise InvalidInputError(f"output {shorten(name)!r} is requested more than once")
        parameters = _parameters(output.get("parameters"), f"output {shorten(name)!r} 'parameters'")
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise InvalidInputError(
                    f"output {shorten(name)!r} 'binary_data' must be true or false"
                )
            options.binary[name] = parameters["binary_data"]
        names.append(name)
    return tuple(names), options


class _BinaryReader:
    """Hands out consecutive chunks of the binary part of a request body."""

    def __init__(self, data: memoryview, header_given: bool) -> None:
        self._data = data
        self._offset = 0
        self._header_given = header_given

    def read(
        self, size: Any, datatype: DataType, shape: tuple[int, ...], label: str
    ) -> np.ndarray[Any, Any]:
        if not self._header_given:
            raise InvalidInputError(
                f"{label} uses 'binary_data_size', which needs the "
                "Inference-Header-Content-Length header"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"{label} 'binary_data_size' must be a non-negative integer")
        if self._offset + size > len(self._data):
            left = len(self._data) - self._offset
            raise InvalidInputError(
                f"{label} declares binary_data_size {size}, but only {left} bytes of binary "
                "data are left in the body"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return decode_raw(chunk, datatype, shape, label)

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise InvalidInputError(
                f"the body has {left} bytes of binary data that no input's binary_data_size "
                "accounts for"
            )


def decode_raw(
    chunk: bytes | memoryview, datatype: DataType, shape: tuple[int, ...], label: str
) -> np.ndarray[Any, Any]:
    """Read a tensor from its raw bytes: little-endian and row-major, or length-prefixed BYTES.

    gRPC's `raw_input_contents` and TF Serving's `tensor_content` use the same layout as the
    binary extension's chunks.
    """
    count = math.prod(shape)
    if datatype.is_bytes:
        return _bytes_elements(memoryview(chunk), count, label).reshape(shape)
    expected = count * datatype.numpy_dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInputError(
            f"{label} has {len(chunk)} bytes of data, but shape {list(shape)} of "
            f"{datatype.v2_name} needs {expected} bytes"
        )
    if datatype is DataType.BOOL:
        return np.frombuffer(chunk, dtype=np.uint8).astype(bool).reshape(shape)
    return np.frombuffer(chunk, dtype=datatype.numpy_dtype.newbyteorder("<")).reshape(shape)


def _bytes_elements(chunk: memoryview, count: int, label: str) -> np.ndarray[Any, Any]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidInputError(f"{label} binary data ends inside an element's length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise InvalidInputError(
                f"{label} binary element {len(elements)} declares {length} bytes, but only "
                f"{len(chunk) - offset} remain"
            )
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidInputError(
            f"{label} binary data contains {len(elements)} elements, but its shape needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def encode_infer(
    response: InferenceResponse, request_id: str | None, options: OutputOptions
) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and the JSON part's length if binary data follows."""
    chunks: list[bytes] = []
    outputs = []
    for name, array in response.outputs.items():
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": DataType.from_numpy(array.dtype).v2_name,
            "shape": list(array.shape),
        }
        if options.is_binary(name):
            chunk = encode_raw(array)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_data(name, array)
        outputs.append(tensor)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": str(response.model_version),
    }
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = outputs
    header = dump_json(document)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _json_data(name: str, array: np.ndarray[Any, Any]) -> Any:
    if array.dtype != object:
        return array.ravel()
    try:
        return object_array_to_lists(array.ravel(), bytes.decode)
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"output {name!r} contains bytes that are not valid UTF-8, so JSON cannot carry them; "
            "request it with the parameter binary_data: true"
        ) from None


def encode_raw(array: np.ndarray[Any, Any]) -> bytes:
    """Write a tensor's raw bytes in the layout `decode_raw` reads."""
    if array.dtype != object:
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts: list[bytes] = []
    for element in array.ravel().tolist():
        parts.append(_LENGTH_PREFIX.pack(len(element)))
        parts.append(element)
    return b"".join(parts)
