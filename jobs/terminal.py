"""What every job shares at the edge: the stderr console, log setup, config validation errors."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
Config = TypeVar("Config", bound=BaseModel)


def setup_logging(verbose: bool) -> None:
    """Rich log lines on stderr; debug level with ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` of cpu, cuda or auto (CUDA when torch sees one);
    raises ``ValueError`` for cuda on a machine without one."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def validated(config_type: type[Config], arguments: dict[str, Any]) -> Config:
    """``config_type(**arguments)``, or a usage error naming each offending ``--flag``."""
    try:
        return config_type(**arguments)
    except ValidationError as error:
        raise typer.BadParameter(explain(error)) from None


def explain(error: ValidationError) -> str:
    """A validation error as ``--flag: message`` clauses."""
    return "; ".join(
        f"--{str(part['loc'][0]).replace('_', '-') if part['loc'] else 'config'}: {part['msg']}"
        for part in error.errors()
    )
