"""Checks across the Kubernetes objects of a servekit deployment.

Each object can be valid on its own while the set is broken: a Service that selects no pod, an
autoscaler aimed at another Deployment, a probe on a port the container does not open. A
cluster accepts all of these and fails later, so `check_manifests` looks for them first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from servekit.config.settings import ServerSettings

_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
_TIMEOUT_FLAGS = ("--rest_api_timeout_in_ms", "--rest-api-timeout-in-ms")
_TIMEOUT_ENV = "SERVEKIT_REST_API_TIMEOUT_IN_MS"
_DEFAULT_TIMEOUT_MS: int = ServerSettings.model_fields["rest_api_timeout_in_ms"].default
# Kubernetes's default terminationGracePeriodSeconds.
_DEFAULT_GRACE_SECONDS = 30

Document = Mapping[str, Any]


class DeployError(ValueError):
    """Invalid deployment options or model repository, or manifests that fail the checks."""


class ManifestError(DeployError):
    """Manifests that fail `check_manifests`; `problems` lists each failure."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"the manifests are inconsistent:{lines}")


def check_manifests(documents: Iterable[Document]) -> None:
    """Raise ManifestError listing every problem found across `documents`.

    The rules:

    - Each Deployment's selector matches its own pod template.
    - Each Service and PodDisruptionBudget selects the pods of a Deployment, and each
      Service's target ports are container ports of those pods.
    - Each HorizontalPodAutoscaler targets an apps/v1 Deployment among the documents. When it
      scales on CPU, every container of that Deployment requests CPU.
    - Each probe's port is a port of its container, by number or name.
    - Each volume mount names a pod volume. Each ConfigMap volume names a ConfigMap among the
      documents, which contains every key that a subPath mount reads.
    - terminationGracePeriodSeconds exceeds the preStop sleep plus servekit's drain time (its
      request timeout), because the kubelet kills the container at that deadline.
    """
    problems = find_problems(documents)
    if problems:
        raise ManifestError(problems)


def find_problems(documents: Iterable[Document]) -> list[str]:
    """Return a description of every problem `check_manifests` looks for."""
    documents = list(documents)
    deployments = _of_kind(documents, "Deployment")
    config_maps = {_name(document): document for document in _of_kind(documents, "ConfigMap")}
    problems: list[str] = []
    for deployment in deployments:
        problems.extend(_deployment_problems(deployment, config_maps))
    for service in _of_kind(documents, "Service"):
        problems.extend(_service_problems(service, deployments))
    for budget in _of_kind(documents, "PodDisruptionBudget"):
        selector = budget.get("spec", {}).get("selector") or {}
        if not any(_selects(selector, _pod_labels(item)) for item in deployments):
            problems.append(
                f"PodDisruptionBudget {_name(budget)}: its selector "
                f"{_describe_selector(selector)} matches the pods of no Deployment "
                f"({_describe_pods(deployments)})"
            )
    for autoscaler in _of_kind(documents, "HorizontalPodAutoscaler"):
        problems.extend(_autoscaler_problems(autoscaler, deployments))
    return problems


def _of_kind(documents: Sequence[Document], kind: str) -> list[Document]:
    return [document for document in documents if document.get("kind") == kind]


def _name(document: Document) -> str:
    return str(document.get("metadata", {}).get("name", "<unnamed>"))


def _pod_spec(deployment: Document) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = deployment.get("spec", {}).get("template", {}).get("spec", {})
    return spec


def _pod_labels(deployment: Document) -> Mapping[str, str]:
    template = deployment.get("spec", {}).get("template", {})
    labels: Mapping[str, str] = template.get("metadata", {}).get("labels") or {}
    return labels


