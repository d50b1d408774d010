"""ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from servekit.core.errors import InvalidInputError
from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import RuntimeOptions

# ONNX Runtime's type strings for the element types that servekit can carry.
_ONNX_TYPES = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(string)": DataType.BYTES,
}


class OnnxRuntime:
    """Runs `model.onnx` with onnxruntime, which releases the GIL while it computes."""

    platform = "onnx_onnxv1"
    model_file = "model.onnx"
    inline_safe = True
    holds_gil = False

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._session: ort.InferenceSession | None = None
        self._string_inputs: frozenset[str] = frozenset()

    def load(self, directory: Path) -> Signature:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = self._options.intra_op_threads
        session_options.inter_op_num_threads = self._options.inter_op_threads
        if not self._options.spinning:
            # Spinning threads keep a core busy after every call, which the event loop and
            # the other instances then lack on a machine with few cores.
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(directory / self.model_file),
            sess_options=session_options,
            providers=["CPUExecutionProvider"],
        )
        signature = Signature(
            inputs=tuple(tensor_spec(node) for node in session.get_inputs()),
            outputs=tuple(tensor_spec(node) for node in session.get_outputs()),
        )
        self._string_inputs = frozenset(
            spec.name for spec in signature.inputs if spec.datatype.is_bytes
        )
        self._session = session
        return signature

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        if self._session is None:
            raise RuntimeError("predict called before load")
        feed = {
            name: _to_text(array, name) if name in self._string_inputs else array
            for name, array in inputs.items()
        }
        results = self._session.run(list(outputs), feed)
        return {
            name: _to_bytes(result) if result.dtype == object else result
            for name, result in zip(outputs, results, strict=True)
        }

    def unload(self) -> None:
        self._session = None


def tensor_spec(node: Any) -> TensorSpec:
    """Describe an ONNX Runtime input or output node as a TensorSpec."""
    try:
        datatype = _ONNX_TYPES[node.type]
    except KeyError:
        raise ValueError(f"tensor {node.name!r} has unsupported type {node.type}") from None
    # Symbolic or unknown dimensions come back as strings or None; both mean any size.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, datatype, shape)


def _to_text(array: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    # onnxruntime turns `bytes` elements into their repr, so string tensors go in as str.
    try:
        return np.vectorize(bytes.decode, otypes=[object])(array) if array.size else array
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"input {name!r} contains bytes that are not valid UTF-8, "
            "but ONNX string tensors hold UTF-8 text"
        ) from None


def _to_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if not array.size:
        return array
    return np.vectorize(str.encode, otypes=[object])(array)  # type: ignore[no-any-return]
