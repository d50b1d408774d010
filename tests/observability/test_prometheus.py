"""The Prometheus rules, example configuration and Grafana dashboard under deploy/.

promtool checks the files, and a real Prometheus scrapes a running server through the example
configuration's relabelling. The binaries come from `make prometheus` (.tools/prometheus) or
PATH; without them those tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from servekit.observability.metrics import Metrics
from tests.conftest import ServerProcess, free_port
from tests.toy_models import write_adder, write_python_model

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DEPLOY = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DEPLOY / "servekit-rules.yml"
RULE_TESTS = PROMETHEUS_DEPLOY / "tests" / "servekit-rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DEPLOY / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "servekit-dashboard.json"
TOOLS = ROOT / ".tools" / "prometheus" / "usr" / "bin"

# Seconds to wait for Prometheus to scrape a value or evaluate a rule, at a 1 s interval.
WAIT_SECONDS = 20

T = TypeVar("T")

RequestKey = tuple[str, str, str, str]

# Requests sent after the first scrape, by (model, version, protocol, code).
REQUESTS: dict[RequestKey, int] = {
    ("adder", "1", "tfserving", "200"): 12,
    ("adder", "1", "tfserving", "400"): 3,
    ("adder", "1", "v2", "200"): 5,
    ("flaky", "1", "tfserving", "500"): 4,
}

# Raises on negative inputs, so the server responds with 500.
FLAKY_SOURCE = """
class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"]}
"""

# Fails to import, so its version fails to load and servekit_model_load_failures_total counts it.
BROKEN_SOURCE = """
raise ImportError("this model cannot be imported")
"""


def find_tool(name: str) -> str:
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found in {TOOLS} or on PATH; run `make prometheus`")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return find_tool("prometheus")


def run_promtool(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# Words of PromQL that look like series names but are not.
_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*|\d[\w.]*")


def series_names(expr: str) -> set[str]:
    """Return the metric and recording-rule names that a PromQL expression selects.

    Label matchers, range durations (which may be Grafana variables), grouping clauses, function
    and aggregation names (tokens followed by a bracket) and numbers are not names.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    names = set()
    for match in _TOKEN.finditer(expr):
        token = match.group()
        if token[0].isdigit() or token.lower() in _PROMQL_KEYWORDS:
            continue
        if expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Return the names of every series servekit's /metrics can contain, with their suffixes."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    text = Metrics().render().decode()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, [""])
    }


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def recorded_names() -> set[str]:
    return {
        rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
    }


def alert_names() -> set[str]:
    return {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def test_rules_pass_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_unit_tests(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_rule() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested_exprs = {case["expr"] for test in tests for case in test.get("promql_expr_test", [])}
    alert_cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in alert_cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in alert_cases if not case["exp_alerts"]}
    assert recorded_names() <= tested_exprs
    assert alert_names() <= firing
    assert alert_names() <= silent


def test_rules_use_exported_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    known = exported_names(monkeypatch) | recorded_names()
    for group in rule_groups():
        for rule in group["rules"]:
            names = series_names(rule["expr"])
            assert names, rule
            assert names <= known, (rule.get("record") or rule.get("alert"), names - known)


def test_example_config_passes_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", str(EXAMPLE_CONFIG))
    output = result.stdout + result.stderr
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in output:
        # Debian's prometheus package is built without Kubernetes service discovery.
        pytest.skip(f"{promtool} was built without kubernetes_sd_configs")
    assert result.returncode == 0, output


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["type"] == "query"
    model_query = variables["model"]["query"]["query"]
    assert model_query == "label_values(servekit_model_version_state, model)"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'model=~"$model"' in target["expr"], panel["title"]


def test_dashboard_uses_known_series(monkeypatch: pytest.MonkeyPatch) -> None:
    known = exported_names(monkeypatch) | recorded_names()
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = series_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= known, (panel["title"], names - known)
            used |= names
    # The panels of per-version queued rows and of rejections stand in for the two rules that
    # only the alerts use.
    assert recorded_names() - {"servekit:queue_full_ratio:5m", "servekit:queue_rows:max"} <= used


def test_series_names_skip_functions_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(servekit_x_bucket{code=~"5.."}[5m])))'
        " / on (model) group_left servekit:y:5m offset 15m > 1e3"
    )
    assert series_names(expr) == {"servekit_x_bucket", "servekit:y:5m"}


