"""Derive click options from a pydantic settings model, so each setting is defined once."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

F = typing.TypeVar("F", bound=Callable[..., Any])


def options_from(model: type[BaseModel]) -> Callable[[F], F]:
    """Add one option per field of `model`, spelled `--snake_case` and `--kebab-case`.

    Options default to None, so only flags given on the command line override the model's
    own defaults and environment variables.
    """

    def decorate(function: F) -> F:
        for name, info in reversed(model.model_fields.items()):
            function = _option(name, info)(function)
        return function

    return decorate


def _option(name: str, info: FieldInfo) -> Callable[[F], F]:
    snake = f"--{name}"
    kebab = f"--{name.replace('_', '-')}"
    names = [snake] if snake == kebab else [snake, kebab]
    help_text = info.description or ""
    if info.default is not None:
        help_text += f" [default: {info.default}]"
    annotation = _unwrap_optional(info.annotation)
    if annotation is bool:
        switches = [f"{snake}/--no_{name}"]
        if snake != kebab:
            switches.append(f"{kebab}/--no-{kebab[2:]}")
        return click.option(*switches, name, default=None, help=help_text)
    return click.option(*names, name, type=_click_type(annotation), default=None, help=help_text)


def _unwrap_optional(annotation: Any) -> Any:
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return arguments[0]
    return annotation


def _click_type(annotation: Any) -> click.ParamType[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(value) for value in typing.get_args(annotation)])
    if annotation is int:
        return click.INT
    if annotation is Path:
        return click.Path(path_type=Path)
    return click.STRING
