"""Starting and stopping the server process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from servekit.config.settings import ServerSettings, tf_serving_container_settings
from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_adder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(toy_repository: Path, sig: int) -> None:
    server = ServerProcess("--model_repository", str(toy_repository))
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert server.stop(sig) == 0
    assert "unloaded model adder version 1" in server.log
    assert "Traceback" not in server.log


def test_logs_each_loaded_version_with_time(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository))
    _ = server.url
    server.stop()
    loaded = re.findall(r"loaded model (\w+) version (\d+) in (\d+\.\d+) s", server.log)
    assert {name for name, _, _ in loaded} == {
        path.name for path in toy_repository.iterdir() if path.is_dir()
    }


def test_binds_loopback_by_default(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository))
    assert server.url.startswith("http://127.0.0.1:")
    server.stop()


def test_single_model_flags(tmp_path: Path) -> None:
    write_adder(tmp_path, name="base")
    server = ServerProcess("--model_name", "plus", "--model_base_path", str(tmp_path / "base"))
    response = httpx.post(f"{server.url}/v1/models/plus:predict", json={"instances": [[1, 2, 3]]})
    server.stop()
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_tf_serving_container_variables(tmp_path: Path) -> None:
    """MODEL_NAME and MODEL_BASE_PATH serve $MODEL_BASE_PATH/$MODEL_NAME, as TF Serving's image."""
    write_adder(tmp_path, name="plus")
    environ = {"MODEL_NAME": "plus", "MODEL_BASE_PATH": str(tmp_path)}
    server = ServerProcess(env={**environ, "SERVEKIT_MODEL_REPOSITORY": str(tmp_path / "none")})
    response = httpx.post(f"{server.url}/v1/models/plus:predict", json={"instances": [[1, 2, 3]]})
    server.stop()
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_flags_win_over_container_variables(tmp_path: Path) -> None:
    given = {"model_repository": tmp_path}
    assert tf_serving_container_settings(given, {"MODEL_NAME": "plus"}) == given
    # The image's default repository gives way to MODEL_NAME.
    environ = {"MODEL_NAME": "plus", "SERVEKIT_MODEL_REPOSITORY": str(tmp_path)}
    expected = {
        "model_name": "plus",
        "model_base_path": Path("/models/plus"),
        "model_repository": None,
        "model_config_file": None,
    }
    assert tf_serving_container_settings({}, environ) == expected
    assert tf_serving_container_settings({}, {"MODEL_NAME": "plus"}) == expected


def test_kubernetes_service_links_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Service named servekit sets these in every pod of its namespace.
    monkeypatch.setenv("SERVEKIT_PORT", "tcp://10.0.0.1:8501")
    monkeypatch.setenv("SERVEKIT_REST_API_PORT", "tcp://10.0.0.2:80")
    settings = ServerSettings()
    assert (settings.port, settings.rest_api_port) == (8500, 8501)
    monkeypatch.setenv("SERVEKIT_PORT", "9000")
    assert ServerSettings().port == 9000


def test_kebab_case_flags_and_json_logs(toy_repository: Path) -> None:
    server = ServerProcess("--model-repository", str(toy_repository), "--log-format", "json")
    _ = server.url
    server.stop()
    records = [json.loads(line) for line in server.lines]
    assert any(record["message"].startswith("loaded model adder") for record in records)
    assert all(set(record) >= {"time", "level", "logger", "message"} for record in records)


def test_access_log_has_request_id(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository), "--access_log")
    response = httpx.get(f"{server.url}/v2/health/live", headers={"x-request-id": "abc-123"})
    server.stop()
    assert response.headers["x-request-id"] == "abc-123"
    assert "GET /v2/health/live 200" in server.log
    assert "id=abc-123" in server.log


def test_generated_request_id(toy: httpx.Client) -> None:
    first = toy.get("/v2/health/live").headers["x-request-id"]
    second = toy.get("/v2/health/live").headers["x-request-id"]
    assert first
    assert first != second
    assert_json_error(toy.get("/nowhere"), 404)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--rest_api_port", "70000"], "rest_api_port"),
        (["--model_base_path", "/nonexistent/models"], "does not exist"),
        (["--model_base_path", ".", "--model_repository", "."], "give only one of"),
        (["--log_format", "xml"], "xml"),
        (["--no_such_flag"], "no_such_flag"),
    ],
)
def test_invalid_flags(flags: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_tf_serving_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in ("--rest_api_port", "--rest_api_host", "--model_name", "--model_base_path"):
        assert flag in result.stdout


def test_control_characters_escaped_in_text_log(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository))
    forged = "x%0A2026-01-01 00:00:00,000 INFO servekit: loaded model evil version 1"
    response = httpx.get(f"{server.url}/v2/models/{forged}/ready")
    server.stop()
    assert response.status_code == 404
    assert "\\x0a2026-01-01" in server.log
    assert not any(line.startswith("2026-01-01") for line in server.lines)


def test_port_in_use(toy_server: ServerProcess) -> None:
    port = toy_server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--rest_api_port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_kebab_case_switch(toy_repository: Path) -> None:
    server = ServerProcess("--model-repository", str(toy_repository), "--access-log")
    httpx.get(f"{server.url}/v2/health/live")
    server.stop()
    assert "GET /v2/health/live 200" in server.log


def test_model_name_without_base_path_warns(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository), "--model_name", "x")
    _ = server.url
    server.stop()
    assert "--model_name is ignored without --model_base_path" in server.log


def test_metrics_method(toy: httpx.Client) -> None:
    response = toy.post("/metrics")
    assert_json_error(response, 405)
    assert response.headers["allow"] == "GET"
