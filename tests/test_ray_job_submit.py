"""What users do on a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml -- python
-m jobs.cache ...` against a running Ray head (here one started by `ray start` on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
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
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# Ray picks every port it can itself (0); it will not pick its client server's, so that one is
# a probed free port, and a start that loses the port to another process is tried again.
HEAD_PORT_FLAGS = [
    f"--{name}=0"
    for name in (
        "port",
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as users start one, with its job server on loopback.

    ``--block`` keeps it in this fixture's own process group, so stopping it touches no other
    Ray on the machine (``ray stop`` would stop them all); its own ``--temp-dir`` keeps its
    sessions, and the pointer a later bare ``ray.init()`` would follow, out of ``/tmp/ray``.
    """
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    temp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must stay short
    for attempt in range(3):
        head, address = start_head(env, temp, attempt)
        if address:
            break
        assert attempt < 2, f"ray start failed three times: {sorted(temp.glob('start-*.log'))}"
    try:
        yield address, env
    finally:
        stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)


def stop_head(head: subprocess.Popen, grace: float = 5) -> None:
    """Stop the head and every process of its group: SIGTERM, then SIGKILL after ``grace``
    seconds (Ray's own shutdown took ~30 s here, for nothing the tests keep)."""
    os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # unless the whole group is gone
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)


def start_head(env: dict, temp: Path, attempt: int) -> tuple[subprocess.Popen, str | None]:
    """``ray start --head`` on loopback; returns it with its job server's URL, or with None if
    it exited (a port taken meanwhile)."""
    command = [
        *("ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1"),
        *HEAD_PORT_FLAGS,
        *("--ray-client-server-port", str(free_port()), "--temp-dir", str(temp)),
        *("--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"),
    ]
    log = temp / f"start-{attempt}.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while head.poll() is None:
        found = re.search(r"'(http://127\.0\.0\.1:\d+)'", log.read_text())
        if found:
            wait_for_job_server(found.group(1), head)
            return head, found.group(1)
        assert time.monotonic() < deadline, "ray start did not report its job server"
        time.sleep(0.5)
    return head, None


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


def test_submitted_train_head_gets_the_driver_resources_it_asks_for(ray_head, tmp_path):
    """cluster/README.md: the head trains in the job's driver, so `--entrypoint-num-cpus`
    (or `--entrypoint-num-gpus`) places that driver where those resources are."""
    address, env = ray_head
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=64, shards=2, epochs=2))
    submit = [
        *("ray", "job", "submit", "--address", address, "--entrypoint-num-cpus", "2"),
        *("--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--"),
        *("python", "-m", "jobs.train_head", "--config", "jobs/configs/demo/train-head.yaml"),
        *("--cache", cache, "--output", str(tmp_path / "head"), "--episodes", "3"),
        *("--episode-size", "256", "--batch-size", "64", "--hidden", "16"),
    ]
    job = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert (tmp_path / "head" / "head.json").is_file()
