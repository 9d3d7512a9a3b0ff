"""Storage faults through the real client stack: moto behind a fault-injecting proxy, reached by
s3fs / aiobotocore / aiohttp exactly as in production (``tests/faultproxy.py``).

Each layer retries only what it alone can see (``pipeline.retry``): botocore the failed HTTP
request, pvu's ``retry`` an answer broken off mid-body; a permanent error is one request.
"""

from __future__ import annotations

import collections
import logging
import re
import time

import fsspec
import pyarrow.parquet as pq
import pytest
import s3fs
from support import make_runner

from pipeline.cache.lock import RunLock
from pipeline.cache.manifest import Manifest
from pipeline.cache.samples import iter_samples
from pipeline.cache.unit import Unit
from pipeline.cache.writer import commit_unit
from pipeline.dataset.tar import write_shard
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.export import export_head
from pipeline.head.model import HeadConfig, create_head
from pipeline.head.stream import StreamConfig
from pipeline.head.train import RunOptions, ScheduleConfig, TrainConfig, fit_head
from pipeline.retry import REQUEST_ATTEMPTS, BucketGone
from schemas import cache_schema

pytestmark = pytest.mark.slow

TRANSIENT = ("500", "503", "slowdown", "reset", "cut", "stall")


@pytest.fixture
def shard(s3_bucket: str, fault_proxy) -> str:
    return write_digit_shards(f"{s3_bucket}/shards", shards=1, per_shard=12, size=32)[0]


def read(url: str) -> list:
    return list(iter_samples(url, counts=collections.Counter(), base_delay=0.05))


def gets(proxy, url: str) -> int:
    """GET requests the proxy saw for the object at ``url``."""
    path = "/" + url.removeprefix("s3://")
    return sum(n for (method, p), n in proxy.requests.items() if method == "GET" and p == path)


