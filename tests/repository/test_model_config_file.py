"""TF Serving's model config file, in text format and YAML, read once and reloaded."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ServerProcess
from tests.toy_models import write_adder, write_twoin

BODY = {"instances": [[1, 2, 3]]}


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def predict(url: str, path: str) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=BODY)


TEXT_CONFIG = """
model_config_list {
  config {
    name: "plus"
    base_path: "models/adder"
    model_platform: "onnx"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config { name: "other" base_path: "models/other" }
}
"""


def write_models(root: Path) -> None:
    write_adder(root / "models", version=1, amount=1.0)
    write_adder(root / "models", version=2, amount=2.0)
    write_adder(root / "models", name="other", version=1, amount=10.0)


def test_text_format_config(tmp_path: Path) -> None:
    write_models(tmp_path)
    config = tmp_path / "models.config"
    config.write_text(TEXT_CONFIG)
    server = ServerProcess("--model_config_file", str(config))
    url = server.url
    stable = predict(url, "/v1/models/plus/labels/stable:predict").json()
    canary = predict(url, "/v1/models/plus/labels/canary:predict").json()
    other = predict(url, "/v1/models/other:predict").json()
    server.stop()
    assert stable == {"predictions": [[2.0, 3.0, 4.0]]}
    assert canary == {"predictions": [[3.0, 4.0, 5.0]]}
    assert other == {"predictions": [[11.0, 12.0, 13.0]]}


def test_yaml_config(tmp_path: Path) -> None:
    write_models(tmp_path)
    config = tmp_path / "models.yaml"
    config.write_text(
        "model_config_list:\n"
        "  config:\n"
        "    - name: plus\n"
        "      base_path: models/adder\n"
        "      model_version_policy: {latest: {num_versions: 2}}\n"
        "      version_labels: {stable: 1}\n"
    )
    server = ServerProcess("--model_config_file", str(config))
    url = server.url
    stable = predict(url, "/v1/models/plus/labels/stable:predict").json()
    status = httpx.get(f"{url}/v1/models/plus").json()["model_version_status"]
    server.stop()
    assert stable == {"predictions": [[2.0, 3.0, 4.0]]}
    assert [entry["state"] for entry in status] == ["AVAILABLE", "AVAILABLE"]


def test_reload_applies_complete_state(tmp_path: Path) -> None:
    write_models(tmp_path)
    write_twoin(tmp_path / "models")
    config = tmp_path / "models.config"
    config.write_text(
        'model_config_list { config { name: "plus" base_path: "models/adder" }\n'
        'config { name: "twoin" base_path: "models/twoin" } }\n'
    )
    server = ServerProcess(
        "--model_config_file", str(config), "--model_config_file_poll_wait_seconds", "0.3"
    )
    url = server.url
    config.write_text(
        'model_config_list { config { name: "plus" base_path: "models/adder" }\n'
        'config { name: "twoin" base_path: "models/twoin" }\n'
        'config { name: "ghost" base_path: "models/nowhere" } }\n'
    )
    time.sleep(1.5)
    assert predict(url, "/v1/models/plus:predict").status_code == 200
    assert httpx.get(f"{url}/v1/models/twoin").status_code == 200
    assert httpx.get(f"{url}/v1/models/ghost").status_code == 404
    config.write_text("model_config_list { config { name: broken")
    time.sleep(1.0)
    assert predict(url, "/v1/models/plus:predict").status_code == 200
    config.write_text(
        'model_config_list { config { name: "plus" base_path: "models/adder" }\n'
        'config { name: "other" base_path: "models/other" } }\n'
    )
    wait_for(lambda: predict(url, "/v1/models/other:predict").status_code == 200)
    wait_for(lambda: httpx.get(f"{url}/v1/models/twoin").status_code == 404)
    assert predict(url, "/v1/models/plus:predict").status_code == 200
    server.stop()
    assert "invalid model config file" in server.log
    assert "model twoin at" in server.log
    assert "is no longer configured" in server.log


def test_new_base_path_unloads_old_versions(tmp_path: Path) -> None:
    write_models(tmp_path)
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "plus" base_path: "models/adder" } }')
    server = ServerProcess(
        "--model_config_file", str(config), "--model_config_file_poll_wait_seconds", "0.3"
    )
    url = server.url
    config.write_text('model_config_list { config { name: "plus" base_path: "models/other" } }')
    wait_for(
        lambda: (
            predict(url, "/v1/models/plus:predict").json().get("predictions")
            == [[11.0, 12.0, 13.0]]
        )
    )
    server.stop()
    assert "unloaded model plus version 2" in server.log
