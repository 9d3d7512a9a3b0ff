"""``pvu info CACHE``: what a cache is (provenance, label space) and what it holds (units, rows,
bytes, skips by reason, epochs), from its manifest; reads no row. ``--verify`` checks storage
against the manifest with the same check ``pvu cache`` reconciles with and readers refuse on
(without a manifest, only each unit's footer); ``--checksums`` also reads every page and checks
its CRC-32."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from typing import Annotated

import fsspec
import typer
from pydantic import BaseModel, ConfigDict
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jobs.config import ConfigFile, PathOrUrl, job_config
from jobs.preflight import check_storage
from jobs.terminal import (
    Verbose,
    answer,
    binary_size,
    console,
    counted_bar,
    reported,
    run_cli,
    setup_logging,
    summary_table,
)
from pipeline.cache.info import CacheInfo, read_cache_info
from pipeline.cache.lock import live_holder
from pipeline.cache.manifest import unfinished_note
from pipeline.cache.verify import CacheCheck, check_cache, check_pages
from pipeline.named import NAMED, counted


class InfoJobConfig(BaseModel):
    """The info job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: PathOrUrl
    json_output: bool = False
    verify: bool = False
    checksums: bool = False


def describe(info: CacheInfo) -> Table:
    """The cache as a two-column table."""
    provenance = info.provenance
    table = summary_table(f"pvu info: {info.root}")
    table.add_row("backbone", str(provenance.get("backbone")))
    table.add_row("weights", str(provenance.get("weights_digest")))
    if provenance.get("model_kwargs"):
        table.add_row("model kwargs", json.dumps(provenance["model_kwargs"], sort_keys=True))
    table.add_row(
        "embedding",
        f"{provenance.get('embedding_dim')} x {provenance.get('dtype', 'float16')}",
    )
    table.add_row("label space", info.label_space())
    table.add_row("transform", json.dumps(provenance.get("transform"), sort_keys=True))
    table.add_row("seed", str(provenance.get("seed")))
    compute = provenance.get("compute")
    table.add_row(
        "compute",
        f"{compute.get('device', '?')}, autocast {compute.get('autocast') or 'none'}"
        if compute
        else "not recorded (a cache from before pvu recorded it)",
    )
    table.add_row("ambiguity key", str(provenance.get("ambiguity_key") or "none"))
    table.add_row(
        "versions",
        f"schema {provenance.get('schema_version')}, pvu {provenance.get('project_version', '?')}",
    )
    shards, epochs = counted(info.shards, "shard"), counted(len(info.epochs), "epoch")
    table.add_row("units", f"{len(info.units):,} ({shards} x {epochs})")
    for epoch, (units, rows) in info.epochs.items():
        table.add_row(f"  epoch {epoch}", f"{counted(units, 'unit')}, {counted(rows, 'row')}")
    table.add_row("rows", f"{info.rows:,}")
    per_row = f", {info.bytes / info.rows:,.0f} per row" if info.rows else ""
    table.add_row("bytes", f"{info.bytes:,} ({binary_size(info.bytes)}{per_row})")
    skipped = info.skipped
    table.add_row("samples skipped", ", ".join(f"{k}={v:,}" for k, v in skipped.items()) or "none")
    table.add_row(
        "read from", f"{info.source}" + (f", updated {info.updated}" if info.updated else "")
    )
    if info.writer is not None:  # its last_run is this run's, unfinished as it runs
        table.add_row("being written", f"by {info.writing()}: units and rows grow as it commits")
    elif info.last_run is not None:
        table.add_row("last run", unfinished_note(info.last_run) or "finished, every unit")
    return table


def checked(check: CacheCheck, *, pages: bool) -> dict[str, bool]:
    """What the check covered besides every unit's footer: storage against the manifest
    (units missing, sizes, orphans; a cache without one has nothing that lists its units) and
    every page's CRC-32 (``--checksums``)."""
    return {"manifest": check.listed is not None, "pages": pages}


