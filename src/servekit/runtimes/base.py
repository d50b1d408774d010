"""The runtime contract and the choice of runtime for a version directory."""

from __future__ import annotations

from collections.abc import Sequence
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


class Runtime(Protocol):
    """Loads one version's files and runs inference on them.

    `predict` is called from a worker thread, never from the event loop, and only after `load`.
    """

    # V2 platform string, such as "onnx_onnxv1".
    platform: str
    # True when predict only computes (no I/O, no sleeping), so short calls may run on the
    # event loop thread.
    inline_safe: bool

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


def runtime_for(directory: Path, options: RuntimeOptions) -> Runtime:
    """Pick the runtime for a version directory from the model file it contains."""
    # Imported here so that a runtime's heavy dependencies load only when it is used.
    from servekit.runtimes.onnx import OnnxRuntime
    from servekit.runtimes.python import PythonRuntime
    from servekit.runtimes.tflite import TFLiteRuntime

    candidates: list[tuple[str, type[OnnxRuntime] | type[PythonRuntime] | type[TFLiteRuntime]]]
    candidates = [
        (OnnxRuntime.model_file, OnnxRuntime),
        (PythonRuntime.model_file, PythonRuntime),
        (TFLiteRuntime.model_file, TFLiteRuntime),
    ]
    for file_name, runtime_class in candidates:
        if (directory / file_name).is_file():
            return runtime_class(options)
    from servekit.runtimes.sklearn import MODEL_FILES, SklearnRuntime

    pickles = [name for name in MODEL_FILES if (directory / name).is_file()]
    if pickles and options.allow_pickle:
        return SklearnRuntime(options)
    if pickles:
        raise RuntimeNotFoundError(
            f"{pickles[0]} is a pickle, and loading it would run code from the file; start the "
            "server with --allow_pickle if you trust it, or convert it with servekit convert"
        )
    expected = " or ".join([*(file_name for file_name, _ in candidates), *MODEL_FILES])
    raise RuntimeNotFoundError(f"no model file found: expected {expected}")
