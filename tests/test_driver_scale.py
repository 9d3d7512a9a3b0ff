"""The driver at scale, a smaller run of ``benchmarks/driver_overhead.py``: its cost per unit
(scheduling, result handling, manifest) stays far under 20 ms and does not grow with the units
done; the manifest's rewrite grows at most linearly."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import ray
from ray import cloudpickle

from pipeline.cache.distribute import start_local_ray

pytestmark = pytest.mark.slow

_SPEC = importlib.util.spec_from_file_location(
    "driver_overhead", Path(__file__).parents[1] / "benchmarks" / "driver_overhead.py"
)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)
cloudpickle.register_pickle_by_value(bench)  # Ray's workers cannot import benchmarks/


def test_driver_cost_per_unit_is_small_and_flat(tmp_path):
    start_local_ray(num_cpus=2)
    try:
        windows = bench.run_units(1200, actors=2, window=300, output=str(tmp_path / "cache"))
    finally:
        ray.shutdown()
    cpu = [c for c, _ in windows.per_unit_ms()]
    assert len(cpu) == 4 and max(cpu) < 20, cpu
    assert cpu[-1] < 3 * statistics.median(cpu[:2]) + 1, f"cost grows with units done: {cpu}"


def test_manifest_rewrite_grows_at_most_linearly(tmp_path):
    # the best of 3 tries: a rewrite's fsync waits on the disk, which other work shares
    tries = [bench.manifest_rewrites([2000, 8000], str(tmp_path / str(i))) for i in range(3)]
    (small, first), (large, second) = (
        min(sizes, key=lambda t: t[1]) for sizes in zip(*tries, strict=True)
    )
    assert second / large < 3 * first / small, (first, second)
    assert second < 1.0, "a rewrite of 8,000 units takes well under a second"
