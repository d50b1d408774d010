"""TensorFlow SavedModels (`saved_model.pb`) and Keras files (`model.keras`), run by tensorflow.

A SavedModel is TF Serving's own layout: `saved_model.pb` and `variables/` in the version
directory, loaded with the `serve` tag as TF Serving does. It serves its `serving_default`
signature, or its only signature, with the signature's input and output keys as tensor names.

A Keras file is loaded in Keras's safe mode, which rejects `Lambda` layers that carry Python
bytecode. It runs through a `tf.function` whose inputs take the model's input names and accept
any number of rows, and whose outputs take the model's output names (the last layer's name for
a Sequential model). `servekit convert keras` exports the same function, so a converted model
keeps these names.

TensorFlow fixes its thread pools when it first runs an op, so `intra_op_threads` and
`inter_op_threads` apply only if the first TensorFlow model of the process sets them. A later
load that requests other values logs a warning and runs with the pools already there. Inputs
and outputs are dense tensors of the types DataType lists, and string tensors are BYTES. The
extra `tensorflow` installs tensorflow-cpu.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import RuntimeNotFoundError, RuntimeOptions

logger = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"
KERAS_FILE = "model.keras"
SERVING_SIGNATURE = "serving_default"
SERVING_TAG = "serve"

_BY_TF_NAME = {member.tf_name: member for member in DataType}
# The (intra, inter) thread counts set in this process, or None before the first attempt.
_thread_settings: tuple[int, int] | None = None
_thread_lock = threading.Lock()


class TensorFlowRuntime:
    """Runs a SavedModel signature or a Keras model through TensorFlow."""

    platform = "tensorflow_savedmodel"
    # A SavedModel may contain ops that read files or call Python (tf.io, tf.py_function), so
    # calls never run on the event loop.
    inline_safe = False
    holds_gil = False

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._function: Any = None
        self._input_names: tuple[str, ...] = ()
        # The loaded object that owns the function's variables.
        self._owner: Any = None

    def load(self, directory: Path) -> Signature:
        try:
            import tensorflow  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "serving a SavedModel or Keras file needs tensorflow: "
                "pip install 'servekit[tensorflow]'",
                name=exc.name,
            ) from None
        configure_threads(self._options.intra_op_threads, self._options.inter_op_threads)
        if (directory / SAVED_MODEL_FILE).is_file():
            owner, key = load_saved_model(directory)
            function = owner.signatures[key]
            self.platform = "tensorflow_savedmodel"
        elif not (directory / KERAS_FILE).is_file():
            raise RuntimeNotFoundError(
                f"no model file found: the tensorflow runtime expects {SAVED_MODEL_FILE} or "
                f"{KERAS_FILE}"
            )
        else:
            owner = load_keras(directory / KERAS_FILE)
            function = keras_function(owner).get_concrete_function()
            self.platform = "tensorflow_keras"
        signature = function_signature(function)
        self._owner = owner
        self._function = function
        self._input_names = signature.input_names
        return signature

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        if self._function is None:
            raise RuntimeError("predict called before load")
        results = call_function(self._function, self._input_names, inputs)
        return {name: results[name] for name in outputs}

    def unload(self) -> None:
        self._function = None
        self._owner = None


def configure_threads(intra_op_threads: int, inter_op_threads: int) -> None:
    """Set TensorFlow's thread pools once per process; 0 lets TensorFlow choose."""
    global _thread_settings
    import tensorflow as tf

    requested = (intra_op_threads, inter_op_threads)
    with _thread_lock:
        if _thread_settings is None:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
                tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
            except RuntimeError:
                # Raised once TensorFlow has run an op, for example in a process that trained
                # or converted a model before loading this one.
                logger.warning(
                    "TensorFlow is already initialized, so it keeps its thread pools "
                    "(requested intra_op_threads=%d, inter_op_threads=%d)",
                    *requested,
                )
            _thread_settings = (
                tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads(),
            )
        elif _thread_settings != requested:
            logger.warning(
                "TensorFlow sets its thread pools once per process: this model runs with "
                "intra_op_threads=%d, inter_op_threads=%d instead of the requested %d, %d",
                *_thread_settings,
                *requested,
            )


def load_saved_model(directory: Path) -> tuple[Any, str]:
    """Load a SavedModel with the `serve` tag; return it and the key of the signature to serve."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(directory), tags=[SERVING_TAG])
    keys = sorted(loaded.signatures.keys())
    if SERVING_SIGNATURE in keys:
        return loaded, SERVING_SIGNATURE
    if len(keys) == 1:
        return loaded, keys[0]
    if not keys:
        raise ValueError(
            f"{SAVED_MODEL_FILE} has no signatures; export it with keras `model.export` or "
            "tf.saved_model.save(..., signatures=...)"
        )
    raise ValueError(
        f"{SAVED_MODEL_FILE} has no {SERVING_SIGNATURE!r} signature and several others "
        f"({', '.join(keys)}); export the one to serve as {SERVING_SIGNATURE!r}"
    )


def load_keras(path: Path) -> Any:
    """Load a `.keras` file in safe mode, with the TensorFlow backend."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"Keras uses the {keras.backend.backend()} backend, but {path.name} is served with "
            "TensorFlow; unset KERAS_BACKEND or set it to tensorflow"
        )
    return keras.saving.load_model(path)


