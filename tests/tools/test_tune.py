"""`servekit tune` on a tiny model and a small search space."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import ServerProcess
from tests.toy_models import write_adder


def test_tune_writes_settings_the_server_loads(tmp_path: Path) -> None:
    write_adder(tmp_path)
    model_dir = tmp_path / "adder"
    (model_dir / "servekit.yaml").write_text("labels: {stable: 1}\n")
    report_dir = tmp_path / "report"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "tune", str(model_dir), "--p99-ms", "500",
         "--workers", "1", "--instances", "1,2", "--max-batch-size", "4,16",
         "--max-queue-delay-ms", "0", "--threads", "1", "--duration", "0.4", "--warmup", "0.1",
         "--max-concurrency", "4", "--report", str(report_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    report = json.loads((report_dir / "tune.json").read_text())
    # workers x instances first (2 candidates), then one more batch size: 3 servers in all.
    assert len(report["tried"]) == 3
    assert all(entry["throughput"] > 0 for entry in report["tried"])
    best = report["best"]["settings"]
    assert report["best"]["throughput"] == max(entry["throughput"] for entry in report["tried"])
    assert (report_dir / "tune.png").read_bytes().startswith(b"\x89PNG")

    written = yaml.safe_load((model_dir / "servekit.yaml").read_text())
    assert written["labels"] == {"stable": 1}
    assert written["instances"] == best["instances"]
    assert written["batching"]["max_batch_size"] == best["max_batch_size"]
    assert written["intra_op_threads"] == 1
    assert "serve with --workers 1" in result.stdout

    server = ServerProcess("--model_base_path", str(model_dir), "--model_name", "adder")
    try:
        response = httpx.post(
            f"{server.url}/v1/models/adder/labels/stable:predict",
            json={"instances": [[1.0, 2.0, 3.0]]},
        )
        assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}
        assert "invalid servekit.yaml" not in server.log
    finally:
        server.stop()


def test_tune_reports_an_unreachable_target(tmp_path: Path) -> None:
    write_adder(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "tune", str(tmp_path / "adder"), "--p99-ms", "0.001",
         "--workers", "1", "--instances", "1", "--max-batch-size", "8",
         "--max-queue-delay-ms", "0", "--threads", "0", "--duration", "0.3", "--warmup", "0",
         "--max-concurrency", "1", "--report", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no candidate kept p99 under 0.001 ms" in result.stderr
    assert not (tmp_path / "adder" / "servekit.yaml").exists()


def test_tune_checks_its_inputs_first(tmp_path: Path) -> None:
    write_adder(tmp_path)
    model_dir = tmp_path / "adder"
    fast = ["--workers", "1", "--instances", "1", "--duration", "0.2", "--warmup", "0"]
    cases = [
        (model_dir / "1", "has no version folders"),
    ]
    bad_yaml = tmp_path / "bad_yaml"
    shutil.copytree(model_dir, bad_yaml)
    (bad_yaml / "servekit.yaml").write_text("batching: [unclosed\n")
    cases.append((bad_yaml, "is not valid YAML"))
    bad_key = tmp_path / "bad_key"
    shutil.copytree(model_dir, bad_key)
    (bad_key / "servekit.yaml").write_text("bogus_key: 1\n")
    cases.append((bad_key, "bogus_key"))
    for folder, expected in cases:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "servekit", "tune", str(folder), "--p99-ms", "20", *fast,
             "--report", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert time.monotonic() - started < 15
