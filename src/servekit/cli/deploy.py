"""`servekit deploy`: write deployment manifests for serving a model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from servekit import __version__
from servekit.tools.deploy.kubernetes import (
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_TARGET_VALUES,
    METRIC_CHOICES,
)


@click.group()
def deploy() -> None:
    """Write deployment manifests for serving a model repository."""


@deploy.command("kubernetes")
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path),
    required=True,
    help="Model repository to serve; each model's servekit.yaml goes into a ConfigMap.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory that receives base/, overlays/production/ and, for custom "
    "metrics, prometheus-adapter-rules.yaml.",
)
@click.option(
    "--name",
    default="servekit",
    show_default=True,
    help="Name of the Deployment, Service and other objects.",
)
@click.option("--namespace", help="Namespace of the objects (default: the one kubectl uses).")
@click.option(
    "--image",
    default=f"servekit:{__version__}",
    show_default=True,
    help="Container image built from servekit's Dockerfile.",
)
@click.option(
    "--models-volume",
    default="image",
    show_default=True,
    help="Where the pods find the models at /models: 'image' when they are baked "
    "into the image, or 'pvc:CLAIM_NAME' for a PersistentVolumeClaim.",
)
@click.option(
    "--replicas-min",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Minimum replica count of the autoscaler in overlays/production (base: 1).",
)
@click.option(
    "--replicas-max",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Maximum replica count of the autoscaler in overlays/production (base: 2).",
)
@click.option(
    "--metric",
    type=click.Choice(METRIC_CHOICES),
    default="cpu",
    show_default=True,
    help="What the autoscaler scales on: CPU utilization, or per pod through the "
    "custom metrics API, servekit_inflight_requests (inflight) or "
    "servekit_queue_rows (queue).",
)
@click.option(
    "--target-cpu",
    type=click.IntRange(min=1),
    default=70,
    show_default=True,
    help="Average CPU use per pod for --metric cpu, in percent of --cpu.",
)
@click.option(
    "--target-value",
    help="Average value per pod for --metric inflight (default "
    f"{DEFAULT_TARGET_VALUES['inflight']} requests) or queue (default "
    f"{DEFAULT_TARGET_VALUES['queue']} rows).",
)
@click.option(
    "--cpu",
    default="1",
    show_default=True,
    help="CPU request per pod, in cores (2, 0.5) or millicores (500m).",
)
@click.option("--cpu-limit", help="CPU limit per pod (default: none, which avoids throttling).")
@click.option(
    "--memory",
    default="1Gi",
    show_default=True,
    help="Memory request per pod, such as 512Mi or 2Gi.",
)
@click.option("--memory-limit", help="Memory limit per pod (default: the --memory request).")
@click.option(
    "--request-timeout-ms",
    type=click.IntRange(min=1),
    default=DEFAULT_REQUEST_TIMEOUT_MS,
    show_default=True,
    help="servekit's --rest_api_timeout_in_ms, which is also how long it drains "
    "after SIGTERM; sizes terminationGracePeriodSeconds.",
)
@click.option(
    "--prestop-seconds",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Seconds the preStop hook sleeps before SIGTERM, while the endpoints and proxies "
    "stop sending new requests.",
)
@click.option(
    "--startup-seconds",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Maximum time in seconds for the models to load before the pod is restarted.",
)
def kubernetes(output: Path, **options: Any) -> None:
    """Write Kubernetes manifests (kustomize base and production overlay) for a repository."""
    from servekit.tools.deploy.checks import DeployError
    from servekit.tools.deploy.kubernetes import KubernetesOptions, write_manifests

    try:
        written = write_manifests(KubernetesOptions(**options), output)
    except DeployError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the manifests: {exc}") from None
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"apply with: kubectl apply -k {output / 'overlays' / 'production'}")
