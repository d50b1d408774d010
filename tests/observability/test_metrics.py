"""Prometheus metrics from the running server."""

from __future__ import annotations

import re
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess


def samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_request_counts_by_protocol_and_code(toy_server: ServerProcess) -> None:
    with httpx.Client(base_url=toy_server.url) as client:
        before = samples(client)
        for _ in range(3):
            client.post("/v1/models/tiny:predict", json={"instances": [1.0]})
        client.post("/v1/models/tiny:predict", content=b"{")
        body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
        client.post("/v2/models/tiny/infer", json=body)
        after = samples(client)
    tf_ok = {"model": "tiny", "version": "1", "protocol": "tfserving", "code": "200"}
    tf_bad = {**tf_ok, "code": "400"}
    v2_ok = {**tf_ok, "protocol": "v2"}
    delta = {
        key: value(after, "servekit_requests_total", **key_labels)
        - value(before, "servekit_requests_total", **key_labels)
        for key, key_labels in (("tf_ok", tf_ok), ("tf_bad", tf_bad), ("v2_ok", v2_ok))
    }
    assert delta == {"tf_ok": 3.0, "tf_bad": 1.0, "v2_ok": 1.0}
    histogram_delta = value(after, "servekit_request_duration_seconds_count", **tf_ok) - value(
        before, "servekit_request_duration_seconds_count", **tf_ok
    )
    assert histogram_delta == 3.0
    compute = value(after, "servekit_inference_duration_seconds_count", model="tiny", version="1")
    assert compute >= 4.0


def test_version_state_and_load_time(toy_server: ServerProcess) -> None:
    with httpx.Client(base_url=toy_server.url) as client:
        found = samples(client)
    labels = {"model": "adder", "version": "1"}
    assert (
        value(
            found,
            "servekit_model_version_state",
            **labels,
            state="AVAILABLE",
        )
        == 1.0
    )
    assert value(found, "servekit_model_version_state", **labels, state="LOADING") == 0.0
    assert value(found, "servekit_model_load_duration_seconds", **labels) > 0.0


def test_process_metrics(toy_server: ServerProcess) -> None:
    with httpx.Client(base_url=toy_server.url) as client:
        found = samples(client)
    assert value(found, "process_resident_memory_bytes") > 0


def test_unknown_models_do_not_add_series(toy_server: ServerProcess) -> None:
    with httpx.Client(base_url=toy_server.url) as client:
        client.post(f"/v1/models/warmup-{uuid.uuid4().hex}:predict", json={"instances": [1]})
        client.post(f"/v2/models/warmup-{uuid.uuid4().hex}/infer", json={})
        client.get(f"/{uuid.uuid4().hex}")
        baseline = client.get("/metrics").text
        for _ in range(300):
            name = uuid.uuid4().hex
            assert (
                client.post(f"/v1/models/m{name}:predict", json={"instances": [1]}).status_code
                == 404
            )
            assert client.post(f"/v2/models/m{name}/infer", json={}).status_code == 404
            assert client.get(f"/{name}").status_code == 404
        grown = client.get("/metrics").text
    series = re.compile(r"^servekit_\w+\{[^}]*\}", re.MULTILINE)
    assert set(series.findall(grown)) == set(series.findall(baseline))
    assert 'model="__unknown__"' in grown
    assert "warmup-" not in grown