class Prometheus:
    """A Prometheus process on 127.0.0.1 with its data in a temporary folder."""

    def __init__(self, binary: str, config: Path, data: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data.parent / "prometheus.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Prometheus did not become ready:\n" + self.log)

    def api(self, path: str, **params: str) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """Return the instant value of each series of `expr`, keyed by its `model` label."""
        return {
            series["metric"].get("model", ""): float(series["value"][1])
            for series in self.api("query", query=expr)["result"]
        }

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def wait_until(read: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Call `read` until `done` accepts its result or WAIT_SECONDS pass; return the last result."""
    deadline = time.monotonic() + WAIT_SECONDS
    result = read()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.25)
        result = read()
    return result


def request_series(prometheus: Prometheus, name: str) -> dict[RequestKey, float]:
    """Return the values of `name` by (model, version, protocol, code)."""
    values = {}
    for series in prometheus.api("query", query=name)["result"]:
        labels = series["metric"]
        key = (labels["model"], labels["version"], labels["protocol"], labels["code"])
        values[key] = float(series["value"][1])
    return values


def kubernetes_pod(name: str, rest_port: int, **overrides: str) -> dict[str, str]:
    """Return the `__meta_kubernetes_*` labels that pod discovery gives a servekit pod."""
    labels = {
        "__meta_kubernetes_namespace": "serving",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app": "servekit",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(rest_port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
    }
    labels.update(overrides)
    return labels


def write_scrape_config(directory: Path, server: ServerProcess) -> Path:
    """Write a Prometheus configuration that scrapes `server` as a Kubernetes pod.

    File discovery gives the targets the labels that Kubernetes pod discovery would, and the
    relabelling of the example configuration selects the target and sets its address. The
    discovered address is the server's gRPC port, so the scrape reaches the REST port only
    through the prometheus.io/port annotation. Two more pods of the same server, one not
    annotated for scraping and one pending, must be dropped.
    """
    rest_address = urlsplit(server.url).netloc
    rest_port = int(rest_address.rsplit(":", 1)[1])
    targets = [
        {"targets": [server.grpc_address], "labels": kubernetes_pod("servekit-0", rest_port)},
        {
            "targets": [rest_address],
            "labels": kubernetes_pod(
                "servekit-off",
                rest_port,
                __meta_kubernetes_pod_annotation_prometheus_io_scrape="false",
            ),
        },
        {
            "targets": [rest_address],
            "labels": kubernetes_pod(
                "servekit-pending", rest_port, __meta_kubernetes_pod_phase="Pending"
            ),
        },
    ]
    targets_path = directory / "targets.json"
    targets_path.write_text(json.dumps(targets))
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "servekit",
                "file_sd_configs": [{"files": [str(targets_path)]}],
                "relabel_configs": example["scrape_configs"][0]["relabel_configs"],
            }
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path


@pytest.fixture
def prometheus_server(
    tmp_path: Path, promtool: str, prometheus_binary: str
) -> Iterator[tuple[ServerProcess, Prometheus]]:
    models = tmp_path / "models"
    write_adder(models)
    write_python_model(models, "flaky", FLAKY_SOURCE)
    write_python_model(models, "broken", BROKEN_SOURCE)
    server = ServerProcess(
        "--model_repository", str(models), "--rest_api_host", "127.0.0.1",
        "--port", str(free_port()),
    )  # fmt: skip
    config = write_scrape_config(tmp_path, server)
    checked = run_promtool(promtool, "check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    prometheus = Prometheus(prometheus_binary, config, tmp_path / "data")
    try:
        yield server, prometheus
    finally:
        prometheus.stop()
        server.stop()


def send_requests(client: httpx.Client, counts: dict[RequestKey, int]) -> None:
    """Send `counts[key]` requests that end with each (model, version, protocol, code)."""
    v2_body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    requests: dict[RequestKey, Callable[[], httpx.Response]] = {
        ("adder", "1", "tfserving", "200"): lambda: client.post(
            "/v1/models/adder:predict", json={"instances": [[1.0, 2.0, 3.0]]}
        ),
        ("adder", "1", "tfserving", "400"): lambda: client.post(
            "/v1/models/adder:predict", content=b"{"
        ),
        ("adder", "1", "v2", "200"): lambda: client.post("/v2/models/adder/infer", json=v2_body),
        ("flaky", "1", "tfserving", "500"): lambda: client.post(
            "/v1/models/flaky:predict", json={"instances": [-1.0]}
        ),
    }
    for key, count in counts.items():
        for _ in range(count):
            response = requests[key]()
            assert response.status_code == int(key[3]), response.text


def test_prometheus_scrapes_server(prometheus_server: tuple[ServerProcess, Prometheus]) -> None:
    server, prometheus = prometheus_server
    rest_address = urlsplit(server.url).netloc
    first = {key: 1 for key in REQUESTS}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        # One request of each kind, and a scrape that finds them, before the second round: a
        # series that first appears already above 0 adds nothing to rate().
        send_requests(client, first)
        prometheus.wait_ready()

        targets = wait_until(
            lambda: prometheus.api("targets"),
            lambda found: [target["health"] for target in found["activeTargets"]] == ["up"],
        )
        assert len(targets["activeTargets"]) == 1, targets
        target = targets["activeTargets"][0]
        assert target["health"] == "up", target
        assert target["scrapeUrl"] == f"http://{rest_address}/metrics"
        assert target["labels"] == {
            "app": "servekit",
            "instance": rest_address,
            "job": "servekit",
            "namespace": "serving",
            "pod": "servekit-0",
        }
        assert len(targets["droppedTargets"]) == 2

        scraped = wait_until(
            lambda: request_series(prometheus, "servekit_requests_total"),
            lambda found: found == {key: 1.0 for key in REQUESTS},
        )
        assert scraped == {key: 1.0 for key in REQUESTS}, prometheus.log

        send_requests(client, REQUESTS)

    expected = {key: float(count + 1) for key, count in REQUESTS.items()}
    counted = wait_until(
        lambda: request_series(prometheus, "servekit_requests_total"),
        lambda found: found == expected,
    )
    assert counted == expected
    labels = prometheus.api("series", **{"match[]": "servekit_requests_total"})
    assert {tuple(sorted(series)) for series in labels} == {
        ("__name__", "app", "code", "instance", "job", "model", "namespace", "pod", "protocol",
         "version")
    }  # fmt: skip
    assert request_series(prometheus, "servekit_request_duration_seconds_count") == expected
    infinite = 'servekit_request_duration_seconds_bucket{le="+Inf"}'
    assert request_series(prometheus, infinite) == expected
    durations = request_series(prometheus, "servekit_request_duration_seconds_sum")
    assert set(durations) == set(expected)
    assert all(seconds > 0 for seconds in durations.values()), durations

    # Recording rules: rates over the samples before and after the second round of requests.
    error_ratio = wait_until(
        lambda: prometheus.query("servekit:request_error_ratio:5m"),
        lambda found: found == {"adder": 0.0, "flaky": 1.0},
    )
    assert error_ratio == {"adder": 0.0, "flaky": 1.0}
    rate = prometheus.query("servekit:request_rate:5m")
    assert rate["adder"] > 0
    assert rate["flaky"] > 0
    p50 = prometheus.query("servekit:request_latency_p50:5m")
    p99 = prometheus.query("servekit:request_latency_p99:5m")
    assert 0 < p50["adder"] <= p99["adder"] <= 10
    assert prometheus.query("servekit:batch_size_rows:mean5m")["adder"] == 1.0
    assert prometheus.query("servekit:queue_full_ratio:5m")["adder"] == 0.0
    assert prometheus.query("servekit:queue_rows:max")["adder"] == 0.0

    # The error ratio alert waits 5 minutes before it fires; the load failure fires at once.
    def alert_states() -> set[tuple[str, str, str]]:
        alerts = prometheus.api("alerts")["alerts"]
        return {
            (alert["labels"]["alertname"], alert["labels"]["model"], alert["state"])
            for alert in alerts
        }

    expected_alerts = {
        ("ServekitHighErrorRatio", "flaky", "pending"),
        ("ServekitModelLoadFailed", "broken", "firing"),
    }
    assert wait_until(alert_states, lambda found: found == expected_alerts) == expected_alerts