def verification(check: CacheCheck, *, pages: bool) -> Table:
    """What ``--verify`` found: the first ``NAMED`` damaged units (and how many more), and the
    orphans ``pvu cache`` would adopt."""
    table = summary_table(f"pvu info --verify: {check.url}")
    covered = checked(check, pages=pages)
    table.add_row(
        "checked",
        ("sizes, footers" if covered["manifest"] else "footers")
        + (" and every page's CRC-32" if pages else " (pages: --checksums)"),
    )
    if not covered["manifest"]:
        table.add_row("not checked", "missing units and sizes: the cache has no manifest")
    table.add_row("units missing or damaged", f"{len(check.damaged):,}")
    named = sorted(check.damaged.items())[:NAMED]
    for relpath, why in named:
        table.add_row(Text(relpath, style="red"), why)
    if len(check.damaged) > len(named):
        more = len(check.damaged) - len(named)
        table.add_row(Text(f"... and {more:,} more", style="red"), "--json lists every one")
    if covered["manifest"]:
        adopt = " (the next pvu cache run adopts those that are pvu units)" if check.orphans else ""
        table.add_row("committed files the manifest lacks", f"{len(check.orphans):,}{adopt}")
    return table


def storage_check(summary: CacheInfo, *, pages: bool) -> CacheCheck:
    """The check of storage against the manifest the summary was read from (the same snapshot,
    read once), with every page read under a progress bar if ``pages``. A cache without a
    manifest has its units' footers checked against the first one's provenance, and their
    pages if ``pages``: nothing records which units it should hold, or their sizes."""
    check = check_cache(
        summary.root, summary.units, summary.provenance, keep_footers=pages
    )  # each footer dropped once checked, unless its pages are read next
    if summary.source != "manifest":
        check.listed = None  # its units are those storage holds: none is an orphan
        check.orphans = {}
        check.damaged.update(summary.unreadable)
    if pages:
        with (
            counted_bar("checksums", "units", transient=True) as progress,
            # closed however the loop ends (Ctrl-C in an update): its pool's reads not begun
            # are cancelled then, not when the traceback holding the generator is freed
            contextlib.closing(check_pages(check)) as checked,
        ):
            task = progress.add_task("units", total=len(check.footers))
            for _ in checked:
                progress.advance(task)
    return check


def run_info(job: InfoJobConfig) -> tuple[CacheInfo, CacheCheck | None]:
    """The cache's summary, and the check of storage against it when ``job.verify`` (or
    ``job.checksums``)."""
    check_storage(job.cache, flag="CACHE", must_exist=True)
    try:
        summary = read_cache_info(job.cache, keep_going=job.verify or job.checksums)
    except ValueError as error:  # no cache there, a file (no lock beside it), or damaged
        fs, root = fsspec.core.url_to_fs(job.cache)
        writer = live_holder(job.cache) if fs.isdir(root) else None
        if writer is None:
            raise
        raise ValueError(
            f"{error}; it is being written by {writer.describe(time.time())}, which has "
            "committed nothing yet: run pvu info again once it has"
        ) from None
    summary = replace(summary, writer=live_holder(job.cache))
    if not (job.verify or job.checksums):
        return summary, None
    return summary, storage_check(summary, pages=job.checksums)


def info(
    ctx: typer.Context,
    cache: Annotated[
        str | None,
        typer.Argument(metavar="CACHE", help="Cache root: a local path or any fsspec URL."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check that every unit the manifest lists exists with its recorded size and "
            "footer (without a manifest: each unit's footer); exit 1 naming the first 10 that do "
            "not (--json: every one).",
        ),
    ] = False,
    checksums: Annotated[
        bool,
        typer.Option(
            help="--verify, and also read every page of every unit and check its CRC-32 (a "
            "byte damaged in place): reads the whole cache.",
        ),
    ] = False,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Show a cache's provenance, units, rows, bytes, skips by reason, epochs and label space."""
    setup_logging(verbose)
    with reported("info", verbose=verbose):  # a --config file that cannot be read, too
        job = job_config(InfoJobConfig, ctx)
        summary, check = run_info(job)
    if job.json_output:
        document = summary.to_json()
        if check is not None:
            document["verify"] = {
                "checked": checked(check, pages=job.checksums),
                "damaged": check.damaged,
                "orphans": check.orphans,
            }
        print(json.dumps(document, indent=1))
    else:
        answer.print(describe(summary))
        if check is not None:
            answer.print(verification(check, pages=job.checksums))
    if check is not None and not check.ok:
        refusal = check.refusal() if summary.writer is None else check.being_written(summary.writer)
        console.print(f"[red]error:[/red] {escape(refusal)}", markup=True)
        raise typer.Exit(code=1)


def main() -> None:
    """``python -m jobs.info``."""
    run_cli(lambda: typer.run(info), "info")


if __name__ == "__main__":
    main()
