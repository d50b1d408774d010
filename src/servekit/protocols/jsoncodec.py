"""JSON decoding and encoding for both REST protocols.

TF Serving's REST API allows the bare tokens `NaN`, `Infinity` and `-Infinity` in requests and
writes them in responses. orjson handles the common case fast and rejects those tokens, so a
document orjson rejects is parsed again with the standard library, which accepts exactly those
three spellings (`Nan` stays an error). Bytes after the first complete JSON value are rejected
with 400 rather than ignored.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import numpy as np
import orjson

from servekit.core.errors import InvalidInputError

_NUMPY_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Stands in for an array with non-finite values while orjson encodes the document around it.
_MARKER_PREFIX = f"__servekit_{uuid.uuid4().hex}_"


def parse_json(body: bytes) -> Any:
    """Parse a request body; raise InvalidInputError with the position of any syntax error."""
    if not body.strip():
        raise InvalidInputError("JSON parse error: the document is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"JSON parse error: {exc.msg} at offset {exc.pos}") from None
    except UnicodeDecodeError:
        raise InvalidInputError("JSON parse error: the body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidInputError("JSON parse error: the document is nested too deeply") from None


def dump_json(document: Any) -> bytes:
    """Encode a response document that may contain numpy arrays and scalars.

    Float arrays with NaN or infinities are written with the tokens `NaN`, `Infinity` and
    `-Infinity`, because orjson would turn them into `null`.
    """
    special: dict[str, bytes] = {}
    prepared = _prepare(document, special)
    encoded = orjson.dumps(prepared, option=_NUMPY_OPTIONS)
    for marker, tokens in special.items():
        encoded = encoded.replace(b'"' + marker.encode() + b'"', tokens, 1)
    return encoded


def _prepare(value: Any, special: dict[str, bytes]) -> Any:
    if isinstance(value, dict):
        return {key: _prepare(item, special) for key, item in value.items()}
    if isinstance(value, list):
        return [_prepare(item, special) for item in value]
    if isinstance(value, np.ndarray):
        return _prepare_array(value, special)
    if isinstance(value, np.generic):
        return _prepare_array(np.asarray(value), special)
    return value


def _prepare_array(array: np.ndarray[Any, Any], special: dict[str, bytes]) -> Any:
    # The sum is finite whenever every element is, so one reduction with no temporary array
    # clears the common case; a sum that overflows only costs the exact check.
    if array.dtype.kind == "f" and not math.isfinite(array.sum()) and not np.isfinite(array).all():
        marker = f"{_MARKER_PREFIX}{len(special)}"
        special[marker] = _float_tokens(array)
        return marker
    if array.dtype.kind == "O":
        return array.tolist()
    if array.ndim == 0:
        return array.item()
    return np.ascontiguousarray(array)


_TOKEN_SPELLING = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _float_tokens(array: np.ndarray[Any, Any]) -> bytes:
    # numpy's str() of a float gives the shortest text that reads back as the same value,
    # which is also what orjson writes for finite numbers.
    texts = [_TOKEN_SPELLING.get(text, text) for text in array.ravel().astype(str).tolist()]
    return _nest(texts, array.shape).encode()


def _nest(texts: list[str], shape: tuple[int, ...]) -> str:
    if not shape:
        return texts[0]
    if len(shape) == 1:
        return "[" + ",".join(texts) + "]"
    step = len(texts) // shape[0] if shape[0] else 0
    rows = (_nest(texts[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0]))
    return "[" + ",".join(rows) + "]"
