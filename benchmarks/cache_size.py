"""Cache size per row against raw float16 embedding bytes (D x 2), target <= 1.05.

1. A real unit: ``UnitRunner`` (the cache job's unit of work) over a shard of ImageNet-like
   JPEGs with ViT-B/16 (random weights, D=768, timm's train transform), committed as Parquet
   exactly as the job does. Reports bytes per row of the whole file, of the data alone, and the
   footer (schema + provenance + unit stats), which a unit pays once.
2. A unit of ImageNet's shard size (``--rows``, default 1,251 = 1,281,167 / 1,024 shards) written
   through ``pipeline.cache.writer.to_record_batch`` / ``commit_unit``, with embeddings drawn per
   dimension from a normal fit to the real rows' (float16, so their bytes look like the real
   ones) and losses and labels like theirs: what a full-size unit costs per row.

    .venv/bin/python benchmarks/cache_size.py --images 64 --rows 1251
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.cache.augment import TransformConfig, resolve_transform
from pipeline.cache.backbone import Backbone, create_backbone_model, describe_backbone
from pipeline.cache.unit import Unit, UnitRunner, UnitSettings
from pipeline.cache.writer import commit_unit, to_record_batch
from pipeline.demo.data import write_photo_shards
from schemas import SCHEMA_VERSION


def describe_file(path: Path, dim: int) -> dict[str, float]:
    """Bytes per row of a Parquet file: whole file, data only, footer; per column too."""
    metadata = pq.ParquetFile(path).metadata
    rows = metadata.num_rows
    size = path.stat().st_size
    columns: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            column = row_group.column(index)
            name = column.path_in_schema.split(".")[0]
            columns[name] = columns.get(name, 0) + column.total_compressed_size
    data = sum(columns.values())
    return {
        "rows": rows,
        "file_per_row": size / rows,
        "data_per_row": data / rows,
        "footer": size - data,
        "raw": dim * 2,
        **{f"column_{name}": value / rows for name, value in columns.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=64, help="real rows (backbone forwards)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1251, help="rows of the full-size unit")
    args = parser.parse_args()

    info = describe_backbone(args.backbone, "random")
    dim = info.embedding_dim
    transform = resolve_transform(TransformConfig(augment="train"), info.data_config)
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "backbone": info.name,
        "weights_digest": info.weights_digest,
        "embedding_dim": dim,
        "num_classes": info.num_classes,
        "transform": transform,
        "seed": 0,
        "dtype": "float16",
        "label_remap_digest": None,
        "label_space": "classifier",
        "project_version": "benchmark",
    }
    with tempfile.TemporaryDirectory() as tmp:
        [shard] = write_photo_shards(f"{tmp}/shards", shards=1, per_shard=args.images)
        settings = UnitSettings(
            output=f"{tmp}/cache",
            seed=0,
            batch_size=args.batch_size,
            transform=transform,
            provenance=provenance,
            embedding_dim=dim,
        )
        model = create_backbone_model(args.backbone, "random")
        runner = UnitRunner(Backbone(model, torch.device("cpu")), settings)
        result = runner.run(Unit(shard, "photos-0000", 0))
        real_path = Path(settings.output) / result.relpath
        real = describe_file(real_path, dim)
        table = pq.read_table(real_path)

        embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        rng = np.random.default_rng(0)
        mean, std = embeddings.astype(np.float32).mean(0), embeddings.astype(np.float32).std(0)
        rows = args.rows
        outputs = {
            "embedding": (mean + std * rng.standard_normal((rows, dim))).astype(np.float16),
            "loss": rng.choice(table.column("loss").to_numpy(), rows),
            "pred": rng.integers(0, info.num_classes, rows),
            "max_prob": rng.choice(table.column("max_prob").to_numpy(), rows),
            "entropy": rng.choice(table.column("entropy").to_numpy(), rows),
        }
        batch = to_record_batch(
            runner.schema,
            keys=[f"n{rng.integers(10**7, 10**8)}_{i:06d}" for i in range(rows)],
            shard="imagenet-train-0000",
            epoch=0,
            labels=rng.integers(0, 1000, rows),
            outputs=outputs,
        )
        stats = {"rows": rows, "skipped": {}, "seconds": 100.0, "source": "s3://b/train-0000.tar"}
        relpath = "epoch=0000/full.parquet"
        commit_unit([batch], runner.schema, root=settings.output, relpath=relpath, stats=stats)
        full = describe_file(Path(settings.output) / relpath, dim)

    raw = dim * 2
    print(f"\nbackbone {args.backbone} (random weights), D={dim}: raw float16 = {raw} bytes/row")
    for name, figures in (
        (f"real unit ({args.images} rows, real forward)", real),
        (f"full-size unit ({args.rows} rows, fitted embeddings)", full),
    ):
        columns = ", ".join(
            f"{key.removeprefix('column_')}={value:.1f}"
            for key, value in figures.items()
            if key.startswith("column_")
        )
        print(
            f"{name}: file {figures['file_per_row']:.1f} B/row = "
            f"{figures['file_per_row'] / raw:.3f}x raw; data only "
            f"{figures['data_per_row']:.1f} B/row = {figures['data_per_row'] / raw:.3f}x; "
            f"footer {figures['footer']:.0f} B once per unit\n    by column (B/row): {columns}"
        )
    print(f"RATIO full-size unit bytes/row / raw float16: {full['file_per_row'] / raw:.3f}")


if __name__ == "__main__":
    main()
