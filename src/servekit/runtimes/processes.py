"""Instances of a runtime in processes of their own, for runtimes that hold the GIL.

A Python model (`model.py`) or a pickled scikit-learn estimator spends much of a call running
Python code, which holds the interpreter lock: two instances in threads of one process take
turns instead of computing together. `ProcessInstances` starts one process per instance and
loads the model in each. It uses the `spawn` method, so no lock or thread of the server is
copied into a child. Every call goes to an idle process over a pipe, with inputs and outputs
pickled.

A process that dies mid-call (a crash in native code, or the kernel's out-of-memory killer)
fails that call with a 500 and is replaced before the instance takes the next call, so one bad
request cannot take the version down. Processes are daemons: they end with the server.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.errors import InternalError, ServekitError
from servekit.core.types import Signature
from servekit.runtimes.base import Runtime, RuntimeOptions, runtime_class

logger = logging.getLogger(__name__)
_STOP_SECONDS = 5.0


class ProcessInstances:
    """Runs `count` copies of a runtime, one per process, behind the runtime interface."""

    holds_gil = False
    # Every call crosses a pipe, so none is short enough for the event loop.
    inline_safe = False

    def __init__(self, runtime: Runtime, options: RuntimeOptions, count: int) -> None:
        self.platform = runtime.platform
        self._target = f"{type(runtime).__module__}:{type(runtime).__qualname__}"
        self._options = options
        self._count = count
        self._directory: Path | None = None
        self._idle: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        self._instances: list[_Instance] = []
        self._lock = threading.Lock()

    def load(self, directory: Path) -> Signature:
        self._directory = directory
        signature: Signature | None = None
        try:
            for _ in range(self._count):
                instance, signature = self._start()
                self._idle.put(instance)
        except BaseException:
            self.unload()
            raise
        assert signature is not None
        return signature

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        instance = self._idle.get()
        try:
            instance.connection.send((inputs, tuple(outputs)))
            ok, value = instance.connection.recv()
        except (EOFError, OSError):
            # The pipe closes as the process dies; wait a moment for its exit code.
            instance.process.join(1.0)
            code = instance.process.exitcode
            logger.error("a model process (pid %s) ended mid-call, code %s; starting another",
                         instance.process.pid, code)  # fmt: skip
            instance = self._replace(instance)
            raise InternalError(
                "the model process ended during the call; it was restarted"
            ) from None
        finally:
            self._idle.put(instance)
        if not ok:
            raise value
        results: dict[str, np.ndarray[Any, Any]] = value
        return results

    def unload(self) -> None:
        with self._lock:
            instances, self._instances = self._instances, []
        for instance in instances:
            instance.stop()

    def _start(self) -> tuple[_Instance, Signature]:
        assert self._directory is not None
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(self._target, self._options, self._directory, child),
            name=f"servekit-model-{self._directory.parent.name}-{self._directory.name}",
            daemon=True,
        )
        process.start()
        child.close()
        instance = _Instance(process, parent)
        with self._lock:
            self._instances.append(instance)
        try:
            ok, value = parent.recv()
        except EOFError:
            raise RuntimeError(
                f"the model process ended while loading (exit code {process.exitcode})"
            ) from None
        if not ok:
            raise value
        signature: Signature = value
        return instance, signature

    def _replace(self, instance: _Instance) -> _Instance:
        """Stop a failed instance and start its successor; keep the old one if that fails."""
        with self._lock:
            if instance in self._instances:
                self._instances.remove(instance)
        instance.stop()
        try:
            return self._start()[0]
        except Exception:
            logger.exception("could not restart the model process")
            return instance


class _Instance:
    def __init__(self, process: BaseProcess, connection: Connection) -> None:
        self.process = process
        self.connection = connection

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(None)
        self.process.join(_STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def _serve(target: str, options: RuntimeOptions, directory: Path, connection: Connection) -> None:
    """Load the model, then run calls until a stop message arrives or the pipe closes."""
    # Ctrl-C reaches the whole process group; the server decides when its models stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runtime = runtime_class(target)(options)
        signature = runtime.load(directory)
    except Exception as exc:
        connection.send((False, _portable(exc)))
        return
    connection.send((True, signature))
    while True:
        try:
            message = connection.recv()
        except EOFError:
            break
        if message is None:
            break
        inputs, outputs = message
        try:
            connection.send((True, runtime.predict(inputs, outputs)))
        except Exception as exc:
            connection.send((False, _portable(exc)))
    runtime.unload()


def _portable(exc: Exception) -> Exception:
    """Return an exception that survives pickling: servekit's own errors, or others as text.

    Other exceptions may carry unpicklable values, so their traceback becomes the message of a
    RuntimeError, which the server logs.
    """
    if isinstance(exc, ServekitError) and type(exc).__init__ is ServekitError.__init__:
        return exc
    return RuntimeError("".join(traceback.format_exception(exc)).rstrip())