def keras_function(model: Any) -> Any:
    """Wrap a Keras model in a tf.function with named inputs that accept any number of rows.

    The function takes the inputs positionally, in the order of `model.inputs`, and returns a
    dict keyed by the model's output names.
    """
    import keras
    import tensorflow as tf

    try:
        flat_inputs = list(model.inputs)
    except (AttributeError, ValueError):
        flat_inputs = []
    if not flat_inputs:
        raise ValueError(
            "the Keras model has no defined inputs; build it from keras.Input "
            "(a functional or Sequential model) before saving it"
        )
    specs = [_keras_input_spec(tensor) for tensor in flat_inputs]
    _check_unique("input", [spec.name for spec in specs])
    try:
        structure = model.input
    except AttributeError:
        # A Sequential model that was built but never called has no `input` structure.
        structure = flat_inputs[0] if len(flat_inputs) == 1 else flat_inputs
    output_names = _keras_output_names(model)

    def serve(*tensors: Any) -> dict[str, Any]:
        results = model(keras.tree.pack_sequence_as(structure, list(tensors)), training=False)
        flat_results = keras.tree.flatten(results)
        if len(flat_results) != len(output_names):
            raise ValueError(
                f"the Keras model returned {len(flat_results)} outputs, but it declares "
                f"{len(output_names)} ({', '.join(output_names)})"
            )
        return dict(zip(output_names, flat_results, strict=True))

    return tf.function(serve, input_signature=specs)


def _keras_input_spec(tensor: Any) -> Any:
    import tensorflow as tf

    if getattr(tensor, "sparse", False) or getattr(tensor, "ragged", False):
        raise ValueError(
            f"Keras input {tensor.name!r} is sparse or ragged, but servekit serves dense tensors"
        )
    shape = tuple(tensor.shape)
    if not shape:
        raise ValueError(f"Keras input {tensor.name!r} is a scalar, so it has no batch dimension")
    return tf.TensorSpec((None, *shape[1:]), tf.as_dtype(tensor.dtype), name=tensor.name)


def _keras_output_names(model: Any) -> list[str]:
    names = getattr(model, "output_names", None)
    if not names:
        # Sequential models have one output, produced by their last layer.
        names = [model.layers[-1].name] if getattr(model, "layers", None) else []
    if not names:
        raise ValueError("the Keras model has no defined outputs")
    names = [str(name) for name in names]
    _check_unique("output", names)
    return names


def _check_unique(kind: str, names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"the Keras model has several {kind}s named {', '.join(duplicates)}; "
            f"give each {kind} layer a unique name"
        )


def function_signature(function: Any) -> Signature:
    """Describe a concrete function: a SavedModel signature or a traced Keras function."""
    import tensorflow as tf

    positional, keywords = function.structured_input_signature
    input_items = list(keywords.items()) or [(spec.name, spec) for spec in positional]
    inputs = tuple(_tensor_spec(name, spec, "input") for name, spec in input_items)
    outputs = function.structured_outputs
    if not isinstance(outputs, dict):
        raise ValueError("the signature's outputs must be a dict of named tensors")
    # A loaded signature describes its outputs as TensorSpecs, a traced function as tensors.
    output_specs = tuple(
        _tensor_spec(name, tf.TensorSpec(tensor.shape, tensor.dtype), "output")
        if isinstance(tensor, tf.Tensor)
        else _tensor_spec(name, tensor, "output")
        for name, tensor in outputs.items()
    )
    return Signature(inputs=inputs, outputs=output_specs)


def _tensor_spec(name: str, spec: Any, kind: str) -> TensorSpec:
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    if not isinstance(spec, tf.TensorSpec):
        raise ValueError(
            f"{kind} {name!r} is a {type(spec).__name__}, but servekit serves dense tensors only"
        )
    tf_name = types_pb2.DataType.Name(spec.dtype.as_datatype_enum)
    datatype = _BY_TF_NAME.get(tf_name)
    if datatype is None:
        supported = ", ".join(member.tf_name for member in DataType)
        raise ValueError(f"{kind} {name!r} has type {tf_name}; servekit supports {supported}")
    if spec.shape.rank is None:
        raise ValueError(f"{kind} {name!r} has an unknown rank; export it with a fixed rank")
    shape = tuple(-1 if size is None else int(size) for size in spec.shape.as_list())
    return TensorSpec(name, datatype, shape)


def call_function(
    function: Any, input_names: Sequence[str], inputs: dict[str, np.ndarray[Any, Any]]
) -> dict[str, np.ndarray[Any, Any]]:
    """Call a concrete function on numpy arrays and return its outputs as numpy arrays.

    SavedModel signatures take their inputs by keyword, traced Keras functions by position.
    """
    import tensorflow as tf

    tensors = [tf.convert_to_tensor(inputs[name]) for name in input_names]
    positional, _ = function.structured_input_signature
    if positional:
        results = function(*tensors)
    else:
        results = function(**dict(zip(input_names, tensors, strict=True)))
    return {name: tensor.numpy() for name, tensor in results.items()}
