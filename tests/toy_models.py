"""Small models with known behaviour, written into a temporary repository for the tests.

ONNX models are built with the onnx helper API and run by ONNX Runtime. Models that need byte
strings or every datatype are plain Python models (`model.py`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


def _tensor(name: str, element_type: int, shape: list[int | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, element_type, shape)


def _save(
    root: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
    version: int = 1,
) -> None:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _const(name: str, values: list[float] | list[int], dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def write_adder(root: Path, name: str = "adder", version: int = 1, amount: float = 1.0) -> None:
    """`y = x + amount` on FP32 [-1, 3]."""
    _save(
        root,
        name,
        [helper.make_node("Add", ["x", "amount"], ["y"])],
        [_tensor("x", FLOAT, [None, 3])],
        [_tensor("y", FLOAT, [None, 3])],
        [_const("amount", [amount], np.float32)],
        version,
    )


def write_twoin(root: Path, with_constant: bool = False) -> None:
    """`sum[i] = a[i,0] + a[i,1] + b[i]` and `prob = softmax(a)`; optionally a constant `const`."""
    nodes = [
        helper.make_node("ReduceSum", ["a", "axis1"], ["a_sum"], keepdims=0),
        helper.make_node("Cast", ["b"], ["b_float"], to=FLOAT),
        helper.make_node("Add", ["a_sum", "b_float"], ["sum"]),
        helper.make_node("Softmax", ["a"], ["prob"], axis=1),
    ]
    outputs = [_tensor("sum", FLOAT, [None]), _tensor("prob", FLOAT, [None, 2])]
    initializers = [_const("axis1", [1], np.int64)]
    if with_constant:
        nodes.append(helper.make_node("Identity", ["const_value"], ["const"]))
        outputs.append(_tensor("const", FLOAT, [2]))
        initializers.append(_const("const_value", [0.5, 1.5], np.float32))
    _save(
        root,
        "twoin_const" if with_constant else "twoin",
        nodes,
        [_tensor("a", FLOAT, [None, 2]), _tensor("b", INT64, [None])],
        outputs,
        initializers,
    )


def write_seqlen(root: Path, name: str = "seqlen") -> None:
    """`n[i]` = number of non-zero tokens in row i, so zero padding does not change it."""
    _save(
        root,
        name,
        [
            helper.make_node("Equal", ["tokens", "zero"], ["is_zero"]),
            helper.make_node("Not", ["is_zero"], ["non_zero"]),
            helper.make_node("Cast", ["non_zero"], ["counts"], to=INT64),
            helper.make_node("ReduceSum", ["counts", "axis1"], ["n"], keepdims=0),
        ],
        [_tensor("tokens", INT64, [None, None])],
        [_tensor("n", INT64, [None])],
        [_const("zero", [0], np.int64), _const("axis1", [1], np.int64)],
    )


def write_unary(root: Path, name: str, op: str, factor: float | None = None) -> None:
    """A one-input FP32 [-1] model: `y = op(x)`, or `y = x * factor` for op Mul."""
    inputs = ["x", "factor"] if factor is not None else ["x"]
    initializers = [_const("factor", [factor], np.float32)] if factor is not None else []
    _save(
        root,
        name,
        [helper.make_node(op, inputs, ["y"])],
        [_tensor("x", FLOAT, [None])],
        [_tensor("y", FLOAT, [None])],
        initializers,
    )


def write_half_plus_two(root: Path) -> None:
    """`y = 0.5 * x + 2` on FP32 [-1], a regressor."""
    _save(
        root,
        "hp",
        [
            helper.make_node("Mul", ["x", "half"], ["scaled"]),
            helper.make_node("Add", ["scaled", "two"], ["y"]),
        ],
        [_tensor("x", FLOAT, [None])],
        [_tensor("y", FLOAT, [None])],
        [_const("half", [0.5], np.float32), _const("two", [2.0], np.float32)],
    )


def write_filter(root: Path) -> None:
    """`y` = the positive elements of `x`, so a row of negatives gives zero rows."""
    _save(
        root,
        "filter",
        [
            helper.make_node("Greater", ["x", "zero"], ["keep"]),
            helper.make_node("Compress", ["x", "keep"], ["y"], axis=0),
        ],
        [_tensor("x", FLOAT, [None])],
        [_tensor("y", FLOAT, [None])],
        [_const("zero", [0.0], np.float32)],
    )


def write_strings(root: Path) -> None:
    """An ONNX string tensor passed through unchanged, to exercise ONNX Runtime's strings."""
    _save(
        root,
        "strings",
        [helper.make_node("Identity", ["text"], ["copy"])],
        [_tensor("text", TensorProto.STRING, [None])],
        [_tensor("copy", TensorProto.STRING, [None])],
    )


