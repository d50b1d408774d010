"""The V2 repository API and the `servekit models` command."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_adder

BODY = {"instances": [[1, 2, 3]]}


def models_command(url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "models", "--url", url, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_index_load_and_unload(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path))
    url = server.url
    try:
        index = httpx.post(f"{url}/v2/repository/index").json()
        assert index == [{"name": "adder", "version": "1", "state": "READY", "reason": ""}]

        assert httpx.post(f"{url}/v2/repository/models/adder/unload").status_code == 200
        assert_json_error(httpx.post(f"{url}/v1/models/adder:predict", json=BODY), 503)
        assert httpx.get(f"{url}/v2/models/adder/ready").status_code == 503

        assert httpx.post(f"{url}/v2/repository/models/adder/load").status_code == 200
        assert httpx.post(f"{url}/v1/models/adder:predict", json=BODY).status_code == 200

        write_adder(tmp_path, name="later")
        assert httpx.post(f"{url}/v2/repository/models/later/load").status_code == 200
        assert httpx.post(f"{url}/v1/models/later:predict", json=BODY).status_code == 200

        missing = httpx.post(f"{url}/v2/repository/models/nosuch/load")
        assert "not in the repository" in assert_json_error(missing, 404)
        traversal = httpx.post(f"{url}/v2/repository/models/..%2F..%2Fetc/load")
        assert_json_error(traversal, 404)
        assert_json_error(httpx.get(f"{url}/v2/repository/index"), 405)
    finally:
        server.stop()


def test_load_reports_failure(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path))
    url = server.url
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"junk")
    response = httpx.post(f"{url}/v2/repository/models/broken/load")
    server.stop()
    assert "failed to load model broken" in assert_json_error(response, 400)


def test_management_can_be_disabled(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path), "--no_enable_model_management")
    response = httpx.post(f"{server.url}/v2/repository/index")
    server.stop()
    assert "disabled" in assert_json_error(response, 404)


def test_models_command(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path))
    url = server.url
    listed = models_command(url, "list")
    unloaded = models_command(url, "unload", "adder")
    after = models_command(url, "list")
    loaded = models_command(url, "load", "adder")
    missing = models_command(url, "load", "nosuch")
    server.stop()
    assert listed.returncode == 0
    assert "adder\t1\tREADY" in listed.stdout
    assert unloaded.returncode == 0
    assert "adder\t1\tUNAVAILABLE" in after.stdout
    assert loaded.returncode == 0
    assert missing.returncode == 1
    assert "not in the repository" in missing.stderr


def test_models_command_without_server() -> None:
    # A port this test bound and released, so nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = models_command(f"http://127.0.0.1:{port}", "list")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


def test_set_label_and_config_override(tmp_path: Path) -> None:
    write_adder(tmp_path, version=1, amount=1.0)
    write_adder(tmp_path, version=2, amount=2.0)
    server = ServerProcess("--model_repository", str(tmp_path))
    url = server.url
    try:
        override = '{"version_policy": {"all": {}}}'
        loaded = httpx.post(
            f"{url}/v2/repository/models/adder/load", json={"parameters": {"config": override}}
        )
        assert loaded.status_code == 200
        index = httpx.post(f"{url}/v2/repository/index").json()
        assert [entry["state"] for entry in index] == ["READY", "READY"]

        command = models_command(url, "set-label", "adder", "stable", "1")
        assert command.returncode == 0, command.stderr
        stable = httpx.post(f"{url}/v1/models/adder/labels/stable:predict", json=BODY)
        assert stable.json() == {"predictions": [[2.0, 3.0, 4.0]]}

        refused = models_command(url, "set-label", "adder", "stable", "9")
        assert refused.returncode == 1
        assert "not available" in refused.stderr
        bad = httpx.post(f"{url}/v2/repository/models/adder/labels", json={"label": "a-b"})
        assert_json_error(bad, 400)
    finally:
        server.stop()


def test_separate_management_port(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path), "--model_management_port", "0")
    url = server.url
    match = re.search(r"serving management API on (http://\S+)", server.log)
    assert match is not None
    management = match.group(1)
    try:
        assert management.startswith("http://127.0.0.1:")
        assert httpx.post(f"{management}/v2/repository/index").status_code == 200
        on_rest = httpx.post(f"{url}/v2/repository/index")
        assert "own port" in assert_json_error(on_rest, 404)
        assert_json_error(httpx.post(f"{management}/v1/models/adder:predict", json=BODY), 404)
        assert httpx.post(f"{url}/v1/models/adder:predict", json=BODY).status_code == 200
    finally:
        server.stop()


def test_invalid_override_changes_nothing(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess(
        "--model_repository", str(tmp_path), "--file_system_poll_wait_seconds", "0.2"
    )
    url = server.url
    try:
        for config in ("{not json", '{"version_policy": {"latest": 0}}'):
            response = httpx.post(
                f"{url}/v2/repository/models/adder/load", json={"parameters": {"config": config}}
            )
            assert "invalid settings for model adder" in assert_json_error(response, 400)
            assert httpx.post(f"{url}/v1/models/adder:predict", json=BODY).status_code == 200
        assert httpx.post(f"{url}/v2/repository/models/adder/load").status_code == 200
        ready = httpx.post(f"{url}/v2/repository/index", json={"ready": True}).json()
        assert [entry["state"] for entry in ready] == ["READY"]
        (tmp_path / "adder" / "servekit.yaml").write_text("instances: [\n")
        time.sleep(1.2)
        assert httpx.post(f"{url}/v1/models/adder:predict", json=BODY).status_code == 200
    finally:
        server.stop()
    assert server.log.count("invalid servekit.yaml") == 1


def test_label_outside_policy_is_reported(tmp_path: Path) -> None:
    write_adder(tmp_path, version=1)
    write_adder(tmp_path, version=3)
    (tmp_path / "adder" / "servekit.yaml").write_text(
        "version_policy: {specific: [1]}\nlabels: {stable: 3}\n"
    )
    server = ServerProcess("--model_repository", str(tmp_path))
    _ = server.url
    server.stop()
    assert server.log.count("label stable of model adder points at version 3") == 1
