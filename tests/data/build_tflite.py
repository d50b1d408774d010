"""Rebuild tests/data/digits_mlp.tflite: a small MLP on scikit-learn's digits, as TFLite.

Needs tensorflow and scikit-learn (for example the environment of `make test-compat` plus
scikit-learn): `python tests/data/build_tflite.py`. The weights come from a fixed seed, so the
file is the same on every run with the same tensorflow version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

OUTPUT = Path(__file__).with_name("digits_mlp.tflite")


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    data = load_digits()
    features = (data.data / 16.0).astype(np.float32)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(64,), name="pixels"),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(features[:1500], data.target[:1500], epochs=20, batch_size=64, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    OUTPUT.write_bytes(converter.convert())
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
