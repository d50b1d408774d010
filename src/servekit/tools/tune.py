"""`servekit tune`: find the settings that give a model the most throughput under a p99 target.

Each candidate runs in its own `servekit serve` on 127.0.0.1 (free ports, gRPC off). It serves a
copy of the model folder whose `servekit.yaml` carries the candidate's settings, and the load
generator of `servekit bench` drives it in a closed loop of 1, 2, 4, ... callers. The
candidate's score is the highest throughput of a step whose p99 stayed under the target without
errors. The ramp stops at the first step over the target, because more callers only queue more.

The search is coordinate-wise and starts from a coarse grid: every combination of workers and
instances, the settings that change the most. From the best of those it tries each value of max
batch size, max queue delay and runtime threads in turn, keeping a value only if it beats the
best so far. A value that loses is not combined with the others again, which is how the
search prunes the full grid (which would be the product of all the value lists).

The winner's per-model settings (instances, runtime threads, batching) are written to the
model's `servekit.yaml`, keeping its other keys. `--workers` is a server flag, not a model
setting, so the report recommends it instead.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from servekit.config.model_config import MODEL_CONFIG_FILE, load_model_options
from servekit.core.options import ServableOptions
from servekit.repository.layout import ModelSource
from servekit.server.sockets import bind
from servekit.tools.bench.runner import BenchSettings, run_bench

_START_SECONDS = 60


@dataclass(frozen=True)
class Candidate:
    workers: int = 1
    instances: int = 1
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    intra_op_threads: int = 0

    def label(self) -> str:
        return (
            f"workers={self.workers} instances={self.instances} "
            f"max_batch_size={self.max_batch_size} delay_ms={self.max_queue_delay_ms:g} "
            f"threads={self.intra_op_threads or 'auto'}"
        )


@dataclass(frozen=True)
class SearchSpace:
    workers: tuple[int, ...] = (1, 2)
    instances: tuple[int, ...] = (1, 2)
    max_batch_size: tuple[int, ...] = (8, 32)
    max_queue_delay_ms: tuple[float, ...] = (0.0, 2.0)
    intra_op_threads: tuple[int, ...] = (0, 1)


@dataclass(frozen=True)
class TuneSettings:
    model_dir: Path
    p99_ms: float
    space: SearchSpace = SearchSpace()
    protocol: str = "v2-binary"
    rows: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    max_concurrency: int = 64
    input_file: Path | None = None


Progress = Callable[[str], None]


def tune(settings: TuneSettings, progress: Progress = print) -> dict[str, Any]:
    """Search the space, write the winner to servekit.yaml, and return the report."""
    model_dir = settings.model_dir
    _check_model_dir(model_dir)
    existing = _read_config(model_dir)
    space = settings.space
    for values in _every_value(space):
        _check_settings(model_dir, _merged(existing, values))
    tried: list[dict[str, Any]] = []
    scores: dict[Candidate, dict[str, Any]] = {}

    def score(candidate: Candidate) -> dict[str, Any]:
        if candidate not in scores:
            progress(f"trying {candidate.label()}")
            result = _evaluate(settings, existing, candidate)
            scores[candidate] = result
            tried.append({"settings": asdict(candidate), **result})
            progress(f"  -> {result['throughput']:,.1f} req/s at p99 {result['p99_ms']:.2f} ms")
        return scores[candidate]

    def better(first: Candidate, second: Candidate) -> Candidate:
        return first if score(first)["throughput"] >= score(second)["throughput"] else second

    best = Candidate(
        workers=space.workers[0],
        instances=space.instances[0],
        max_batch_size=space.max_batch_size[-1],
        max_queue_delay_ms=space.max_queue_delay_ms[0],
        intra_op_threads=space.intra_op_threads[0],
    )
    for workers in space.workers:
        for instances in space.instances:
            best = better(best, replace(best, workers=workers, instances=instances))
    for size in space.max_batch_size:
        best = better(best, replace(best, max_batch_size=size))
    for delay in space.max_queue_delay_ms:
        best = better(best, replace(best, max_queue_delay_ms=delay))
    for threads in space.intra_op_threads:
        best = better(best, replace(best, intra_op_threads=threads))
    winner = scores[best]
    report: dict[str, Any] = {
        "model": model_dir.name,
        "p99_target_ms": settings.p99_ms,
        "protocol": settings.protocol,
        "rows_per_request": settings.rows,
        "tried": tried,
        "best": {"settings": asdict(best), **winner},
        "server_flags": f"--workers {best.workers}",
    }
    if winner["throughput"] > 0:
        _write_config(model_dir, existing, best)
        report["written"] = str(model_dir / MODEL_CONFIG_FILE)
    return report


def _evaluate(
    settings: TuneSettings, existing: dict[str, Any], candidate: Candidate
) -> dict[str, Any]:
    """Start a server with the candidate and ramp the callers up until p99 passes the target."""
    best = {"throughput": 0.0, "p99_ms": float("nan"), "concurrency": 0}
    steps = []
    with _candidate_server(settings.model_dir, existing, candidate) as url:
        concurrency = 1
        while concurrency <= settings.max_concurrency:
            bench = BenchSettings(
                url=url,
                model=settings.model_dir.name,
                protocol=settings.protocol,
                concurrency=(concurrency,),
                duration=settings.duration,
                warmup=settings.warmup,
                rows=settings.rows,
                input_file=settings.input_file,
                metrics_url=f"{url}/metrics",
            )
            step = run_bench(bench)["steps"][0]
            steps.append(
                {key: step[key] for key in ("load", "throughput", "p50_ms", "p99_ms", "errors")}
            )
            if step["errors"] or not step["p99_ms"] <= settings.p99_ms:
                break
            if step["throughput"] > best["throughput"]:
                best = {
                    "throughput": step["throughput"],
                    "p99_ms": step["p99_ms"],
                    "concurrency": concurrency,
                }
            concurrency *= 2
    return {**best, "steps": steps}


@contextlib.contextmanager
def _candidate_server(
    model_dir: Path, existing: dict[str, Any], candidate: Candidate
) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="servekit-tune-") as directory:
        repository = Path(directory)
        served = repository / model_dir.name
        shutil.copytree(model_dir, served, symlinks=True)
        (served / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(_merged(existing, candidate)))
        with bind("127.0.0.1", 0) as probe:
            port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "servekit", "serve", "--model_repository", str(repository),
            "--rest_api_port", str(port), "--port", "0", "--workers", str(candidate.workers),
            "--file_system_poll_wait_seconds", "0", "--log_level", "warning",
        ]  # fmt: skip
        log = repository / "server.log"
        with log.open("wb") as output:
            # A file, not a pipe: an unread pipe would stop the server once it is full.
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, model_dir.name, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, model: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the candidate serves the model; fail at once if it cannot.

    The server loads its models before it serves HTTP, so any response other than ready means
    the model failed to load, and waiting longer would not help.
    """
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for a candidate exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            reason = exc.read().decode(errors="replace")
            raise RuntimeError(
                f"the server for a candidate cannot serve {model}: {reason}\n"
                f"{log.read_text()[-2000:]}"
            ) from None
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"the server for a candidate was not ready in {_START_SECONDS} s")


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a mapping of settings")
    return document


