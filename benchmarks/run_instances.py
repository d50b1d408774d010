"""Two instances of a Python model: threads against processes, on a CPU-bound predict.

    python benchmarks/run_instances.py [--seconds 8] [--clients 8]

The model's predict spends its time in Python code (a loop over the row's values, about 5 ms
per row), so it holds the GIL throughout. One server (127.0.0.1) serves three copies of it:
one instance, two instances as threads (`instance_kind: thread`) and two instances as
processes (the default for Python models). `servekit bench` drives each in turn with
`--clients` closed-loop callers sending one row per request, and the script prints each rate
and its ratio to the single instance. Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from run_throughput import free_port, machine, running, servekit_command

MODEL = """
import numpy as np


class Model:
    inputs = (("x", "FP32", (-1, 16)),)
    outputs = (("y", "FP32", (-1,)),)

    def predict(self, inputs):
        rows = []
        for row in inputs["x"].tolist():
            total = 0.0
            for _ in range(6000):
                for value in row:
                    total = (total + value * value) % 1000.0
            rows.append(total)
        return {"y": np.array(rows, dtype=np.float32)}
"""
SETTINGS = {
    "one_instance": "batching: {enabled: false}\n",
    "two_threads": "instances: 2\ninstance_kind: thread\nbatching: {enabled: false}\n",
    "two_processes": "instances: 2\nbatching: {enabled: false}\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        models = directory / "models"
        for model, settings in SETTINGS.items():
            (models / model / "1").mkdir(parents=True)
            (models / model / "1" / "model.py").write_text(textwrap.dedent(MODEL))
            (models / model / "servekit.yaml").write_text(settings)
        rows = directory / "rows.npy"
        np.save(rows, np.random.default_rng(0).random((64, 16), dtype=np.float32))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = servekit_command(models, port, workers=1)
        with running(command, f"{base}/v2/health/ready"):
            for model in SETTINGS:
                output = directory / f"{model}.json"
                subprocess.run(
                    [sys.executable, "-m", "servekit", "bench", base, "--model", model,
                     "--input", str(rows), "--protocol", "v2", "--concurrency",
                     str(args.clients), "--duration", str(args.seconds), "--warmup", "2",
                     "--json", str(output)],
                    check=True, capture_output=True,
                )  # fmt: skip
                step = json.loads(output.read_text())["steps"][0]
                if step["errors"]:
                    raise RuntimeError(f"servekit bench saw errors on {model}: {step['errors']}")
                rates[model] = float(step["throughput"])
    print(json.dumps(machine()))
    print(f"\n| Python model, {args.clients} clients | requests/s | vs one instance |")
    print("|---|---|---|")
    for model, rate in rates.items():
        print(f"| {model.replace('_', ' ')} | {rate:,.1f} | {rate / rates['one_instance']:.2f}x |")


if __name__ == "__main__":
    main()
