"""``pvu plan``'s command line: its flags and their help.

The job itself, its config and run, is :mod:`jobs.run.plan`, imported only when the
command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from jobs import names_of
from jobs.cache import cache
from jobs.config import job_config
from jobs.terminal import reported, run_cli, setup_logging


def _plan_options(
    sample_images: Annotated[
        int,
        typer.Option(
            help="Images read from the start of a few shards spread through the list, and run "
            "through the job here."
        ),
    ] = 256,
    images_per_second_per_gpu: Annotated[
        float | None,
        typer.Option(
            help="--backbone's images/s on one target GPU (default: measured here if this "
            "machine has a GPU, else GPU hours are not estimated; --also backbones are always "
            "measured so)."
        ),
    ] = None,
) -> None:
    """The plan's own flags, added to the cache job's."""


def _signature() -> inspect.Signature:
    """``pvu cache``'s parameters with the plan's own before ``--verbose``."""
    params = list(inspect.signature(cache, eval_str=True).parameters.values())
    extra = list(inspect.signature(_plan_options, eval_str=True).parameters.values())
    return inspect.Signature(params[:-1] + extra + params[-1:], return_annotation=None)


def plan(**arguments: Any) -> None:
    """Dry run of `pvu cache` (same flags): units, rows, bytes and actor-hours, from a sample."""
    verbose = arguments["verbose"]
    setup_logging(verbose)
    with reported("plan", verbose=verbose):  # a Ctrl-C while torch imports says so too
        from jobs.run.plan import PlanJobConfig, print_plans, run_plan

        job = job_config(PlanJobConfig, arguments["ctx"])
        plans = run_plan(job)
    print_plans(plans, job)


plan.__signature__ = _signature()  # type: ignore[attr-defined]


__getattr__ = names_of("jobs.run.plan")


def main() -> None:
    """``python -m jobs.plan``."""
    run_cli(lambda: typer.run(plan), "plan")


if __name__ == "__main__":
    main()