def _check_model_dir(model_dir: Path) -> None:
    if not any(child.is_dir() and child.name.isdigit() for child in model_dir.iterdir()):
        raise ValueError(
            f"{model_dir} has no version folders (1/, 2/, ...); pass the model's folder, "
            "not a version folder or a repository"
        )


def _check_settings(model_dir: Path, document: dict[str, Any]) -> None:
    """Raise ValueError unless the server would accept `document` as the model's servekit.yaml."""
    text = yaml.safe_dump(document, sort_keys=False)
    try:
        load_model_options(ModelSource(model_dir.name, model_dir, override=text), ServableOptions())
    except ValueError as exc:
        raise ValueError(f"invalid settings for {model_dir.name}: {exc}") from None


def _merged(existing: dict[str, Any], candidate: Candidate) -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(existing)
    document["instances"] = candidate.instances
    document["intra_op_threads"] = candidate.intra_op_threads
    batching = document.setdefault("batching", {})
    batching["max_batch_size"] = candidate.max_batch_size
    batching["max_queue_delay_ms"] = candidate.max_queue_delay_ms
    if "allowed_batch_sizes" in batching:
        # Sizes above the new maximum would make the file invalid.
        allowed = [
            size for size in batching["allowed_batch_sizes"] if size < candidate.max_batch_size
        ]
        batching["allowed_batch_sizes"] = [*allowed, candidate.max_batch_size]
    return document


def _every_value(space: SearchSpace) -> list[Candidate]:
    """Return one candidate per value of every setting, to check each before any server starts."""
    base = Candidate()
    return [
        *(replace(base, instances=value) for value in space.instances),
        *(replace(base, max_batch_size=value) for value in space.max_batch_size),
        *(replace(base, max_queue_delay_ms=value) for value in space.max_queue_delay_ms),
        *(replace(base, intra_op_threads=value) for value in space.intra_op_threads),
    ]


def _write_config(model_dir: Path, existing: dict[str, Any], best: Candidate) -> None:
    document = _merged(existing, best)
    _check_settings(model_dir, document)  # never write a file the server would reject
    (model_dir / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(document, sort_keys=False))


def plot_png(report: dict[str, Any]) -> bytes:
    """Draw each candidate's best throughput against its p99, marking the chosen one."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=110)
    for index, entry in enumerate(report["tried"]):
        axes.scatter(entry["p99_ms"], entry["throughput"], color="tab:blue")
        axes.annotate(str(index + 1), (entry["p99_ms"], entry["throughput"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))  # fmt: skip
    best = report["best"]
    axes.scatter(best["p99_ms"], best["throughput"], s=160, facecolors="none",
                 edgecolors="tab:red", label="chosen")  # fmt: skip
    axes.axvline(report["p99_target_ms"], color="tab:gray", linestyle="--", label="p99 target")
    axes.set_xlabel("p99 latency at the best step (ms)")
    axes.set_ylabel("throughput (requests per second)")
    axes.set_title(f"servekit tune: {report['model']} (numbers: order tried)", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()
