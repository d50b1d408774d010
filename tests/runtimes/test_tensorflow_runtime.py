"""TensorFlow SavedModels and Keras files: served outputs equal the Keras model's in process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from servekit.runtimes.base import RuntimeOptions
from tests.conftest import ServerProcess, assert_json_error

pytestmark = [
    pytest.mark.extras,
    # Keras 3.15 reads TensorFlow 2.21 variables with np.array(copy=False), which numpy 2 warns
    # about when it saves a model.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def train_digits_mlp() -> Any:
    """Train a small Keras MLP on scikit-learn's digits (pixels scaled to [0, 1])."""
    import keras

    keras.utils.set_random_seed(0)
    digits = load_digits()
    features = (digits.data[:1500] / 16.0).astype(np.float32)
    inputs = keras.Input(shape=(64,), name="pixels")
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(features, digits.target[:1500], epochs=20, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("tensorflow_models")
    model = train_digits_mlp()
    model.export(str(root / "digits_saved" / "1"), verbose=False)
    (root / "digits_keras" / "1").mkdir(parents=True)
    model.save(root / "digits_keras" / "1" / "model.keras")
    return root, model


@pytest.fixture(scope="module")
def server(repository: tuple[Path, Any]) -> Iterator[ServerProcess]:
    process = ServerProcess("--model_repository", str(repository[0]))
    _ = process.url
    yield process
    process.stop()


@pytest.mark.parametrize(
    ("name", "platform", "output"),
    [
        ("digits_saved", "tensorflow_savedmodel", "output_0"),
        ("digits_keras", "tensorflow_keras", "probabilities"),
    ],
)
def test_model_over_both_protocols(
    repository: tuple[Path, Any], server: ServerProcess, name: str, platform: str, output: str
) -> None:
    rows = (load_digits().data[1500:1530] / 16.0).astype(np.float32)
    expected = repository[1](rows, training=False).numpy()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        metadata = client.get(f"/v2/models/{name}").json()
        tfserving = client.post(
            f"/v1/models/{name}:predict", json={"instances": rows.tolist()}
        ).json()
        v2 = client.post(
            f"/v2/models/{name}/infer",
            json={"inputs": [{"name": "pixels", "shape": [30, 64], "datatype": "FP32",
                              "data": rows.ravel().tolist()}]},
        ).json()  # fmt: skip
    assert metadata["platform"] == platform
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": output, "datatype": "FP32", "shape": [-1, 10]}]
    served = np.array(tfserving["predictions"], np.float32)
    assert np.allclose(served, expected, atol=1e-5)
    assert v2["outputs"][0]["name"] == output
    assert v2["outputs"][0]["shape"] == [30, 10]
    assert np.allclose(np.array(v2["outputs"][0]["data"], np.float32), expected.ravel(), atol=1e-5)
    accuracy = np.mean(expected.argmax(axis=1) == load_digits().target[1500:1530])
    assert accuracy > 0.8


@pytest.mark.parametrize("name", ["digits_saved", "digits_keras"])
def test_wrong_shape_is_rejected(server: ServerProcess, name: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        tfserving = client.post(f"/v1/models/{name}:predict", json={"instances": [[0.5] * 10]})
        v2 = client.post(
            f"/v2/models/{name}/infer",
            json={"inputs": [{"name": "pixels", "shape": [1, 10], "datatype": "FP32",
                              "data": [0.5] * 10}]},
        )  # fmt: skip
    assert "[-1, 64]" in assert_json_error(tfserving, 400)
    assert "[-1, 64]" in assert_json_error(v2, 400)


def save_module(path: Path, signatures: dict[str, Any]) -> None:
    import tensorflow as tf

    module = tf.Module()
    for key, function in signatures.items():
        setattr(module, key, function)
    tf.saved_model.save(module, str(path), signatures=signatures)


def test_string_tensors_are_bytes(tmp_path: Path) -> None:
    import tensorflow as tf

    from servekit.runtimes.tensorflow import TensorFlowRuntime

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def shout(text: Any) -> dict[str, Any]:
        return {"upper": tf.strings.upper(text), "length": tf.strings.length(text)}

    save_module(tmp_path, {"serving_default": shout})
    runtime = TensorFlowRuntime(RuntimeOptions())
    signature = runtime.load(tmp_path)
    assert [(spec.name, spec.datatype.v2_name, spec.shape) for spec in signature.inputs] == [
        ("text", "BYTES", (-1,))
    ]
    assert {spec.name: spec.datatype.v2_name for spec in signature.outputs} == {
        "upper": "BYTES",
        "length": "INT32",
    }
    outputs = runtime.predict(
        {"text": np.array([b"abc", b"servekit"], dtype=object)}, ["upper", "length"]
    )
    assert outputs["upper"].tolist() == [b"ABC", b"SERVEKIT"]
    assert outputs["length"].tolist() == [3, 8]


def test_signature_choice(tmp_path: Path) -> None:
    import tensorflow as tf

    from servekit.runtimes.tensorflow import TensorFlowRuntime

    spec = tf.TensorSpec([None, 2], tf.float32, name="x")
    double = tf.function(lambda x: {"y": x * 2}, input_signature=[spec])
    negate = tf.function(lambda x: {"y": -x}, input_signature=[spec])

    save_module(tmp_path / "only", {"double": double})
    runtime = TensorFlowRuntime(RuntimeOptions())
    runtime.load(tmp_path / "only")
    result = runtime.predict({"x": np.ones((1, 2), np.float32)}, ["y"])
    assert result["y"].tolist() == [[2.0, 2.0]]

    save_module(tmp_path / "two", {"double": double, "negate": negate})
    with pytest.raises(ValueError, match="no 'serving_default' signature") as error:
        TensorFlowRuntime(RuntimeOptions()).load(tmp_path / "two")
    assert "double, negate" in str(error.value)


def test_keras_input_and_output_names(tmp_path: Path) -> None:
    import keras

    from servekit.runtimes.tensorflow import TensorFlowRuntime

    keras.utils.set_random_seed(0)
    image = keras.Input(shape=(3,), name="image")
    extra = keras.Input(shape=(2,), name="extra")
    joined = keras.layers.Concatenate()([image, extra])
    score = keras.layers.Dense(1, name="score")(joined)
    embedding = keras.layers.Dense(4, name="embedding")(joined)
    functional = keras.Model({"image": image, "extra": extra}, [score, embedding])
    sequential = keras.Sequential(
        [keras.Input(shape=(3,), name="rows"), keras.layers.Dense(2, name="logits")]
    )
    rows = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    extras = np.random.default_rng(1).random((5, 2)).astype(np.float32)

    (tmp_path / "functional").mkdir()
    functional.save(tmp_path / "functional" / "model.keras")
    runtime = TensorFlowRuntime(RuntimeOptions())
    signature = runtime.load(tmp_path / "functional")
    assert sorted(signature.input_names) == ["extra", "image"]
    assert signature.output_names == ("score", "embedding")
    embedding_spec = signature.output("embedding")
    assert embedding_spec is not None
    assert embedding_spec.shape == (-1, 4)
    outputs = runtime.predict({"image": rows, "extra": extras}, ["score", "embedding"])
    expected = functional({"image": rows, "extra": extras}, training=False)
    assert np.allclose(outputs["score"], expected[0].numpy(), atol=1e-6)
    assert np.allclose(outputs["embedding"], expected[1].numpy(), atol=1e-6)

    (tmp_path / "sequential").mkdir()
    sequential.save(tmp_path / "sequential" / "model.keras")
    runtime = TensorFlowRuntime(RuntimeOptions())
    signature = runtime.load(tmp_path / "sequential")
    assert signature.input_names == ("rows",)
    assert signature.output_names == ("logits",)
    outputs = runtime.predict({"rows": rows}, ["logits"])
    assert np.allclose(outputs["logits"], sequential(rows, training=False).numpy(), atol=1e-6)
