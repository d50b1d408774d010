"""The `servekit` command."""

from __future__ import annotations

import os
from typing import Any

import click
from pydantic import ValidationError

from servekit import __version__
from servekit.cli.batch import batch
from servekit.cli.bench import bench
from servekit.cli.convert import convert
from servekit.cli.deploy import deploy
from servekit.cli.models import models
from servekit.cli.options import options_from
from servekit.cli.quantize import quantize
from servekit.cli.tune import tune
from servekit.config.model_config import describe_validation_error
from servekit.config.settings import ServerSettings, tf_serving_container_settings
from servekit.observability.logging import configure_logging


@click.group()
@click.version_option(__version__, prog_name="servekit")
def cli() -> None:
    """Serve versioned models over TF Serving REST and KServe V2."""


@cli.command()
@options_from(ServerSettings)
def serve(**flags: Any) -> None:
    """Serve models until Ctrl-C or SIGTERM."""
    given = {name: value for name, value in flags.items() if value is not None}
    given = tf_serving_container_settings(given, os.environ)
    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc, prefix="--")) from None
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    # Imported after logging is set up, and only for this command, because it loads uvicorn.
    from servekit.config.model_config import ConfigError
    from servekit.server.runner import serve as run_server
    from servekit.server.sockets import BindError
    from servekit.server.supervisor import WorkersFailedError

    try:
        run_server(settings)
    except (BindError, ConfigError, FileNotFoundError, WorkersFailedError) as exc:
        raise click.ClickException(str(exc)) from None


cli.add_command(models)
cli.add_command(bench)
cli.add_command(batch)
cli.add_command(tune)
cli.add_command(quantize)
cli.add_command(convert)
cli.add_command(deploy)


def main() -> None:
    cli()