def _containers(deployment: Document) -> list[Mapping[str, Any]]:
    return list(_pod_spec(deployment).get("containers") or [])


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Tell whether a label selector (matchLabels and matchExpressions) selects `labels`.

    An empty selector counts as selecting nothing: for these objects it is a mistake.
    """
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    return all(_matches_expression(expression, labels) for expression in expressions)


def _matches_expression(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key = expression.get("key", "")
    values = expression.get("values") or []
    operator = expression.get("operator")
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    return False


def _describe_selector(selector: Mapping[str, Any]) -> str:
    parts = [f"{key}={value}" for key, value in (selector.get("matchLabels") or {}).items()]
    parts += [
        f"{item.get('key')} {item.get('operator')} {item.get('values') or ''}".rstrip()
        for item in selector.get("matchExpressions") or []
    ]
    return "{" + ", ".join(parts) + "}"


def _describe_pods(deployments: Sequence[Document]) -> str:
    if not deployments:
        return "there is no Deployment"
    return "; ".join(
        f"Deployment {_name(item)}'s pods carry "
        + _describe_selector({"matchLabels": _pod_labels(item)})
        for item in deployments
    )


def _port_exists(port: Any, containers: Sequence[Mapping[str, Any]]) -> bool:
    """Tell whether `port` (a number or a port name) is a port of one of `containers`."""
    for container in containers:
        for declared in container.get("ports") or []:
            if isinstance(port, int) and declared.get("containerPort") == port:
                return True
            if isinstance(port, str) and declared.get("name") == port:
                return True
    return False


def _deployment_problems(
    deployment: Document, config_maps: Mapping[str, Document]
) -> Iterator[str]:
    name = _name(deployment)
    selector = deployment.get("spec", {}).get("selector") or {}
    if not _selects(selector, _pod_labels(deployment)):
        labels = _describe_selector({"matchLabels": _pod_labels(deployment)})
        yield (
            f"Deployment {name}: its selector {_describe_selector(selector)} does not match "
            f"its pod template labels {labels}"
        )
    containers = _containers(deployment)
    for container in containers:
        for probe_name in _PROBES:
            probe = container.get(probe_name)
            if probe is None:
                continue
            port = _probe_port(probe)
            if port is not None and not _port_exists(port, [container]):
                yield (
                    f"Deployment {name}: container {container.get('name')}'s {probe_name} "
                    f"uses port {port!r}, which is not among its ports {_describe_ports(container)}"
                )
    yield from _grace_problems(deployment)
    yield from _volume_problems(deployment, config_maps)


def _probe_port(probe: Mapping[str, Any]) -> Any:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            return probe[handler].get("port")
    return None


def _describe_ports(container: Mapping[str, Any]) -> str:
    ports = [
        f"{port.get('name')}={port.get('containerPort')}" if port.get("name") else
        str(port.get("containerPort"))
        for port in container.get("ports") or []
    ]  # fmt: skip
    return "[" + ", ".join(ports) + "]"


def _grace_problems(deployment: Document) -> Iterator[str]:
    pod_spec = _pod_spec(deployment)
    grace = pod_spec.get("terminationGracePeriodSeconds", _DEFAULT_GRACE_SECONDS)
    for container in _containers(deployment):
        sleep = prestop_sleep_seconds(container)
        drain = drain_seconds(container)
        if grace <= sleep + drain:
            yield (
                f"Deployment {_name(deployment)}: terminationGracePeriodSeconds {grace} must "
                f"exceed container {container.get('name')}'s preStop sleep ({sleep} s) plus "
                f"servekit's drain ({drain} s, its request timeout), or the kubelet kills "
                "requests still in flight"
            )


def prestop_sleep_seconds(container: Mapping[str, Any]) -> float:
    """Return how long the container's preStop hook sleeps: `sleep N` or the sleep action."""
    pre_stop = container.get("lifecycle", {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"].get("seconds", 0))
    command = pre_stop.get("exec", {}).get("command") or []
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"):
        try:
            return float(command[1])
        except ValueError:
            return 0.0
    return 0.0


def drain_seconds(container: Mapping[str, Any]) -> int:
    """Return how long servekit may drain after SIGTERM in this container, in whole seconds.

    servekit drains for up to its request timeout, set by --rest_api_timeout_in_ms in the
    container's arguments, by SERVEKIT_REST_API_TIMEOUT_IN_MS, or by default.
    """
    timeout_ms = _DEFAULT_TIMEOUT_MS
    for variable in container.get("env") or []:
        if variable.get("name") == _TIMEOUT_ENV and "value" in variable:
            timeout_ms = int(variable["value"])
    words = [str(word) for word in (container.get("command") or [])]
    words += [str(word) for word in (container.get("args") or [])]
    for index, word in enumerate(words):
        flag, equals, value = word.partition("=")
        if flag not in _TIMEOUT_FLAGS:
            continue
        if not equals and index + 1 < len(words):
            value = words[index + 1]
        timeout_ms = int(value)
    return math.ceil(timeout_ms / 1000)


def _volume_problems(deployment: Document, config_maps: Mapping[str, Document]) -> Iterator[str]:
    name = _name(deployment)
    volumes = {volume.get("name"): volume for volume in _pod_spec(deployment).get("volumes") or []}
    for volume in volumes.values():
        source = volume.get("configMap")
        if source is None or source.get("optional"):
            continue
        if source.get("name") not in config_maps:
            yield (
                f"Deployment {name}: volume {volume.get('name')} uses ConfigMap "
                f"{source.get('name')}, which is not among the manifests"
            )
    for container in _containers(deployment):
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None:
                yield (
                    f"Deployment {name}: container {container.get('name')} mounts volume "
                    f"{mount.get('name')}, which the pod does not declare"
                )
                continue
            config_map = config_maps.get(str((volume.get("configMap") or {}).get("name")))
            key = mount.get("subPath")
            if config_map is not None and key and key not in (config_map.get("data") or {}):
                yield (
                    f"Deployment {name}: the mount at {mount.get('mountPath')} reads key {key} "
                    f"of ConfigMap {_name(config_map)}, which has no such key"
                )


def _service_problems(service: Document, deployments: Sequence[Document]) -> Iterator[str]:
    name = _name(service)
    spec = service.get("spec", {})
    selector = {"matchLabels": spec.get("selector") or {}}
    selected = [item for item in deployments if _selects(selector, _pod_labels(item))]
    if not selected:
        yield (
            f"Service {name}: its selector {_describe_selector(selector)} matches the pods of "
            f"no Deployment ({_describe_pods(deployments)})"
        )
        return
    for port in spec.get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        for deployment in selected:
            if not _port_exists(target, _containers(deployment)):
                yield (
                    f"Service {name}: port {port.get('name') or port.get('port')} targets "
                    f"{target!r}, which no container of Deployment {_name(deployment)} declares"
                )


def _autoscaler_problems(autoscaler: Document, deployments: Sequence[Document]) -> Iterator[str]:
    name = _name(autoscaler)
    spec = autoscaler.get("spec", {})
    target = spec.get("scaleTargetRef") or {}
    reference = f"{target.get('apiVersion')} {target.get('kind')} {target.get('name')}"
    if target.get("kind") != "Deployment" or target.get("apiVersion") != "apps/v1":
        yield f"HorizontalPodAutoscaler {name}: scales {reference}, expected an apps/v1 Deployment"
        return

    matching = [item for item in deployments if _name(item) == target.get("name")]
    if not matching:
        names = ", ".join(_name(item) for item in deployments) or "none"
        yield (
            f"HorizontalPodAutoscaler {name}: scales {reference}, which is not among the "
            f"manifests (Deployments: {names})"
        )
        return

    if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
        yield (
            f"HorizontalPodAutoscaler {name}: minReplicas {spec.get('minReplicas')} exceeds "
            f"maxReplicas {spec.get('maxReplicas')}"
        )

    # Without metrics, autoscaling/v2 scales on CPU utilization (80 %).
    metrics = spec.get("metrics") or [{"type": "Resource", "resource": {"name": "cpu"}}]
    on_cpu = any(
        metric.get("type") in ("Resource", "ContainerResource")
        and (metric.get("resource") or metric.get("containerResource") or {}).get("name") == "cpu"
        for metric in metrics
    )
    if not on_cpu:
        return
    for container in _containers(matching[0]):
        resources = container.get("resources") or {}
        # A container with only a CPU limit gets a request equal to it.
        if "cpu" not in (resources.get("requests") or {}) | (resources.get("limits") or {}):
            yield (
                f"HorizontalPodAutoscaler {name}: scales on CPU utilization, but container "
                f"{container.get('name')} of Deployment {_name(matching[0])} has no CPU "
                "request, so the autoscaler cannot compute it"
            )