ECHO_SOURCE = """
import numpy as np


class Model:
    inputs = [("text", "BYTES", {shape})]
    outputs = [("text_bytes", "BYTES", {shape}), ("length", "INT64", {shape})]

    def predict(self, inputs):
        text = inputs["text"]
        lengths = np.array([len(item) for item in text.ravel()], dtype=np.int64)
        return {{"text_bytes": text, "length": lengths.reshape(text.shape)}}
"""

ALL_TYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

IDENTITY_SOURCE = """
class Model:
    inputs = [(name.lower(), name, [-1]) for name in {types!r}]
    outputs = [(name.lower() + "_out", name, [-1]) for name in {types!r}]

    def predict(self, inputs):
        return {{name + "_out": array for name, array in inputs.items()}}
"""


def _write_python(root: Path, name: str, source: str) -> None:
    path = root / name / "1" / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def write_repository(root: Path) -> Path:
    """Write every toy model under `root` and return it."""
    write_adder(root)
    write_twoin(root)
    write_twoin(root, with_constant=True)
    write_seqlen(root)
    write_unary(root, "logm", "Log")
    write_unary(root, "tiny", "Mul", factor=1e-6)
    write_filter(root)
    write_half_plus_two(root)
    write_strings(root)
    _write_python(root, "echo", ECHO_SOURCE.format(shape=[-1]))
    _write_python(root, "echo2d", ECHO_SOURCE.format(shape=[-1, 1]))
    _write_python(root, "identity", IDENTITY_SOURCE.format(types=ALL_TYPES))
    # FP16 has no typed field in V2 gRPC, so a typed request cannot feed `identity`.
    typed = [name for name in ALL_TYPES if name != "FP16"]
    _write_python(root, "identity_typed", IDENTITY_SOURCE.format(types=typed))
    return root


SLOW_SOURCE = """
import time

import numpy as np


class Model:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def predict(self, inputs):
        x = inputs["x"]
        time.sleep(float(x[0, 0]))
        return {"y": x}
"""

# Returns, for every row, the number of rows in the call that computed it, so callers can see
# how large a batch reached the model.
ROWCOUNT_SOURCE = """
import numpy as np


class Model:
    inputs = [("x", "FP32", [-1, 3])]
    outputs = [("y", "FP32", [-1, 3]), ("rows", "INT64", [-1])]

    def predict(self, inputs):
        x = inputs["x"]
        return {"y": x + 1, "rows": np.full(len(x), len(x), dtype=np.int64)}
"""


def write_python_model(root: Path, name: str, source: str, config: str = "") -> None:
    """Write a Python model, with an optional servekit.yaml."""
    _write_python(root, name, source)
    if config:
        (root / name / "servekit.yaml").write_text(textwrap.dedent(config))


def write_batching_repository(root: Path) -> Path:
    """Write the models of the batching tests, each with its own servekit.yaml."""
    write_seqlen(root)
    (root / "seqlen" / "servekit.yaml").write_text(
        "batching: {max_batch_size: 8, max_queue_delay_ms: 50}\n"
    )
    write_seqlen(root, "seqlen_padded")
    (root / "seqlen_padded" / "servekit.yaml").write_text(
        "batching:\n"
        "  max_batch_size: 8\n"
        "  max_queue_delay_ms: 50\n"
        "  padding: {tokens: {value: 0, axes: [1]}}\n"
    )
    write_twoin(root)
    (root / "twoin" / "servekit.yaml").write_text("batching: {max_queue_delay_ms: 50}\n")
    write_python_model(
        root, "rowcount", ROWCOUNT_SOURCE, "batching: {max_batch_size: 4, max_queue_delay_ms: 50}\n"
    )
    write_python_model(root, "slow", SLOW_SOURCE, "batching: {enabled: false, max_queue_size: 8}\n")
    write_python_model(root, "slow_pair", SLOW_SOURCE, "instances: 2\nbatching: {enabled: false}\n")
    return root
