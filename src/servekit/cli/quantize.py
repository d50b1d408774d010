"""`servekit quantize`: write an int8 or fp16 version of an ONNX or TensorFlow model, checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from servekit.tools.quantize import MODES


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--version", "version", type=click.IntRange(min=0), required=True,
              help="Version to quantize.")  # fmt: skip
@click.option("--file", "model_file", default="model.onnx", show_default=True,
              help="The version's ONNX file to quantize; its other files are copied.")  # fmt: skip
@click.option("--mode", type=click.Choice(MODES), default="int8-dynamic", show_default=True,
              help="int8 weights, int8 weights and activations (calibrated), or float16; "
                   "for a SavedModel or Keras version, the TFLite equivalents.")  # fmt: skip
@click.option("--per-channel", is_flag=True, help="One int8 scale per output channel.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rows for int8-static calibration (.npy, .npz or .jsonl).")  # fmt: skip
@click.option("--validation", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rows to compare the models on; an .npz may add `labels`.")  # fmt: skip
@click.option("--output-version", type=click.IntRange(min=0),
              help="Version to write (default: one above the highest).")  # fmt: skip
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0),
              help="Fail, writing nothing, if accuracy drops more (0.01 = 1 point).")  # fmt: skip
@click.option("--min-cosine", type=click.FloatRange(min=-1, max=1),
              help="Fail, writing nothing, if mean output cosine is lower.")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Time per speed measurement.")  # fmt: skip
def quantize(model_dir: Path, **options: Any) -> None:
    """Quantize version --version of MODEL_DIR and write it as a new version with a report."""
    from servekit.tools.quantize import QualityError, QuantizeSettings
    from servekit.tools.quantize import quantize as run_quantize
    from servekit.tools.quantize_tflite import quantize_tflite, tensorflow_source

    settings = QuantizeSettings(model_dir=model_dir.resolve(), **options)
    # A version with saved_model.pb or model.keras and no ONNX file is quantized to TFLite.
    tensorflow = tensorflow_source(settings) is not None
    try:
        report = quantize_tflite(settings) if tensorflow else run_quantize(settings)
    except ImportError as exc:
        extra = "tflite" if exc.name == "ai_edge_litert" else "tensorflow"
        raise click.ClickException(
            f"quantizing needs {exc.name}: pip install 'servekit[{extra}]'"
        ) from None
    except QualityError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"cannot quantize: {exc}") from None
    click.echo(json.dumps(report, indent=2))
