"""pvu's jobs: one module per command, its flags and help (``python -m jobs.<job>``).

A job that needs torch, timm or Ray keeps its typed config and ``run_*`` function in
``jobs.run.<job>``, which its command imports only when it runs: ``--help`` answers at once.
``info`` and ``shards`` need none of them and hold all three in one module.
"""

from importlib.metadata import PackageNotFoundError, version


def project_version() -> str:
    """The installed pvu version."""
    try:
        return version("pvu")
    except PackageNotFoundError:
        return "0+unknown"
