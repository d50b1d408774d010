"""The runtime contract and the choice of runtime for a version directory."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from servekit.core.types import Signature


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Thread settings passed to every runtime; 0 lets the runtime choose."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Whether idle intra-op threads busy-wait for the next call instead of sleeping.
    spinning: bool = False
    # Whether pickled models (which run code when loaded) may be loaded.
    allow_pickle: bool = False
    # A name from RUNTIME_NAMES, or None to choose by the model files present.
    runtime: str | None = None


class Runtime(Protocol):
    """Loads one version's files and runs inference on them.

    `predict` is called from a worker thread, never from the event loop, and only after `load`.
    """

    # V2 platform string, such as "onnx_onnxv1".
    platform: str
    # True when predict only computes (no I/O, no sleeping), so short calls may run on the
    # event loop thread.
    inline_safe: bool
    # True when predict runs Python code under the GIL for most of its time, so instances of
    # the model compute in parallel only in separate processes.
    holds_gil: bool

    def load(self, directory: Path) -> Signature:
        """Load the model files in `directory` and return their signature."""
        ...

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Compute the named outputs from validated inputs."""
        ...

    def unload(self) -> None:
        """Release the model's memory; `predict` is not called afterwards."""
        ...


class RuntimeNotFoundError(Exception):
    """A version directory holds no file that any runtime loads."""


class PickleNotAllowedError(Exception):
    """A model file that runs code when loaded, in a server started without allow_pickle."""


# Model file -> "module:class" of the runtime that loads it, in the order they are looked for.
# Modules are imported only when chosen, so a runtime's heavy dependencies load only when used.
# A model.py comes first: it is custom code that may itself load the other files.
RUNTIMES: dict[str, str] = {
    "model.py": "servekit.runtimes.python:PythonRuntime",
    "model.onnx": "servekit.runtimes.onnx:OnnxRuntime",
    # PyTorch files load only with allow_pickle; the runtime raises the load error.
    "model.pt": "servekit.runtimes.torch:TorchScriptRuntime",
    "model.pt2": "servekit.runtimes.torch:TorchExportRuntime",
    "model.tflite": "servekit.runtimes.tflite:TFLiteRuntime",
    "saved_model.pb": "servekit.runtimes.tensorflow:TensorFlowRuntime",
    "model.keras": "servekit.runtimes.tensorflow:TensorFlowRuntime",
}
# Pickle files, loaded only with allow_pickle because unpickling runs code from the file.
PICKLE_FILES = ("model.joblib", "model.pkl")
PICKLE_RUNTIME = "servekit.runtimes.sklearn:SklearnRuntime"
# The names that `runtime:` in servekit.yaml accepts, to choose a runtime whatever the files.
RUNTIME_NAMES: dict[str, str] = {
    "onnx": RUNTIMES["model.onnx"],
    "python": RUNTIMES["model.py"],
    "torchscript": RUNTIMES["model.pt"],
    "torch_export": RUNTIMES["model.pt2"],
    "tflite": RUNTIMES["model.tflite"],
    "tensorflow": RUNTIMES["saved_model.pb"],
    "sklearn": PICKLE_RUNTIME,
}


def runtime_for(directory: Path, options: RuntimeOptions) -> Runtime:
    """Pick the runtime for a version directory: the one named in options, or by its files."""
    if options.runtime is not None:
        if options.runtime == "sklearn" and not options.allow_pickle:
            raise PickleNotAllowedError(
                "the sklearn runtime loads pickles, which run code from the file; start the "
                "server with --allow_pickle if you trust them"
            )
        return runtime_class(RUNTIME_NAMES[options.runtime])(options)
    for file_name, target in RUNTIMES.items():
        if (directory / file_name).exists():
            return runtime_class(target)(options)
    pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
    if pickles and options.allow_pickle:
        return runtime_class(PICKLE_RUNTIME)(options)
    if pickles:
        raise PickleNotAllowedError(
            f"{pickles[0]} is a pickle, and loading it would run code from the file; start the "
            "server with --allow_pickle if you trust it, or convert it with servekit convert"
        )
    expected = " or ".join([*RUNTIMES, *PICKLE_FILES])
    raise RuntimeNotFoundError(f"no model file found: expected {expected}")


def runtime_class(target: str) -> Callable[[RuntimeOptions], Runtime]:
    module_name, _, class_name = target.partition(":")
    runtime_class: Callable[[RuntimeOptions], Runtime]
    runtime_class = getattr(importlib.import_module(module_name), class_name)
    return runtime_class
