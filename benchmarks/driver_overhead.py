"""The cache driver's cost per unit at scale, simulated: 10,000 units on a 4-node Ray cluster.

Everything the driver does per unit is real: ``ActorPool`` scheduling over a real multi-node
``ray.cluster_utils.Cluster`` (one 1-CPU actor per node), result handling and the manifest's
``record`` with its throttled rewrite, as ``jobs.cache`` wires them. Only the actors' work is
stood in for: each returns a finished unit's result at once (the other benchmarks measure the
work). Reports, per window of ``--window`` units, the driver's CPU ms per unit (its process,
Ray's client threads included) and wall ms per unit, so flat means last window / first window
near 1; the driver's RSS growth per unit; and the manifest's full rewrite time at growing unit
counts, which must grow at most linearly. Target: <= 20 ms per unit, flat.

Figures (BENCHMARKS.md) come from a loaded 2-core machine: read the CPU columns.

    .venv/bin/python benchmarks/driver_overhead.py --units 10000 --nodes 4
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.distribute import ActorPool, keep_ray_on_loopback
from pipeline.cache.manifest import Manifest
from pipeline.cache.unit import Unit, UnitResult, UnitSettings

PROVENANCE = {
    "schema_version": 1,
    "backbone": "vit_base_patch16_224",
    "weights_digest": "sha256:" + "0" * 64,
    "embedding_dim": 768,
    "transform": {"augment": "train", "input_size": [3, 224, 224]},
    "seed": 0,
    "dtype": "float16",
    "label_remap_digest": None,
}


def finished(unit: Unit) -> UnitResult:
    """The result of an ImageNet-sized unit (1,251 rows of ViT-B/16 embeddings)."""
    return UnitResult(
        relpath=unit.relpath,
        epoch=unit.epoch,
        shard=unit.shard,
        source=unit.source,
        rows=1251,
        bytes=1_795_000,
        skipped={"undecodable": 1},
        seconds=95.0,
        timings={"prepare": 60.0, "forward": 90.0, "wait": 1.0, "write": 2.0, "cpu": 150.0},
    )


class InstantWorker:
    """A cache actor whose units finish at once: what is left to measure is the driver."""

    def __init__(
        self, backbone: str, weights: str, settings: UnitSettings, also: tuple = ()
    ) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def start(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "device": "cpu", "gpu_ids": [], "threads": 1}

    def run(self, unit: Unit, targets: tuple[int, ...] | None = None) -> dict[int, UnitResult]:
        return {0: finished(unit)}

    def close(self) -> None:
        pass


def rss_mb() -> float:
    """The driver's resident memory now, in MB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Windows:
    """Driver CPU, wall time and RSS at the end of each window of units."""

    size: int
    marks: list[tuple[int, float, float, float]] = field(default_factory=list)

    def mark(self, done: int) -> None:
        if done % self.size == 0:
            self.marks.append((done, time.process_time(), time.perf_counter(), rss_mb()))

    def per_unit_ms(self) -> list[tuple[float, float]]:
        """(CPU ms, wall ms) per unit in each window after the first mark."""
        return [
            (1e3 * (c1 - c0) / (n1 - n0), 1e3 * (w1 - w0) / (n1 - n0))
            for (n0, c0, w0, _), (n1, c1, w1, _) in zip(self.marks, self.marks[1:], strict=False)
        ]


def run_units(units: int, *, actors: int, window: int, output: str) -> Windows:
    """Run ``units`` stand-in units on the connected Ray through ``ActorPool`` + ``Manifest``."""
    settings = UnitSettings(
        output=output,
        seed=0,
        batch_size=64,
        transform={},
        provenance=PROVENANCE,
        embedding_dim=768,
    )
    pool = ActorPool(
        size=actors,
        gpus=0,
        cpus=1,
        backbone="-",
        weights="-",
        settings=settings,
        worker=InstantWorker,  # type: ignore[arg-type]
    )
    manifest = Manifest(output, PROVENANCE)
    todo = [
        Unit(f"s3://bucket/train/in21k-{i:06d}.tar", f"in21k-{i:06d}", epoch)
        for epoch in range(2)
        for i in range(units // 2)
    ]
    windows = Windows(window)
    done = 0

    def on_result(result: UnitResult) -> None:
        nonlocal done
        if done == 0:  # the actors are up: windows count from the first result
            windows.mark(0)
        manifest.record(result.relpath, result.manifest_entry())
        done += 1
        windows.mark(done)

    report = pool.run(todo, on_result)
    manifest.flush(force=True)
    assert not report.failed and len(report.results) == len(todo)
    return windows


def manifest_rewrites(sizes: list[int], output: str) -> list[tuple[int, float]]:
    """Seconds of one manifest rewrite (``flush(force=True)``) at each unit count, with the
    last 1% of the units recorded since the write before."""
    timings = []
    for size in sizes:
        manifest = Manifest(f"{output}/m{size}", PROVENANCE, flush_seconds=1e9)
        for i in range(size):
            if i == size - size // 100:
                manifest.flush(force=True)
            unit = Unit(f"s3://b/in21k-{i:06d}.tar", f"in21k-{i:06d}", 0)
            manifest.record(unit.relpath, finished(unit).manifest_entry())
        started = time.perf_counter()
        manifest.flush(force=True)
        timings.append((size, time.perf_counter() - started))
    return timings


def start_cluster(nodes: int):
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` 1-CPU nodes on 127.0.0.1; Ray connected."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    keep_ray_on_loopback()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()
    import ray

    cluster = start_cluster(args.nodes)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rss0 = rss_mb()
            windows = run_units(
                args.units, actors=args.nodes, window=args.window, output=f"{tmp}/cache"
            )
            rewrites = manifest_rewrites([1000, 2500, 5000, 10_000, 20_000], tmp)
    finally:
        ray.shutdown()
        cluster.shutdown()
    per_unit = windows.per_unit_ms()
    cpu = [c for c, _ in per_unit]
    wall = [w for _, w in per_unit]
    print(f"{args.units} units, {args.nodes} nodes, windows of {args.window} units")
    print("driver CPU ms/unit per window: " + ", ".join(f"{c:.2f}" for c in cpu))
    print("driver wall ms/unit per window: " + ", ".join(f"{w:.2f}" for w in wall))
    print(
        f"CPU ms/unit: median {statistics.median(cpu):.2f}, max {max(cpu):.2f}; "
        f"last/first window {cpu[-1] / cpu[0]:.2f} (CPU), {wall[-1] / wall[0]:.2f} (wall)"
    )
    rss = [mb for *_, mb in windows.marks]
    growth_kb = 1024 * (rss[-1] - rss[1]) / (windows.marks[-1][0] - windows.marks[1][0])
    print(f"driver RSS MB: {rss0:.0f} before Ray, " + ", ".join(f"{mb:.0f}" for mb in rss))
    print(f"driver RSS growth after the first window: {growth_kb:.1f} KB/unit")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(
        "manifest full rewrite: "
        + ", ".join(f"{n} units {s * 1e3:.0f} ms ({s * 1e6 / n:.1f} us/unit)" for n, s in rewrites)
    )


if __name__ == "__main__":
    main()
