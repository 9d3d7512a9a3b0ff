"""pvu's jobs: one module per command, each a typed config, a ``run_*`` function and its CLI."""

from importlib.metadata import PackageNotFoundError, version


def project_version() -> str:
    """The installed pvu version."""
    try:
        return version("pvu")
    except PackageNotFoundError:
        return "0+unknown"
