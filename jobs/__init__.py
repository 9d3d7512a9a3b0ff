"""pvu's jobs: one module per command, its flags and help (``python -m jobs.<job>``).

A job that needs torch, timm or Ray keeps its typed config and ``run_*`` function in
``jobs.run.<job>``, which its command imports only when it runs: ``--help`` answers at once.
``info`` and ``shards`` need none of them and hold all three in one module. A command's module
still offers its job's names (``from jobs.cache import CacheJobConfig, run_cache``), imported
from ``jobs.run.<job>`` when first asked for.
"""

import importlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def project_version() -> str:
    """The installed pvu version."""
    try:
        return version("pvu")
    except PackageNotFoundError:
        return "0+unknown"


def names_of(module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds the names a module lacks in ``module``, imported on
    first use (PEP 562)."""

    def attribute(name: str) -> Any:
        if name.startswith("__"):  # tools probing for __path__, __wrapped__, ...
            raise AttributeError(name)
        return getattr(importlib.import_module(module), name)

    return attribute
