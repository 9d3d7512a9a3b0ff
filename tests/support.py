"""Helpers shared by test modules: a small real backbone and the unit settings around it."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.run.cache_config import CacheJobConfig
from pipeline.cache.augment import TransformConfig, resolve_transform
from pipeline.cache.backbone import Backbone, create_backbone_model, describe_backbone
from pipeline.cache.deteriorate import Deterioration
from pipeline.cache.unit import UnitRunner, UnitSettings
from pipeline.head.pages import EMBEDDING_LEAF
from schemas import SCHEMA_VERSION, leaf_column

BACKBONE = "resnet10t"
# The same small backbone on the command line: random weights at 32x32, fast on a CPU.
SMALL_BACKBONE_FLAGS = ["--backbone", BACKBONE, "--weights", "random", "--input-size", "32"]

# The jobs' command lines as the project fixes them (issue 2 and its follow-ups). A manifest
# may only use these; tests also check them against the real `--help`.
JOB_FLAGS: dict[str, set[str]] = {
    "cache": {
        "--shards",
        "--backbone",
        "--weights",
        "--label-remap",
        "--epochs",
        "--augment",
        "--output",
        "--seed",
        "--batch-size",
        "--actors",
        "--gpus-per-actor",
        "--image-key",
        "--label-key",
        "--ray-address",
        "--dtype",
        "--label-space",
        "--config",
    },
    "train_head": {
        "--cache",
        "--output",
        "--loss",
        "--episodes",
        "--episode-size",
        "--batch-size",
        "--lr",
        "--warmup-episodes",
        "--hidden",
        "--seed",
        "--device",
        "--resume",
        "--val-fraction",
        "--config",
    },
    "evaluate": {
        "--head",
        "--dataset",
        "--upstream",
        "--report",
        "--device",
        "--deterioration",
        "--ambiguity",
        "--reject-fraction",
        "--tsne-dataset",
        "--tsne-classes",
        "--config",
    },
}


def unit_settings(
    output: str,
    *,
    augment: str = "train",
    seed: int = 0,
    deteriorate: Deterioration | None = None,
    backbone: str = BACKBONE,
    size: int = 32,
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    decode: str = "pil",
    **overrides,
) -> UnitSettings:
    """Settings for caching with random-weight ``backbone`` at ``size`` into ``output``
    (``normalize``: a (mean, std) other than the backbone's; ``decode``: ``--decode``)."""
    info = describe_backbone(backbone, "random", input_size=(3, size, size))
    mean, std = normalize or (None, None)
    config = TransformConfig(
        augment=augment,
        input_size=(3, size, size),
        deteriorate=deteriorate,
        mean=mean,
        std=std,
        decode=decode,
    )
    transform = resolve_transform(config, info.data_config)
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "label_space": overrides.get("label_space", "classifier"),
        "backbone": backbone,
        "weights_digest": info.weights_digest,
        "embedding_dim": info.embedding_dim,
        "seed": seed,
        "transform": transform,
        "dtype": "float16",
        "compute": {"device": "cpu", "autocast": None},
    }
    return UnitSettings(
        output=output,
        seed=seed,
        batch_size=8,
        transform=transform,
        provenance=provenance,
        embedding_dim=info.embedding_dim,
        **overrides,
    )


def small_cache_config(shards: str, output: str, address: str, **options) -> CacheJobConfig:
    """A ``pvu cache`` config of the small backbone (``BACKBONE``, random weights, 32 px, batches
    of 8) reading ``shards`` into ``output`` on the Ray cluster at ``address``."""
    return CacheJobConfig(
        shards=shards,
        output=output,
        backbone=BACKBONE,
        weights="random",
        input_size=32,
        batch_size=8,
        ray_address=address,
        **options,
    )


def make_runner(output: str, **options) -> UnitRunner:
    """A ``UnitRunner`` on the CPU with :func:`unit_settings` (``options`` as it takes)."""
    settings = unit_settings(output, **options)
    model = create_backbone_model(settings.provenance["backbone"], "random")
    return UnitRunner(Backbone(model, torch.device("cpu")), settings)


def pvu(*args: str):
    """``pvu ARGS`` in-process; the result's ``text`` is its output with rich's wrapping undone.

    Its error panels are 250 columns wide: at 80, a long path (a deep ``tmp_path``) was cut
    mid-word, and no phrase holding it matched."""
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    result.text = " ".join(result.output.split())
    return result


def unboxed(text: str) -> str:
    """``text`` without rich's box drawing (error panels, table rules), spaces collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def with_embedding(table: pa.Table, embedding: np.ndarray) -> pa.Table:
    """``table`` (cache rows) with its embedding column replaced by ``embedding`` (rows, D)."""
    field = table.schema.field("embedding")
    column = pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), type=field.type)
    return table.set_column(table.schema.get_field_index("embedding"), field, column)


def flip_page_byte(path: Path, group: int, column: str = EMBEDDING_LEAF) -> None:
    """Flip a bit in the last page body of row group ``group``'s ``column`` chunk in the
    Parquet file at ``path``, in place: the file keeps its size and footer."""
    metadata = pq.read_metadata(path)
    chunk = metadata.row_group(group).column(leaf_column(metadata, column))
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x40
    path.write_bytes(data)


def damage_page_header(path: Path, group: int) -> None:
    """Overwrite the first page header of row group ``group``'s embedding chunk in the Parquet
    file at ``path``, in place: the file keeps its size."""
    metadata = pq.read_metadata(path)
    start = metadata.row_group(group).column(leaf_column(metadata, EMBEDDING_LEAF)).data_page_offset
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\xff" * 16)


@dataclass
class FooterReads:
    """Footer reads seen by :func:`slow_footer_reads`: how many, and the most at once."""

    calls: int = 0
    in_flight: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def slow_footer_reads(
    monkeypatch, delay: float = 0.05, slower: dict[str, float] | None = None
) -> FooterReads:
    """Make every footer read of ``pipeline.cache.verify`` take ``delay`` seconds (those of the
    relpaths in ``slower`` their own delay) and count the reads in flight at once."""
    from pipeline.cache import verify

    real, reads = verify.read_footer, FooterReads()

    def slow(url: str, relpath: str, size: int | None = None):
        with reads.lock:
            reads.calls += 1
            reads.in_flight += 1
            reads.peak = max(reads.peak, reads.in_flight)
        try:
            time.sleep((slower or {}).get(relpath, delay))
            return real(url, relpath, size)
        finally:
            with reads.lock:
                reads.in_flight -= 1

    monkeypatch.setattr(verify, "read_footer", slow)
    return reads


def record_fsyncs(
    monkeypatch, note: Callable[[str], object] = lambda path: None
) -> list[tuple[str, object]]:
    """Record every ``os.fsync`` (and make it): the path synced and ``note(path)`` as it was
    synced. A power loss cannot be produced in a test; the syncs that guard against one can be
    seen."""
    synced: list[tuple[str, object]] = []
    fsync = os.fsync

    def recorded(descriptor: int) -> None:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        synced.append((path, note(path)))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    return synced
