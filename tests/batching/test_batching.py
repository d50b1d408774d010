"""Dynamic batching, overload and deadlines against the running server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess, assert_json_error
from tests.observability.test_metrics import samples, value
from tests.toy_models import write_batching_repository


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = write_batching_repository(tmp_path_factory.mktemp("batching"))
    server = ServerProcess("--model_repository", str(root))
    _ = server.url
    yield server
    server.stop()


def gather(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """Send every (path, JSON body) pair at once and return the responses in order."""

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(send_all())


def tokens_request(length: int) -> tuple[str, dict[str, Any]]:
    return "", {"instances": [list(range(1, length + 1))]}


@pytest.mark.parametrize("model", ["seqlen", "seqlen_padded"])
def test_different_lengths_share_or_split(batching_server: ServerProcess, model: str) -> None:
    lengths = [3, 5, *range(1, 21)]
    path = f"/v1/models/{model}:predict"
    responses = gather(batching_server.url, [(path, tokens_request(n)[1]) for n in lengths])
    for length, response in zip(lengths, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": [length]}


def test_padding_merges_lengths(batching_server: ServerProcess) -> None:
    with httpx.Client(base_url=batching_server.url) as client:
        before = samples(client)
    gather(
        batching_server.url,
        [("/v1/models/seqlen_padded:predict", tokens_request(n)[1]) for n in range(1, 9)],
    )
    with httpx.Client(base_url=batching_server.url) as client:
        after = samples(client)
    labels = {"model": "seqlen_padded", "version": "1"}
    calls = value(after, "servekit_batch_size_rows_count", **labels) - value(
        before, "servekit_batch_size_rows_count", **labels
    )
    assert 1 <= calls < 8


def rowcount_body(first: float, rows: int) -> dict[str, Any]:
    data = [[first + i, first + i, first + i] for i in range(rows)]
    return {"inputs": [{"name": "x", "shape": [rows, 3], "datatype": "FP32", "data": data}]}


def test_max_batch_size_counts_rows(batching_server: ServerProcess) -> None:
    requests = [("/v2/models/rowcount/infer", rowcount_body(100 * i, 3)) for i in range(6)]
    responses = gather(batching_server.url, requests)
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        outputs = {output["name"]: output for output in response.json()["outputs"]}
        expected = [100 * index + i + 1 for i in range(3) for _ in range(3)]
        assert outputs["y"]["data"] == expected
        assert max(outputs["rows"]["data"]) <= 4


def test_request_larger_than_max_batch_size(batching_server: ServerProcess) -> None:
    (response,) = gather(batching_server.url, [("/v2/models/rowcount/infer", rowcount_body(0, 10))])
    assert response.status_code == 200
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    assert outputs["y"]["shape"] == [10, 3]
    assert outputs["y"]["data"] == [i + 1 for i in range(10) for _ in range(3)]
    assert max(outputs["rows"]["data"]) <= 4


def twoin_body(a: list[float], b: int, outputs: list[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": a, "parameters": {"tag": 7}},
            {"name": "b", "shape": [1], "datatype": "INT64", "data": [b]},
        ]
    }
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def expected_twoin(a: list[float], b: int) -> dict[str, list[float]]:
    exponents = np.exp(np.array(a, dtype=np.float32))
    return {"sum": [a[0] + a[1] + b], "prob": (exponents / exponents.sum()).tolist()}


def test_requested_outputs_survive_batching(batching_server: ServerProcess) -> None:
    cases = [
        ([1.0, 2.0], 3, ["prob"]),
        ([0.5, -1.0], 1, ["sum"]),
        ([2.0, 2.0], -4, None),
    ] * 10
    requests = [("/v2/models/twoin/infer", twoin_body(a, b, out)) for a, b, out in cases]
    responses = gather(batching_server.url, requests)
    for (a, b, wanted), response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
        assert list(outputs) == (wanted or ["sum", "prob"])
        for name, data in outputs.items():
            assert data == pytest.approx(expected_twoin(a, b)[name], rel=1e-6)


def test_single_request_in_window(batching_server: ServerProcess) -> None:
    body = twoin_body([1.0, 2.0], 3, ["sum"])
    response = httpx.post(f"{batching_server.url}/v2/models/twoin/infer", json=body)
    assert response.status_code == 200
    assert [output["name"] for output in response.json()["outputs"]] == ["sum"]


def test_every_caller_gets_its_own_rows(batching_server: ServerProcess) -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=300).tolist()
    requests = [
        ("/v2/models/rowcount/infer", rowcount_body(1000 * index, rows))
        for index, rows in enumerate(sizes)
    ]
    responses = gather(batching_server.url, requests)
    for index, (rows, response) in enumerate(zip(sizes, responses, strict=True)):
        assert response.status_code == 200, response.text
        y = next(o for o in response.json()["outputs"] if o["name"] == "y")
        assert y["shape"] == [rows, 3]
        assert y["data"] == [1000 * index + i + 1 for i in range(rows) for _ in range(3)]


def slow_body(seconds: float) -> dict[str, Any]:
    return {"instances": [[seconds]]}


def test_full_queue_rejects_at_once(batching_server: ServerProcess) -> None:
    path = "/v1/models/slow:predict"

    async def burst() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=batching_server.url, timeout=60, limits=limits
        ) as client:

            async def timed() -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await client.post(path, json=slow_body(0.3))
                return response, time.monotonic() - started

            return await asyncio.gather(*(timed() for _ in range(40)))

    results = asyncio.run(burst())
    succeeded = [elapsed for response, elapsed in results if response.status_code == 200]
    rejected = [(response, elapsed) for response, elapsed in results if response.status_code != 200]
    # 1 running + 8 queued; a few more may fit as slots free up while the burst is sent.
    assert 9 <= len(succeeded) <= 20
    assert len(rejected) >= 20
    for response, elapsed in rejected:
        assert "overloaded" in assert_json_error(response, 429)
        assert response.headers["retry-after"] == "1"
        assert elapsed < 2.0
    after = httpx.post(f"{batching_server.url}{path}", json=slow_body(0), timeout=10)
    assert after.status_code == 200


def test_deadline_header(batching_server: ServerProcess) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{batching_server.url}/v1/models/slow_pair:predict",
        json=slow_body(2.0),
        headers={"x-request-timeout-ms": "500"},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert_json_error(response, 504)
    assert elapsed < 1.5
    started = time.monotonic()
    follow_up = httpx.post(
        f"{batching_server.url}/v1/models/slow_pair:predict", json=slow_body(0.1), timeout=10
    )
    assert follow_up.status_code == 200
    assert time.monotonic() - started < 1.5


def test_deadline_v2_parameter(batching_server: ServerProcess) -> None:
    body = {
        "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}],
        "parameters": {"timeout": 300_000},
    }
    response = httpx.post(f"{batching_server.url}/v2/models/slow_pair/infer", json=body, timeout=10)
    assert_json_error(response, 504)
    body["parameters"] = {"timeout": "soon"}
    response = httpx.post(f"{batching_server.url}/v2/models/slow_pair/infer", json=body, timeout=10)
    assert "timeout" in assert_json_error(response, 400)


def test_invalid_timeout_header(batching_server: ServerProcess) -> None:
    response = httpx.post(
        f"{batching_server.url}/v1/models/slow_pair:predict",
        json=slow_body(0),
        headers={"x-request-timeout-ms": "-5"},
    )
    assert "x-request-timeout-ms" in assert_json_error(response, 400)


def test_server_timeout_flag(tmp_path: Path) -> None:
    root = write_batching_repository(tmp_path)
    server = ServerProcess("--model_repository", str(root), "--rest_api_timeout_in_ms", "400")
    server.url  # noqa: B018 (waits for the start, which is not part of the timing)
    started = time.monotonic()
    response = httpx.post(
        f"{server.url}/v1/models/slow_pair:predict", json=slow_body(2.0), timeout=10
    )
    elapsed = time.monotonic() - started
    with httpx.Client(base_url=server.url) as client:
        found = samples(client)
    server.stop()
    assert_json_error(response, 504)
    assert elapsed < 1.5
    rejected = value(
        found, "servekit_rejected_requests_total", model="slow_pair", version="1", reason="deadline"
    )
    assert rejected == 1.0


def test_disconnected_clients_lose_their_queued_work(batching_server: ServerProcess) -> None:
    labels = {"model": "slow", "version": "1"}
    with httpx.Client(base_url=batching_server.url) as client:
        before = samples(client)

    def abandon(_: int) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(
                f"{batching_server.url}/v1/models/slow:predict", json=slow_body(1.0), timeout=0.2
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(abandon, range(8)))
    started = time.monotonic()
    response = httpx.post(
        f"{batching_server.url}/v1/models/slow:predict", json=slow_body(0), timeout=30
    )
    assert response.status_code == 200
    assert time.monotonic() - started < 2.5
    time.sleep(1.2)
    with httpx.Client(base_url=batching_server.url) as client:
        after = samples(client)
    calls = value(after, "servekit_inference_duration_seconds_count", **labels) - value(
        before, "servekit_inference_duration_seconds_count", **labels
    )
    assert calls <= 3
    assert value(after, "servekit_queue_rows", **labels) == 0.0
    assert value(after, "servekit_inflight_requests", **labels) == 0.0


def test_gauges_and_counters_at_rest(batching_server: ServerProcess) -> None:
    labels = {"model": "twoin", "version": "1"}
    with httpx.Client(base_url=batching_server.url) as client:
        before = samples(client)
        for _ in range(5):
            client.post("/v2/models/twoin/infer", json={"inputs": [{"name": "a"}]})
        for _ in range(3):
            client.post("/v2/models/twoin/infer", json=twoin_body([1.0, 1.0], 1, None))
        after = samples(client)
    counts = {
        code: value(after, "servekit_requests_total", **labels, protocol="v2", code=code)
        - value(before, "servekit_requests_total", **labels, protocol="v2", code=code)
        for code in ("200", "400")
    }
    assert counts == {"200": 3.0, "400": 5.0}
    for code in ("200", "400"):
        assert value(
            after, "servekit_request_duration_seconds_count", **labels, protocol="v2", code=code
        ) == value(after, "servekit_requests_total", **labels, protocol="v2", code=code)
    assert value(after, "servekit_queue_rows", **labels) == 0.0
    assert value(after, "servekit_inflight_requests", **labels) == 0.0


def test_inputs_must_share_rows(batching_server: ServerProcess) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [1], "datatype": "INT64", "data": [3]},
        ]
    }
    response = httpx.post(f"{batching_server.url}/v2/models/twoin/infer", json=body)
    message = assert_json_error(response, 400)
    assert "same number of rows" in message


def test_python_model_never_blocks_the_loop(batching_server: ServerProcess) -> None:
    url = batching_server.url
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(40):
            assert client.post("/v1/models/slow:predict", json=slow_body(0)).status_code == 200

    async def slow_and_health() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            slow = asyncio.create_task(
                client.post(
                    "/v1/models/slow:predict",
                    json=slow_body(1.0),
                    headers={"x-request-timeout-ms": "300"},
                )
            )
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert (await client.get("/v2/health/live")).status_code == 200
            return await slow, time.monotonic() - started

    response, health_seconds = asyncio.run(slow_and_health())
    assert_json_error(response, 504)
    assert health_seconds < 0.6


def test_timeout_header_cannot_extend_server_limit(tmp_path: Path) -> None:
    root = write_batching_repository(tmp_path)
    server = ServerProcess("--model_repository", str(root), "--rest_api_timeout_in_ms", "300")
    response = httpx.post(
        f"{server.url}/v1/models/slow_pair:predict",
        json=slow_body(1.0),
        headers={"x-request-timeout-ms": "60000"},
        timeout=10,
    )
    server.stop()
    assert_json_error(response, 504)
