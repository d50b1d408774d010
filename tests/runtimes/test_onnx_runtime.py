"""ONNX Runtime settings that servekit passes to every session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servekit.runtimes.base import RuntimeOptions
from servekit.runtimes.onnx import OnnxRuntime
from tests.toy_models import write_adder

SPINNING = "session.intra_op.allow_spinning"


def session_options(tmp_path: Path, spinning: bool) -> Any:
    write_adder(tmp_path)
    runtime = OnnxRuntime(RuntimeOptions(spinning=spinning))
    runtime.load(tmp_path / "adder" / "1")
    return runtime._session.get_session_options()  # type: ignore[union-attr]


def test_spinning_off_by_default(tmp_path: Path) -> None:
    assert not RuntimeOptions().spinning
    assert session_options(tmp_path, spinning=False).get_session_config_entry(SPINNING) == "0"


def test_spinning_on_keeps_runtime_default(tmp_path: Path) -> None:
    # Without the entry, ONNX Runtime spins (its default); reading a missing entry raises.
    with pytest.raises(RuntimeError):
        session_options(tmp_path, spinning=True).get_session_config_entry(SPINNING)
