"""TF Serving gRPC codec: TensorProto, ModelSpec, examples and the response messages.

A TensorProto carries its values either in `tensor_content` (raw little-endian bytes, any
numeric dtype) or in the typed field of its dtype. As in TensorFlow, a typed field with a
single value fills the whole shape. Any other count that differs from the shape's is an error,
where TensorFlow would silently repeat the last value. Responses use `tensor_content` for numeric
outputs and `string_val` for strings, which `tf.make_ndarray` reads either way.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np

from servekit.core.errors import InvalidInputError, shorten
from servekit.core.servable import VersionStatus
from servekit.core.types import DataType, InferenceRequest, InferenceResponse, Signature, TensorSpec
from servekit.protocols.protos import tensorflow_pb2 as tf
from servekit.protocols.protos import tensorflow_serving_pb2 as pb
from servekit.protocols.tensors import cast_checked, check_dims
from servekit.protocols.tfserving import DEFAULT_SIGNATURE, PREDICT_METHOD
from servekit.protocols.v2 import decode_raw, encode_raw

SIGNATURE_DEF_FIELD = "signature_def"

_TO_PROTO: dict[DataType, Any] = {
    datatype: tf.DataType.Value(datatype.tf_name) for datatype in DataType
}
_FROM_PROTO = {value: datatype for datatype, value in _TO_PROTO.items()}
# The typed field of each dtype, and the numpy type its values have on the wire.
_TYPED_FIELD: dict[DataType, tuple[str, Any]] = {
    DataType.BOOL: ("bool_val", np.bool_),
    DataType.INT8: ("int_val", np.int32),
    DataType.INT16: ("int_val", np.int32),
    DataType.INT32: ("int_val", np.int32),
    DataType.UINT8: ("int_val", np.int32),
    DataType.UINT16: ("int_val", np.int32),
    DataType.UINT32: ("uint32_val", np.uint32),
    DataType.INT64: ("int64_val", np.int64),
    DataType.UINT64: ("uint64_val", np.uint64),
    DataType.FP16: ("half_val", np.int32),
    DataType.FP32: ("float_val", np.float32),
    DataType.FP64: ("double_val", np.float64),
    DataType.BYTES: ("string_val", object),
}


def model_target(spec: pb.ModelSpec) -> tuple[str, int | None, str | None]:
    """Return the model name and the version or label that a ModelSpec requests."""
    if not spec.name:
        raise InvalidInputError("model_spec.name is required")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        if spec.version.value < 0:
            raise InvalidInputError(f"invalid version {spec.version.value}: it must be >= 0")
        return spec.name, spec.version.value, None
    if choice == "version_label":
        if not spec.version_label:
            raise InvalidInputError("model_spec.version_label is empty")
        return spec.name, None, spec.version_label
    return spec.name, None, None


def signature_name(spec: pb.ModelSpec) -> str:
    return spec.signature_name or DEFAULT_SIGNATURE


def effective_spec(name: str, version: int, signature: str) -> pb.ModelSpec:
    """Build the ModelSpec of a response: the model and version that computed it."""
    spec = pb.ModelSpec(name=name, signature_name=signature)
    spec.version.value = version
    return spec


def decode_predict(message: pb.PredictRequest, max_bytes: int) -> InferenceRequest:
    """Build the core request from a PredictRequest's input tensors and output filter.

    `max_bytes` caps a tensor that one typed value fills, as the message size caps the rest.
    """
    if not message.inputs:
        raise InvalidInputError("the request has no inputs")
    inputs = {
        name: tensor_to_array(tensor, f"input {shorten(name)!r}", max_bytes)
        for name, tensor in message.inputs.items()
    }
    outputs = list(message.output_filter)
    for index, name in enumerate(outputs):
        if name in outputs[:index]:
            raise InvalidInputError(f"output {shorten(name)!r} is in output_filter more than once")
    return InferenceRequest(inputs, tuple(outputs) if outputs else None)


def tensor_to_array(
    tensor: tf.TensorProto, label: str, max_bytes: int = 64 * 1024 * 1024
) -> np.ndarray[Any, Any]:
    """Read a TensorProto into a numpy array, checking its shape against its values."""
    datatype = _FROM_PROTO.get(tensor.dtype)
    if datatype is None:
        raise InvalidInputError(
            f"{label} has dtype {_dtype_name(tensor.dtype)}, which servekit does not serve"
        )
    if tensor.tensor_shape.unknown_rank:
        raise InvalidInputError(f"{label} has an unknown rank; give its shape")
    shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise InvalidInputError(f"{label} has shape {list(shape)}; sizes must be >= 0")
    check_dims(shape, label)
    if tensor.tensor_content:
        if datatype.is_bytes:
            raise InvalidInputError(f"{label} is DT_STRING, which travels in string_val only")
        return decode_raw(tensor.tensor_content, datatype, shape, label)
    field, wire_type = _TYPED_FIELD[datatype]
    values = getattr(tensor, field)
    count = math.prod(shape)
    if len(values) not in (count, 1) or (count == 0 and len(values)):
        filled = [descriptor.name for descriptor, _ in tensor.ListFields()]
        typed = [name for name in filled if name.endswith("_val") and name != field]
        hint = f"; {datatype.tf_name} values go in {field}, not {typed[0]}" if typed else ""
        raise InvalidInputError(
            f"{label} has {len(values)} values in {field}, but shape {list(shape)} needs "
            f"{count}{hint}"
        )
    if len(values) == 1 and count * datatype.numpy_dtype.itemsize > max_bytes:
        raise InvalidInputError(
            f"{label} fills shape {list(shape)} from one value, which would take more than the "
            f"{max_bytes} bytes a message may carry"
        )
    if datatype.is_bytes:
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    else:
        array = _narrow(np.asarray(values, dtype=wire_type), datatype, label)
    if len(values) != count:
        # One value fills the whole shape, as TensorFlow reads it.
        array = np.repeat(array, count)
    return array.reshape(shape)


def _narrow(array: np.ndarray[Any, Any], datatype: DataType, label: str) -> np.ndarray[Any, Any]:
    if datatype is not DataType.FP16:
        return cast_checked(array, datatype, label)
    # Each half_val element contains the 16 bits of one float16.
    if array.size and (int(array.min()) < 0 or int(array.max()) > 0xFFFF):
        raise InvalidInputError(f"{label} has half_val values that are not 16-bit patterns")
    return array.astype(np.uint16).view(np.float16)


def array_to_tensor(array: np.ndarray[Any, Any]) -> tf.TensorProto:
    datatype = DataType.from_numpy(array.dtype)
    tensor = tf.TensorProto(dtype=_TO_PROTO[datatype])
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    if datatype.is_bytes:
        tensor.string_val.extend(array.ravel().tolist())
    else:
        tensor.tensor_content = encode_raw(array)
    return tensor


def encode_predict(response: InferenceResponse, signature: str) -> pb.PredictResponse:
    message = pb.PredictResponse(
        model_spec=effective_spec(response.model_name, response.model_version, signature)
    )
    for name, array in response.outputs.items():
        message.outputs[name].CopyFrom(array_to_tensor(array))
    return message


def decode_examples(data: pb.Input) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Turn a classify or regress Input into examples and context of plain feature values."""
    kind = data.WhichOneof("kind")
    if kind == "example_list":
        examples, context = data.example_list.examples, {}
    elif kind == "example_list_with_context":
        examples = data.example_list_with_context.examples
        context = _features(data.example_list_with_context.context)
    else:
        raise InvalidInputError("Input is empty: give example_list or example_list_with_context")
    if not examples:
        raise InvalidInputError("Input is empty: it has no examples")
    return [_features(example) for example in examples], context


