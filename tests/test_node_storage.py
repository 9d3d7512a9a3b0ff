"""A joined Ray cluster whose node reaches storage otherwise than the driver: each actor checks
the job's storage from its own node as it starts; a node that fails is left out and named.

A real multi-node ``ray.cluster_utils.Cluster`` (nodes declaring ``num_gpus=1``) and a real S3
server (moto, 127.0.0.1); one node's raylet, and so its workers, is started with another
AWS environment that holds no credentials, as a node set up otherwise than the driver's
machine would be.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from support import small_cache_config

from jobs.run.cache import run_cache
from pipeline.cache.distribute import NodeUnfit
from pipeline.demo.data import write_digit_shards

pytestmark = pytest.mark.slow

#: A node's environment without the driver's S3 credentials (the keys only in the shell that
#: ran the driver): none from the variables, no ~/.aws, no instance metadata to ask.
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def test_a_node_that_cannot_reach_the_storage_is_left_out_and_named(
    s3_bucket, wide_console, capsys
):
    """Before: the node's actor took units and failed each on 3 tries (8 of the 12 here, as
    'NoCredentialsError: Unable to locate credentials', no node named), and the summary said
    the same command tries them again, which a node's environment does not change. Now its
    actor fails as it starts, naming the node; the other node caches every unit; with only
    such nodes, the run ends at once with that error."""
    shards, epochs = 4, 3  # units enough that the node left out is seen before the run ends
    write_digit_shards(f"{s3_bucket}/shards", shards=shards, per_shard=6, size=32)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    good = cluster.add_node(num_cpus=1, num_gpus=1)
    bad = cluster.add_node(num_cpus=1, num_gpus=1, env_vars=NO_CREDENTIALS)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        pattern = f"{s3_bucket}/shards/digits-{{0000..{shards - 1:04d}}}.tar"
        config = small_cache_config(pattern, f"{s3_bucket}/cache", cluster.address, epochs=epochs)
        report = run_cache(config)
        assert len(report.results) == shards * epochs and not report.failed
        assert {worker["node_id"] for worker in report.workers} == {good.node_id}
        assert list(report.nodes_left_out) == [bad.node_id]
        named = f"node {socket.gethostname()} (127.0.0.1, Ray node {bad.node_id[:12]})"
        why = report.nodes_left_out[bad.node_id]
        assert why.startswith(f"{named} cannot use the job's storage, which the driver could:")
        assert f"--shards {config.shards}: no credentials for s3://; set AWS_ACCESS_KEY_ID" in why
        assert "The node's environment (its AWS_* variables, ~/.aws, fsspec's config)" in why
        said = " ".join(capsys.readouterr().err.replace("│", " ").split())
        assert f"NODE LEFT OUT {named}" in said

        cluster.remove_node(good)
        while any(node["Alive"] for node in ray.nodes() if node["NodeID"] == good.node_id):
            time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(
            NodeUnfit, match=rf"^{re.escape(named)} cannot use the job.s storage"
        ) as ended:
            run_cache(config.model_copy(update={"output": f"{s3_bucket}/cache-2"}))
        assert "no credentials for s3://" in str(ended.value)
        assert time.monotonic() - started < 60  # the actor's start, not a wait for a node
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_actors_packed_onto_a_node_left_out_are_started_again_on_another(s3_bucket, wide_console):
    """Ray packs actors: here both of ``--actors 2`` land on the 2-GPU node without
    credentials (the other node's GPU is held while they are placed). Before: each failed its
    check, none was started in its place, and the run ended with NodeUnfit (exit 2) while the
    good node idled. Now each is started again on the other nodes: the good node caches all."""
    shards = 2
    write_digit_shards(f"{s3_bucket}/shards", shards=shards, per_shard=6, size=32)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    bad = cluster.add_node(num_cpus=2, num_gpus=2, env_vars=NO_CREDENTIALS)
    good = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:

        class Holder:  # holds a GPU of its node until killed (a local class: pickled whole)
            def ready(self) -> bool:
                return True

        holder = ray.remote(num_gpus=1, num_cpus=0)(Holder).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(good.node_id, soft=False)
        )
        held = holder.remote()
        ray.get(held.ready.remote())
        freed = threading.Thread(target=_free_once_full, args=(held, bad.node_id), daemon=True)
        freed.start()
        pattern = f"{s3_bucket}/shards/digits-{{0000..{shards - 1:04d}}}.tar"
        config = small_cache_config(pattern, f"{s3_bucket}/cache", cluster.address, actors=2)
        report = run_cache(config)
        freed.join(timeout=5)
        assert len(report.results) == shards and not report.failed
        assert {worker["node_id"] for worker in report.workers} == {good.node_id}
        assert list(report.nodes_left_out) == [bad.node_id]
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_once_full(held: ray.actor.ActorHandle, node_id: str, timeout: float = 120) -> None:
    """Kill ``held`` once node ``node_id`` has no GPU free (the pool's first actors placed
    there), or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free = ray._private.state.available_resources_per_node().get(node_id, {})
        if free.get("GPU", 0) == 0:
            break
        time.sleep(0.05)
    ray.kill(held)
