"""Kubernetes manifests that serve a model repository: `servekit deploy kubernetes`.

`write_manifests` writes a kustomize layout::

    OUTPUT/base/                          Deployment, Service, HorizontalPodAutoscaler,
                                          PodDisruptionBudget, ConfigMap of servekit.yaml files
    OUTPUT/overlays/production/           the autoscaler's replica range from the options
    OUTPUT/prometheus-adapter-rules.yaml  only when scaling on a servekit metric

Every manifest passes `check_manifests` before anything is written.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from servekit import __version__
from servekit.config.model_config import MODEL_CONFIG_FILE, ConfigError, load_model_options
from servekit.config.settings import ServerSettings
from servekit.core.options import ServableOptions
from servekit.repository.layout import sources_in_repository
from servekit.tools.deploy.checks import DeployError, check_manifests

REST_PORT = 8501
GRPC_PORT = 8500
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
# Path of the model repository inside the container: the Dockerfile's /models.
MODELS_PATH = "/models"
# The numeric user and group of the Dockerfile's non-root user. Kubernetes can only verify
# runAsNonRoot for a numeric user.
RUN_AS_ID = 10001
CONTAINER_NAME = "servekit"

Metric = Literal["cpu", "inflight", "queue"]
METRIC_CHOICES: tuple[Metric, ...] = ("cpu", "inflight", "queue")
# servekit gauges that the autoscaler can read per pod through the custom metrics API, under the
# same names (see prometheus-adapter-rules.yaml). Both sum over models and versions per pod.
CUSTOM_METRICS = {"inflight": "servekit_inflight_requests", "queue": "servekit_queue_rows"}
DEFAULT_TARGET_VALUES = {"inflight": "8", "queue": "32"}

DEFAULT_REQUEST_TIMEOUT_MS: int = ServerSettings.model_fields["rest_api_timeout_in_ms"].default
# Time left after the drain for the lifespan shutdown (unloading the models) and the exit.
EXIT_MARGIN_SECONDS = 10
STARTUP_PERIOD_SECONDS = 5
# Replica range of base/; overlays/production/ sets the one from the options.
BASE_REPLICAS_MIN = 1
BASE_REPLICAS_MAX = 2

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIG_MAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_CPU = re.compile(r"(\d+(?:\.\d+)?)(m?)")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_MEMORY_FACTORS: dict[str, int] = {
    "": 1,
    **{suffix: 1000 ** (power + 1) for power, suffix in enumerate("kMGTPE")},
    **{f"{suffix}i": 1024 ** (power + 1) for power, suffix in enumerate("KMGTPE")},
}

BASE_FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "configmap.yaml")
ADAPTER_RULES_FILE = "prometheus-adapter-rules.yaml"
REPLICAS_PATCH_FILE = "hpa-replicas.yaml"
KUSTOMIZATION_FILE = "kustomization.yaml"


@dataclass(frozen=True)
class KubernetesOptions:
    """Options of `servekit deploy kubernetes`: the repository, the objects and their sizes."""

    model_repository: Path
    name: str = "servekit"
    namespace: str | None = None
    image: str = f"servekit:{__version__}"
    # "image" when the models are in the image at /models, or "pvc:CLAIM" for a volume claim.
    models_volume: str = "image"
    replicas_min: int = 2
    replicas_max: int = 10
    metric: Metric = "cpu"
    # Average CPU use per pod, in percent of its CPU request, for metric "cpu".
    target_cpu: int = 70
    # Average value of the servekit metric per pod (a Kubernetes quantity) for the others.
    target_value: str | None = None
    cpu: str = "1"
    cpu_limit: str | None = None
    memory: str = "1Gi"
    # None sets the limit to the memory request.
    memory_limit: str | None = None
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS
    prestop_seconds: int = 5
    startup_seconds: int = 300

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def claim_name(self) -> str | None:
        """The PersistentVolumeClaim that contains the models, or None for models in the image."""
        return self.models_volume.removeprefix("pvc:") if self.models_volume != "image" else None

    @property
    def drain_seconds(self) -> int:
        """Maximum seconds that servekit drains after SIGTERM: its request timeout, rounded up."""
        return math.ceil(self.request_timeout_ms / 1000)

    @property
    def grace_seconds(self) -> int:
        """terminationGracePeriodSeconds: the preStop sleep, the drain and the exit margin."""
        return self.prestop_seconds + self.drain_seconds + EXIT_MARGIN_SECONDS

    @property
    def threads(self) -> int:
        """Runtime threads per operator: the CPUs the container may use, rounded up.

        Left at 0, ONNX Runtime sizes its pool by the node's physical cores, because a CPU
        quota is invisible to its core detection (microsoft/onnxruntime#29510).
        """
        return max(1, math.ceil(parse_cpu(self.cpu_limit or self.cpu)))

    @property
    def custom_metric(self) -> str | None:
        return CUSTOM_METRICS.get(self.metric)


@dataclass(frozen=True)
class Manifests:
    """The documents of each output file, by path relative to the output directory."""

    files: dict[str, dict[str, Any]]

    def base_documents(self) -> list[dict[str, Any]]:
        """Return the Kubernetes objects of base/, in kustomization order."""
        return [self.files[f"base/{name}"] for name in BASE_FILES if f"base/{name}" in self.files]


def parse_cpu(quantity: str) -> float:
    """Return a CPU quantity ("500m", "2", "1.5") in cores; raise DeployError if invalid."""
    match = _CPU.fullmatch(quantity)
    if match is None:
        raise DeployError(
            f"invalid CPU quantity {quantity!r}: use cores (2, 0.5) or millicores (500m)"
        )
    value = float(match[1])
    return value / 1000 if match[2] else value


def parse_memory(quantity: str) -> float:
    """Return a memory quantity ("512Mi", "2Gi", "1G") in bytes; raise DeployError if invalid."""
    match = _MEMORY.fullmatch(quantity)
    if match is None:
        raise DeployError(
            f"invalid memory quantity {quantity!r}: use bytes with a suffix such as 512Mi or 2Gi"
        )
    suffix: str = match[2] or ""
    return float(match[1]) * _MEMORY_FACTORS[suffix]


def _validate(options: KubernetesOptions) -> None:
    if len(options.name) > 63 or not _DNS_LABEL.fullmatch(options.name):
        raise DeployError(
            f"invalid --name {options.name!r}: use at most 63 lowercase letters, digits and "
            "'-', starting with a letter"
        )
    namespace = options.namespace
    if namespace is not None and (len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace)):
        raise DeployError(f"invalid --namespace {namespace!r}: not a valid namespace name")
    if not options.image or any(char.isspace() for char in options.image):
        raise DeployError(f"invalid --image {options.image!r}")

    claim = options.claim_name
    if not options.models_volume.startswith("pvc:") and claim is not None:
        raise DeployError(
            f"invalid --models-volume {options.models_volume!r}: use 'image' for models baked "
            "into the image, or 'pvc:CLAIM_NAME' for a PersistentVolumeClaim"
        )
    if claim is not None and (len(claim) > 253 or not _DNS_SUBDOMAIN.fullmatch(claim)):
        raise DeployError(f"invalid claim name {claim!r} in --models-volume")

    if not 1 <= options.replicas_min <= options.replicas_max:
        raise DeployError(
            f"need 1 <= --replicas-min <= --replicas-max, got {options.replicas_min} and "
            f"{options.replicas_max}"
        )

    if options.metric not in METRIC_CHOICES:
        raise DeployError(f"invalid --metric {options.metric!r}: use one of {METRIC_CHOICES}")
    if options.metric == "cpu" and options.target_value is not None:
        raise DeployError(
            "--target-value applies to --metric inflight or queue; for cpu, use --target-cpu"
        )
    target = options.target_value
    if target is not None and (_CPU.fullmatch(target) is None or parse_cpu(target) <= 0):
        raise DeployError(
            f"invalid --target-value {target!r}: use a number above 0, such as 8, 2.5 or 500m"
        )
    if options.target_cpu < 1:
        raise DeployError(f"--target-cpu must be at least 1 (percent), got {options.target_cpu}")

    _validate_resources(options)
    for flag, value in (
        ("--request-timeout-ms", options.request_timeout_ms),
        ("--startup-seconds", options.startup_seconds),
    ):
        if value < 1:
            raise DeployError(f"{flag} must be at least 1, got {value}")
    if options.prestop_seconds < 0:
        raise DeployError(f"--prestop-seconds must be 0 or more, got {options.prestop_seconds}")


def _validate_resources(options: KubernetesOptions) -> None:
    cpu = parse_cpu(options.cpu)
    if cpu <= 0:
        raise DeployError("--cpu must be above 0: the autoscaler divides CPU use by it")
    if options.cpu_limit is not None and parse_cpu(options.cpu_limit) < cpu:
        raise DeployError(f"--cpu-limit {options.cpu_limit} is below --cpu {options.cpu}")
    memory = parse_memory(options.memory)
    if memory <= 0:
        raise DeployError("--memory must be above 0")
    if options.memory_limit is not None and parse_memory(options.memory_limit) < memory:
        raise DeployError(
            f"--memory-limit {options.memory_limit} is below --memory {options.memory}"
        )


def read_model_configs(repository: Path) -> dict[str, str]:
    """Return the text of each model's servekit.yaml in `repository`, by model name.

    Each file is validated as `servekit serve` would read it. Raises DeployError for a missing
    or empty repository, an invalid file, or a model name that cannot be a ConfigMap key.
    """
    try:
        sources = sources_in_repository(repository)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DeployError(str(exc)) from None
    if not sources:
        raise DeployError(f"model repository {repository} contains no model folders")
    configs: dict[str, str] = {}
    for source in sources:
        path = source.base_path / MODEL_CONFIG_FILE
        if not path.is_file():
            continue
        try:
            load_model_options(source, ServableOptions())
        except ConfigError as exc:
            raise DeployError(f"invalid {path}: {exc}") from None
        if not _CONFIG_MAP_KEY.fullmatch(config_key(source.name)):
            raise DeployError(
                f"model {source.name!r} has a {MODEL_CONFIG_FILE}, but its name cannot be a "
                "ConfigMap key: use letters, digits, '-', '_' and '.'"
            )
        configs[source.name] = path.read_text()
    return configs


def config_key(model: str) -> str:
    """Return the ConfigMap key of a model's servekit.yaml."""
    return f"{model}.{MODEL_CONFIG_FILE}"


def config_map_name(options: KubernetesOptions) -> str:
    return f"{options.name}-model-config"


def build_manifests(options: KubernetesOptions, configs: Mapping[str, str]) -> Manifests:
    """Build every output file's document for `options` and the models' servekit.yaml texts."""
    files: dict[str, dict[str, Any]] = {
        "base/deployment.yaml": _deployment(options, configs),
        "base/service.yaml": _service(options),
        "base/hpa.yaml": _autoscaler(
            options, BASE_REPLICAS_MIN, min(BASE_REPLICAS_MAX, options.replicas_max)
        ),
        "base/pdb.yaml": _disruption_budget(options),
    }
    if configs:
        files["base/configmap.yaml"] = _config_map(options, configs)

    resources = [name for name in BASE_FILES if f"base/{name}" in files]
    base_kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if options.namespace is not None:
        base_kustomization["namespace"] = options.namespace
    base_kustomization["resources"] = resources
    files[f"base/{KUSTOMIZATION_FILE}"] = base_kustomization

    files[f"overlays/production/{KUSTOMIZATION_FILE}"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        # The target finds the autoscaler whatever namespace base/ sets.
        "patches": [
            {
                "path": REPLICAS_PATCH_FILE,
                "target": {"kind": "HorizontalPodAutoscaler", "name": options.name},
            }
        ],
    }
    files[f"overlays/production/{REPLICAS_PATCH_FILE}"] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": options.name},
        "spec": {"minReplicas": options.replicas_min, "maxReplicas": options.replicas_max},
    }

    if options.custom_metric is not None:
        files[ADAPTER_RULES_FILE] = adapter_rules(options.custom_metric)
    return Manifests(files)


