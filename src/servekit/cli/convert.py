"""`servekit convert`: turn a model from another framework into a checked ONNX version."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def convert() -> None:
    """Convert a model into an ONNX version of a model folder."""


@convert.command("sklearn")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Model folder that receives the new version.")  # fmt: skip
@click.option("--sample", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Rows (.npy or .npz, rows x features) to compare.")  # fmt: skip
@click.option("--version", type=click.IntRange(min=0), help="Version to write (default: next).")
@click.option("--allow-pickle", is_flag=True,
              help="Load SOURCE although unpickling runs code from the file.")  # fmt: skip
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest difference allowed between the two models' outputs.")  # fmt: skip
def sklearn(
    source: Path,
    model_dir: Path,
    sample: Path,
    version: int | None,
    allow_pickle: bool,
    tolerance: float,
) -> None:
    """Convert a pickled or joblib scikit-learn model (SOURCE) to ONNX with skl2onnx."""
    from servekit.tools.convert import ConversionMismatchError, convert_sklearn

    try:
        report = convert_sklearn(source, model_dir, sample, version, allow_pickle, tolerance)
    except ImportError as exc:
        raise click.ClickException(
            f"converting needs {exc.name}: pip install scikit-learn skl2onnx"
        ) from None
    except ConversionMismatchError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"cannot convert {source}: {exc}") from None
    click.echo(json.dumps(report, indent=2))
