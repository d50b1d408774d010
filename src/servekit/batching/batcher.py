"""The batcher: one queue per servable that merges requests into batches of rows.

Everything here except `_execute` runs on the event loop, so the queue needs no lock. Batches
run on the servable's instance threads, or, for a single instance whose batches take under
INLINE_MAX_SECONDS, on the event loop thread itself, which saves the thread hand-off. A batch
is taken from the queue as soon as an instance is free; while all instances are busy, requests
accumulate and the next free instance takes up to `max_batch_size` rows at once. Requests whose
inputs differ in dtype or non-batch shape (after padding) never share a batch, and a request
larger than `max_batch_size` is split across batches and reassembled in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import typing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from servekit.batching.config import BatchingConfig
from servekit.batching.merge import (
    BatchKey,
    NotRowAlignedError,
    batch_key,
    batch_outputs,
    merge_inputs,
    split_outputs,
)
from servekit.core.errors import DeadlineExceededError, OverloadedError
from servekit.core.types import Signature

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
Predict = Callable[[Arrays, tuple[str, ...]], Arrays]


@dataclass(slots=True)
class BatcherMetrics:
    """Metric children (already labelled with model and version) that the batcher updates."""

    queue_seconds: Any
    batch_rows: Any
    rejected_full: Any
    rejected_deadline: Any


class _Task:
    """One request in the queue; its rows may be dispatched in several pieces."""

    __slots__ = (
        "deadline",
        "done_rows",
        "enqueued",
        "future",
        "inputs",
        "key",
        "outputs",
        "pieces",
        "rows",
        "taken",
    )

    def __init__(
        self,
        inputs: Arrays,
        outputs: tuple[str, ...],
        rows: int,
        deadline: float | None,
        future: asyncio.Future[Arrays],
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.key: BatchKey | object = _NO_KEY
        self.deadline = deadline
        self.future = future
        self.enqueued = time.monotonic()
        self.taken = 0
        self.done_rows = 0
        self.pieces: list[tuple[int, Arrays]] = []


# A slice of one task's rows: (task, first row, end row).
_Part = tuple[_Task, int, int]
# The outcome of one batch: a result or error per part, and the seconds it took.
_Outcome = tuple[list[Arrays | BaseException], float]

# Batches that take less than this on average run on the event loop thread itself. Handing a
# batch to an instance thread and back costs about 100 us on the machines measured (see
# docs/benchmarks.md), which is more than a small model's whole computation. Longer batches
# run in threads, so the loop keeps reading requests meanwhile.
INLINE_MAX_SECONDS = 0.0005
# Deadlines are checked this often, so a request may get its 504 up to this much late.
SWEEP_SECONDS = 0.05
# A batch this slow sends a servable back to its instance threads straight away.
_INLINE_ABORT_SECONDS = 0.005
_NO_KEY = object()
_SKIPPED = DeadlineExceededError("the request already had its response before its rows ran")
_INLINE_AFTER_BATCHES = 16
_AVERAGE_WEIGHT = 0.1


class Batcher:
    """Queues requests for one servable and runs them on its instances in batches."""

    def __init__(
        self,
        name: str,
        signature: Signature,
        predict: Predict,
        executor: Executor,
        instances: int,
        config: BatchingConfig,
        metrics: BatcherMetrics,
    ) -> None:
        self._name = name
        self._signature = signature
        self._batch_outputs = batch_outputs(signature)
        self._predict = predict
        self._executor = executor
        self._free = instances
        self._config = config
        self._merging = config.enabled
        self._metrics = metrics
        self._queue: deque[_Task] = deque()
        self._queued_rows = 0
        # Requests accepted and still awaiting a response, and the timer for their deadlines.
        self._pending: set[_Task] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Batches start in the instance threads; once they prove fast, they run inline.
        self._inline_allowed = instances == 1 and config.execution == "auto"
        self._inline = config.execution == "inline"
        self._dispatch_scheduled = False
        self._batch_seconds = 0.0
        self._batches = 0

    async def submit(
        self, inputs: Arrays, outputs: tuple[str, ...], deadline: float | None
    ) -> Arrays:
        """Queue validated inputs and wait for this request's own outputs."""
        rows = _rows(inputs)
        # A request larger than the whole bound is still admitted into an empty queue, so
        # big offline requests work on an idle server.
        if self._queued_rows + rows > self._config.max_queue_size and self._queue:
            self._metrics.rejected_full.inc()
            raise OverloadedError(
                f"model {self._name} is overloaded: {self._queued_rows} rows are queued "
                f"(max_queue_size {self._config.max_queue_size}); retry later"
            )
        loop = asyncio.get_running_loop()
        task = _Task(inputs, outputs, rows, deadline, loop.create_future())
        self._queue.append(task)
        self._queued_rows += rows
        self._pending.add(task)
        if deadline is not None and self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)
        try:
            self._request_dispatch()
            return await task.future
        finally:
            # Rows never dispatched (cancelled or expired) leave the queue now.
            self._forget(task)
            self._pending.discard(task)

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def _sweep(self) -> None:
        """Fail requests past their deadline, queued or running, then check again later."""
        self._sweeper = None
        now = time.monotonic()
        for task in list(self._pending):
            if task.deadline is not None and task.deadline <= now and not task.future.done():
                task.future.set_exception(self._expired())
        if self._pending:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def _key(self, task: _Task) -> BatchKey:
        # Computed only when two requests are compared, so a lone request never pays for it.
        if task.key is _NO_KEY:
            task.key = batch_key(task.inputs, self._config)
        return typing.cast(BatchKey, task.key)

    def _forget(self, task: _Task) -> None:
        left = task.rows - task.taken
        if left:
            task.taken = task.rows
            self._queued_rows -= left
            with contextlib.suppress(ValueError):
                self._queue.remove(task)
        if not task.future.done():
            task.future.cancel()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def _request_dispatch(self) -> None:
        if not self._inline:
            self._dispatch()
        elif not self._dispatch_scheduled:
            # Inline batches run after the loop has handled every request that is already
            # readable, so those requests share the batch instead of running one by one.
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start batches while an instance is free and the queue contains work."""
        self._dispatch_scheduled = False
        while self._free and self._queue:
            if self._should_wait():
                return
            parts = self._take_batch()
            if not parts:
                continue
            self._free -= 1
            if self._inline:
                self._complete(parts, self._execute(parts))
                continue
            loop = asyncio.get_running_loop()
            running = loop.run_in_executor(self._executor, self._execute, parts)
            running.add_done_callback(functools.partial(self._finish, parts))

    def _should_wait(self) -> bool:
        delay = self._config.max_queue_delay
        if not delay or not self._merging or self._queued_rows >= self._config.max_batch_size:
            return False
        remaining = self._queue[0].enqueued + delay - time.monotonic()
        if remaining <= 0:
            return False
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(remaining, self._on_timer)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_batch(self) -> list[_Part]:
        now = time.monotonic()
        limit = self._config.max_batch_size if self._merging else None
        parts: list[_Part] = []
        rows = 0
        index = 0
        while index < len(self._queue):
            task = self._queue[index]
            if task.future.done() or (task.deadline is not None and task.deadline <= now):
                # Abandoned or expired while queued: drop it before it runs.
                del self._queue[index]
                if not task.future.done():
                    task.future.set_exception(self._expired())
                self._forget(task)
                continue
            if parts and (limit is None or self._key(task) != self._key(parts[0][0])):
                index += 1
                if limit is None:
                    break
                continue
            left = task.rows - task.taken
            take = left if limit is None else min(left, limit - rows)
            parts.append((task, task.taken, task.taken + take))
            if task.taken == 0:
                self._metrics.queue_seconds.observe(now - task.enqueued)
            task.taken += take
            rows += take
            self._queued_rows -= take
            if task.taken == task.rows:
                del self._queue[index]
            if limit is None or rows >= limit:
                break
        return parts

    def _execute(self, parts: list[_Part]) -> _Outcome:
        """Run one batch; return each part's outputs or its error, and the seconds it took."""
        started = time.perf_counter()
        results = self._execute_parts(parts)
        return results, time.perf_counter() - started

    def _execute_parts(self, parts: list[_Part]) -> list[Arrays | BaseException]:
        if len(parts) == 1 and not self._config.allowed_batch_sizes:
            return [self._run_part(parts[0])]
        if not self._merging:
            return [self._run_part(part) for part in parts]
        try:
            return self._run_merged(parts)
        except NotRowAlignedError as exc:
            if self._merging:
                self._merging = False
                logger.warning("stopped merging requests for model %s: %s", self._name, exc)
        except Exception:
            logger.debug("batch of %d parts failed; running them one by one", len(parts))
        # One request's bad data must not fail the others, so each part runs alone, except
        # the parts whose request already has its response (expired or abandoned).
        return [self._run_part(part) if not part[0].future.done() else _SKIPPED for part in parts]

    def _run_part(self, part: _Part) -> Arrays | BaseException:
        task, start, stop = part
        inputs = task.inputs
        if stop - start != task.rows:
            inputs = {name: array[start:stop] for name, array in inputs.items()}
        self._metrics.batch_rows.observe(stop - start)
        try:
            return self._predict(inputs, task.outputs)
        except BaseException as exc:
            return exc

    def _run_merged(self, parts: list[_Part]) -> list[Arrays | BaseException]:
        pieces = [
            {name: array[start:stop] for name, array in task.inputs.items()}
            for task, start, stop in parts
        ]
        inputs, rows = merge_inputs(pieces, self._config)
        outputs = self._union_outputs(parts)
        self._metrics.batch_rows.observe(rows)
        results = self._predict(inputs, outputs)
        sizes = [stop - start for _, start, stop in parts]
        split = split_outputs(results, sizes, rows, self._batch_outputs)
        return [
            {name: piece[name] for name in task.outputs}
            for (task, _, _), piece in zip(parts, split, strict=True)
        ]

    def _union_outputs(self, parts: list[_Part]) -> tuple[str, ...]:
        wanted = {name for task, _, _ in parts for name in task.outputs}
        return tuple(name for name in self._signature.output_names if name in wanted)

    def _expired(self) -> DeadlineExceededError:
        self._metrics.rejected_deadline.inc()
        return DeadlineExceededError(f"request to model {self._name} timed out")

    def _finish(self, parts: list[_Part], done: asyncio.Future[_Outcome]) -> None:
        try:
            outcome = done.result()
        except BaseException as exc:
            outcome = ([exc] * len(parts), 0.0)
        self._complete(parts, outcome)
        self._dispatch()

    def _complete(self, parts: list[_Part], outcome: _Outcome) -> None:
        results, seconds = outcome
        self._free += 1
        self._update_inline(seconds)
        for (task, start, stop), result in zip(parts, results, strict=True):
            self._deliver(task, start, stop, result)

    def _update_inline(self, seconds: float) -> None:
        # A moving average of the time per batch decides where the next batches run, and one
        # slow batch sends them back to the threads at once.
        if not self._inline_allowed:
            return
        if seconds > _INLINE_ABORT_SECONDS:
            self._inline = False
            self._batches = 0
            self._batch_seconds = seconds
            return
        self._batch_seconds += _AVERAGE_WEIGHT * (seconds - self._batch_seconds)
        self._batches += 1
        self._inline = (
            self._batches >= _INLINE_AFTER_BATCHES and self._batch_seconds < INLINE_MAX_SECONDS
        )

    def _deliver(self, task: _Task, start: int, stop: int, result: Arrays | BaseException) -> None:
        if task.future.done():
            return
        if isinstance(result, BaseException):
            task.future.set_exception(result)
            return
        task.pieces.append((start, result))
        task.done_rows += stop - start
        if task.done_rows < task.rows:
            return
        if len(task.pieces) == 1:
            task.future.set_result(result)
            return
        task.pieces.sort(key=lambda piece: piece[0])
        joined = {}
        for name in task.outputs:
            arrays = [piece[name] for _, piece in task.pieces]
            # Outputs without a batch dimension are the same for every piece.
            joined[name] = np.concatenate(arrays) if name in self._batch_outputs else arrays[0]
        task.future.set_result(joined)


def _rows(inputs: Arrays) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1
