"""Build the benchmark MLPs with the onnx helper API and fixed random weights.

- `mlp`: 784 -> Dense 512 ReLU -> Dense 10 softmax (the classic TensorFlow tutorial MLP).
- `heavy_mlp`: 784 -> 4096 ReLU -> 4096 ReLU -> 10 softmax, where compute dominates.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = {"mlp": [784, 512, 10], "heavy_mlp": [784, 4096, 4096, 10]}


def build_mlp(name: str, sizes: list[int], seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current = "x"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = np.zeros(fan_out, dtype=np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"]))
        nodes.append(helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]))
        last = index == len(sizes) - 2
        current = f"a{index}" if last else f"h{index}"
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{index}"], [current]))
    nodes.append(helper.make_node("Softmax", [current], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, sizes[-1]])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_repository(root: Path) -> Path:
    """Write both models as version 1 under `root` and return it."""
    for name, sizes in LAYERS.items():
        path = root / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build_mlp(name, sizes).SerializeToString())
    return root
