"""`servekit deploy kubernetes` and the Dockerfile, checked offline.

The manifests are validated against the Kubernetes API schemas that kubernetes-validate
bundles, rendered with `kubectl kustomize` where kubectl is installed, and checked across
objects. The Dockerfile is parsed with BuildKit's parser and linted with hadolint; no image
is built.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from servekit.cli.main import cli, serve
from servekit.config.settings import ServerSettings
from servekit.examples import EXAMPLE_REPOSITORY
from servekit.observability.metrics import Metrics
from servekit.tools.deploy.checks import DeployError, ManifestError, check_manifests, find_problems
from servekit.tools.deploy.kubernetes import (
    GRPC_PORT,
    MODELS_PATH,
    REST_PORT,
    RUN_AS_ID,
    KubernetesOptions,
    build_manifests,
    read_model_configs,
    write_manifests,
)
from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
# The oldest, a middle and the newest Kubernetes release that kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.33", "1.37")
DIGITS_CONFIG = """\
# Serve the newest version, batched.
version_policy: {latest: 1}
labels: {stable: 1}
batching:
  max_batch_size: 32
  max_queue_delay_ms: 2
"""
OPTION_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "pvc-inflight": {
        "models_volume": "pvc:models",
        "namespace": "ml",
        "metric": "inflight",
        "cpu": "500m",
        "cpu_limit": "2",
        "memory": "512Mi",
        "memory_limit": "1Gi",
    },
    "queue-custom": {
        "name": "digits-server",
        "image": "registry.example.com/servekit:0.1.0-tflite",
        "metric": "queue",
        "target_value": "64",
        "replicas_min": 3,
        "replicas_max": 30,
        "request_timeout_ms": 60500,
        "prestop_seconds": 10,
        "startup_seconds": 900,
    },
    "cpu-target": {"target_cpu": 50, "replicas_min": 1, "replicas_max": 1},
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repository with a servekit.yaml for the digits model."""
    folder = tmp_path_factory.mktemp("deploy") / "models"
    shutil.copytree(EXAMPLE_REPOSITORY, folder)
    (folder / "digits" / "servekit.yaml").write_text(DIGITS_CONFIG)
    return folder


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def base_documents(output: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((output / "base" / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += load_documents(output / "base" / name)
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [document] = [item for item in documents if item["kind"] == kind]
    return document


def container_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = of_kind(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def generate(repository: Path, output: Path, **options: Any) -> list[dict[str, Any]]:
    write_manifests(KubernetesOptions(model_repository=repository, **options), output)
    return base_documents(output)


def assert_valid_kubernetes(documents: list[dict[str, Any]]) -> None:
    for version in KUBERNETES_VERSIONS:
        for document in documents:
            kubernetes_validate.validate(document, version, strict=True)


# --- The manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("option_set", OPTION_SETS)
def test_manifests_pass_schemas_and_checks(
    repository: Path, tmp_path: Path, option_set: str
) -> None:
    documents = generate(repository, tmp_path, **OPTION_SETS[option_set])
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"
    ]  # fmt: skip
    assert_valid_kubernetes(documents)
    assert find_problems(documents) == []


def test_strict_schemas_reject_unknown_field(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path)
    deployment = of_kind(documents, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_deployment_probes_and_shutdown(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path)
    deployment = of_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(documents)
    assert "replicas" not in deployment["spec"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] == 300
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # preStop 5 s, then the drain of servekit's default request timeout, then 10 s to exit.
    drain = math.ceil(ServerSettings().rest_api_timeout_in_ms / 1000)
    assert drain == 30
    assert pod["terminationGracePeriodSeconds"] == 5 + drain + 10
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == RUN_AS_ID
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": REST_PORT, "grpc": GRPC_PORT}
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"memory": "1Gi"},
    }
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(REST_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_follows_request_timeout(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path, request_timeout_ms=60500, prestop_seconds=10)
    pod = of_kind(documents, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 61 + 10
    assert "--rest_api_timeout_in_ms=60500" in container_of(documents)["args"]


def test_container_args_accepted_by_serve(repository: Path, tmp_path: Path) -> None:
    container = container_of(generate(repository, tmp_path, cpu="1500m"))
    context = serve.make_context("serve", list(container["args"]))
    given = {name: value for name, value in context.params.items() if value is not None}
    assert given["model_repository"] == Path(MODELS_PATH)
    assert given["tensorflow_intra_op_parallelism"] == 2
    given["model_repository"] = repository
    settings = ServerSettings(**given)
    assert settings.rest_api_host == "0.0.0.0"
    assert (settings.rest_api_port, settings.port) == (REST_PORT, GRPC_PORT)
    assert settings.enable_model_management is False


def test_service_ports_and_selector(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path)
    service = of_kind(documents, "Service")
    ports = {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]}
    assert ports == {"http": (REST_PORT, "http"), "grpc": (GRPC_PORT, "grpc")}
    labels = of_kind(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    budget = of_kind(documents, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_config_map_mounted_over_servekit_yaml(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path, models_volume="pvc:models")
    config_map = of_kind(documents, "ConfigMap")
    assert config_map["data"] == {"digits.servekit.yaml": DIGITS_CONFIG}
    mounts = {mount["mountPath"]: mount for mount in container_of(documents)["volumeMounts"]}
    assert mounts[MODELS_PATH]["readOnly"] is True
    assert mounts[f"{MODELS_PATH}/digits/servekit.yaml"]["subPath"] == "digits.servekit.yaml"
    volumes = of_kind(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]
    claims = [
        volume["persistentVolumeClaim"] for volume in volumes if "persistentVolumeClaim" in volume
    ]
    assert claims == [{"claimName": "models", "readOnly": True}]


def test_config_change_rolls_pods(repository: Path, tmp_path: Path) -> None:
    def digest(configs: dict[str, str]) -> str:
        options = KubernetesOptions(model_repository=repository)
        deployment = build_manifests(options, configs).files["base/deployment.yaml"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["servekit/model-config-sha256"])

    configs = read_model_configs(repository)
    changed = {"digits": configs["digits"].replace("32", "64")}
    assert digest(configs) == digest(dict(configs))
    assert digest(configs) != digest(changed)


def test_repository_without_configs(repository: Path, tmp_path: Path) -> None:
    generate(repository, tmp_path)
    assert (tmp_path / "base" / "configmap.yaml").is_file()
    # The example repository has no servekit.yaml: no ConfigMap, and the earlier one goes.
    documents = generate(EXAMPLE_REPOSITORY, tmp_path)
    assert "ConfigMap" not in {document["kind"] for document in documents}
    assert not (tmp_path / "base" / "configmap.yaml").exists()
    container = container_of(documents)
    assert [mount["name"] for mount in container["volumeMounts"]] == ["tmp"]
    assert_valid_kubernetes(documents)
    assert find_problems(documents) == []


def test_autoscaler_on_cpu(repository: Path, tmp_path: Path) -> None:
    documents = generate(repository, tmp_path, target_cpu=55)
    autoscaler = of_kind(documents, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "servekit"
    }  # fmt: skip
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 55}
    assert not (tmp_path / "prometheus-adapter-rules.yaml").exists()


@pytest.mark.parametrize(
    ("metric", "series", "target"),
    [("inflight", "servekit_inflight_requests", "8"), ("queue", "servekit_queue_rows", "32")],
)
def test_autoscaler_on_servekit_metric(
    repository: Path, tmp_path: Path, metric: str, series: str, target: str
) -> None:
    documents = generate(repository, tmp_path, metric=metric)
    [hpa_metric] = of_kind(documents, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert hpa_metric["type"] == "Pods"
    assert hpa_metric["pods"]["metric"] == {"name": series}
    assert hpa_metric["pods"]["target"] == {"type": "AverageValue", "averageValue": target}
    # The series is one that servekit exports.
    assert f"# TYPE {series} gauge" in Metrics().render().decode()
    [rule] = yaml.safe_load((tmp_path / "prometheus-adapter-rules.yaml").read_text())["rules"]
    assert rule["seriesQuery"].startswith(f"{series}{{")
    assert rule["name"]["as"] == series
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
    # The rules file is for the adapter, so kustomize does not apply it.
    kustomization = yaml.safe_load((tmp_path / "base" / "kustomization.yaml").read_text())
    assert "prometheus-adapter-rules.yaml" not in kustomization["resources"]


# --- The kustomize layout ----------------------------------------------------------------


def test_kustomize_layout(repository: Path, tmp_path: Path) -> None:
    generate(repository, tmp_path, namespace="ml", replicas_min=3, replicas_max=12)
    base = yaml.safe_load((tmp_path / "base" / "kustomization.yaml").read_text())
    assert base["kind"] == "Kustomization"
    assert base["namespace"] == "ml"
    listed = set(base["resources"])
    present = {path.name for path in (tmp_path / "base").iterdir()} - {"kustomization.yaml"}
    assert listed == present
    overlay_dir = tmp_path / "overlays" / "production"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    assert (overlay_dir / overlay["resources"][0]).resolve() == (tmp_path / "base").resolve()
    [patch] = overlay["patches"]
    assert patch["target"] == {"kind": "HorizontalPodAutoscaler", "name": "servekit"}
    replicas = yaml.safe_load((overlay_dir / patch["path"]).read_text())
    assert replicas["spec"] == {"minReplicas": 3, "maxReplicas": 12}
    autoscaler = of_kind(base_documents(tmp_path), "HorizontalPodAutoscaler")
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (1, 2)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_production(repository: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    generate(repository, output, namespace="ml", metric="inflight", replicas_min=3)
    # `kubectl kustomize` works on local files only; the missing kubeconfig keeps it that way.
    environment = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    result = subprocess.run(
        ["kubectl", "kustomize", str(output / "overlays" / "production")],
        capture_output=True, text=True, timeout=60, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    documents = [item for item in yaml.safe_load_all(result.stdout) if item]
    assert {document["metadata"]["namespace"] for document in documents} == {"ml"}
    autoscaler = of_kind(documents, "HorizontalPodAutoscaler")
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (3, 10)
    assert_valid_kubernetes(documents)
    check_manifests(documents)


# --- Cross-object checks -----------------------------------------------------------------


def _break_service_selector(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "Service")["spec"]["selector"]["app.kubernetes.io/instance"] = "other"


def _drop_cpu_request(documents: list[dict[str, Any]]) -> None:
    del container_of(documents)["resources"]["requests"]["cpu"]


def _probe_named_port(documents: list[dict[str, Any]]) -> None:
    container_of(documents)["readinessProbe"]["httpGet"]["port"] = "metrics"


def _probe_numbered_port(documents: list[dict[str, Any]]) -> None:
    container_of(documents)["livenessProbe"]["httpGet"]["port"] = 9000


def _shorten_grace(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] = 30


def _raise_timeout(documents: list[dict[str, Any]]) -> None:
    args = container_of(documents)["args"]
    args[:] = [arg for arg in args if not arg.startswith("--rest_api_timeout_in_ms")]
    args += ["--rest-api-timeout-in-ms", "45000"]


def _retarget_autoscaler(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "other"


def _autoscale_statefulset(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] = "StatefulSet"


def _break_budget_selector(documents: list[dict[str, Any]]) -> None:
    selector = of_kind(documents, "PodDisruptionBudget")["spec"]["selector"]
    selector["matchLabels"]["app.kubernetes.io/name"] = "other"


def _break_service_target(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "Service")["spec"]["ports"][1]["targetPort"] = 9500


def _drop_config_key(documents: list[dict[str, Any]]) -> None:
    of_kind(documents, "ConfigMap")["data"].clear()


def _break_deployment_selector(documents: list[dict[str, Any]]) -> None:
    labels = of_kind(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    labels["app.kubernetes.io/instance"] = "renamed"


def _mount_missing_volume(documents: list[dict[str, Any]]) -> None:
    container_of(documents)["volumeMounts"].append({"name": "cache", "mountPath": "/cache"})


BROKEN_CASES: dict[str, tuple[Callable[[list[dict[str, Any]]], None], str]] = {
    "service selector": (
        _break_service_selector,
        "Service servekit: its selector {app.kubernetes.io/name=servekit, "
        "app.kubernetes.io/instance=other} matches the pods of no Deployment",
    ),
    "cpu request": (
        _drop_cpu_request,
        "HorizontalPodAutoscaler servekit: scales on CPU utilization, but container servekit "
        "of Deployment servekit has no CPU request",
    ),
    "probe port name": (
        _probe_named_port,
        "container servekit's readinessProbe uses port 'metrics', which is not among its "
        "ports [http=8501, grpc=8500]",
    ),
    "probe port number": (_probe_numbered_port, "livenessProbe uses port 9000"),
    "grace": (
        _shorten_grace,
        "terminationGracePeriodSeconds 30 must exceed container servekit's preStop sleep "
        "(5.0 s) plus servekit's drain (30 s",
    ),
    "timeout": (_raise_timeout, "terminationGracePeriodSeconds 45 must exceed"),
    "autoscaler name": (
        _retarget_autoscaler,
        "scales apps/v1 Deployment other, which is not among the manifests",
    ),
    "autoscaler kind": (_autoscale_statefulset, "expected an apps/v1 Deployment"),
    "budget selector": (_break_budget_selector, "PodDisruptionBudget servekit: its selector"),
    "service target port": (_break_service_target, "targets 9500, which no container"),
    "config key": (_drop_config_key, "reads key digits.servekit.yaml of ConfigMap"),
    "deployment selector": (_break_deployment_selector, "does not match its pod template"),
    "mount": (_mount_missing_volume, "mounts volume cache, which the pod does not declare"),
}


@pytest.fixture(scope="module")
def consistent(repository: Path) -> list[dict[str, Any]]:
    options = KubernetesOptions(model_repository=repository)
    return build_manifests(options, read_model_configs(repository)).base_documents()


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_checks_catch_broken_manifests(consistent: list[dict[str, Any]], case: str) -> None:
    breaker, message = BROKEN_CASES[case]
    documents = copy.deepcopy(consistent)
    breaker(documents)
    with pytest.raises(ManifestError) as caught:
        check_manifests(documents)
    assert str(caught.value).startswith("the manifests are inconsistent:")
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_checks_accept_cpu_limit_without_request(consistent: list[dict[str, Any]]) -> None:
    documents = copy.deepcopy(consistent)
    resources = container_of(documents)["resources"]
    resources["limits"]["cpu"] = resources["requests"].pop("cpu")
    assert find_problems(documents) == []


def test_checks_accept_custom_metric_without_cpu(consistent: list[dict[str, Any]]) -> None:
    documents = copy.deepcopy(consistent)
    del container_of(documents)["resources"]["requests"]["cpu"]
    of_kind(documents, "HorizontalPodAutoscaler")["spec"]["metrics"] = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "servekit_inflight_requests"},
                "target": {"type": "AverageValue", "averageValue": "8"},
            },
        }
    ]
    assert find_problems(documents) == []


def test_checks_read_prestop_sleep_action(consistent: list[dict[str, Any]]) -> None:
    documents = copy.deepcopy(consistent)
    container_of(documents)["lifecycle"]["preStop"] = {"sleep": {"seconds": 20}}
    [problem] = find_problems(documents)
    assert "preStop sleep (20.0 s) plus servekit's drain (30 s" in problem


# --- Options and the command line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"metric": "cpu", "target_value": "8"}, "--target-value applies to --metric inflight"),
        ({"models_volume": "nfs:models"}, "invalid --models-volume 'nfs:models': use 'image'"),
        ({"models_volume": "pvc:Bad_Name"}, "invalid claim name 'Bad_Name'"),
        ({"replicas_min": 5, "replicas_max": 2}, "need 1 <= --replicas-min <= --replicas-max"),
        ({"cpu": "1 core"}, "invalid CPU quantity '1 core'"),
        ({"cpu": "2", "cpu_limit": "1"}, "--cpu-limit 1 is below --cpu 2"),
        ({"memory": "2Gi", "memory_limit": "1G"}, "--memory-limit 1G is below --memory 2Gi"),
        ({"name": "Servekit"}, "invalid --name 'Servekit'"),
        ({"metric": "memory"}, "invalid --metric 'memory'"),
        ({"metric": "queue", "target_value": "0"}, "invalid --target-value '0'"),
        ({"metric": "queue", "target_value": "lots"}, "invalid --target-value 'lots'"),
    ],
)
def test_invalid_options(repository: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(DeployError, match="^" + re.escape(message)):
        KubernetesOptions(model_repository=repository, **options)


def test_invalid_servekit_yaml(repository: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(repository, broken)
    (broken / "digits" / "servekit.yaml").write_text("batching: {max_batch_size: 0}\n")
    with pytest.raises(
        DeployError, match=r"^invalid \S+/digits/servekit\.yaml: batching\.max_batch_size: "
    ):
        read_model_configs(broken)


def deploy_command(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "deploy", "kubernetes", *arguments],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_command_writes_layout(repository: Path, tmp_path: Path) -> None:
    result = deploy_command(
        "--model-repository", str(repository), "--output", str(tmp_path / "k8s"),
        "--metric", "queue", "--target-value", "16", "--namespace", "ml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'k8s' / 'base' / 'deployment.yaml'}" in result.stdout
    assert "kubectl apply -k" in result.stdout
    documents = base_documents(tmp_path / "k8s")
    [metric] = of_kind(documents, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["target"]["averageValue"] == "16"


def test_command_missing_repository(tmp_path: Path) -> None:
    result = deploy_command(
        "--model-repository", str(tmp_path / "absent"), "--output", str(tmp_path / "k8s")
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"Error: model repository {tmp_path / 'absent'} is not a directory\n"
    assert not (tmp_path / "k8s").exists()


def test_command_bad_metric(repository: Path, tmp_path: Path) -> None:
    result = deploy_command(
        "--model-repository", str(repository), "--output", str(tmp_path), "--metric", "gpu"
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert "'--metric'" in error
    assert "'gpu' is not one of 'cpu', 'inflight', 'queue'" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--target-value", "4"], "Error: --target-value applies to --metric inflight or queue"),
        (["--models-volume", "claim"], "Error: invalid --models-volume 'claim'"),
        (["--cpu", "lots"], "Error: invalid CPU quantity 'lots'"),
    ],
)
def test_command_invalid_options(
    repository: Path, tmp_path: Path, arguments: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        cli,
        ["deploy", "kubernetes", "--model-repository", str(repository), "--output",
         str(tmp_path), *arguments],
    )  # fmt: skip
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    [line] = result.output.splitlines()
    assert line.startswith(message)


def test_command_empty_repository(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    result = CliRunner().invoke(
        cli,
        ["deploy", "kubernetes", "--model-repository", str(tmp_path / "models"), "--output",
         str(tmp_path / "k8s")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: model repository {tmp_path / 'models'} contains no model folders\n"
    )


# --- The Dockerfile ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> dict[str, list[dockerfile.Command]]:
    """The Dockerfile's instructions by keyword, parsed with BuildKit's own parser."""
    parsed: dict[str, list[dockerfile.Command]] = {}
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        parsed.setdefault(command.cmd, []).append(command)
    return parsed


def test_dockerfile_instructions(instructions: dict[str, list[dockerfile.Command]]) -> None:
    images = [command.value[0] for command in instructions["FROM"]]
    assert images == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "PYTHON_IMAGE=python:3.11-slim" in [arg.value[0] for arg in instructions["ARG"]]
    assert 'EXTRAS=""' in [arg.value[0] for arg in instructions["ARG"]]
    environment: dict[str, str] = {}
    for command in instructions["ENV"]:
        environment.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert environment["MODEL_BASE_PATH"] == MODELS_PATH
    [user] = instructions["USER"]
    assert user.value == (f"{RUN_AS_ID}:{RUN_AS_ID}",)
    [expose] = instructions["EXPOSE"]
    assert sorted(expose.value) == sorted([str(REST_PORT), str(GRPC_PORT)])
    assert any(command.value[-1] == MODELS_PATH for command in instructions["COPY"])


def test_dockerfile_exec_forms(instructions: dict[str, list[dockerfile.Command]]) -> None:
    for keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
        [command] = instructions[keyword]
        assert command.json, f"{keyword} is in shell form"
        # The text after the keyword and flags must itself be a JSON array.
        text = command.original.split(None, 1)[1]
        if keyword == "HEALTHCHECK":
            text = text.split("CMD", 1)[1]
        assert isinstance(json.loads(text), list)
    assert instructions["ENTRYPOINT"][0].value == ("servekit", "serve")
    healthcheck = instructions["HEALTHCHECK"][0]
    assert healthcheck.value[:3] == ("CMD", "python", "-c")
    assert "/v2/health/ready" in healthcheck.value[3]


def test_dockerfile_environment_configures_serve(
    instructions: dict[str, list[dockerfile.Command]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image's settings come from its environment, which the health check reads too."""
    [command] = instructions["CMD"]
    assert list(command.value) == []
    values = [value for command in instructions["ENV"] for value in command.value]
    environment = dict(zip(values[::2], values[1::2], strict=True))
    # The repository comes from the environment, so that MODEL_NAME can replace it.
    assert environment["SERVEKIT_MODEL_REPOSITORY"] == MODELS_PATH
    for name, value in environment.items():
        if name.startswith("SERVEKIT_") and name != "SERVEKIT_MODEL_REPOSITORY":
            monkeypatch.setenv(name, value)
    settings = ServerSettings()
    assert settings.rest_api_host == "0.0.0.0"
    assert (settings.rest_api_port, settings.port) == (REST_PORT, GRPC_PORT)


def _ignored(path: str, patterns: list[str]) -> bool:
    # An approximation of Docker's matching: a source is excluded when a pattern matches it
    # or one of its parent directories.
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
        for pattern in patterns
        for prefix in prefixes
    )


def test_dockerfile_sources_in_context(instructions: dict[str, list[dockerfile.Command]]) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    arguments = dict(arg.value[0].split("=", 1) for arg in instructions["ARG"])
    for command in instructions["COPY"]:
        if any(flag.startswith("--from") for flag in command.flags):
            continue
        for source in command.value[:-1]:
            source = arguments.get(source.strip("${}"), source)
            assert (ROOT / source).exists(), source
            assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"


def test_dockerfile_lint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_healthcheck(
    instructions: dict[str, list[dockerfile.Command]], port: int
) -> subprocess.CompletedProcess[str]:
    _, *command = instructions["HEALTHCHECK"][0].value
    assert command[0] == "python"
    environment = {**os.environ, "SERVEKIT_REST_API_PORT": str(port)}
    return subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=30, env=environment
    )


def test_healthcheck_passes_when_ready(
    instructions: dict[str, list[dockerfile.Command]], example_server: ServerProcess
) -> None:
    port = int(example_server.url.rsplit(":", 1)[1])
    result = run_healthcheck(instructions, port)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_without_models(
    instructions: dict[str, list[dockerfile.Command]], tmp_path: Path
) -> None:
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        port = int(server.url.rsplit(":", 1)[1])
        result = run_healthcheck(instructions, port)
    finally:
        server.stop()
    assert result.returncode != 0
    assert "HTTP Error 503" in result.stderr
