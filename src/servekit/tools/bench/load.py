"""Closed-loop and open-loop load against one target, in one or several client processes.

Closed loop: `concurrency` callers each send a request, wait for its response and send the
next. Open loop: requests leave on a schedule (`rate` per second, evenly spaced or with Poisson
arrivals) whatever the server does. Each latency counts from the request's scheduled send time,
so a server that stalls shows its queueing instead of slowing the generator down. Only
requests scheduled after the warm-up and before the end of the step are measured. Every step
stops by itself: requests still running `timeout` seconds after the end are cancelled and
counted as `timeout`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from servekit.tools.bench.requests import Payload, Target
from servekit.tools.bench.stats import StepResult, merge

OK = "OK"
Send = Callable[[Payload], Awaitable[str]]


@dataclass(frozen=True)
class StepPlan:
    """One step of a run: the load, how long, and how requests arrive."""

    mode: str  # "closed" or "open"
    load: float  # concurrency (closed) or requests per second (open)
    duration: float
    warmup: float
    requests: int | None = None
    arrivals: str = "constant"
    timeout: float = 30.0
    max_inflight: int = 4096
    seed: int = 0

    def share(self, processes: int, index: int) -> StepPlan:
        """Return the part of this step that client process `index` of `processes` runs."""
        load = self.load / processes
        if self.mode == "closed":
            load = self.load // processes + (1 if index < self.load % processes else 0)
        requests = None
        if self.requests is not None:
            requests = self.requests // processes + (1 if index < self.requests % processes else 0)
        return StepPlan(
            self.mode,
            load,
            self.duration,
            self.warmup,
            requests,
            self.arrivals,
            self.timeout,
            self.max_inflight,
            self.seed + index,
        )


def run_step(target: Target, payloads: list[Payload], plan: StepPlan, processes: int) -> StepResult:
    """Run one step, in this process or split across `processes` client processes."""
    if plan.mode == "closed":
        # A process without a caller would take its share of --requests with it.
        processes = min(processes, int(plan.load))
    if processes <= 1:
        return asyncio.run(_run(target, payloads, plan))
    shares = [plan.share(processes, index) for index in range(processes)]
    context = get_context("spawn")
    with ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        parts = list(pool.map(_run_share, [(target, payloads, share) for share in shares]))
    result = merge(parts)
    result.load = plan.load
    return result


def _run_share(arguments: tuple[Target, list[Payload], StepPlan]) -> StepResult:
    return asyncio.run(_run(*arguments))


async def _run(target: Target, payloads: list[Payload], plan: StepPlan) -> StepResult:
    async with _Client(target, plan) as send:
        if plan.mode == "closed":
            return await _closed_loop(send, payloads, plan)
        return await _open_loop(send, payloads, plan)


class _Recorder:
    """Collects the latency and outcome of every measured request."""

    def __init__(self, start: float, plan: StepPlan) -> None:
        self.measure_from = start + plan.warmup
        self.end = self.measure_from + plan.duration
        self.limit = plan.requests
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        # Every response, warm-up included, to compare with the server's own counters.
        self.answered: Counter[str] = Counter()
        self.last_response = self.measure_from

    @property
    def done(self) -> bool:
        return self.limit is not None and sum(self.statuses.values()) >= self.limit

    def open_for(self, scheduled: float) -> bool:
        if self.limit is not None:
            return not self.done
        return scheduled < self.end

    def record(self, scheduled: float, finished: float, status: str) -> None:
        self.answered[status] += 1
        if scheduled < self.measure_from or self.done:
            return
        self.statuses[status] += 1
        self.last_response = max(self.last_response, finished)
        if status == OK:
            self.latencies.append(finished - scheduled)

    def result(self, plan: StepPlan) -> StepResult:
        # Throughput counts until the last measured response, so the responses that a slow
        # server sends after the end of the schedule do not inflate it.
        end = self.last_response if self.limit is not None else max(self.end, self.last_response)
        return StepResult(
            load=plan.load,
            mode=plan.mode,
            duration=max(end - self.measure_from, 1e-9),
            latencies=np.array(self.latencies, dtype=np.float64),
            statuses=self.statuses,
            answered=self.answered,
        )


async def _closed_loop(send: Send, payloads: list[Payload], plan: StepPlan) -> StepResult:
    recorder = _Recorder(time.perf_counter(), plan)

    async def caller(offset: int) -> None:
        index = offset
        while True:
            started = time.perf_counter()
            if not recorder.open_for(started):
                return
            status = await send(payloads[index % len(payloads)])
            recorder.record(started, time.perf_counter(), status)
            index += 1

    callers = [asyncio.ensure_future(caller(offset)) for offset in range(int(plan.load))]
    await _finish(callers, recorder, plan)
    return recorder.result(plan)


async def _open_loop(send: Send, payloads: list[Payload], plan: StepPlan) -> StepResult:
    rng = np.random.default_rng(plan.seed)
    start = time.perf_counter()
    recorder = _Recorder(start, plan)
    inflight: set[asyncio.Future[None]] = set()

    async def one(payload: Payload, scheduled: float) -> None:
        status = await send(payload)
        recorder.record(scheduled, time.perf_counter(), status)

    index = 0
    sent = 0
    upcoming = start
    while recorder.open_for(upcoming):
        scheduled = upcoming
        sent += 1
        if plan.arrivals == "poisson":
            upcoming = scheduled + rng.exponential(1 / plan.load)
        else:
            # Multiplied, not summed, so rounding never lets one more request into the window.
            upcoming = start + sent / plan.load
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= plan.max_inflight:
            # The client cannot hold more open requests; count it instead of waiting, so the
            # schedule holds.
            recorder.record(scheduled, scheduled, "client_overloaded")
            continue
        task = asyncio.ensure_future(one(payloads[index % len(payloads)], scheduled))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        index += 1
    await _finish(list(inflight), recorder, plan)
    return recorder.result(plan)


async def _finish(
    tasks: Sequence[asyncio.Future[None]], recorder: _Recorder, plan: StepPlan
) -> None:
    """Wait for the step's requests; cancel those still running `timeout` s after its end."""
    if not tasks:
        return
    # With a request count there is no end time: every request has its own timeout instead.
    wait = (
        None
        if recorder.limit is not None
        else (max(0.0, recorder.end - time.perf_counter()) + plan.timeout)
    )
    _, pending = await asyncio.wait(tasks, timeout=wait)
    for task in pending:
        task.cancel()
    if pending:
        recorder.statuses["timeout"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)


class _Client:
    """Opens the protocol's client for the step and hands out its `send` function."""

    def __init__(self, target: Target, plan: StepPlan) -> None:
        self._target = target
        self._plan = plan
        self._close: Callable[[], Awaitable[Any]] | None = None

    async def __aenter__(self) -> Send:
        if self._target.protocol == "grpc":
            return await self._grpc()
        return await self._http()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._close is not None:
            await self._close()

    async def _http(self) -> Send:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self._plan.timeout)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._close = session.close
        url = self._target.url.rstrip("/") + self._target.http_path

        async def send(payload: Payload) -> str:
            try:
                async with session.post(url, data=payload.body, headers=dict(payload.headers)) as r:
                    await r.read()
                    return OK if r.status < 300 else str(r.status)
            except TimeoutError:
                return "timeout"
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        return send

    async def _grpc(self) -> Send:
        import grpc
        import grpc.aio

        channel = grpc.aio.insecure_channel(
            self._target.grpc_address,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
            ],
        )
        self._close = channel.close
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )

        async def send(payload: Payload) -> str:
            try:
                await method(payload.body, timeout=self._plan.timeout)
                return OK
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)

        return send
