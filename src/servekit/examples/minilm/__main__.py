"""`python -m servekit.examples.minilm OUTPUT_DIR`: build a MiniLM version (see build.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from servekit.examples.minilm.build import EmbeddingMismatchError, build


@click.command()
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--version", type=click.IntRange(min=0), help="Version to write (default: next).")
@click.option("--no-bucketing", is_flag=True, help="Pad each batch to its longest text.")
def main(output: Path, version: int | None, no_bucketing: bool) -> None:
    """Export all-MiniLM-L6-v2 to ONNX and write it as a version of the model folder OUTPUT."""
    try:
        report = build(output, version, bucketing=not no_bucketing)
    except ImportError as exc:
        raise click.ClickException(
            f"building needs {exc.name}: pip install 'servekit[minilm]'"
        ) from None
    except (EmbeddingMismatchError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2))


main()
