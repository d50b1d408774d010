"""The built-in example model repository, served when no model is named."""

from pathlib import Path

EXAMPLE_REPOSITORY = Path(__file__).parent / "models"
