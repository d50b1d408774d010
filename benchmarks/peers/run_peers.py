"""servekit against MLServer, LitServe and TorchServe on the same ONNX MLP, in one run.

    python benchmarks/peers/run_peers.py [--peers mlserver,litserve,torchserve] [--seconds 8]

Each peer gets a virtual environment of its own under benchmarks/peers/.venvs (created on the
first run: `pip install` of the peer, onnxruntime and numpy; TorchServe also needs Java 17 and
takes the pinned CPU build of torch 2.13.0). Each serves the small benchmark MLP (784 -> 512 ->
10) through onnxruntime with its own batching on (at most 32 rows, 1 ms wait), on 127.0.0.1.
wrk drives the peer and then servekit (defaults: batching on, 32 rows, no wait) with the same
body at 1, 16 and 64 connections; servekit gets the peer's request format (V2 JSON for
MLServer, TF Serving's row format for the others). Every server is checked to listen only on
127.0.0.1, and stopped after its runs. The script prints one table of servekit's rate divided
by each peer's, with the machine. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from models import write_repository  # noqa: E402 (after the path set-up above)
from run_throughput import free_port, machine, wrk  # noqa: E402

PACKAGES = {
    "mlserver": ["mlserver", "onnxruntime", "numpy"],
    "litserve": ["litserve", "onnxruntime", "numpy"],
    "torchserve": [
        # TorchServe's workers import yaml without declaring it.
        "torchserve",
        "torch-model-archiver",
        "torch==2.13.0",
        "pyyaml",
        "onnxruntime",
        "numpy",
    ],
}
CONNECTIONS = (1, 16, 64)
_LOOPBACK = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")
_LISTENER = re.compile(r"LISTEN\s+\d+\s+\d+\s+(\S+):(\d+)\s+.*pid=(\d+)")


@dataclass
class Server:
    """How to start one server and where to send its requests."""

    command: list[str]
    ready_url: str
    url: str
    body: Path
    cwd: Path | None = None


def venv_python(venvs: Path, peer: str) -> Path:
    """Return the peer's interpreter, creating its environment on the first run."""
    python = venvs / peer / "bin" / "python"
    if not python.exists():
        print(f"installing {peer} into {venvs / peer}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venvs / peer)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *PACKAGES[peer]], check=True
        )
    return python


def bodies(directory: Path) -> dict[str, Path]:
    row = np.random.default_rng(1).random(784).round(3).tolist()
    tf_body, v2_body = directory / "tf.json", directory / "v2.json"
    tf_body.write_text(json.dumps({"instances": [row]}))
    v2_body.write_text(
        json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": row}]})
    )
    return {"tf": tf_body, "v2": v2_body}


def mlserver(python: Path, model: Path, directory: Path, body: dict[str, Path]) -> Server:
    port = free_port()
    folder = directory / "mlserver"
    (folder / "mlp").mkdir(parents=True)
    shutil.copy(model, folder / "mlp" / "model.onnx")
    shutil.copy(HERE / "mlserver_runtime.py", folder / "mlserver_runtime.py")
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,
        # MLServer's inference worker processes fail to start here (mlserver 1.7.1 with uvloop
        # 0.23: "There is no current event loop"), so inference runs in the server process.
        "parallel_workers": 0,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": "mlp",
        "implementation": "mlserver_runtime.OnnxModel",
        "max_batch_size": 32,
        "max_batch_time": 0.001,
        "parameters": {"uri": str(folder / "mlp" / "model.onnx")},
    }
    (folder / "mlp" / "model-settings.json").write_text(json.dumps(model_settings))
    base = f"http://127.0.0.1:{port}"
    return Server(
        [str(python.parent / "mlserver"), "start", str(folder)],
        f"{base}/v2/models/mlp/ready",
        f"{base}/v2/models/mlp/infer",
        body["v2"],
        cwd=folder,
    )


def litserve(python: Path, model: Path, directory: Path, body: dict[str, Path]) -> Server:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    return Server(
        [str(python), str(HERE / "litserve_app.py"), str(model), str(port)],
        f"{base}/health",
        f"{base}/v1/models/mlp:predict",
        body["tf"],
    )


