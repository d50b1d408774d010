"""Texts of natural lengths for tests and benchmarks, from the docstrings of Python's library.

Paragraphs of the standard library's documentation run from a few words to a few hundred, much
like the sentences and passages sent to an embedding model. They ship with Python, so nothing
is downloaded, and the same Python version gives the same texts.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "fractions", "functools", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re",
    "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
_MIN_WORDS = 3


def paragraphs() -> list[str]:
    """Return every paragraph of the listed modules' docstrings, whitespace folded, in order."""
    found: dict[str, None] = {}
    # Some names (typing.io, for one) warn when their documentation is read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _MODULES:
            module = importlib.import_module(module_name)
            objects = [module, *(value for _, value in sorted(vars(module).items()))]
            for value in objects:
                if not (inspect.ismodule(value) or inspect.isclass(value) or callable(value)):
                    continue
                for block in re.split(r"\n\s*\n", inspect.getdoc(value) or ""):
                    text = " ".join(block.split())
                    if len(text.split()) >= _MIN_WORDS:
                        found.setdefault(text)
    return list(found)


def sample(count: int, seed: int = 0) -> list[str]:
    """`count` paragraphs in a shuffled order, the same for the same seed."""
    texts = paragraphs()
    random.Random(seed).shuffle(texts)
    if count > len(texts):
        raise ValueError(f"only {len(texts)} paragraphs are available, not {count}")
    return texts[:count]
