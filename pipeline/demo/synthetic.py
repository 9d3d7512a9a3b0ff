"""A synthetic pvu cache whose loss is a known noisy function of the embedding.

For tests, benchmarks and demos of head training without a backbone: rows follow the real
schema, provenance and file layout (docs/design.md 3.1-3.2) and the writer's Parquet options.
Image ``i`` (of ``M``) has class ``c = i * classes // M`` and a base embedding
``b_i = mu_c + N(0, I)``; in epoch ``e`` its embedding is ``b_i + jitter * N(0, I)`` and its
loss ``softplus(2 * <w, e> + o_c + noise * N(0, 1))`` for a fixed unit vector ``w`` (class
means ``mu_c`` and offsets ``o_c`` are zero for one class), so a head can learn to rank rows
by loss from their embeddings alone. ``order="sorted"`` writes images in index order, so
shards are sorted by class, as when shards are built from per-class folders;
``order="shuffled"`` writes the same rows with the images dealt to shards at random.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.writer import PARQUET_OPTIONS, to_record_batch
from schemas import SCHEMA_VERSION, UNIT_STATS_KEY, cache_schema, with_provenance


@dataclass(frozen=True)
class SyntheticCache:
    """Shape and noise of a synthetic cache."""

    dim: int = 32
    samples_per_shard: int = 256
    shards: int = 4
    epochs: int = 2
    row_group_rows: int = 128
    jitter: float = 0.3
    noise: float = 0.5
    seed: int = 0
    backbone: str = "synthetic"
    weights_digest: str = "sha256:synthetic"
    dtype: str = "float16"
    classes: int = 1
    order: Literal["sorted", "shuffled"] = "sorted"

    @property
    def images(self) -> int:
        """Images per epoch."""
        return self.shards * self.samples_per_shard


def provenance(spec: SyntheticCache) -> dict[str, Any]:
    """The provenance the synthetic cache's files and manifest carry."""
    return {
        "backbone": spec.backbone,
        "weights_digest": spec.weights_digest,
        "transform": {"name": "synthetic", "jitter": spec.jitter},
        "seed": spec.seed,
        "dtype": spec.dtype,
    }


def direction(spec: SyntheticCache) -> np.ndarray:
    """The unit vector ``w`` the loss depends on."""
    w = np.random.default_rng([spec.seed, 1]).standard_normal(spec.dim)
    return w / np.linalg.norm(w)


@functools.lru_cache(maxsize=4)
def _class_effects(spec: SyntheticCache) -> tuple[np.ndarray, np.ndarray]:
    """Class means ``mu_c`` (classes, dim) and loss offsets ``o_c`` (zero for one class);
    drawn once per spec, not once per unit (read only: shared by every unit's rows)."""
    if spec.classes <= 1:
        means, offsets = np.zeros((1, spec.dim)), np.zeros(1)
    else:
        rng = np.random.default_rng([spec.seed, 5])
        means = rng.standard_normal((spec.classes, spec.dim))
        offsets = 2.0 * rng.standard_normal(spec.classes)
    means.setflags(write=False)  # cached: a caller writing to them would change later units
    offsets.setflags(write=False)
    return means, offsets


def synthetic_rows(spec: SyntheticCache, shard: int, epoch: int) -> pa.Table:
    """The rows of one (shard, epoch) unit with images in index order (``order="sorted"``)."""
    n, dim = spec.samples_per_shard, spec.dim
    images = np.arange(shard * n, (shard + 1) * n)
    labels = images * spec.classes // max(1, spec.images)
    means, offsets = _class_effects(spec)
    base = np.random.default_rng([spec.seed, 2, shard]).standard_normal((n, dim))
    base += means[labels % len(means)]
    rng = np.random.default_rng([spec.seed, 3, shard, epoch])
    embedding = (base + spec.jitter * rng.standard_normal((n, dim))).astype(spec.dtype)
    score = 2.0 * embedding.astype(np.float64) @ direction(spec) + offsets[labels % len(offsets)]
    loss = np.logaddexp(0.0, score + spec.noise * rng.standard_normal(n)).astype(np.float32)
    name = f"shard-{shard:05d}"
    schema = with_provenance(cache_schema(dim, pa.from_numpy_dtype(spec.dtype)), provenance(spec))
    outputs = {
        "embedding": embedding,
        "loss": loss,
        "pred": np.zeros(n, np.int32),
        "max_prob": np.ones(n, np.float32),
        "entropy": np.zeros(n, np.float32),
    }
    batch = to_record_batch(
        schema,
        keys=[f"image-{i:07d}" for i in images],
        shard=name,
        epoch=epoch,
        labels=labels,
        outputs=outputs,
    )
    return pa.Table.from_batches([batch])


def _epoch_units(spec: SyntheticCache, epoch: int) -> Iterator[pa.Table]:
    """The units of one epoch, shard by shard, in the spec's order of images."""
    if spec.order == "sorted":
        yield from (synthetic_rows(spec, shard, epoch) for shard in range(spec.shards))
        return
    rows = pa.concat_tables(synthetic_rows(spec, shard, epoch) for shard in range(spec.shards))
    dealt = rows.take(np.random.default_rng([spec.seed, 4]).permutation(rows.num_rows))
    n = spec.samples_per_shard
    for shard in range(spec.shards):
        unit = dealt.slice(shard * n, n)
        names = pa.array([f"shard-{shard:05d}"] * n, unit.schema.field("shard").type)
        field = unit.schema.field("shard")
        yield unit.set_column(unit.schema.get_field_index("shard"), field, names)


def write_synthetic_cache(url: str, spec: SyntheticCache) -> int:
    """Write the cache described by ``spec`` at ``url`` (any fsspec URL); returns its rows."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    units: dict[str, Any] = {}
    options = PARQUET_OPTIONS | {"row_group_size": spec.row_group_rows}
    spec_digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    for epoch in range(spec.epochs):
        fs.makedirs(f"{root}/epoch={epoch:04d}", exist_ok=True)
        for shard, table in enumerate(_epoch_units(spec, epoch)):
            stats = {
                "epoch": epoch,
                "shard": f"shard-{shard:05d}",
                "source": f"synthetic://{spec_digest}/{shard}",  # other data, another source
                "rows": spec.samples_per_shard,
                "skipped": {},
            }
            metadata = {**table.schema.metadata, UNIT_STATS_KEY: json.dumps(stats, sort_keys=True)}
            name = f"epoch={epoch:04d}/shard-{shard:05d}.parquet"
            with fs.open(f"{root}/{name}", "wb") as handle:
                pq.write_table(table.replace_schema_metadata(metadata), handle, **options)
            units[name] = {**stats, "bytes": int(fs.size(f"{root}/{name}"))}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "provenance": {
            "schema_version": SCHEMA_VERSION,
            "embedding_dim": spec.dim,
            **provenance(spec),
        },
        "units": units,
    }
    fs.pipe_file(f"{root}/_manifest.json", json.dumps(manifest, indent=1).encode())
    return spec.epochs * spec.shards * spec.samples_per_shard
