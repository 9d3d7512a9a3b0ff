"""What users do on a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml -- python
-m jobs.cache ...` against a running Ray head (here one started by `ray start` on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.demo_data import write_digit_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as users start one, with its job server on loopback."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dashboard = free_port()
    start = [
        "ray",
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--num-cpus",
        "2",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submitted_cache_job_joins_the_cluster_and_writes_the_cache(ray_head, tmp_path):
    address, env = ray_head
    write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=8, size=32)
    submit = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "jobs.cache",
        "--shards",
        str(tmp_path / "shards"),
        "--backbone",
        "resnet10t",
        "--weights",
        "random",
        "--input-size",
        "32",
        "--output",
        str(tmp_path / "cache"),
    ]
    job = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "Started a local Ray instance" not in log, "the job must join the cluster it runs on"
    table = ds.dataset(str(tmp_path / "cache"), format="parquet", ignore_prefixes=["_"]).to_table()
    assert table.num_rows == 16
