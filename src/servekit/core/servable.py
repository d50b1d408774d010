"""A servable: one loaded version of a model, with its lifecycle state."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from servekit.batching.batcher import Batcher, BatcherMetrics
from servekit.batching.config import BatchingConfig
from servekit.core.errors import (
    InternalError,
    InvalidInputError,
    ServekitError,
    UnavailableError,
    shorten,
)
from servekit.core.options import ServableOptions
from servekit.core.types import InferenceRequest, InferenceResponse, Signature
from servekit.core.warmup import run_warmup
from servekit.runtimes.base import (
    PickleNotAllowedError,
    Runtime,
    RuntimeNotFoundError,
    runtime_for,
)
from servekit.runtimes.processes import ProcessInstances

logger = logging.getLogger(__name__)
# How long a retired version waits for its routed requests, and how often it checks.
_DRAIN_SECONDS = 30.0
_DRAIN_POLL_SECONDS = 0.01


class Observer(Protocol):
    """A histogram child (or anything else) that records a duration in seconds."""

    def observe(self, amount: float) -> None: ...


@dataclasses.dataclass(slots=True)
class ServableMetrics:
    """Metric children labelled with one servable's model and version."""

    inference_seconds: Observer
    batcher: BatcherMetrics


class State(enum.IntEnum):
    """Lifecycle states, with TF Serving's names and numbers."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """The state of one version and, after a failed load, why it failed."""

    version: int
    state: State
    error_code: str = "OK"
    error_message: str = ""


class Servable:
    """Runtime + signature + state + batcher for one version.

    `load` and `unload` block and run outside the event loop. `infer` is called on the loop and
    hands the computation to the batcher, which runs it on this servable's instance threads or,
    for batches that take well under a millisecond, on the loop itself.
    """

    def __init__(
        self,
        model_name: str,
        version: int,
        directory: Path,
        options: ServableOptions,
        metrics: ServableMetrics,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.directory = directory
        self.state = State.START
        self.error_code = "OK"
        self.error_message = ""
        self.load_seconds = 0.0
        self.platform = ""
        self._runtime: Runtime | None = None
        self._signature: Signature | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: Batcher | None = None
        self._batchable = False
        # Requests routed to this version that still await a response (event loop only).
        self._leases = 0
        self._options = options
        self._metrics = metrics

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise UnavailableError(self._unavailable_message())
        return self._signature

    @property
    def status(self) -> VersionStatus:
        return VersionStatus(self.version, self.state, self.error_code, self.error_message)

    def load(self) -> None:
        """Load the version's files; on failure, end in END with the error kept for status."""
        self.state = State.LOADING
        started = time.monotonic()
        runtime = self._load_runtime()
        if runtime is None:
            return
        self._start(runtime)
        self.load_seconds = time.monotonic() - started
        if self.state is State.LOADING:
            self.state = State.AVAILABLE
            logger.info(
                "loaded model %s version %d in %.2f s",
                self.model_name,
                self.version,
                self.load_seconds,
            )

    def _load_runtime(self) -> Runtime | None:
        """Load the files and run the warmup; return None after recording a failure."""
        runtime: Runtime | None = None
        try:
            runtime = runtime_for(self.directory, self._options.runtime)
            if self._in_processes(runtime):
                runtime = ProcessInstances(runtime, self._options.runtime, self._options.instances)
            self._signature = runtime.load(self.directory)
            # Warmup runs before the version is AVAILABLE, so a model that loads but cannot
            # compute (or computes wrong outputs) never takes traffic.
            warmed = run_warmup(self.directory, self._signature, runtime.predict)
            logger.debug(
                "warmed up model %s version %d with %d requests",
                self.model_name,
                self.version,
                warmed,
            )
        except Exception as exc:
            # The message reaches clients through the status API, so the server's own
            # directory layout is replaced by the model and version it stands for.
            reason = str(exc).replace(str(self.directory), f"{self.model_name}/{self.version}")
            code = "UNKNOWN"
            if isinstance(exc, RuntimeNotFoundError):
                code = "NOT_FOUND"
            elif isinstance(exc, PickleNotAllowedError):
                code = "FAILED_PRECONDITION"
            if runtime is not None:
                runtime.unload()
            self.fail(f"failed to load: {reason}", code)
            return None
        return runtime

    def _in_processes(self, runtime: Runtime) -> bool:
        kind = self._options.instance_kind
        if kind == "auto":
            return runtime.holds_gil and self._options.instances > 1
        return kind == "process"

    def _start(self, runtime: Runtime) -> None:
        """Create the instance threads and the batcher in front of a loaded runtime."""
        signature = self.signature
        self._batchable = all(spec.shape and spec.shape[0] == -1 for spec in signature.inputs)
        try:
            batching = self._batching_config(signature, runtime.inline_safe)
        except ValueError as exc:
            runtime.unload()
            self.fail(f"invalid batching settings: {exc}")
            return
        self._runtime = runtime
        self.platform = runtime.platform
        instances = self._options.instances
        self._executor = ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix=f"servekit-{self.model_name}-{self.version}"
        )
        self._batcher = Batcher(
            self.model_name,
            signature,
            self._predict,
            self._executor,
            instances,
            batching,
            self._metrics.batcher,
        )

    def fail(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        """End in END without serving, keeping `message` for the status API."""
        self.state = State.END
        self.error_code = code
        self.error_message = message
        logger.error(
            "model %s version %d (%s) will not serve: %s",
            self.model_name,
            self.version,
            self.directory,
            message,
        )

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Mark a request as routed to this version until its response is sent.

        A version being retired waits for its leases, so a request resolved to it just before
        the swap still finishes on it.
        """
        self._leases += 1
        try:
            yield
        finally:
            self._leases -= 1

    def drain_and_unload(self, timeout: float = _DRAIN_SECONDS) -> None:
        """Stop routing new requests here, wait for routed ones, then unload."""
        if self.state is not State.AVAILABLE:
            return
        self.state = State.UNLOADING
        deadline = time.monotonic() + timeout
        while self._leases > 0 and time.monotonic() < deadline:
            time.sleep(_DRAIN_POLL_SECONDS)
        if self._leases > 0:
            logger.warning(
                "model %s version %d still had %d requests after %.0f s; unloading anyway",
                self.model_name,
                self.version,
                self._leases,
                timeout,
            )
        self.unload()

    def unload(self) -> None:
        """Stop taking work, wait for running calls, and release the runtime."""
        if self.state not in (State.AVAILABLE, State.UNLOADING):
            return
        self.state = State.UNLOADING
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._runtime is not None:
            self._runtime.unload()
        self._runtime = None
        self.state = State.END
        logger.info("unloaded model %s version %d", self.model_name, self.version)

    def load_figures(self) -> tuple[int, int]:
        """Return the rows queued and the requests in flight on this version."""
        if self._batcher is None:
            return 0, 0
        return self._batcher.queued_rows, self._batcher.inflight

    def _batching_config(self, signature: Signature, inline_safe: bool) -> BatchingConfig:
        """Fit the configured batching to the signature, raising ValueError if it cannot."""
        config = self._options.batching
        if not inline_safe and config.execution == "auto":
            # Python models may block (I/O, sleeps), which must never stall the event loop.
            config = dataclasses.replace(config, execution="thread")
        _check_padding(config, signature)
        if not self._batchable:
            if config.enabled:
                logger.info(
                    "model %s version %d runs requests one by one: not every input has a "
                    "variable first dimension",
                    self.model_name,
                    self.version,
                )
            # Without a batch dimension there is nothing to merge, pad or fill up.
            return dataclasses.replace(
                config, enabled=False, allowed_batch_sizes=(), padding={}, pad_all_inputs=False
            )
        if not config.enabled:
            return dataclasses.replace(config, allowed_batch_sizes=(), padding={})
        return config

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Validate a request against the signature and run it on this version."""
        batcher = self._batcher
        # UNLOADING still serves the requests that were routed here before the swap.
        if self.state not in (State.AVAILABLE, State.UNLOADING) or batcher is None:
            raise UnavailableError(self._unavailable_message())
        signature = self.signature
        self._check_inputs(request.inputs, signature)
        if self._batchable:
            _check_rows(request.inputs)
        outputs = self._requested_outputs(request.outputs, signature)
        results = await batcher.submit(request.inputs, outputs, request.deadline)
        return InferenceResponse(self.model_name, self.version, results)

    def _predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run the runtime for one batch; failures other than bad input become 500s."""
        runtime = self._runtime
        if runtime is None:
            raise UnavailableError(self._unavailable_message())
        started = time.perf_counter()
        try:
            return runtime.predict(inputs, outputs)
        except ServekitError:
            raise
        except Exception as exc:
            logger.exception(
                "inference failed on model %s version %d", self.model_name, self.version
            )
            raise InternalError("inference failed; the server log has details") from exc
        finally:
            self._metrics.inference_seconds.observe(time.perf_counter() - started)

    def _check_inputs(self, inputs: dict[str, np.ndarray[Any, Any]], signature: Signature) -> None:
        for name in inputs:
            if signature.input(name) is None:
                expected = ", ".join(signature.input_names)
                raise InvalidInputError(
                    f"unknown input {shorten(name)!r}; model {self.model_name} takes: {expected}"
                )
        for spec in signature.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise InvalidInputError(f"missing input {spec.name!r}")
            spec.check(array)

    def _requested_outputs(
        self, requested: tuple[str, ...] | None, signature: Signature
    ) -> tuple[str, ...]:
        if requested is None:
            return signature.output_names
        for name in requested:
            if signature.output(name) is None:
                expected = ", ".join(signature.output_names)
                raise InvalidInputError(
                    f"unknown output {shorten(name)!r}; model {self.model_name} has: {expected}"
                )
        return requested

    def _unavailable_message(self) -> str:
        message = (
            f"model {self.model_name} version {self.version} is not available: {self.state.name}"
        )
        if self.error_message:
            message += f" ({self.error_message})"
        return message


def _check_rows(inputs: dict[str, np.ndarray[Any, Any]]) -> None:
    """Require every input to have the same first dimension, the rows of the request."""
    rows = {name: array.shape[0] for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        described = ", ".join(f"{name!r} has {count}" for name, count in rows.items())
        raise InvalidInputError(
            f"inputs must have the same number of rows (first dimension): {described}"
        )


def _check_padding(config: BatchingConfig, signature: Signature) -> None:
    for name, spec in config.padding.items():
        tensor = signature.input(name)
        if tensor is None:
            raise ValueError(f"padding names {name!r}, which is not an input of the model")
        bad = [axis for axis in spec.axes if not 1 <= axis < len(tensor.shape)]
        if bad:
            raise ValueError(
                f"padding axes {bad} of input {name!r} must be between 1 and "
                f"{len(tensor.shape) - 1} (axis 0 is the batch)"
            )
        if tensor.datatype.is_bytes:
            raise ValueError(f"padding cannot apply to BYTES input {name!r}")
