"""KServe V2 gRPC codec: ModelInferRequest and ModelInferResponse to and from the core types.

Tensors arrive either in each input's typed `contents` or, for every input at once, in
`raw_input_contents` (the layout of the REST binary extension). The response uses the form
of the request: raw contents for a raw request (what tritonclient sends and reads), typed
contents for a typed one. FP16 has no typed field, so a response with an FP16 output is always
raw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from servekit.core.errors import InvalidInputError, shorten
from servekit.core.types import DataType, InferenceRequest, InferenceResponse, TensorSpec
from servekit.protocols.protos import kserve_v2_pb2 as pb
from servekit.protocols.tensors import cast_checked
from servekit.protocols.v2 import check_shape, decode_raw, encode_raw

# The typed field of each datatype; narrower integers travel in the 32-bit fields.
_CONTENTS_FIELD = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}


def decode_infer(message: pb.ModelInferRequest) -> tuple[InferenceRequest, bool]:
    """Decode a ModelInferRequest; returns the request and whether it used raw contents."""
    if not message.inputs:
        raise InvalidInputError("the request has no inputs")
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidInputError(
            f"the request has {len(message.inputs)} inputs but {len(raw)} raw_input_contents; "
            "give raw contents for every input or for none"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(message.inputs):
        if tensor.name in inputs:
            raise InvalidInputError(f"input {shorten(tensor.name)!r} is given more than once")
        label = f"input {shorten(tensor.name)!r}"
        datatype = DataType.from_v2(tensor.datatype)
        shape = check_shape(list(tensor.shape), label)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(f"{label} has both contents and raw_input_contents")
            inputs[tensor.name] = decode_raw(raw[index], datatype, shape, label)
        else:
            inputs[tensor.name] = _from_contents(tensor.contents, datatype, shape, label)
    requested: list[str] = []
    for output in message.outputs:
        if output.name in requested:
            raise InvalidInputError(f"output {shorten(output.name)!r} is requested more than once")
        requested.append(output.name)
    request = InferenceRequest(
        inputs,
        tuple(requested) if requested else None,
        decode_parameters(message.parameters),
        message.id or None,
    )
    return request, bool(raw)


def decode_parameters(parameters: Any) -> dict[str, Any]:
    """Turn a map of InferParameter (or ModelRepositoryParameter) into plain values."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def _from_contents(
    contents: pb.InferTensorContents, datatype: DataType, shape: tuple[int, ...], label: str
) -> np.ndarray[Any, Any]:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(
            f"{label} is {datatype.v2_name}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        filled = [descriptor.name for descriptor, _ in contents.ListFields()]
        hint = ""
        if filled and field not in filled:
            hint = f"; {datatype.v2_name} values go in {field}, not {filled[0]}"
        raise InvalidInputError(
            f"{label} has {len(values)} values in {field}, but shape {list(shape)} needs "
            f"{count}{hint}"
        )
    if datatype.is_bytes:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.asarray(values, dtype=_wide_dtype(datatype))
    return cast_checked(array, datatype, label).reshape(shape)


def _wide_dtype(datatype: DataType) -> np.dtype[Any]:
    # The protobuf field's own type, before narrowing to the tensor's datatype.
    field = _CONTENTS_FIELD[datatype]
    wide = {"int_contents": np.int32, "uint_contents": np.uint32}.get(field)
    return np.dtype(wide) if wide is not None else datatype.numpy_dtype


def encode_infer(
    response: InferenceResponse, request_id: str | None, raw: bool
) -> pb.ModelInferResponse:
    """Build the ModelInferResponse, with raw or typed contents as `decode_infer` reported."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=str(response.model_version),
        id=request_id or "",
    )
    datatypes = {name: DataType.from_numpy(a.dtype) for name, a in response.outputs.items()}
    raw = raw or any(datatype not in _CONTENTS_FIELD for datatype in datatypes.values())
    for name, array in response.outputs.items():
        datatype = datatypes[name]
        tensor = message.outputs.add(name=name, datatype=datatype.v2_name, shape=array.shape)
        if raw:
            message.raw_output_contents.append(encode_raw(array))
        else:
            getattr(tensor.contents, _CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
    return message


def tensor_metadata(
    specs: tuple[TensorSpec, ...],
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Describe a signature's tensors for ModelMetadataResponse."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype.v2_name, shape=spec.shape
        )
        for spec in specs
    ]
