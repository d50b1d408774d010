"""New version directories for the tools that write models: numbered, and complete at once."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def next_version(model_dir: Path) -> int:
    """Return one above the highest version directory of `model_dir` (1 for none)."""
    versions = [int(child.name) for child in model_dir.iterdir() if child.name.isdigit()]
    return max(versions, default=0) + 1


@contextlib.contextmanager
def staged_version(model_dir: Path, version: int) -> Iterator[Path]:
    """Yield a hidden folder to write the version into, renamed to `version` on success.

    The server ignores hidden folders, so a polling server never loads half a version. If the
    block raises, the folder is removed and nothing appears.
    """
    target = model_dir / str(version)
    if target.exists():
        raise ValueError(f"version {version} already exists in {model_dir}")
    work = Path(tempfile.mkdtemp(prefix=f".servekit-{version}-", dir=model_dir))
    # mkdtemp makes the folder private; a version is as readable as any folder made here.
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)
    try:
        yield work
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
