"""`servekit models`: list, load and unload models on a running server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import click

DEFAULT_URL = "http://127.0.0.1:8501"


@click.group()
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Address of the server.")
@click.pass_context
def models(context: click.Context, url: str) -> None:
    """Manage the models of a running server through its V2 repository API."""
    context.obj = url.rstrip("/")


@models.command("list")
@click.pass_obj
def list_models(url: str) -> None:
    """List every model version with its state."""
    entries = _post(url, "/v2/repository/index")
    for entry in entries:
        reason = f"  {entry['reason']}" if entry.get("reason") else ""
        click.echo(f"{entry['name']}\t{entry['version'] or '-'}\t{entry['state']}{reason}")


@models.command("load")
@click.argument("name")
@click.pass_obj
def load_model(url: str, name: str) -> None:
    """Load NAME (or reload it from disk) and wait until it is ready."""
    _post(url, f"/v2/repository/models/{quote(name, safe='')}/load")
    click.echo(f"loaded {name}")


@models.command("set-label")
@click.argument("name")
@click.argument("label")
@click.argument("version", type=click.IntRange(min=0))
@click.pass_obj
def set_label(url: str, name: str, label: str, version: int) -> None:
    """Point LABEL of NAME at VERSION, which must be available (until the server restarts)."""
    body = {"label": label, "version": version}
    _post(url, f"/v2/repository/models/{quote(name, safe='')}/labels", body)
    click.echo(f"{name} label {label} -> version {version}")


@models.command("unload")
@click.argument("name")
@click.pass_obj
def unload_model(url: str, name: str) -> None:
    """Unload every version of NAME after its running requests finish."""
    _post(url, f"/v2/repository/models/{quote(name, safe='')}/unload")
    click.echo(f"unloaded {name}")


def _post(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url + path, data=data, method="POST")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise click.ClickException(_error_message(exc)) from None
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc.reason}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}"
