"""How far a recomputed unit can be from the original: the rerun guarantee, measured.

Runs one unit (a shard of ImageNet-like JPEGs, timm's train augmentation, a random-weight
backbone) once per setting (``cpu:<torch threads>`` or ``cuda``, an actor's shape) and compares
every row with the first setting's: bit-identical rows, and the largest relative difference of
the embedding (L2 per row) and of the loss. The augmented image is a function of (seed, epoch,
key) only, so any difference is the forward's float rounding.

    .venv/bin/python benchmarks/rerun_rounding.py --settings cpu:1 cpu:1 cpu:2 cpu:4
    .venv/bin/python benchmarks/rerun_rounding.py --settings cuda cuda cpu:4 --dtype float32
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def run_unit(setting: str, shard: str, output: str, args: argparse.Namespace) -> pa.Table:
    """The rows of the unit ``shard`` computed on ``setting`` (``cpu:<threads>`` or ``cuda``)."""
    from pipeline.cache.augment import TransformConfig, resolve_transform
    from pipeline.cache.backbone import Backbone, create_backbone_model, describe_backbone
    from pipeline.cache.unit import Unit, UnitRunner, UnitSettings

    device, _, threads = setting.partition(":")
    torch.set_num_threads(int(threads or 1))
    size = (3, args.input_size, args.input_size) if args.input_size else None
    info = describe_backbone(args.backbone, "random", input_size=size)
    transform = resolve_transform(TransformConfig(input_size=size), info.data_config)
    settings = UnitSettings(
        output=output,
        seed=0,
        batch_size=args.batch_size,
        transform=transform,
        provenance={"backbone": args.backbone, "dtype": args.dtype},
        embedding_dim=info.embedding_dim,
        dtype=args.dtype,
    )
    model = create_backbone_model(args.backbone, "random")
    runner = UnitRunner(Backbone(model, torch.device(device)), settings)
    try:
        result = runner.run(Unit(shard, "photos", 0))
    finally:
        runner.close()
    return pq.read_table(f"{output}/{result.relpath}")


def compare(reference: pa.Table, other: pa.Table) -> tuple[float, float, float]:
    """(share of bit-identical rows, max relative embedding difference, max relative loss
    difference) of ``other`` against ``reference``."""
    assert reference.column("key").to_pylist() == other.column("key").to_pylist()

    def embeddings(table: pa.Table) -> np.ndarray:
        column = table.column("embedding").combine_chunks()
        return column.flatten().to_numpy().astype(np.float64).reshape(len(table), -1)

    a, b = embeddings(reference), embeddings(other)
    loss_a = reference.column("loss").to_numpy().astype(np.float64)
    loss_b = other.column("loss").to_numpy().astype(np.float64)
    same = np.all(a == b, axis=1) & (loss_a == loss_b)
    embedding = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    loss = np.abs(loss_a - loss_b) / np.maximum(np.abs(loss_a), 1e-12)
    return float(same.mean()), float(embedding.max()), float(loss.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["cpu:1", "cpu:1", "cpu:2"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    args = parser.parse_args()

    from pipeline.demo.data import write_photo_shards

    with tempfile.TemporaryDirectory() as tmp:
        (shard,) = write_photo_shards(f"{tmp}/shards", shards=1, per_shard=args.images)
        tables = [
            run_unit(setting, shard, f"{tmp}/out-{i}", args)
            for i, setting in enumerate(args.settings)
        ]
    print(f"{args.backbone}, {args.images} images, stored {args.dtype}; against {args.settings[0]}")
    print(
        f"{'setting':>8}  {'identical rows':>14}  {'max rel. embedding':>18}  {'max rel. loss':>13}"
    )
    for setting, table in zip(args.settings[1:], tables[1:], strict=True):
        same, embedding, loss = compare(tables[0], table)
        print(f"{setting:>8}  {same:>14.1%}  {embedding:>18.2e}  {loss:>13.2e}")


if __name__ == "__main__":
    main()
