"""``pvu label-remap``: the shards' label names -> a head's class indices, for
``pvu cache --label-remap``.

The shards' names come from ``classes.json`` (written by ``pvu shards``) or a text file of
synsets; the head's from the synset lists timm ships (e.g. ``imagenet21k_goog_synsets.txt``
for the 21,843-class ``augreg_in21k`` heads). Classes with no counterpart are reported and
map to -1: ``pvu cache`` skips their samples as ``label_outside_head``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from rich.table import Table

from jobs.config import PathOrUrl
from jobs.preflight import check_not_in_a_cache, check_not_inside, check_storage
from jobs.terminal import summary_table
from pipeline.dataset.remap import (
    Remap,
    build_remap,
    head_names,
    read_names,
    refuse_shared_classes,
    unique_names,
    write_remap,
)

SHOWN_MISSING = 20


class LabelRemapJobConfig(BaseModel):
    """The label-remap job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: PathOrUrl
    head: PathOrUrl  # a label list's or a model's name, or a file
    output: PathOrUrl


def run_label_remap(config: LabelRemapJobConfig) -> Remap:
    """Build the remap and write it to ``config.output``; refuses one that maps nothing."""
    check_storage(config.classes, flag="--classes", must_exist=True)
    check_storage(config.output, flag="--output")
    check_not_in_a_cache(config.output, flag="--output", itself=True)  # a .json/.txt, no Parquet
    head = head_names(config.head)
    for flag, names in (("--classes", config.classes), ("--head", head.file)):
        if names is not None:  # a --head list's or model's name is no file
            check_not_inside(
                config.output,
                names,
                flag="--output",
                folder_flag=flag,
                why="the remap would overwrite the names it is made from; write it to a file "
                "of its own",
            )
    classes = unique_names(config.classes, read_names(config.classes), of="labels")
    remap = build_remap(classes, head)
    refuse_shared_classes(config.classes, remap)  # names alike but for their case
    if len(remap.missing) == len(remap.classes):
        # either side may be at fault: a head file of "n01440764 tench, Tinca tinca" lines, too
        raise ValueError(
            f"no label of {config.classes} is a class of head {remap.head} (labels "
            f"{_first(remap.classes)}; the head's classes {_first(head.names)}): both must "
            "name a class alike, as a synset alone such as 'n01440764'"
        )
    write_remap(remap, config.output)
    return remap


def _first(names: list[str]) -> str:
    """The first three of ``names``, quoted: a name may hold commas and blanks."""
    return ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")


def summarize(remap: Remap, config: LabelRemapJobConfig) -> Table:
    """The job's summary: how many labels map, and the ones that do not."""
    table = summary_table("pvu label-remap: summary")
    table.add_row("remap", config.output)
    table.add_row("head", remap.head)
    table.add_row("shard labels", f"{len(remap.classes):,} ({config.classes})")
    table.add_row("mapped", f"{len(remap.classes) - len(remap.missing):,}")
    missing = remap.missing
    table.add_row(
        "no counterpart (skipped by pvu cache)",
        f"{len(missing):,}" + (f": {', '.join(missing[:SHOWN_MISSING])}" if missing else ""),
    )
    if len(missing) > SHOWN_MISSING:
        table.add_row("", f"... and {len(missing) - SHOWN_MISSING:,} more")
    return table
