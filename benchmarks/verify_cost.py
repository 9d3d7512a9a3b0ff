"""What the manifest/storage check costs at start: requests and seconds for a cache of N units.

Writes a synthetic cache of ``--units`` tiny units on moto's S3 protocol server (loopback) and
times ``verify_cache`` with footers (what ``pvu cache`` and the readers run) and without (the
listing alone), counting the S3 requests each makes: one listing per epoch folder (paged by
1,000 keys), plus one ranged read per unit for the footers.

    .venv/bin/python benchmarks/verify_cost.py --units 1000 --epochs 2
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from local_s3 import start_s3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    server, _ = start_s3()
    import s3fs

    from pipeline.cache.verify import verify_cache
    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    s3fs.S3FileSystem().mkdir("verify-cost")
    url = "s3://verify-cost/cache"
    shards = args.units // args.epochs
    spec = SyntheticCache(dim=8, samples_per_shard=4, shards=shards, epochs=args.epochs)
    write_synthetic_cache(url, spec)
    requests: Counter[str] = Counter()

    def count(event_name: str, **_: object) -> None:
        requests[event_name.split(".")[-1]] += 1

    for footers in (False, True):
        requests.clear()
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.connect()
        fs.s3.meta.events.register("before-call.s3", count)
        started = time.perf_counter()
        check = verify_cache(url, footers=footers)
        seconds = time.perf_counter() - started
        assert check.ok and not check.orphans
        print(
            f"{shards * args.epochs} units, footers={footers}: {seconds:.2f} s, "
            f"{seconds / (shards * args.epochs) * 1000:.2f} ms per unit, requests {dict(requests)}"
        )
    server.stop()


if __name__ == "__main__":
    main()
