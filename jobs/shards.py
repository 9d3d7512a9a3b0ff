"""``pvu shards``: an image folder of class subfolders or of class tar archives (ImageNet's
``n01440764.tar``), or a table of (path, label) (CSV, TSV, JSON Lines, each maybe compressed,
or Parquet, which may hold the images' bytes, or be a folder of parts) -> WebDataset tar
shards that ``pvu cache`` reads, with a ``classes.json`` of label names.

Images are shuffled across classes (seeded) unless ``--no-shuffle``; one that cannot be read
or decoded is left out and named in the summary, never fatal.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Annotated

import typer
from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator
from rich.markup import escape
from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from jobs.config import ConfigFile, PathOrUrl, job_config
from jobs.preflight import (
    check_not_in_a_cache,
    check_not_inside,
    check_output_folder,
    check_storage,
)
from jobs.terminal import (
    Verbose,
    console,
    counted_bar,
    progress_bar,
    reported,
    run_cli,
    setup_logging,
    summary_table,
)
from pipeline.dataset.convert import CLASSES_NAME, ConvertReport, write_dataset
from pipeline.dataset.sources import list_dataset
from pipeline.named import NAMED, counted

log = logging.getLogger("pvu.shards")


class ShardsJobConfig(BaseModel):
    """The shards job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: PathOrUrl
    output: PathOrUrl
    shard_size: ByteSize = Field(default=ByteSize(1_000_000_000))
    samples_per_shard: int | None = Field(default=None, ge=1)
    shuffle: bool = True
    seed: int = Field(default=0, ge=0)
    prefix: str = "shard"
    path_column: str = "path"
    label_column: str = "label"
    label_names: bool = False
    threads: int = Field(default=8, ge=1)

    @field_validator("shard_size")
    @classmethod
    def _holds_a_sample(cls, size: ByteSize) -> ByteSize:
        if size <= 16_384:
            raise ValueError(f"must be over 16KiB (16,384 bytes), got {size:,} bytes")
        return size

    @field_validator("prefix")
    @classmethod
    def _safe_prefix(cls, prefix: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", prefix):
            raise ValueError(f"{prefix!r} must be letters, digits, '-' or '_' (no dots)")
        return prefix


def _ignored(suffixes: Counter[str]) -> str:
    """The files a listing ignored, by suffix: `` (7 other files ignored: 5 .avif, 2 none)``."""
    if not suffixes:
        return ""
    named = ", ".join(f"{n} {suffix or 'without suffix'}" for suffix, n in suffixes.most_common(5))
    more = ", ..." if len(suffixes) > 5 else ""
    return f" ({suffixes.total()} other files ignored: {named}{more})"


def run_shards(config: ShardsJobConfig) -> ConvertReport:
    """List the input, then write its shards under a progress bar."""
    check_storage(config.input, flag="--input", must_exist=True)
    check_output_folder(config.output, flag="--output")
    check_not_inside(
        *(config.output, config.input),
        flag="--output",
        folder_flag="--input",
        why="the run that finishes an interrupted one would list its shards as a class; "
        "write them outside the input",
    )
    check_not_in_a_cache(config.output, flag="--output", itself=True)
    # one listing of the whole input, no count until it ends: minutes for millions on S3
    said = f"listing {config.input}".replace("{", "{{").replace("}", "}}")  # a format
    columns = (SpinnerColumn(), TextColumn(said, markup=False), TimeElapsedColumn())
    with progress_bar(*columns, plain=f"shards: {said}", transient=True) as progress:
        progress.add_task("listing", total=None)
        listing = list_dataset(
            config.input,
            path_column=config.path_column,
            label_column=config.label_column,
            label_names=config.label_names,
        )
    log.info(
        "%s: %d images in %d classes%s",
        config.input,
        len(listing.sources),
        len(listing.classes),
        _ignored(listing.ignored),
    )
    if listing.empty:
        log.warning(
            "%d class folders hold no image (their labels are kept): %s",
            len(listing.empty),
            ", ".join(listing.empty[:10]),
        )
    with counted_bar("shards", "images, {task.fields[bad]} left out") as progress:
        task = progress.add_task("images", total=len(listing.sources), bad=0)
        bad = 0

        def on_image(ok: bool) -> None:
            nonlocal bad
            bad += not ok
            progress.update(task, advance=1, bad=bad)

        return write_dataset(
            listing,
            config.output,
            prefix=config.prefix,
            max_bytes=int(config.shard_size),
            max_samples=config.samples_per_shard,
            shuffle=config.shuffle,
            seed=config.seed,
            threads=config.threads,
            on_image=on_image,
        )


def summarize(report: ConvertReport, output: str) -> Table:
    """The job's closing summary: shards, samples, classes, and each image left out."""
    table = summary_table("pvu shards: summary")
    table.add_row("output", f"{output} ({counted(len(report.shards), 'shard')}, {CLASSES_NAME})")
    table.add_row("samples written", f"{report.samples:,}")
    table.add_row("classes", f"{len(report.classes):,}")
    table.add_row("bytes", f"{sum(shard.bytes for shard in report.shards):,}")
    reasons = Counter(item.reason for item in report.unreadable)
    table.add_row(
        "images left out", ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "none"
    )
    for item in report.unreadable[:NAMED]:
        table.add_row(Text(f"left out ({item.reason})", style="yellow"), item.url)
    if len(report.unreadable) > NAMED:
        more = len(report.unreadable) - NAMED
        table.add_row("", f"... and {more:,} more (the log names the first {NAMED} of each kind)")
    return table


def shards(
    ctx: typer.Context,
    input: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Required. A folder of class subfolders (<input>/<class>/<image>) or of class "
            "tar archives (<input>/<class>.tar of images, as ImageNet's n01440764.tar; read "
            "without extracting), or a table of image paths or URLs and labels: .csv, .tsv, "
            ".jsonl / .ndjson (each may be .gz, .bz2 or .zst compressed) or .parquet (its "
            "images may be held in it, as a Hugging Face dataset's; see --path-column), or a "
            "folder of .parquet files of one schema alone (a table in parts, as the Hub's "
            "train-00000-of-00040.parquet, ...), read as one table; local or any fsspec URL "
            "(no glob: give the folder).",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Required. Folder for the shards: a path or fsspec URL."),
    ] = None,
    shard_size: Annotated[
        str,
        typer.Option(
            metavar="SIZE",
            help="Largest shard, e.g. 500MB, 1GiB; an image larger than it gets a "
            "shard of its own.",
        ),
    ] = "1GB",
    samples_per_shard: Annotated[
        int | None, typer.Option(help="Most samples per shard (default: only --shard-size).")
    ] = None,
    shuffle: Annotated[
        bool, typer.Option(help="Shuffle images across classes (seeded by --seed).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle.")] = 0,
    prefix: Annotated[
        str, typer.Option(metavar="NAME", help="Shard names: <prefix>-000000.tar, ...")
    ] = "shard",
    path_column: Annotated[
        str,
        typer.Option(
            metavar="COLUMN",
            help="Table column of image paths or URLs; relative paths are relative to the "
            "table's own folder. In a .parquet it may hold the images: struct<bytes, path> "
            "(a Hugging Face dataset's; the path is read where bytes are null) or binary; "
            "left at 'path' where the table has none, its 'image' column is read.",
        ),
    ] = "path",
    label_column: Annotated[
        str,
        typer.Option(
            metavar="COLUMN",
            help="Table column of labels: class names, or integer class indices (a CSV's "
            "zero-padded numbers, 001, are names).",
        ),
    ] = "label",
    label_names: Annotated[
        bool,
        typer.Option(
            "--label-names",
            help="Read a table's numeric labels as class names (IDs such as 2435099), listed "
            "in sorted order in classes.json, not as class indices.",
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="Images read and checked in parallel.")] = 8,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Convert an image folder or table into shuffled WebDataset shards for `pvu cache`."""
    setup_logging(verbose)
    with reported("shards", verbose=verbose, resume="run the same command again to finish"):
        job = job_config(ShardsJobConfig, ctx)  # a --config file that cannot be read, too
        report = run_shards(job)
    console.print(summarize(report, job.output))
    if not report.samples:
        console.print(
            f"[red]error:[/red] no image of {escape(job.input)} could be read", markup=True
        )
        raise typer.Exit(code=2)


def main() -> None:
    """``python -m jobs.shards``."""
    run_cli(lambda: typer.run(shards), "shards")


if __name__ == "__main__":
    main()
