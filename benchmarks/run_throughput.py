"""Measure servekit against baselines with wrk, in one run on one machine.

    python benchmarks/run_throughput.py [--seconds 10] [--rounds 1] [--output results.json]

Servers, all on 127.0.0.1: servekit with 1 and 2 workers (default batching), a bare ASGI app that
runs onnxruntime per request without batching, and a bare ASGI app that returns a constant (the
HTTP ceiling). Each is driven by wrk with 1, 16 and 64 connections posting one 784-value row in
TF Serving's JSON format; the heavy MLP is driven with 16 connections. The in-process limit is
onnxruntime alone at its best batch size. Results print as a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from models import write_repository

HERE = Path(__file__).parent
_RESULT = re.compile(
    r"RESULT requests=(\d+) seconds=([\d.]+) errors=(\d+) p50_us=(\d+) p99_us=(\d+)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str], ready_url: str) -> Iterator[None]:
    """Start a server process, wait until `ready_url` answers, and stop it afterwards."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"server did not start: {command}")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def wrk(url: str, body: Path, connections: int, seconds: int) -> dict[str, float]:
    threads = min(2, connections)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-s", str(HERE / "post.lua"), url,
    ]  # fmt: skip
    output = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "BODY_FILE": str(body)}
    ).stdout
    match = _RESULT.search(output)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    requests, elapsed, errors, p50, p99 = match.groups()
    return {
        "rps": int(requests) / float(elapsed),
        "errors": int(errors),
        "p50_ms": int(p50) / 1000,
        "p99_ms": int(p99) / 1000,
    }


def in_process_rate(path: Path, seconds: float = 2.0) -> tuple[float, int]:
    """Return onnxruntime's best rows per second over a range of batch sizes, and that size."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    best = (0.0, 0)
    for batch in (1, 8, 32, 128, 512):
        x = np.random.default_rng(0).random((batch, 784), dtype=np.float32)
        session.run(None, {"x": x})
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, {"x": x})
            calls += 1
        rate = calls * batch / (time.perf_counter() - started)
        best = max(best, (rate, batch))
    return best


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "kernel": platform.release(),
    }


def servekit_command(repository: Path, port: int, workers: int, grpc_port: int = 0) -> list[str]:
    """Return the command that serves `repository`, with gRPC only if `grpc_port` is given."""
    return [
        sys.executable, "-m", "servekit", "serve", "--model_repository", str(repository),
        "--rest_api_port", str(port), "--port", str(grpc_port), "--workers", str(workers),
        "--log_level", "warning",
    ]  # fmt: skip


def bare_command(target: str, port: int) -> list[str]:
    return [sys.executable, str(HERE / "bare_server.py"), target, str(port)]


def measure(args: argparse.Namespace, repository: Path, body: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "seconds": args.seconds, "servers": {}}
    small, heavy = (
        repository / "mlp" / "1" / "model.onnx",
        repository / "heavy_mlp" / "1" / "model.onnx",
    )
    for name, path in (("mlp", small), ("heavy_mlp", heavy)):
        rate, batch = in_process_rate(path)
        results[f"in_process_{name}"] = {"rows_per_second": rate, "batch": batch}
    servers = {
        "servekit (1 worker)": lambda port: servekit_command(repository, port, 1),
        "servekit (2 workers)": lambda port: servekit_command(repository, port, 2),
        "bare ASGI + onnxruntime": lambda port: bare_command(str(small), port),
        "bare ASGI, constant": lambda port: bare_command("constant", port),
    }
    heavy_servers = {
        "servekit (1 worker)": lambda port: servekit_command(repository, port, 1),
        "servekit (2 workers)": lambda port: servekit_command(repository, port, 2),
        "bare ASGI + onnxruntime": lambda port: bare_command(str(heavy), port),
    }
    for name, command in servers.items():
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        path = "/v1/models/mlp:predict" if name.startswith("servekit") else "/"
        with running(command(port), f"{base}/v2/health/live"):
            wrk(base + path, body, 16, 2)  # warm-up
            rows = {
                str(connections): best_of(args.rounds, base + path, body, connections, args.seconds)
                for connections in (1, 16, 64)
            }
        results["servers"][name] = {"mlp": rows}
        print(name, json.dumps(rows), flush=True)
    for name, command in heavy_servers.items():
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        path = "/v1/models/heavy_mlp:predict" if name.startswith("servekit") else "/"
        with running(command(port), f"{base}/v2/health/live"):
            wrk(base + path, body, 16, 2)
            heavy_result = best_of(args.rounds, base + path, body, 16, args.seconds)
        results["servers"][name]["heavy_mlp_16"] = heavy_result
        print(name, "heavy", json.dumps(heavy_result), flush=True)
    return results


def best_of(rounds: int, url: str, body: Path, connections: int, seconds: int) -> dict[str, float]:
    """Run wrk `rounds` times and keep the median round by requests per second."""
    runs = sorted(
        (wrk(url, body, connections, seconds) for _ in range(rounds)), key=lambda r: r["rps"]
    )
    return runs[len(runs) // 2]


def table(results: dict[str, Any]) -> str:
    lines = [
        "| server | 1 connection | 16 | 64 | p50 ms at 1 | p99 ms at 64 | heavy MLP at 16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, server in results["servers"].items():
        mlp = server["mlp"]
        heavy = server.get("heavy_mlp_16")
        rates = " | ".join(f"{mlp[str(count)]['rps']:,.0f}" for count in (1, 16, 64))
        heavy_rate = f"{heavy['rps']:,.0f}" if heavy else "-"
        lines.append(
            f"| {name} | {rates} | {mlp['1']['p50_ms']:.2f} | {mlp['64']['p99_ms']:.1f} "
            f"| {heavy_rate} |"
        )
    small = results["in_process_mlp"]
    heavy = results["in_process_heavy_mlp"]
    lines.append(
        f"| onnxruntime in-process (rows/s) | {small['rows_per_second']:,.0f} "
        f"(batch {small['batch']}) | | | | | {heavy['rows_per_second']:,.0f} "
        f"(batch {heavy['batch']}) |"
    )
    return "\n".join(lines)


def ratios(results: dict[str, Any]) -> str:
    servers = results["servers"]
    bare = servers["bare ASGI + onnxruntime"]
    lines = []
    for name in ("servekit (1 worker)", "servekit (2 workers)"):
        ours = servers[name]
        best = results["in_process_heavy_mlp"]["rows_per_second"]
        heavy_fraction = ours["heavy_mlp_16"]["rps"] / best
        speedup = ours["mlp"]["64"]["rps"] / bare["mlp"]["64"]["rps"]
        latency = ours["mlp"]["1"]["p50_ms"] - bare["mlp"]["1"]["p50_ms"]
        lines.append(
            f"- {name}: {speedup:.2f}x the bare server at 64 connections; heavy MLP at 16 "
            f"connections = {heavy_fraction:.0%} of onnxruntime's best in-process rate; p50 at "
            f"1 connection {latency:+.2f} ms against the bare server"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=1, help="wrk runs per point (median kept)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        repository = write_repository(Path(directory) / "models")
        body = Path(directory) / "body.json"
        row = np.random.default_rng(1).random(784).round(3).tolist()
        body.write_text(json.dumps({"instances": [row]}))
        results = measure(args, repository, body)
    print()
    print(json.dumps(results["machine"]))
    print(table(results))
    print(ratios(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
