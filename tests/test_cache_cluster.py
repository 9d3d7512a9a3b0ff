"""Multi-node behaviour on a real Ray cluster of several processes: GPU pinning and node loss.

Nodes declare ``num_gpus=1`` (no GPU needed): each actor must be pinned to its own declared GPU
and use CUDA where there is one, else fall back to the CPU with a log line; a node removed
mid-job must lose and duplicate nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import psutil
import pyarrow.dataset as ds
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from support import small_cache_config

from jobs.run.cache import run_cache
from pipeline.cache.distribute import actor_device_type, plan_actors
from pipeline.demo.data import write_digit_shards

pytestmark = pytest.mark.slow

GPU_NODES = 3


@pytest.fixture(scope="module")
def gpu_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(GPU_NODES)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def hosts_cache_worker(node) -> bool:
    """Whether a cache actor on ``node`` is running a unit right now (processes come and go
    while we look: one that vanishes runs nothing)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return any(_runs_a_unit(child) for child in raylet.children(recursive=True))


def _runs_a_unit(process: psutil.Process) -> bool:
    try:
        return "CacheWorker.run" in process.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def lose_node(cluster: Cluster, node) -> None:
    """The node dies as a machine would: its raylet and every worker process on it, at once."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    workers = raylet.children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def test_a_cluster_whose_gpus_are_all_held_is_named_as_such(gpu_cluster):
    """Another job holding every GPU: the device probe gives up saying so (before: a silent
    wait of 5 minutes, then 'cache: Get timed out: some object(s) not ready.')."""

    @ray.remote(num_gpus=1, num_cpus=0)
    class Holder:
        def ping(self) -> int:
            return 1

    # hold every GPU of the alive nodes (a node an earlier test lost is gone), once free
    deadline = time.monotonic() + 60
    gpus = int(sum(node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]))
    while ray.available_resources().get("GPU", 0) < gpus and time.monotonic() < deadline:
        time.sleep(0.5)
    holders = [Holder.remote() for _ in range(gpus)]
    ray.get([holder.ping.remote() for holder in holders], timeout=120)
    try:
        with pytest.raises(TimeoutError, match=r"no 1 GPU\(s\) .* came free in 3 s .*ray status"):
            actor_device_type(1.0, timeout_s=3)
    finally:
        for holder in holders:
            ray.kill(holder)
    # the probe given up holds no GPU: one comes free and the next probe gets it
    assert actor_device_type(1.0, timeout_s=120) in {"cpu", "cuda"}


def test_one_actor_per_gpu_and_a_lost_node_loses_no_row(gpu_cluster, tmp_path):
    cluster, nodes = gpu_cluster
    shards, per_shard, epochs = 12, 24, 2
    write_digit_shards(str(tmp_path / "shards"), shards=shards, per_shard=per_shard, size=32)
    output = tmp_path / "cache"
    config = small_cache_config(
        str(tmp_path / "shards"), str(output), cluster.address, epochs=epochs
    )
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(report=run_cache(config)))
    job.start()
    deadline = time.monotonic() + 240
    # mid-job: units are being committed and the doomed node is running one right now
    doomed = None
    while doomed is None:
        assert job.is_alive() and time.monotonic() < deadline, "the job did not get going"
        if len(list(output.glob("epoch=*/*.parquet"))) >= 2:
            doomed = next((node for node in nodes if hosts_cache_worker(node)), None)
        time.sleep(0.05)
    lose_node(cluster, doomed)
    job.join(timeout=300)
    assert not job.is_alive(), "the job did not finish after losing a node"
    report = outcome["report"]

    assert not report.failed
    assert report.actors_replaced >= 1, "the lost node's actor must have been replaced"
    started = report.workers[:GPU_NODES]
    assert len({worker["node_id"] for worker in started}) == GPU_NODES, "one actor per GPU node"
    assert all(len(worker["gpu_ids"]) == 1 for worker in report.workers)
    # declared GPUs: the real one where CUDA is, else the CPU fallback
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert all(worker["device"] == device for worker in report.workers)
    table = ds.dataset(str(output), format="parquet", ignore_prefixes=["_", "."]).to_table()
    pairs = list(
        zip(table.column("key").to_pylist(), table.column("epoch").to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == shards * per_shard * epochs
    assert len(list(output.glob("epoch=*/*.parquet"))) == shards * epochs


def test_plan_actors_defaults():
    gpu_nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 4, "GPU": 1}, {"CPU": 2}]
    assert plan_actors(gpu_nodes, actors=None, gpus_per_actor=None, cpus_per_actor=None) == (
        3,
        1.0,
        4.0,
    )
    assert plan_actors([{"CPU": 2}], actors=None, gpus_per_actor=None, cpus_per_actor=None) == (
        1,
        0.0,
        2.0,
    )
    assert plan_actors(
        [{"CPU": 16}, {"CPU": 16}], actors=None, gpus_per_actor=0, cpus_per_actor=4
    ) == (8, 0.0, 4)
    with pytest.raises(ValueError, match=r"asks for GPUs, but .* most 0 each .*-per-actor 0"):
        plan_actors([{"CPU": 8}], actors=None, gpus_per_actor=1, cpus_per_actor=None)
    with pytest.raises(ValueError, match="--cpus-per-actor 4 is more than any node"):
        plan_actors([{"CPU": 2}], actors=None, gpus_per_actor=0, cpus_per_actor=4)
    with pytest.raises(ValueError, match="--cpus-per-actor 9 is more than any node"):
        plan_actors([{"CPU": 8, "GPU": 1}], actors=None, gpus_per_actor=1, cpus_per_actor=9)


def test_plan_actors_counts_only_the_actors_a_node_can_hold(caplog):
    """A GPU node started without CPUs was planned an actor that never started, and was
    refused as '--cpus-per-actor 1 is more than any node has (0); ask for at most that many'
    of a flag never given; --actors past what the cluster holds waited unplaced, unsaid."""
    mixed = [{"CPU": 0, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert plan_actors(mixed, actors=None, gpus_per_actor=None, cpus_per_actor=None) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"needs 1 CPU\(s\) beside its GPU, .* at most 0: st"):
        plan_actors([{"CPU": 0, "GPU": 1}], actors=None, gpus_per_actor=None, cpus_per_actor=None)
    with caplog.at_level(logging.WARNING):
        planned = plan_actors(mixed, actors=4, gpus_per_actor=None, cpus_per_actor=None)
    assert planned[0] == 4 and "--actors 4: the Ray cluster holds 1 cache actor(s) at once" in (
        caplog.text
    )


def test_plan_actors_warns_of_fractional_cpus_past_the_cores(caplog):
    """--cpus-per-actor 0.1 on a CPU cluster planned 80 actors on 8 cores without a word: each
    runs its backbone on at least one thread, holding its own copy of it."""
    with caplog.at_level(logging.WARNING):
        planned = plan_actors([{"CPU": 8}], actors=None, gpus_per_actor=0, cpus_per_actor=0.1)
    assert planned == (80, 0.0, 0.1)
    assert "--cpus-per-actor 0.1 plans 80 cache actors on 8 CPU(s)" in caplog.text
    assert "--cpus-per-actor 1 or more, or --actors 8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # as many actors as cores: nothing to say
        plan_actors([{"CPU": 8}], actors=8, gpus_per_actor=0, cpus_per_actor=0.5)
    assert caplog.text == ""


def test_plan_actors_warns_of_gpu_shares_the_cpus_leave_idle(caplog):
    """--gpus-per-actor 0.5 on GPU nodes of 1 CPU planned one actor a GPU, each taking 1 CPU, so
    half of every GPU sat idle, with nothing said beyond '0.5 GPU and 1 CPU each'."""
    with caplog.at_level(logging.WARNING):
        planned = plan_actors([{"CPU": 1, "GPU": 1}] * 2, **ASK_GPUS, gpus_per_actor=0.5)
    assert planned == (2, 0.5, 1.0)
    assert "hold 2 cache actor(s) of 1 CPU(s), where their GPUs would hold 4 at 0.5" in (
        caplog.text
    )
    assert "--gpus-per-actor 1, or start" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # CPUs enough for every share: nothing to say
        assert plan_actors([{"CPU": 8, "GPU": 1}], **ASK_GPUS, gpus_per_actor=0.5)[0] == 2
    assert caplog.text == ""


ASK_GPUS = {"actors": None, "cpus_per_actor": None}
ASK = {"actors": None, "gpus_per_actor": None}


def test_cpus_per_actor_past_the_gpu_nodes_names_them_not_the_cluster():
    """--cpus-per-actor on a cluster of small GPU nodes and a large CPU node was refused as
    'more than any node of the Ray cluster has (1)', which the CPU node's 8 belie, and on GPU
    nodes without CPUs told to 'ask for at most' 0, which the flag refuses."""
    with pytest.raises(ValueError, match=r"more than any node with 1 GPU\(s\) .* \(1\); .*-per-a"):
        plan_actors([{"CPU": 1, "GPU": 1}, {"CPU": 8}], **ASK, cpus_per_actor=4)
    with pytest.raises(ValueError, match=r"^--cpus-per-actor 1 beside its GPU, .* at most 0: st"):
        plan_actors([{"CPU": 0, "GPU": 1}, {"CPU": 4}], **ASK, cpus_per_actor=1)


def test_actors_no_alive_node_can_hold_are_named():
    """The only GPU node lost mid-run: the replacement actor waited for a GPU forever while
    the progress line repeated '1/4 units' and nothing said why."""
    from pipeline.cache.distribute import unplaceable

    left = [{"CPU": 0}, {"CPU": 1}]  # the head and a CPU node, the GPU node gone
    assert "no alive node of the Ray cluster has the 1 GPU(s) and 1 CPU(s)" in unplaceable(
        left, 1.0, 1.0
    )
    assert unplaceable([*left, {"CPU": 1, "GPU": 1}], 1.0, 1.0) is None
    assert unplaceable(left, 0.0, 1.0) is None  # CPU actors fit on the CPU node
