"""The jobs under storage faults: a fault proxy between every pvu process (driver, Ray actors)
and the S3 protocol server, injecting 500/503/SlowDown, resets, cut answers and stalls into
reads and writes of shards, unit files and the manifest (``make test-faults``)."""

from __future__ import annotations

import logging
import time

import pyarrow.dataset as ds
import pyarrow.fs
import pytest
import ray
import s3fs
import torch

from jobs.run.cache import run_cache
from jobs.run.cache_config import CacheJobConfig
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.manifest import Manifest
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.stream import StreamConfig
from pipeline.head.train import ScheduleConfig, TrainConfig, fit_head
from pipeline.retry import OutputDenied

pytestmark = [pytest.mark.slow, pytest.mark.faults]

RATE = 0.05
COMMON = {"backbone": "resnet10t", "weights": "random", "input_size": 32, "batch_size": 8}


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The proxy, made the AWS endpoint before Ray starts, so the actors go through it too."""
    from faultproxy import FaultProxy

    with (
        FaultProxy(s3_server, seed=8, stall_seconds=0.5) as proxy,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        start_local_ray(num_cpus=2)
        yield proxy
        ray.shutdown()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(proxy) -> str:
    fs = s3fs.S3FileSystem()
    name = f"faults-{time.monotonic_ns()}"
    fs.mkdir(name)
    proxy.clear()
    return f"s3://{name}"


def inject(proxy) -> None:
    """Faults at ``RATE``, plus one of each kind on a read and on a write for sure."""
    from faultproxy import KINDS, READS, WRITES

    proxy.rate = RATE
    for kind in KINDS:
        proxy.fail_next(kind, 1, methods=READS)
        proxy.fail_next(kind, 1, methods=WRITES)


def read_sorted(url: str):
    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem()))
    dataset = ds.dataset(
        url.removeprefix("s3://"), filesystem=fs, format="parquet", ignore_prefixes=["_", "."]
    )
    return dataset.to_table().sort_by([("epoch", "ascending"), ("key", "ascending")])


def test_cache_at_five_percent_faults_equals_the_fault_free_cache(bucket, proxy):
    shards, per_shard, epochs = 4, 12, 2
    write_digit_shards(f"{bucket}/shards", shards=shards, per_shard=per_shard, size=32)
    config = {"shards": f"{bucket}/shards", "epochs": epochs, **COMMON}
    started = time.monotonic()
    clean = run_cache(CacheJobConfig(output=f"{bucket}/clean", **config))
    print(f"fault-free run: {time.monotonic() - started:.1f} s")
    inject(proxy)
    started = time.monotonic()
    faulty = run_cache(CacheJobConfig(output=f"{bucket}/faulty", **config))
    seconds = time.monotonic() - started
    proxy.rate = 0.0
    injected = sum(proxy.counts.values())
    print(f"{injected} faults injected ({dict(proxy.counts)}) in {seconds:.1f} s")
    assert injected >= 12, "the run must have met faults"
    assert not clean.failed and not faulty.failed
    expected, got = read_sorted(f"{bucket}/clean"), read_sorted(f"{bucket}/faulty")
    assert got.num_rows == shards * per_shard * epochs
    assert got.equals(expected), "the faulty run's cache must be the fault-free one, exactly"


def test_head_trained_through_faults_is_the_fault_free_head(bucket, proxy, tmp_path):
    spec = SyntheticCache(dim=16, samples_per_shard=200, shards=4, epochs=2, row_group_rows=50)
    write_synthetic_cache(f"{bucket}/synthetic", spec)
    config = TrainConfig(
        hidden=(32,),
        schedule=ScheduleConfig(episodes=3, episode_size=600, batch_size=64, warmup_episodes=1),
        stream=StreamConfig(seed=0, shuffle_rows=400, val_fraction=0.2),
        val_rows=200,
    )
    clean = fit_head([f"{bucket}/synthetic"], str(tmp_path / "clean"), config)
    inject(proxy)
    faulty = fit_head([f"{bucket}/synthetic"], str(tmp_path / "faulty"), config)
    proxy.rate = 0.0
    print(f"{sum(proxy.counts.values())} faults injected ({dict(proxy.counts)})")
    assert sum(proxy.counts.values()) >= 6, "training must have met faults"
    expected, got = clean.head.state_dict(), faulty.head.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_shard_denied_mid_job_fails_its_unit_with_the_url_and_no_other(bucket, proxy):
    urls = write_digit_shards(f"{bucket}/shards", shards=3, per_shard=4, size=32)
    proxy.deny(urls[1].removeprefix("s3:/"), methods=["GET"])  # listed fine, never readable
    started = time.monotonic()
    report = run_cache(CacheJobConfig(shards=f"{bucket}/shards", output=f"{bucket}/c", **COMMON))
    seconds = time.monotonic() - started
    print(f"job with one denied shard ended in {seconds:.1f} s")
    assert list(report.failed) == ["epoch=0000/digits-0001.parquet"]
    why = report.failed["epoch=0000/digits-0001.parquet"]
    assert urls[1] in why and "PermissionError" in why
    assert len(report.results) == 2
    assert proxy.counts["deny"] <= 2, "a permanent error is not retried"


def test_writes_denied_mid_job_stop_it_at_the_first_denied_commit(
    bucket, proxy, monkeypatch, caplog
):
    """A bucket policy changed (or credentials expired) mid-run: every later unit was computed
    in full and then denied at its commit, each tried again, hours of GPUs for nothing; and the
    manifest's last write, denied too, hid why the run stopped."""
    write_digit_shards(f"{bucket}/shards", shards=4, per_shard=4, size=32)
    output = f"{bucket}/c"
    started = Manifest.begin_run

    def then_denied(manifest: Manifest, units: int) -> None:  # the run has begun: no writes
        started(manifest, units)
        proxy.deny(f"{output.removeprefix('s3:/')}/", methods=["PUT", "POST", "DELETE"])

    monkeypatch.setattr(Manifest, "begin_run", then_denied)
    config = CacheJobConfig(shards=f"{bucket}/shards", output=output, actors=1, **COMMON)
    with caplog.at_level(logging.WARNING), pytest.raises(OutputDenied) as stopped:
        run_cache(config)
    said = str(stopped.value)
    assert f"commit {output}/epoch=0000/digits-0000.parquet failed" in said, said
    assert "Stopped: restore write access to the output" in said
    assert "_manifest.json not written" in caplog.text  # a warning: the denial above is told
    unit_writes = [path for (_, path) in proxy.requests if "/c/" in path and "digits" in path]
    assert all("digits-0000" in path for path in unit_writes), "no other unit was started"