def test_clients_run_one_retry_policy_per_layer(fault_proxy):
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.connect()
    assert s3fs.S3FileSystem.retries == 1, "s3fs must not repeat botocore's retries"
    retries = fs.s3.meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == REQUEST_ATTEMPTS


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.5 s read timeout, so that a stalled answer times out within the test."""
    conf = {**fsspec.config.conf["s3"]}
    conf["config_kwargs"] = {**conf["config_kwargs"], "read_timeout": 0.5}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_faults_on_reads_lose_nothing(kind, shard, fault_proxy, short_timeouts, caplog):
    expected = read(shard)
    fault_proxy.requests.clear()
    fault_proxy.stall_seconds = 1.5
    fault_proxy.fail_next(kind, 2, pattern=re.escape(shard.removeprefix("s3:/")), methods=["GET"])
    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        assert read(shard) == expected
    assert fault_proxy.counts[kind] == 2
    assert gets(fault_proxy, shard) == 3, "each fault costs one more request, no more"
    # botocore retries a failed request; only an answer cut mid-body reaches pvu's retry
    assert ("retrying" in caplog.text) == (kind == "cut")


def test_a_store_that_keeps_stalling_costs_one_request_per_botocore_try(
    shard, fault_proxy, short_timeouts
):
    """Both layers retried a request that timed out before any answer: 25 GETs (about 25
    minutes at botocore's 60 s read timeout) before the error."""
    fault_proxy.requests.clear()
    fault_proxy.stall_seconds = 1.5
    fault_proxy.fail_next(
        "stall", 100, pattern=re.escape(shard.removeprefix("s3:/")), methods=["GET"]
    )
    with pytest.raises(OSError, match=re.escape(shard)):
        read(shard)
    assert gets(fault_proxy, shard) == REQUEST_ATTEMPTS


@pytest.mark.parametrize(
    ("fault", "error"),
    [("deny", PermissionError), ("no-bucket", FileNotFoundError), ("deleted", FileNotFoundError)],
)
def test_a_permanent_fault_fails_at_once_with_the_url(fault, error, shard, fault_proxy):
    if fault == "deleted":
        s3fs.S3FileSystem().rm(shard)
    else:
        fault_proxy.deny(re.escape(shard.removeprefix("s3:/")), kind=fault)
    fault_proxy.requests.clear()
    started = time.monotonic()
    with pytest.raises(error, match=re.escape(shard)):
        read(shard)
    assert time.monotonic() - started < 5
    assert sum(fault_proxy.requests.values()) <= 2, "a permanent error is not retried"


def test_unit_files_and_manifest_survive_write_faults(
    s3_bucket, shard, fault_proxy, short_timeouts
):
    output = f"{s3_bucket}/cache"
    runner = make_runner(output)
    unit = Unit(source=shard, shard="digits-0000", epoch=0)
    fault_proxy.stall_seconds = 1.5
    # a run of three faults (within botocore's 5 tries of a request) on the staging write,
    # and three on the manifest's
    for kinds, target in ((TRANSIENT[:3], "_staging/"), (TRANSIENT[3:], "_manifest")):
        for kind in kinds:
            fault_proxy.fail_next(kind, 1, pattern=target, methods=["PUT", "POST", "DELETE"])
    result = runner.run(unit)
    manifest = Manifest.open(output, runner.settings.provenance)
    manifest.record(result.relpath, result.manifest_entry())
    manifest.flush(force=True)
    assert all(fault_proxy.counts[kind] == 1 for kind in TRANSIENT)
    fs = s3fs.S3FileSystem()
    table = pq.read_table(fs.open(f"{output}/{result.relpath}", "rb"))
    assert table.num_rows == result.rows == 12
    assert table.column("key").to_pylist() == [sample.key for sample in read(shard)]
    reopened = Manifest.open(output, runner.settings.provenance)
    assert reopened.units == {result.relpath: result.manifest_entry()}


@pytest.mark.parametrize("kind", ["cut", "reset"])
def test_run_lock_taken_when_the_answer_to_its_create_is_lost(kind, s3_bucket, fault_proxy):
    from pipeline.cache.lock import RunLock

    # the create lands, its answer is lost, and botocore's retry finds the lock existing
    fault_proxy.fail_next(kind, 1, pattern="_lock.json", methods=["PUT"])
    fault_proxy.fail_next("cut", 1, pattern="_lock.json", methods=["GET"])
    with RunLock(f"{s3_bucket}/cache", owner="test") as lock:
        assert (
            lock.holder.run_id
            in s3fs.S3FileSystem().cat_file(f"{s3_bucket}/cache/_lock.json").decode()
        )
    assert fault_proxy.counts[kind] >= 1


def test_weights_and_label_files_read_through_a_cut_answer(s3_bucket, fault_proxy):
    """A backbone's weights, a label remap and a label-names file are read whole from storage
    under the same retry as shards: an answer cut mid-body costs one more GET, not the job."""
    import torch
    from safetensors.torch import save

    from pipeline.cache.backbone import read_state_dict
    from pipeline.dataset.remap import read_label_remap, read_names

    weights = {"head.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}
    files = {
        "weights.safetensors": save(weights),
        "remap.json": b"[2, 0, 1]",
        "classes.txt": b"cat\ndog\n",
    }
    fs = s3fs.S3FileSystem()
    for name, data in files.items():
        fs.pipe_file(f"{s3_bucket}/{name}", data)
        fault_proxy.fail_next("cut", 1, pattern=re.escape(name), methods=["GET"])
    state = read_state_dict(f"{s3_bucket}/weights.safetensors")
    assert torch.equal(state["head.weight"], weights["head.weight"])
    assert read_label_remap(f"{s3_bucket}/remap.json").tolist() == [2, 0, 1]
    assert read_names(f"{s3_bucket}/classes.txt") == ["cat", "dog"]
    assert fault_proxy.counts["cut"] == len(files)


def test_a_bucket_deleted_mid_run_is_not_created_again(s3_bucket, shard):
    """s3fs's makedirs, called before each unit commit, manifest write and lock, created a
    missing bucket: one deleted mid-run came back, without its policy, encryption or
    lifecycle, and the run went on writing into it."""
    output = f"{s3_bucket}/cache"
    runner = make_runner(output)
    result = runner.run(Unit(source=shard, shard="digits-0000", epoch=0))
    manifest = Manifest.open(output, runner.settings.provenance)
    manifest.record(result.relpath, result.manifest_entry())
    fs = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    fs.rm(bucket, recursive=True)  # its objects, then the bucket
    fs.invalidate_cache()
    assert not fs.exists(bucket)
    schema = cache_schema(4)
    writes = {
        "commit": lambda: commit_unit([], schema, root=output, relpath=result.relpath, stats={}),
        "manifest": lambda: manifest.flush(force=True),
        "lock": lambda: RunLock(output, owner="pvu cache").acquire(),
    }
    for what, write in writes.items():
        with pytest.raises(
            BucketGone, match=rf"the bucket {bucket} of s3://{bucket}/cache\S* is gone"
        ):
            write()
        fs.invalidate_cache()
        assert bucket not in fs.ls("", detail=False), f"{what} created the bucket again"
    head = create_head(HeadConfig(embedding_dim=4, hidden=(2,)), seed=0)
    other_writes = {  # a head's export, a report's folder: an error, not a new bucket
        "head export": lambda: export_head(
            head, f"{s3_bucket}/head", backbone="b", weights_digest="d", loss="l2"
        ),
        "shards": lambda: write_shard(f"{s3_bucket}/shards/s-000000.tar", [("k", {"cls": b"0"})]),
    }
    for what, write in other_writes.items():
        with pytest.raises(OSError):
            write()
        fs.invalidate_cache()
        assert bucket not in fs.ls("", detail=False), f"{what} created the bucket again"


def test_a_lock_that_storage_will_not_release_leaves_the_runs_own_error(
    s3_bucket, fault_proxy, caplog
):
    """Credentials expired or a policy changed mid-run: the lock's release failed too, and
    its error ("read .../_lock.json failed") replaced the one that stopped the run. The lock
    left is the ended run's: the same process takes it over."""
    output = f"{s3_bucket}/cache"
    lock = f"{output.removeprefix('s3:/')}/_lock.json"
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match="the run's own"),
        RunLock(output, owner="pvu cache"),
    ):
        fault_proxy.deny(re.escape(lock))
        raise RuntimeError("the run's own error")
    assert f"left {output}/_lock.json in place" in caplog.text
    assert "a later run in this process takes it over at once" in caplog.text
    fault_proxy.clear()  # storage answers again: the same process (a notebook) runs again
    with RunLock(output, owner="pvu cache"):  # refused as "another pvu run", pid its own
        pass
    assert "taking over the lock of a dead run" in caplog.text


