"""`servekit bench` against the real server: counts, percentiles, open-loop queueing, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servekit.tools.bench.stats import StepResult, merge, percentile
from tests.conftest import ServerProcess, free_port
from tests.toy_models import SLOW_SOURCE, write_adder, write_python_model


def test_percentiles_of_known_samples() -> None:
    samples = np.arange(1, 101, dtype=np.float64)  # 1 .. 100
    assert percentile(samples, 50) == 50.5
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(np.array([7.0]), 99) == 7.0
    assert np.isnan(percentile(np.array([]), 50))


def test_summary_counts_and_merge() -> None:
    first = StepResult(2, "closed", 2.0, np.array([0.001, 0.003]), Counter({"OK": 2, "429": 1}))
    second = StepResult(2, "closed", 1.0, np.array([0.002]), Counter({"OK": 1}))
    merged = merge([first, second]).summary()
    assert merged["load"] == 4
    assert merged["succeeded"] == 3
    assert merged["requests"] == 4
    assert merged["throughput"] == 1.5
    assert merged["p50_ms"] == pytest.approx(2.0)
    assert merged["max_ms"] == pytest.approx(3.0)
    assert merged["errors"] == {"429": 1}


@pytest.fixture(scope="module")
def bench_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bench_models")
    write_adder(root)
    write_python_model(root, "slow", SLOW_SOURCE, "batching: {enabled: false}\n")
    write_python_model(
        root, "tiny_queue", SLOW_SOURCE, "batching: {enabled: false, max_queue_size: 1}\n"
    )
    server = ServerProcess("--model_repository", str(root), "--port", str(free_port()))
    _ = server.url
    yield server
    server.stop()


def bench(*arguments: str, tmp_path: Path) -> dict[str, Any]:
    output = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "bench", *arguments, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(output.read_text())
    return document


@pytest.mark.parametrize("protocol", ["tfserving", "v2", "v2-binary", "grpc"])
def test_counts_match_the_server(
    bench_server: ServerProcess, tmp_path: Path, protocol: str
) -> None:
    url = bench_server.grpc_address if protocol == "grpc" else bench_server.url
    document = bench(
        url, "--model", "adder", "--protocol", protocol, "--concurrency", "1,4",
        "--duration", "1", "--warmup", "0.3", "--rows", "2",
        "--metrics-url", f"{bench_server.url}/metrics",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert [step["load"] for step in document["steps"]] == [1, 4]
    for step in document["steps"]:
        assert step["errors"] == {}
        assert step["succeeded"] > 0
        assert step["answered_ok"] == step["server_requests"]
        assert step["p50_ms"] <= step["p99_ms"] <= step["max_ms"]
        assert step["server_batch_rows"] >= 2


def constant_input(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / "sleep.npy"
    np.save(path, np.full((1, 1), seconds, dtype=np.float32))
    return path


def test_open_loop_latency_includes_queueing(bench_server: ServerProcess, tmp_path: Path) -> None:
    # Each request takes 50 ms on the one instance: 40 requests a second queue up.
    sleep = str(constant_input(tmp_path, 0.05))
    closed = bench(
        bench_server.url, "--model", "slow", "--input", sleep, "--concurrency", "1",
        "--requests", "10", "--warmup", "0", tmp_path=tmp_path,
    )["steps"][0]  # fmt: skip
    opened = bench(
        bench_server.url, "--model", "slow", "--input", sleep, "--rate", "40",
        "--duration", "1.5", "--warmup", "0", tmp_path=tmp_path,
    )["steps"][0]  # fmt: skip
    assert closed["succeeded"] == 10
    assert closed["p99_ms"] < 200
    assert opened["errors"] == {}
    # The last requests waited behind about 1.5 s of queued work.
    assert opened["p99_ms"] > 5 * closed["p50_ms"]
    assert opened["p99_ms"] > 500
    assert opened["throughput"] < 25


def test_errors_are_counted_by_code(bench_server: ServerProcess, tmp_path: Path) -> None:
    sleep = str(constant_input(tmp_path, 0.02))
    step = bench(
        bench_server.url, "--model", "tiny_queue", "--input", sleep, "--protocol", "v2",
        "--concurrency", "6", "--duration", "1", "--warmup", "0", tmp_path=tmp_path,
    )["steps"][0]  # fmt: skip
    assert step["errors"].get("429", 0) > 0
    assert set(step["errors"]) == {"429"}
    assert step["answered"] - step["answered_ok"] == step["server_failed"]


def test_latency_threshold_search_and_reports(bench_server: ServerProcess, tmp_path: Path) -> None:
    plot, html, csv = tmp_path / "plot.png", tmp_path / "report.html", tmp_path / "steps.csv"
    document = bench(
        bench_server.url, "--model", "adder", "--rate", "50:200:50", "--arrivals", "poisson",
        "--duration", "0.6", "--warmup", "0.2", "--latency-threshold", "1000",
        "--plot", str(plot), "--html", str(html), "--csv", str(csv),
        tmp_path=tmp_path,
    )  # fmt: skip
    # Bisection over 50, 100, 150, 200: every rate meets 1 s, so it ends at the top.
    assert document["best"]["load"] == 200
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in html.read_text()
    assert csv.read_text().splitlines()[0].startswith("mode,requests,succeeded,load")


def test_unknown_model_is_a_clear_error(bench_server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "bench", bench_server.url, "--model", "nope",
         "--concurrency", "1", "--duration", "0.5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", *arguments],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_usage_errors_are_one_line(bench_server: ServerProcess, tmp_path: Path) -> None:
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((4, 5), np.float32))
    base = [bench_server.url, "--model", "adder", "--duration", "0.3", "--warmup", "0"]
    cases = [
        ([*base, "--json", str(tmp_path / "missing" / "r.json")], "does not exist"),
        ([*base, "--rate", "0:10:5"], "every value must be positive"),
        ([*base, "--concurrency", "1:2:0.5"], "expected whole numbers"),
        ([*base, "--input", str(wrong_shape)], "the model expects [3]"),
        ([bench_server.grpc_address, "--protocol", "grpc", "--model", "nope"], "NOT_FOUND"),
        ([bench_server.grpc_address, "--protocol", "v2", "--model", "adder"], "REST port"),
    ]
    for arguments, expected in cases:
        result = run_cli("bench", *arguments)
        assert result.returncode in (1, 2), arguments
        assert expected in result.stderr, (arguments, result.stderr)
        assert "Traceback" not in result.stderr


def test_request_count_is_not_cut_short(bench_server: ServerProcess, tmp_path: Path) -> None:
    for processes in ("1", "2"):
        step = bench(
            bench_server.url, "--model", "adder", "--concurrency", "1", "--requests", "150",
            "--duration", "0.1", "--warmup", "0", "--timeout", "5", "--processes", processes,
            tmp_path=tmp_path,
        )["steps"][0]  # fmt: skip
        assert step["succeeded"] == 150
        assert step["errors"] == {}


def test_open_loop_stays_inside_the_window(bench_server: ServerProcess, tmp_path: Path) -> None:
    step = bench(
        bench_server.url, "--model", "adder", "--rate", "100", "--duration", "1", "--warmup",
        "0", tmp_path=tmp_path,
    )["steps"][0]  # fmt: skip
    assert step["requests"] == 100


def test_exit_status_when_every_request_fails(bench_server: ServerProcess, tmp_path: Path) -> None:
    sleep = str(constant_input(tmp_path, 0.5))
    result = run_cli(
        "bench", bench_server.url, "--model", "slow", "--input", sleep, "--concurrency", "1",
        "--duration", "0.3", "--warmup", "0", "--timeout", "0.1",
        "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "no request succeeded" in result.stderr
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["steps"][0]["p50_ms"] is None
