"""Check that `servekit bench` is not the bottleneck: its rate against wrk's, on one endpoint.

    python benchmarks/run_generator.py [--seconds 8] [--connections 16]

servekit (1 worker) serves the small MLP on 127.0.0.1. wrk and `servekit bench` (closed loop,
the same number of connections, 1 and 2 client processes) post the same TF Serving JSON row to
it in turn, and the script prints each rate and its ratio to wrk's. Needs wrk. Both send the
same 784 values; wrk in the row format, servekit bench in the columnar one. The generators take
turns for `--rounds` rounds, and the median of each is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import write_repository
from run_throughput import free_port, machine, running, servekit_command, wrk


def bench_rate(
    url: str, row: Path, connections: int, seconds: int, processes: int, output: Path
) -> float:
    subprocess.run(
        [sys.executable, "-m", "servekit", "bench", url, "--model", "mlp", "--input", str(row),
         "--protocol", "tfserving", "--concurrency", str(connections),
         "--duration", str(seconds), "--warmup", "2", "--processes", str(processes),
         "--json", str(output)],
        check=True, capture_output=True,
    )  # fmt: skip
    step = json.loads(output.read_text())["steps"][0]
    if step["errors"]:
        raise RuntimeError(f"servekit bench saw errors: {step['errors']}")
    return float(step["throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        repository = write_repository(directory / "models")
        body = directory / "body.json"
        row = np.random.default_rng(1).random(784).round(3).tolist()
        body.write_text(json.dumps({"instances": [row]}))
        # The same row for servekit bench, which writes it as {"inputs": {"x": [[...]]}}.
        row_file = directory / "row.npy"
        np.save(row_file, np.array([row], dtype=np.float32))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        samples: dict[str, list[float]] = {}
        with running(servekit_command(repository, port, 1), f"{base}/v2/health/live"):
            wrk(f"{base}/v1/models/mlp:predict", body, args.connections, 2)  # warm-up
            # Rounds interleave the generators, so drift in the machine's speed hits all alike.
            for _ in range(args.rounds):
                samples.setdefault("wrk", []).append(
                    wrk(f"{base}/v1/models/mlp:predict", body, args.connections, args.seconds)[
                        "rps"
                    ]
                )
                for processes in (1, 2):
                    samples.setdefault(f"servekit bench, {processes} process(es)", []).append(
                        bench_rate(
                            base, row_file, args.connections, args.seconds, processes,
                            directory / "b.json",
                        )
                    )  # fmt: skip
        rates = {name: statistics.median(values) for name, values in samples.items()}
    print(json.dumps(machine()))
    print(f"| generator | requests/s at {args.connections} connections (median) | vs wrk |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / rates['wrk']:.2f}x |")


if __name__ == "__main__":
    main()