def _selector(options: KubernetesOptions) -> dict[str, str]:
    # Labels that never change for a deployment: a Deployment's selector is immutable.
    return {"app.kubernetes.io/name": "servekit", "app.kubernetes.io/instance": options.name}


def _labels(options: KubernetesOptions) -> dict[str, str]:
    return {
        **_selector(options),
        "app.kubernetes.io/component": "model-server",
    }


def _metadata(options: KubernetesOptions, name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if options.namespace is not None:
        metadata["namespace"] = options.namespace
    metadata["labels"] = _labels(options)
    return metadata


def server_args(options: KubernetesOptions) -> list[str]:
    """Return the arguments after the image's `servekit serve` entrypoint."""
    return [
        "--rest_api_host=0.0.0.0",
        f"--rest_api_port={REST_PORT}",
        f"--port={GRPC_PORT}",
        f"--model_repository={MODELS_PATH}",
        f"--rest_api_timeout_in_ms={options.request_timeout_ms}",
        f"--tensorflow_intra_op_parallelism={options.threads}",
        # Each replica would load and unload models on its own, so versions come and go
        # through the models volume and rollouts instead.
        "--no_enable_model_management",
        "--log_format=json",
    ]


def _probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _resources(options: KubernetesOptions) -> dict[str, Any]:
    limits = {"memory": options.memory_limit or options.memory}
    # No CPU limit unless asked: throttling stalls inference mid-request, and the request
    # already reserves the CPU for scheduling and the autoscaler.
    if options.cpu_limit is not None:
        limits["cpu"] = options.cpu_limit
    return {"requests": {"cpu": options.cpu, "memory": options.memory}, "limits": limits}


def _volumes(
    options: KubernetesOptions, configs: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # The root filesystem is read-only, and with --workers above 1 the supervisor keeps the
    # shared metric files in a temporary directory.
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    claim = options.claim_name
    if claim is not None:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": MODELS_PATH, "readOnly": True})
    if configs:
        volumes.append({"name": "model-config", "configMap": {"name": config_map_name(options)}})
        # One file per model, over the servekit.yaml in its base path. A subPath mount is not
        # updated in place, so the pod template's config digest rolls the pods instead.
        # NOTE: not tried on a cluster. The runtime creates a missing mount point file, which
        # a read-only models volume does not allow, so the file should exist there already.
        for model in sorted(configs):
            mounts.append(
                {
                    "name": "model-config",
                    "mountPath": f"{MODELS_PATH}/{model}/{MODEL_CONFIG_FILE}",
                    "subPath": config_key(model),
                    "readOnly": True,
                }
            )
    return volumes, mounts


def _config_digest(configs: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for model in sorted(configs):
        digest.update(f"{model}\0{configs[model]}\0".encode())
    return digest.hexdigest()


def _container(options: KubernetesOptions, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    startup_failures = math.ceil(options.startup_seconds / STARTUP_PERIOD_SECONDS)
    return {
        "name": CONTAINER_NAME,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "args": server_args(options),
        "ports": [
            {"name": "http", "containerPort": REST_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(options),
        # Readiness waits for every model's first version, so the startup probe allows for
        # the model load time. Liveness and readiness start once it has passed.
        "startupProbe": _probe(READY_PATH, STARTUP_PERIOD_SECONDS, startup_failures, 3),
        "readinessProbe": _probe(READY_PATH, 5, 2, 3),
        # Generous, so that a server busy with a long batch is not restarted.
        "livenessProbe": _probe(LIVE_PATH, 10, 6, 5),
        "lifecycle": {
            # The endpoints controller and the proxies stop sending new requests while this
            # runs. SIGTERM follows, and servekit then drains for up to its request timeout.
            # It runs the image's sleep (coreutils in python:3.11-slim), because the preStop
            # sleep action is alpha in Kubernetes 1.29.
            "preStop": {"exec": {"command": ["sleep", str(options.prestop_seconds)]}},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def _deployment(options: KubernetesOptions, configs: Mapping[str, str]) -> dict[str, Any]:
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(REST_PORT),
        "prometheus.io/path": METRICS_PATH,
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    if configs:
        annotations["servekit/model-config-sha256"] = _config_digest(configs)
    volumes, mounts = _volumes(options, configs)
    pod_spec = {
        # Kubernetes would otherwise set <SERVICE>_PORT=tcp://... for every Service in the
        # namespace, and a Service named servekit gives SERVEKIT_PORT, which servekit reads as
        # its gRPC port setting.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": options.grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(options, mounts)],
        "volumes": volumes,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(options, options.name),
        "spec": {
            # No `replicas`: the autoscaler sets the count, and a value here would reset it at
            # every apply.
            "revisionHistoryLimit": 5,
            # A rollout whose pods take longer than this to become ready is reported failed.
            "progressDeadlineSeconds": max(600, options.startup_seconds + 120),
            "selector": {"matchLabels": _selector(options)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": _labels(options), "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def _service(options: KubernetesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(options, options.name),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(options),
            "ports": [
                {
                    "name": "http",
                    "port": REST_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
            ],
        },
    }


def _autoscaler(options: KubernetesOptions, replicas_min: int, replicas_max: int) -> dict[str, Any]:
    metric: dict[str, Any]
    if options.custom_metric is None:
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": options.target_cpu},
            },
        }
    else:
        target = options.target_value or DEFAULT_TARGET_VALUES[options.metric]
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": options.custom_metric},
                "target": {"type": "AverageValue", "averageValue": target},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(options, options.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
            "minReplicas": replicas_min,
            "maxReplicas": replicas_max,
            "metrics": [metric],
            "behavior": {
                # Up at once, by at most doubling every 30 s. Down by one pod a minute, after
                # five minutes below target, since a new pod pays the model load time again.
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 30}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


def _disruption_budget(options: KubernetesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(options, options.name),
        # maxUnavailable rather than minAvailable, so that a node drain can evict the only pod
        # of a deployment that runs one ready replica, which minAvailable: 1 would block.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(options)}},
    }


def _config_map(options: KubernetesOptions, configs: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(options, config_map_name(options)),
        "data": {config_key(model): configs[model] for model in sorted(configs)},
    }


def adapter_rules(metric: str) -> dict[str, Any]:
    """Return the Prometheus adapter rule that serves `metric` per pod as a custom metric.

    The series need `namespace` and `pod` labels, which the usual annotation-driven
    Prometheus scrape job adds. The rule sums over models and versions and averages over a
    minute, because one scrape of a gauge is noisy.
    """
    return {
        "rules": [
            {
                "seriesQuery": f'{metric}{{namespace!="",pod!=""}}',
                "resources": {
                    "overrides": {
                        "namespace": {"resource": "namespace"},
                        "pod": {"resource": "pod"},
                    }
                },
                "name": {"matches": f"^{metric}$", "as": metric},
                "metricsQuery": (
                    "sum(avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)"
                ),
            }
        ]
    }


class _Dumper(yaml.SafeDumper):
    """YAML as kubectl prints it: list items indented under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # servekit.yaml texts stay readable as literal blocks; PyYAML falls back to quotes for
    # text that a block cannot hold, such as trailing spaces.
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)

_HEADERS = {
    ADAPTER_RULES_FILE: (
        "# Prometheus adapter rule that serves this metric per pod through the custom\n"
        "# metrics API (custom.metrics.k8s.io), for the HorizontalPodAutoscaler in\n"
        "# base/hpa.yaml: {metric}\n"
        "# Add the rule to the adapter's config.yaml, or under `rules.custom` in the values\n"
        "# of its Helm chart. Prometheus must scrape the pods with `namespace` and `pod`\n"
        "# labels, as the usual annotation-driven scrape job adds them.\n"
    ),
}


def dump_yaml(document: Mapping[str, Any]) -> str:
    """Return one document as block-style YAML, keys in the order built."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def write_manifests(options: KubernetesOptions, output: Path) -> list[Path]:
    """Check and write the manifests for `options` under `output`; return the files written.

    Raises DeployError, before writing anything, for an invalid repository or a manifest that
    fails `check_manifests`. Files of an earlier run that this one does not produce are
    removed, so the layout never lists stale objects.
    """
    configs = read_model_configs(options.model_repository)
    manifests = build_manifests(options, configs)
    check_manifests(manifests.base_documents())
    if output.exists() and not output.is_dir():
        raise DeployError(f"output {output} exists and is not a directory")
    written = []
    header = f"# Written by servekit deploy kubernetes (servekit {__version__}).\n"
    for relative, document in manifests.files.items():
        path = output / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        text = header + _HEADERS.get(relative, "").format(metric=options.custom_metric)
        path.write_text(text + dump_yaml(document))
        written.append(path)
    for stale in [f"base/{name}" for name in BASE_FILES] + [ADAPTER_RULES_FILE]:
        if stale not in manifests.files:
            (output / stale).unlink(missing_ok=True)
    return written
