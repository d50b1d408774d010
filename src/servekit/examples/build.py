"""Rebuild the example models from the digits data that scikit-learn ships.

    python -m servekit.examples.build [OUTPUT_DIR]

Needs the `dev` extra (scikit-learn, skl2onnx, onnx, scipy) at the versions it pins. With those,
the ONNX files come out byte for byte the same as the committed ones on the same kind of CPU;
elsewhere OpenBLAS's kernels round differently, and the weights differ in the last digits.
Nothing is downloaded.

- `digits/1/model.onnx`: standard scaling and logistic regression on the 64 pixel values exactly
  as `sklearn.datasets.load_digits().data` gives them (floats 0 to 16). Input `pixels`
  FP32 [-1, 64]; outputs `label` INT64 [-1] and `probabilities` FP32 [-1, 10].
- `mnist_mlp/1/model.onnx`: the classic MLP of the TensorFlow tutorials, 784 -> Dense 512 ReLU
  -> Dense 10 softmax, trained on the same digits upscaled to 28x28 (bilinear) and scaled to
  0..1. Input `images` FP32 [-1, 784]; output `probabilities` FP32 [-1, 10].

Both train on 75% of the digits; `digits_split` returns the same split for evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from servekit.examples import EXAMPLE_REPOSITORY

SEED = 0
OPSET = 17
Array = np.ndarray[Any, Any]


def digits_split() -> tuple[Array, Array, Array, Array]:
    """Return train pixels, held-out pixels, train labels and held-out labels (float32 pixels)."""
    digits = load_digits()
    pixels = digits.data.astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return train_x, test_x, train_y, test_y


def upscale_to_mnist(pixels: Array) -> Array:
    """Turn 8x8 digits (0 to 16) into 28x28 images flattened to 784 values in 0..1."""
    images = pixels.reshape(-1, 8, 8) / 16.0
    upscaled: Array = ndimage.zoom(images, (1, 3.5, 3.5), order=1)
    return np.clip(upscaled, 0.0, 1.0).reshape(-1, 784).astype(np.float32)


def build_digits(train_x: Array, train_y: Array) -> onnx.ModelProto:
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pipeline.fit(train_x, train_y)
    classifier = pipeline.steps[-1][1]
    model: onnx.ModelProto = to_onnx(
        pipeline,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},
        target_opset=OPSET,
    )
    return model


def build_mnist_mlp(train_x: Array, train_y: Array) -> onnx.ModelProto:
    mlp = MLPClassifier(hidden_layer_sizes=(512,), max_iter=60, random_state=SEED)
    mlp.fit(upscale_to_mnist(train_x), train_y)
    weights = [
        numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(mlp.coefs_)
    ]
    biases = [
        numpy_helper.from_array(b.astype(np.float32), f"b{i}")
        for i, b in enumerate(mlp.intercepts_)
    ]
    nodes = [
        helper.make_node("MatMul", ["images", "w0"], ["dense0"]),
        helper.make_node("Add", ["dense0", "b0"], ["biased0"]),
        helper.make_node("Relu", ["biased0"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w1"], ["dense1"]),
        helper.make_node("Add", ["dense1", "b1"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_mlp",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
        initializer=weights + biases,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def build(output: Path) -> None:
    train_x, _, train_y, _ = digits_split()
    # One BLAS thread makes the floating-point sums, and so the weights, repeatable.
    with threadpool_limits(limits=1):
        models = {
            "digits": build_digits(train_x, train_y),
            "mnist_mlp": build_mnist_mlp(train_x, train_y),
        }
    for name, model in models.items():
        onnx.checker.check_model(model)
        path = output / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.SerializeToString())
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE_REPOSITORY)
