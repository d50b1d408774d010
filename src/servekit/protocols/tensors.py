"""Conversion of JSON tensor values (nested lists of scalars) to numpy arrays.

Both REST protocols share it. Values are checked strictly: a ragged list, a string where a
number is expected, a `null`, a fraction for an integer or an integer out of range is a 400,
never a silent conversion. numpy alone would do each of those conversions without complaint
(for example `None` becomes NaN in a float array). One conversion is allowed on purpose, as
numpy does it: `true` and `false` in a numeric input read as 1 and 0.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from servekit.core.errors import InvalidInputError
from servekit.core.types import DataType

# numpy allows 64 dimensions; 32 is far beyond the rank of any model input.
MAX_RANK = 32
# Elements in a shape, not counting its zero dimensions; numpy refuses shapes near 2**60 even
# for empty arrays, and no real tensor comes near this.
MAX_ELEMENTS = 2**48


def check_dims(shape: tuple[int, ...], name: str) -> None:
    """Reject a shape with more than MAX_RANK dimensions or too many elements to represent."""
    if len(shape) > MAX_RANK:
        raise InvalidInputError(
            f"{name} has {len(shape)} dimensions; at most {MAX_RANK} are allowed"
        )
    if math.prod(size for size in shape if size) > MAX_ELEMENTS:
        raise InvalidInputError(f"{name} has shape {list(shape)}, which is too large")


def array_from_json(
    value: Any, datatype: DataType, name: str, allow_b64: bool
) -> np.ndarray[Any, Any]:
    """Build an array of `datatype` from a JSON value; the nesting gives the shape.

    `name` describes the value in error messages (for example `input 'x'`). With `allow_b64`,
    BYTES elements may be `{"b64": "..."}` objects, as in TF Serving's REST API.
    """
    if datatype.is_bytes:
        return _bytes_array(value, name, allow_b64)
    if not isinstance(value, (list, bool, int, float)):
        raise InvalidInputError(f"{name} is not of expected type {datatype.v2_name}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        array = None
    if array is not None and _kind_fits(array, datatype):
        return cast_checked(array, datatype, name)
    # Slow path: find the exact problem, or convert values numpy could not type (huge ints).
    shape, leaves = nested_shape(value, name)
    for leaf in leaves:
        _check_number(leaf, datatype, name)
    try:
        array = np.array(value, dtype=np.float64 if datatype.numpy_dtype.kind == "f" else object)
    except (ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{name} has invalid values: {exc}") from None
    return cast_checked(array.reshape(shape), datatype, name)


def _kind_fits(array: np.ndarray[Any, Any], datatype: DataType) -> bool:
    kind: str = array.dtype.kind
    if array.size == 0 and kind == "f":
        return True  # numpy types an empty list as float64
    target: str = datatype.numpy_dtype.kind
    if target == "b":
        return kind == "b"
    if target in "iu":
        return kind in "biu"
    return kind in "biuf"


def cast_checked(
    array: np.ndarray[Any, Any], datatype: DataType, name: str
) -> np.ndarray[Any, Any]:
    """Convert to `datatype`; integers out of its range or floats too large for it are a 400."""
    target = datatype.numpy_dtype
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise _out_of_range(name, datatype, f"{info.min} to {info.max}")
    if target.kind != "f" or array.dtype == target:
        return array.astype(target, copy=False)
    # A finite value too large for a narrower float type would silently become infinite.
    # numpy's overflow warning is off in servers (see run_worker), and the check is explicit.
    result = array.astype(target)
    if math.isfinite(result.sum()) or not (np.isinf(result) & np.isfinite(array)).any():
        return result
    raise _out_of_range(name, datatype, f"magnitude up to {np.finfo(target).max}")


def _out_of_range(name: str, datatype: DataType, bounds: str) -> InvalidInputError:
    return InvalidInputError(f"{name} has values out of range for {datatype.v2_name} ({bounds})")


def _check_number(leaf: Any, datatype: DataType, name: str) -> None:
    expected = datatype.v2_name
    if datatype is DataType.BOOL:
        if not isinstance(leaf, bool):
            raise InvalidInputError(
                f"{name} has {_describe(leaf)}, but {expected} needs true or false"
            )
        return
    if not isinstance(leaf, (int, float)):
        raise InvalidInputError(f"{name} has {_describe(leaf)}, but {expected} needs numbers")
    if datatype.numpy_dtype.kind in "iu" and not isinstance(leaf, int):
        if isinstance(leaf, float) and leaf.is_integer() and abs(leaf) >= 2**63:
            # The JSON parser reads integers past 64 bits as floats.
            raise _out_of_range(name, datatype, "the value needs more than 64 bits")
        raise InvalidInputError(f"{name} has {_describe(leaf)}, but {expected} needs integers")


def _describe(leaf: Any) -> str:
    if leaf is None:
        return "null"
    if isinstance(leaf, dict):
        return "an object"
    return f"the value {str(leaf)[:40]!r}"


def _bytes_array(value: Any, name: str, allow_b64: bool) -> np.ndarray[Any, Any]:
    shape, leaves = nested_shape(value, name)
    elements = [_bytes_element(leaf, name, allow_b64) for leaf in leaves]
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _bytes_element(leaf: Any, name: str, allow_b64: bool) -> bytes:
    if isinstance(leaf, str):
        return leaf.encode()
    if isinstance(leaf, bytes):
        return leaf  # from a protobuf message: gRPC examples carry bytes features
    if allow_b64 and is_b64_object(leaf):
        return decode_b64(leaf["b64"], name)
    hint = ' or {"b64": "..."} objects' if allow_b64 else ""
    raise InvalidInputError(f"{name} has {_describe(leaf)}, but BYTES needs strings{hint}")


def is_b64_object(value: Any) -> bool:
    """Tell whether `value` is TF Serving's binary form: an object with one string member `b64`."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(text: str, name: str) -> bytes:
    """Decode standard base64 with padding; the URL-safe alphabet is rejected like TF Serving."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(
            f"{name}: unable to base64 decode {text[:40]!r}; use the standard alphabet with padding"
        ) from None


def nested_shape(value: Any, name: str) -> tuple[tuple[int, ...], list[Any]]:
    """Return the shape of a dense nested list and its leaves in row-major order.

    Walks level by level without recursion, so deep nesting cannot exhaust the stack. Raises
    InvalidInputError naming the first list whose length differs from its siblings, or a
    scalar found at a level where lists are expected.
    """
    shape: list[int] = []
    level: list[Any] = [value]
    paths: list[str] = [""]
    while any(isinstance(item, list) for item in level):
        if len(shape) >= MAX_RANK:
            raise InvalidInputError(f"{name} is nested deeper than {MAX_RANK} levels")
        _check_level(level, paths, name)
        width = len(level[0])
        shape.append(width)
        level = [child for item in level for child in item]
        paths = [f"{path}[{i}]" for path in paths for i in range(width)]
    return tuple(shape), level


def _check_level(level: list[Any], paths: list[str], name: str) -> None:
    first = level[0]
    for item, path in zip(level, paths, strict=True):
        if not isinstance(item, list):
            raise InvalidInputError(
                f"{name} has a scalar at {path or 'the top level'} where a list is expected; "
                "nested lists must be dense"
            )
        if len(item) != len(first):
            raise InvalidInputError(
                f"{name} is ragged: {path or 'the value'} has {len(item)} elements but "
                f"{paths[0] or 'the first'} has {len(first)}; every row must have the same "
                "shape (pad them before sending)"
            )


def object_array_to_lists(array: np.ndarray[Any, Any], convert: Callable[[Any], Any]) -> Any:
    """Apply `convert` to each element of an object array and return nested lists."""
    converted = np.empty(array.size, dtype=object)
    converted[:] = [convert(element) for element in array.ravel().tolist()]
    return converted.reshape(array.shape).tolist()