def torchserve(python: Path, model: Path, directory: Path, body: dict[str, Path]) -> Server:
    folder = directory / "torchserve"
    store = folder / "store"
    store.mkdir(parents=True)
    subprocess.run(
        [str(python.parent / "torch-model-archiver"), "--model-name", "mlp", "--version", "1",
         "--serialized-file", str(model), "--handler", str(HERE / "torchserve_handler.py"),
         "--export-path", str(store)],
        check=True,
    )  # fmt: skip
    inference, management, metrics = free_port(), free_port(), free_port()
    registration = {
        "mlp": {"1": {"defaultVersion": True, "marName": "mlp.mar", "minWorkers": 1,
                      "maxWorkers": 1, "batchSize": 32, "maxBatchDelay": 1}}
    }  # fmt: skip
    config = folder / "config.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{inference}\n"
        f"management_address=http://127.0.0.1:{management}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\n"
        f"grpc_inference_address=127.0.0.1\ngrpc_management_address=127.0.0.1\n"
        f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        f"model_store={store}\nload_models=mlp.mar\nmodels={json.dumps(registration)}\n"
        "disable_token_authorization=true\ninstall_py_dep_per_model=false\n"
        "enable_metrics_api=false\n"
    )
    base = f"http://127.0.0.1:{inference}"
    return Server(
        [str(python.parent / "torchserve"), "--start", "--foreground", "--ncs",
         "--disable-token-auth", "--ts-config", str(config), "--model-store", str(store)],
        f"{base}/ping",
        f"{base}/predictions/mlp",
        body["tf"],
        cwd=folder,
    )  # fmt: skip


def servekit(repository: Path, body: Path, kind: str) -> Server:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = "/v2/models/mlp/infer" if kind == "v2" else "/v1/models/mlp:predict"
    return Server(
        [sys.executable, "-m", "servekit", "serve", "--model_repository", str(repository),
         "--rest_api_port", str(port), "--port", "0", "--log_level", "warning"],
        f"{base}/v2/health/ready",
        base + path,
        body,
    )  # fmt: skip


@contextmanager
def running(server: Server, log: Path) -> Iterator[None]:
    """Start the server in its own process group, check its sockets, and stop it afterwards."""
    with log.open("w") as output:
        process = subprocess.Popen(
            server.command, stdout=output, stderr=subprocess.STDOUT, cwd=server.cwd,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_ready(server, process, log)
        _check_loopback_only(process.pid)
        yield
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(server: Server, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{server.command[0]} exited:\n{log.read_text()[-3000:]}")
        # Ready means a real prediction succeeds: some servers pass their health check before
        # their model's worker has started.
        request = urllib.request.Request(
            server.url, data=server.body.read_bytes(), headers={"content-type": "application/json"}
        )
        with suppress(OSError), urllib.request.urlopen(request, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.command[0]} was not ready in time:\n{log.read_text()[-3000:]}")


def _check_loopback_only(group: int) -> None:
    """Raise if any process of the server's group listens on an address other than loopback."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    for address, port, pid in _LISTENER.findall(output):
        with suppress(ProcessLookupError):
            if os.getpgid(int(pid)) == group and address not in _LOOPBACK:
                raise RuntimeError(f"a peer process listens on {address}:{port}; stopping")


def measure(server: Server, log: Path, seconds: int) -> dict[str, float]:
    """Return requests per second by connection count; fail if any request failed."""
    rates = {}
    with running(server, log):
        wrk(server.url, server.body, 16, 2)  # warm-up
        for count in CONNECTIONS:
            result = wrk(server.url, server.body, count, seconds)
            if result["errors"]:
                raise RuntimeError(f"{result['errors']} requests failed on {server.url}")
            rates[str(count)] = result["rps"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="mlserver,litserve,torchserve")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    builders = {"mlserver": mlserver, "litserve": litserve, "torchserve": torchserve}
    results: dict[str, Any] = {"machine": machine(), "peers": {}}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        repository = write_repository(directory / "models")
        model = repository / "mlp" / "1" / "model.onnx"
        body = bodies(directory)
        for peer in args.peers.split(","):
            python = venv_python(args.venvs, peer)
            server = builders[peer](python, model, directory, body)
            kind = "v2" if server.body == body["v2"] else "tf"
            peer_rates = measure(server, directory / f"{peer}.log", args.seconds)
            ours = measure(
                servekit(repository, server.body, kind), directory / "sk.log", args.seconds
            )
            results["peers"][peer] = {"peer": peer_rates, "servekit": ours, "format": kind}
            print(peer, json.dumps(results["peers"][peer]), flush=True)
    print(json.dumps(results["machine"]))
    print("| peer | request format | connections | peer req/s | servekit req/s | servekit / peer |")
    print("|---|---|---|---|---|---|")
    for peer, entry in results["peers"].items():
        for count in CONNECTIONS:
            theirs, ours = entry["peer"][str(count)], entry["servekit"][str(count)]
            form = "V2 JSON" if entry["format"] == "v2" else "TF row JSON"
            ratio = ours / theirs
            print(f"| {peer} | {form} | {count} | {theirs:,.0f} | {ours:,.0f} | {ratio:.2f}x |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
