"""Protocol-neutral types: datatypes, signatures, inference requests and responses.

Tensors are numpy arrays. BYTES tensors are object arrays whose elements are `bytes`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servekit.core.errors import InvalidInputError, shorten


class DataType(enum.Enum):
    """Tensor element types, named as in KServe V2, with their numpy and TF equivalents."""

    BOOL = ("BOOL", "bool", "DT_BOOL")
    UINT8 = ("UINT8", "uint8", "DT_UINT8")
    UINT16 = ("UINT16", "uint16", "DT_UINT16")
    UINT32 = ("UINT32", "uint32", "DT_UINT32")
    UINT64 = ("UINT64", "uint64", "DT_UINT64")
    INT8 = ("INT8", "int8", "DT_INT8")
    INT16 = ("INT16", "int16", "DT_INT16")
    INT32 = ("INT32", "int32", "DT_INT32")
    INT64 = ("INT64", "int64", "DT_INT64")
    FP16 = ("FP16", "float16", "DT_HALF")
    FP32 = ("FP32", "float32", "DT_FLOAT")
    FP64 = ("FP64", "float64", "DT_DOUBLE")
    BYTES = ("BYTES", "object", "DT_STRING")

    def __init__(self, v2_name: str, numpy_name: str, tf_name: str) -> None:
        self.v2_name = v2_name
        self.numpy_dtype = np.dtype(numpy_name)
        self.tf_name = tf_name

    @classmethod
    def from_v2(cls, name: str) -> DataType:
        """Look up a V2 datatype name such as `FP32`; raise InvalidInputError if unknown."""
        try:
            return _BY_V2_NAME[name]
        except (KeyError, TypeError):
            known = ", ".join(_BY_V2_NAME)
            value = shorten(name, 40) if isinstance(name, str) else name
            raise InvalidInputError(
                f"invalid datatype {value!r}: expected one of {known}"
            ) from None

    @classmethod
    def from_numpy(cls, dtype: np.dtype[Any]) -> DataType:
        """Map a numpy dtype to its datatype; strings and bytes map to BYTES."""
        if dtype.kind in "OSU":
            return cls.BYTES
        try:
            return _BY_NUMPY[dtype]
        except KeyError:
            raise ValueError(f"unsupported numpy dtype {dtype}") from None

    @property
    def is_bytes(self) -> bool:
        return self is DataType.BYTES


_BY_V2_NAME = {member.v2_name: member for member in DataType}
_BY_NUMPY = {member.numpy_dtype: member for member in DataType if member is not DataType.BYTES}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named, typed tensor of a signature; -1 marks a dimension of any size."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]

    def shape_matches(self, shape: tuple[int, ...]) -> bool:
        """Tell whether a concrete shape fits this spec's rank and fixed dimensions."""
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))

    def check(self, array: np.ndarray[Any, Any]) -> None:
        """Raise InvalidInputError unless `array` has this spec's datatype and shape."""
        actual = DataType.from_numpy(array.dtype)
        if actual is not self.datatype:
            raise InvalidInputError(
                f"input {self.name!r} has datatype {actual.v2_name}, "
                f"but the model expects {self.datatype.v2_name}"
            )
        if not self.shape_matches(array.shape):
            raise InvalidInputError(
                f"input {self.name!r} has shape {list(array.shape)}, "
                f"but the model expects {list(self.shape)} (-1 means any size)"
            )


@dataclass(frozen=True, slots=True)
class Signature:
    """The inputs and outputs of one version, in the order the model declares them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)


@dataclass(slots=True)
class InferenceRequest:
    """One call to a model: named input arrays, the outputs wanted, and free parameters."""

    inputs: dict[str, np.ndarray[Any, Any]]
    # None means every output of the signature.
    outputs: tuple[str, ...] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    # time.monotonic() value after which the request is dropped with 504; None waits forever.
    deadline: float | None = None


@dataclass(slots=True)
class InferenceResponse:
    """The named output arrays of one call and the version that computed them."""

    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray[Any, Any]]