def _features(example: tf.Example) -> dict[str, Any]:
    features: dict[str, Any] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        features[name] = list(getattr(feature, kind).value) if kind is not None else []
    return features


def encode_classification(
    results: list[list[list[Any]]], spec: pb.ModelSpec
) -> pb.ClassificationResponse:
    message = pb.ClassificationResponse(model_spec=spec)
    for pairs in results:
        classes = message.result.classifications.add().classes
        for label, score in pairs:
            classes.add(label=label, score=score)
    return message


def encode_regression(results: list[float], spec: pb.ModelSpec) -> pb.RegressionResponse:
    message = pb.RegressionResponse(model_spec=spec)
    for value in results:
        message.result.regressions.add(value=value)
    return message


def check_metadata_fields(fields: list[str]) -> None:
    if not fields:
        raise InvalidInputError("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != SIGNATURE_DEF_FIELD:
            raise InvalidInputError(
                f"Metadata field {shorten(field)} is not supported; the only field is "
                f"{SIGNATURE_DEF_FIELD}"
            )


def encode_metadata(name: str, version: int, signature: Signature) -> pb.GetModelMetadataResponse:
    """Build a GetModelMetadataResponse with the one `serving_default` signature."""
    signature_def = tf.SignatureDef(method_name=PREDICT_METHOD)
    for specs, tensors in (
        (signature.inputs, signature_def.inputs),
        (signature.outputs, signature_def.outputs),
    ):
        for spec in specs:
            tensors[spec.name].CopyFrom(_tensor_info(spec))
    signature_map = pb.SignatureDefMap()
    signature_map.signature_def[DEFAULT_SIGNATURE].CopyFrom(signature_def)
    message = pb.GetModelMetadataResponse(model_spec=effective_spec(name, version, ""))
    message.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return message


def _tensor_info(spec: TensorSpec) -> tf.TensorInfo:
    info = tf.TensorInfo(name=spec.name, dtype=_TO_PROTO[spec.datatype])
    for size in spec.shape:
        info.tensor_shape.dim.add(size=size)
    return info


def encode_status(statuses: list[VersionStatus]) -> pb.GetModelStatusResponse:
    message = pb.GetModelStatusResponse()
    for status in statuses:
        message.model_version_status.add(
            version=status.version,
            state=int(status.state),
            status=pb.StatusProto(
                error_code=grpc.StatusCode[status.error_code].value[0],
                error_message=status.error_message,
            ),
        )
    return message


def _dtype_name(value: int) -> str:
    try:
        return tf.DataType.Name(value)
    except ValueError:
        return str(value)