def _tiny_head_run(tmp_path, *, episodes: int) -> tuple[str, TrainConfig]:
    """A small local cache and a head training of ``episodes`` on it, in seconds."""
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=200, shards=1))
    schedule = ScheduleConfig(episodes=episodes, episode_size=256, batch_size=64, warmup_episodes=0)
    stream = StreamConfig(shuffle_rows=256, val_fraction=0.2)
    return cache, TrainConfig(hidden=(8,), schedule=schedule, stream=stream)


@pytest.mark.parametrize("path", ["head.json", "metrics.jsonl", "checkpoint/state.json"])
def test_a_look_for_an_output_file_that_storage_refuses_is_named(
    s3_bucket, fault_proxy, tmp_path, path
):
    """503s past botocore's tries on train-head's look for a file of its --output (an earlier
    head, run or metrics) ended the run with a bare "[Errno 16] Service Unavailable": no file."""
    cache, config = _tiny_head_run(tmp_path, episodes=1)
    output = f"{s3_bucket}/head"
    pattern = re.escape(path) + "$"
    fault_proxy.fail_next("503", REQUEST_ATTEMPTS, pattern=pattern, methods=["HEAD"])
    with pytest.raises(OSError, match=f"look for {re.escape(output)}/{re.escape(path)} failed"):
        fit_head([cache], output, config, RunOptions(resume=True))
    assert fit_head([cache], output, config, RunOptions(resume=True)).finished


def test_a_checkpoint_move_that_storage_refuses_is_named_and_the_run_resumes(
    s3_bucket, fault_proxy, tmp_path
):
    """503s past botocore's own tries (the layer that retries them), on the move of
    metrics.jsonl into place, ended the run with "[Errno 16] Service Unavailable": no file."""
    cache, config = _tiny_head_run(tmp_path, episodes=2)
    output = f"{s3_bucket}/head"
    moved = r"metrics\.jsonl\.tmp$"
    fault_proxy.fail_next("503", REQUEST_ATTEMPTS, pattern=moved, methods=["HEAD"])
    with pytest.raises(OSError, match=f"move {output}/metrics.jsonl.tmp to {output}/metrics"):
        fit_head([cache], output, config)
    assert fit_head([cache], output, config, RunOptions(resume=True)).finished
