"""Two backbones from one decode pass vs two separate runs: CPU seconds per image by stage.

Runs one unit of ImageNet-like JPEGs (``write_photo_shards``, ~400x350, quality 90) through
``UnitRunner`` once per backbone (two separate runs), then through one ``Fanout`` of both
(``pvu cache --also``), in-process and with decoding in the runner's own thread, so each stage's
CPU time is measurable: decode + augmentation (the preparing thread's CPU time, batch stacking
included) and the rest (forward, Arrow, Parquet: the process's CPU time minus that). Rounds
alternate; the rows of both ways are checked equal. Target: decode + augment paid once, i.e.
the one-pass figure about half the two runs'.

    .venv/bin/python benchmarks/fanout_throughput.py --images 64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", nargs=2, default=["resnet10t", "resnet14t"])
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from pipeline.cache.augment import TransformConfig, resolve_transform
    from pipeline.cache.backbone import Backbone, create_backbone_model, describe_backbone
    from pipeline.cache.unit import Fanout, Unit, UnitRunner, UnitSettings
    from pipeline.demo.data import write_photo_shards

    size = (3, args.input_size, args.input_size)

    def runner(name: str, output: str) -> UnitRunner:
        info = describe_backbone(name, "random", input_size=size)
        transform = resolve_transform(TransformConfig(input_size=size), info.data_config)
        settings = UnitSettings(
            output=output,
            seed=0,
            batch_size=32,
            transform=transform,
            provenance={"backbone": name, "transform": transform},
            embedding_dim=info.embedding_dim,
        )
        return UnitRunner(
            Backbone(create_backbone_model(name, "random"), torch.device("cpu")), settings
        )

    figures: dict[str, list[tuple[float, float]]] = {"separate": [], "one pass": []}
    with tempfile.TemporaryDirectory() as tmp:
        (shard,) = write_photo_shards(f"{tmp}/shards", shards=1, per_shard=args.images)
        unit = Unit(shard, "photos-0000", 0)
        alone = [runner(name, f"{tmp}/alone/{name}") for name in args.backbones]
        together = Fanout([runner(name, f"{tmp}/one/{name}") for name in args.backbones], 0)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            prepare = total = 0.0
            for single in alone:
                cpu = time.process_time()
                result = single.run(unit)
                total += time.process_time() - cpu
                prepare += result.timings["prepare_cpu"]
            cpu = time.process_time()
            results = together.run(unit)
            one_total = time.process_time() - cpu
            if round_:
                figures["separate"].append((prepare, total - prepare))
                one_prepare = results[0].timings["prepare_cpu"]
                figures["one pass"].append((one_prepare, one_total - one_prepare))
        for name, result in zip(args.backbones, results.values(), strict=True):
            mine = pq.read_table(f"{tmp}/one/{name}/{result.relpath}")
            assert mine.equals(pq.read_table(f"{tmp}/alone/{name}/{result.relpath}")), name
    images = args.images
    print(
        f"{images} JPEGs (~400x350, q90), train transform at {args.input_size}, backbones "
        f"{' + '.join(args.backbones)} on the CPU, {args.rounds} rounds; CPU ms per image"
    )
    for name, rounds in figures.items():
        prepare = [1000 * p / images for p, _ in rounds]
        rest = [1000 * r / images for _, r in rounds]
        print(
            f"  {name:>8}: decode + augment {', '.join(f'{v:.2f}' for v in prepare)} "
            f"(mean {statistics.mean(prepare):.2f}); forward + write "
            f"{', '.join(f'{v:.1f}' for v in rest)} (mean {statistics.mean(rest):.1f})"
        )
    ratio = statistics.mean(p for p, _ in figures["one pass"]) / statistics.mean(
        p for p, _ in figures["separate"]
    )
    print(f"  RATIO decode + augment, one pass / separate runs: {ratio:.2f} (target ~0.5)")


if __name__ == "__main__":
    main()
