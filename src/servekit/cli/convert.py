"""`servekit convert`: turn a model from another framework into a checked ONNX or TFLite version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# The options every conversion takes, applied in this order.
_COMMON_OPTIONS = [
    click.option("--output", "model_dir", type=click.Path(file_okay=False, path_type=Path),
                 required=True, help="Model folder that receives the new version."),
    click.option("--sample", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 required=True,
                 help="Rows to compare: .npy for a model with one input, .npz with one array "
                      "per input name (also .jsonl or .parquet for TensorFlow models)."),
    click.option("--version", type=click.IntRange(min=0),
                 help="Version to write (default: next)."),
    click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
                 help="Largest difference allowed between the two models' outputs."),
]  # fmt: skip
# Both spellings, as `servekit serve` takes both.
_ALLOW_PICKLE = click.option(
    "--allow-pickle",
    "--allow_pickle",
    "allow_pickle",
    is_flag=True,
    help="Load SOURCE although loading it runs code from the file.",
)
_FORMAT = click.option(
    "--format", "target_format", type=click.Choice(["onnx", "tflite"]), default="onnx",
    show_default=True, help="Format of the converted model.",
)  # fmt: skip


def _common_options(command: Any) -> Any:
    for option in reversed(_COMMON_OPTIONS):
        command = option(command)
    return command


@click.group()
def convert() -> None:
    """Convert a model into an ONNX (or TFLite) version of a model folder."""


@convert.command("sklearn")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common_options
@_ALLOW_PICKLE
def sklearn(source: Path, **options: Any) -> None:
    """Convert a pickled or joblib scikit-learn, XGBoost or LightGBM model (SOURCE) to ONNX."""
    from servekit.tools.convert import convert_sklearn

    _run(source, "scikit-learn skl2onnx onnxmltools", lambda: convert_sklearn(source, **options))


@convert.command("pytorch")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common_options
@_ALLOW_PICKLE
def pytorch(source: Path, **options: Any) -> None:
    """Export a TorchScript (.pt) or torch.export (.pt2) model (SOURCE) to ONNX."""
    from servekit.tools.convert_torch import convert_pytorch

    _run(source, "'servekit[torch]'", lambda: convert_pytorch(source, **options))


@convert.command("keras")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common_options
@_FORMAT
def keras(source: Path, **options: Any) -> None:
    """Convert a Keras 3 model file (SOURCE, .keras) to ONNX or TFLite."""
    from servekit.tools.convert_tensorflow import convert_tensorflow

    _run(source, "'servekit[tensorflow]'", lambda: convert_tensorflow(source, **options))


@convert.command("saved-model")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_common_options
@_FORMAT
def saved_model(source: Path, **options: Any) -> None:
    """Convert a TensorFlow SavedModel directory (SOURCE) to ONNX or TFLite."""
    from servekit.tools.convert_tensorflow import convert_tensorflow

    _run(source, "'servekit[tensorflow]'", lambda: convert_tensorflow(source, **options))


def _run(source: Path, extra: str, conversion: Callable[[], dict[str, Any]]) -> None:
    """Run a conversion and print its report, turning its failures into one-line errors."""
    from servekit.tools.convert import ConversionMismatchError

    try:
        report = conversion()
    except ImportError as exc:
        raise click.ClickException(f"converting needs {exc.name}: pip install {extra}") from None
    except ConversionMismatchError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"cannot convert {source}: {exc}") from None
    click.echo(json.dumps(report, indent=2))
