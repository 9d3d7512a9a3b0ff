"""What the duplicate-key pass costs the driver at the end of every `pvu cache` run.

Writes a synthetic cache of ``--units`` units of ``--rows`` keys each (one epoch, no key
repeated: the common case, in which the pass only reads) and times ``deduplicate`` over it:
CPU seconds per key and per unit, and the peak of the memory it allocates (tracemalloc, which
numpy reports to) per key, from which the memory at ImageNet-21k scale (13M keys an epoch)
follows; the peak holds one epoch, plus the keys of the units being read (16 at a time).
Local disk by default; ``--s3`` puts the cache on moto's S3 server (loopback).

    .venv/bin/python benchmarks/dedupe_cost.py --units 200 --rows 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc

IMAGENET_21K_KEYS = 13_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--s3", action="store_true", help="cache on moto S3 (loopback)")
    args = parser.parse_args()
    if args.s3:
        from local_s3 import start_s3

        start_s3()
        import s3fs

        s3fs.S3FileSystem().mkdir("dedupe-cost")
        url = "s3://dedupe-cost/cache"
    else:
        url = f"{tempfile.mkdtemp(prefix='pvu-dedupe-')}/cache"

    from pipeline.cache.dedupe import deduplicate
    from pipeline.cache.manifest import Manifest
    from pipeline.cache.verify import reconcile
    from pipeline.demo.synthetic import SyntheticCache, provenance, write_synthetic_cache
    from schemas import SCHEMA_VERSION

    spec = SyntheticCache(
        dim=8, samples_per_shard=args.rows, shards=args.units, epochs=1, row_group_rows=4096
    )
    keys = write_synthetic_cache(url, spec)
    identity = {"schema_version": SCHEMA_VERSION, "embedding_dim": spec.dim, **provenance(spec)}
    manifest = reconcile(Manifest.open(url, identity))
    order = [f"shard-{shard:05d}" for shard in range(args.units)]
    cpu, wall = time.process_time(), time.perf_counter()
    dropped = deduplicate(manifest, order)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert not dropped
    tracemalloc.start()  # a second pass, for its memory: tracing slows every allocation
    deduplicate(manifest, order)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"{args.units} units x {args.rows} keys = {keys:,} keys: {cpu:.2f} CPU-s "
        f"({cpu / keys * 1e9:.0f} ns/key, {cpu / args.units * 1e3:.1f} ms/unit), "
        f"wall {wall:.2f} s; peak allocated {peak / 2**20:.1f} MiB = {peak / keys:.1f} B/key "
        f"-> {peak / keys * IMAGENET_21K_KEYS / 2**20:,.0f} MiB for an epoch of ImageNet-21k "
        "(13M keys)"
    )


if __name__ == "__main__":
    main()
