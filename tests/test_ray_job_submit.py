"""What users do on a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml -- python
-m jobs.cache ...` against a running Ray head (here one started by `ray start` on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from support import SMALL_BACKBONE_FLAGS

from pipeline.demo.data import write_digit_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as users start one, with its job server on loopback.

    ``--block`` keeps it in this fixture's own process group, so stopping it touches no other
    Ray on the machine (``ray stop`` would stop them all).
    """
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    address, gcs_port = f"http://127.0.0.1:{free_port()}", free_port()
    start = [
        "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        address.rsplit(":", 1)[1],
        "--num-cpus",
        "2",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_job_server(address, head)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
        forget_cluster(gcs_port)


def forget_cluster(gcs_port: int) -> None:
    """Drop Ray's pointer to the stopped head, which a later bare ``ray.init()`` would follow."""
    pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if pointer.exists() and pointer.read_text().strip() == f"127.0.0.1:{gcs_port}":
        pointer.unlink()


def wait_for_job_server(address: str, head: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert head.poll() is None, "ray start exited"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(0.5)


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
        *SMALL_BACKBONE_FLAGS,
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
