"""Compare servekit's protocols on one model in one run: REST JSON, REST binary and gRPC.

    python benchmarks/run_protocols.py [--seconds 8] [--rows 1,32] [--output results.json]

One servekit (1 worker, defaults) serves the small MLP on 127.0.0.1; with `--compare-spinning`,
a second one with `--runtime_spinning` follows in the same run. h2load (Debian's
nghttp2-client) drives every protocol, so the load generator is the same C program for all of
them: TF Serving REST JSON and KServe V2 REST with the binary extension over HTTP/1.1, and
KServe V2 gRPC with raw_input_contents over HTTP/2 (one stream per connection, as a unary
client sends). h2load does not read gRPC status trailers, so errors are counted from servekit's
own request counter before and after each run. Each run is preceded by a 2 s warm-up.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import write_repository
from run_throughput import free_port, machine, running, servekit_command

from servekit.protocols.protos import kserve_v2_pb2 as pb

_REQUESTS = re.compile(r'servekit_requests_total\{code="(\d+)",model="mlp".*\} ([\d.e+]+)')
_CPU = re.compile(r"^process_cpu_seconds_total ([\d.e+]+)", re.MULTILINE)


def bodies(directory: Path, rows: int) -> dict[str, tuple[Path, list[str]]]:
    """Write one request of `rows` rows in each protocol; return each file and its headers."""
    x = np.random.default_rng(1).random((rows, 784), dtype=np.float32).round(3)
    json_body = directory / f"tfserving_{rows}.json"
    json_body.write_text(json.dumps({"instances": x.tolist()}))
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [rows, 784], "datatype": "FP32",
                     "parameters": {"binary_data_size": x.nbytes}}],
         "parameters": {"binary_data_output": True}}
    ).encode()  # fmt: skip
    binary_body = directory / f"v2_{rows}.bin"
    binary_body.write_bytes(header + x.astype("<f4").tobytes())
    message = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    message.inputs.add(name="x", datatype="FP32", shape=[rows, 784])
    payload = message.SerializeToString()
    grpc_body = directory / f"grpc_{rows}.bin"
    # gRPC's length-prefixed message: an uncompressed flag byte and a big-endian length.
    grpc_body.write_bytes(struct.pack(">BI", 0, len(payload)) + payload)
    return {
        "REST JSON (TF Serving)": (json_body, ["content-type: application/json"]),
        "REST binary (V2)": (
            binary_body,
            [
                "content-type: application/octet-stream",
                f"inference-header-content-length: {len(header)}",
            ],
        ),
        "gRPC (V2, raw contents)": (
            grpc_body,
            ["content-type: application/grpc", "te: trailers"],
        ),
    }


def h2load(
    url: str, body: Path, headers: list[str], http1: bool, connections: int, seconds: int, log: Path
) -> dict[str, float]:
    command = [
        "h2load", "-c", str(connections), "-t", str(min(2, connections)), "-m", "1",
        "-D", str(seconds), "--warm-up-time", "2", "-d", str(body), "--log-file", str(log),
    ]  # fmt: skip
    if http1:
        command.append("--h1")
    for header in headers:
        command += ["-H", header]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", output)
    if match is None:
        raise RuntimeError(f"h2load printed no result:\n{output}")
    # Each log line: start time (us), HTTP status, duration (us).
    durations = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line)
    quantiles = statistics.quantiles(durations, n=100)
    return {
        "rps": float(match.group(2)),
        "p50_ms": quantiles[49] / 1000,
        "p99_ms": quantiles[98] / 1000,
    }


def counters(metrics_url: str) -> tuple[float, float, float]:
    """Read the model's successful and failed requests and the server's CPU seconds.

    499s count as neither: h2load closes its connections when its time is up, which cancels
    the requests it still has in flight.
    """
    text = httpx.get(metrics_url).text
    codes = _REQUESTS.findall(text)
    answered = sum(float(value) for code, value in codes if code == "200")
    failed = sum(float(value) for code, value in codes if code not in ("200", "499"))
    cpu = float(_CPU.search(text).group(1))  # type: ignore[union-attr]
    return answered, failed, cpu


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    repository = write_repository(directory / "models")
    rest_port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{rest_port}"
    urls = {
        "REST JSON (TF Serving)": (f"{base}/v1/models/mlp:predict", True),
        "REST binary (V2)": (f"{base}/v2/models/mlp/infer", True),
        "gRPC (V2, raw contents)": (
            f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer",
            False,
        ),
    }
    results: dict[str, Any] = {"machine": machine(), "seconds": args.seconds, "runs": []}
    configurations = [""] + (["--runtime_spinning"] if args.compare_spinning else [])
    for flags in configurations:
        command = servekit_command(repository, rest_port, 1, grpc_port) + flags.split()
        with running(command, f"{base}/v2/health/live"):
            for rows in args.rows:
                for protocol, (body, headers) in bodies(directory, rows).items():
                    url, http1 = urls[protocol]
                    for connections in args.connections:
                        log = directory / "latencies.log"
                        log.unlink(missing_ok=True)  # h2load appends to an existing file
                        before = counters(f"{base}/metrics")
                        result = h2load(url, body, headers, http1, connections, args.seconds, log)
                        after = counters(f"{base}/metrics")
                        result["errors"] = after[1] - before[1]
                        # Server CPU time per successful request, warm-up included on both sides.
                        result["cpu_us"] = 1e6 * (after[2] - before[2]) / (after[0] - before[0])
                        run = {
                            "flags": flags,
                            "protocol": protocol,
                            "rows": rows,
                            "connections": connections,
                        }
                        results["runs"].append({**run, **result})
                        print(json.dumps(results["runs"][-1]), flush=True)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| server flags | protocol | rows | connections | requests/s | rows/s | p50 ms | p99 ms "
        "| server CPU us/request | vs JSON |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {
        (run["flags"], run["rows"], run["connections"]): run["rps"]
        for run in results["runs"]
        if run["protocol"].startswith("REST JSON")
    }
    for run in results["runs"]:
        ratio = run["rps"] / baseline[(run["flags"], run["rows"], run["connections"])]
        lines.append(
            f"| {run['flags'] or 'defaults'} | {run['protocol']} | {run['rows']} "
            f"| {run['connections']} | {run['rps']:,.0f} "
            f"| {run['rps'] * run['rows']:,.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} "
            f"| {run['cpu_us']:,.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def numbers(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="length of each h2load run")
    parser.add_argument("--rows", type=numbers, default=[1, 32], help="rows per request")
    parser.add_argument("--connections", type=numbers, default=[1, 16], help="connections")
    parser.add_argument(
        "--compare-spinning",
        action="store_true",
        help="also run every point with --runtime_spinning, in the same run",
    )
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        results = measure(args, Path(directory))
    print()
    print(json.dumps(results["machine"]))
    print(table(results))
    if any(run["errors"] for run in results["runs"]):
        sys.exit("some requests failed; see the errors column of the JSON output")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
