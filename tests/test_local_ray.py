"""The local Ray that pvu starts (``pvu cache`` without a cluster, ``make demo``) listens on
127.0.0.1 only: Ray would otherwise take 127.0.0.1 to mean the machine's routable address and
open its servers on every interface. And a SIGTERM to its driver ends the job with one line,
where Ray's own handler dumped a stack trace and aborted."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Starts the local Ray as ``pvu cache`` does, in a fresh process, and prints where it listens.
SCRIPT = """
import json, psutil, ray
from jobs.run.ray_address import connect_ray

connect_ray(None)

@ray.remote
def node_ip():
    return ray.util.get_node_ip_address()

worker = ray.get(node_ip.remote())

@ray.remote
def say():
    print("a worker's line", flush=True)

ray.get(say.remote())
listening = set()
for process in psutil.Process().children(recursive=True):
    try:
        connections = process.net_connections(kind="inet")
    except psutil.NoSuchProcess:
        continue
    listening |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
gcs = ray.get_runtime_context().gcs_address
print(json.dumps({"gcs": gcs, "worker": worker, "listening": sorted(listening)}), flush=True)

# SIGTERM (ray job stop) while the driver waits on Ray, as pvu cache's driver does
import os, signal, sys, threading, time, typer
from jobs.terminal import reported

@ray.remote
def wait():
    time.sleep(120)

threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the line reaches us
try:
    with reported("cache", verbose=False, resume="the same command resumes"):
        ray.get(wait.remote())
except typer.Exit as stop:
    sys.exit(stop.exit_code)
"""


def is_loopback(ip: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 as an IPv4-mapped IPv6 address."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.slow
def test_the_local_ray_listens_on_loopback_only_and_a_sigterm_ends_the_job_cleanly() -> None:
    # a fresh environment, without the setting tests/conftest.py gives this process
    unset = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 143, run.stderr
    assert "cache: terminated; the same command resumes" in " ".join(run.stderr.split())
    assert "SIGTERM received" not in run.stderr
    # the worker's line in plain text, where stderr is no terminal (a log file)
    [line] = [line for line in run.stdout.splitlines() if "a worker's line" in line]
    assert line.startswith("(say pid=") and "\x1b[" not in line, line
    [found] = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert found["gcs"].startswith("127.0.0.1:"), found
    assert found["worker"] == "127.0.0.1", found
    assert found["listening"], "no Ray server found listening"
    assert all(map(is_loopback, found["listening"])), found


@pytest.mark.faults
def test_a_full_temp_folder_is_named_when_ray_cannot_start(tmp_path) -> None:
    """Ray keeps its session files under TMPDIR: a full one (a cluster node's small /tmp) ended
    `pvu cache` with a 120-line traceback, 'Timed out waiting for file .../gcs_server_port'."""
    from pipeline.demo.data import write_digit_shards

    full = Path(tempfile.mkdtemp(prefix="pvu-")) / "t"  # short: Ray's socket paths are long
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)]).returncode:
        pytest.skip("no tmpfs can be mounted here (not root)")
    with contextlib.suppress(OSError):  # full
        (full / "filler").write_bytes(b"\0" * 1024 * 1024)
    try:
        shards = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
        command = [sys.executable, "-m", "jobs.cache", "--shards", shards[0], "--output"]
        command += [str(tmp_path / "cache"), "--backbone", "resnet10t", "--weights", "random"]
        unset = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_TMPDIR")
        env = {name: value for name, value in os.environ.items() if name not in unset}
        run = subprocess.run(
            command,
            cwd=REPO,
            env=env | {"PYTHONPATH": str(REPO), "TMPDIR": str(full)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["umount", str(full)], check=True)
        shutil.rmtree(full.parent)
    said = " ".join(run.stdout.split() + run.stderr.split())
    assert run.returncode == 2, said
    assert (
        "could not start a local Ray" in said and f"under {full}/ray, where 0 MiB are free" in said
    )
    assert "Traceback" not in said


def test_a_local_ray_whose_node_never_comes_up_is_one_line(monkeypatch) -> None:
    """A raylet that dies as it starts (a file-size limit, `ulimit -f`, killed it: SIGXFSZ)
    makes Ray raise a bare ``Exception`` ('The current node timed out during startup'), not the
    ``RuntimeError`` of a full temp folder: `pvu cache` ended with a 120-line traceback, exit 1."""
    import ray

    from pipeline.cache.distribute import start_local_ray

    def node_never_up(**_: object) -> None:
        raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", node_never_up)
    with pytest.raises(
        OSError, match=r"could not start a local Ray \(The current node timed out"
    ) as said:
        start_local_ray()
    # Ray's temp folder has room here: its logs are named, with no advice to free space
    assert "session_latest/logs" in str(said.value) and "free space" not in str(said.value)


#: Starts the local Ray as ``pvu cache`` does and prints the one line it fails with.
START = """
from pipeline.cache.distribute import start_local_ray
try:
    start_local_ray(num_cpus=1)
except OSError as error:
    print(error)
"""


def test_a_home_ray_cannot_write_is_named_not_its_temp_folder(tmp_path: Path) -> None:
    """A local Ray writes its auth token to ~/.ray as it starts: with HOME read-only (a pod's
    read-only root) or a file, `pvu cache` pointed at Ray's temp folder, free space and logs."""
    home = tmp_path / "home"
    home.write_text("a file, so that nothing can be created below it, even by root")
    unset = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    run = subprocess.run(
        [sys.executable, "-c", START],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = run.stdout.strip()
    assert f"it could not write {home}/.ray (Not a directory)" in said, run.stdout + run.stderr
    assert "set HOME to a writable folder" in said and "session" not in said


#: Joins the cluster at $RAY_ADDRESS through ``--ray-address auto`` as ``pvu cache`` does.
JOIN_AUTO = """
import ray
from jobs.run.ray_address import connect_ray

connect_ray("auto")
print(ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"], flush=True)
"""


@pytest.mark.slow
def test_auto_joins_a_running_cluster_on_loopback() -> None:
    """`--ray-address auto` is checked before Ray is asked (a dead address failed only after
    minutes); a live cluster at $RAY_ADDRESS, one on 127.0.0.1 included, is still joined."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    address = cluster.address
    try:
        # a user's shell: without the setting tests/conftest.py gives this process
        env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        run = subprocess.run(
            [sys.executable, "-c", JOIN_AUTO],
            cwd=REPO,
            env=env | {"PYTHONPATH": str(REPO), "RAY_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        cluster.shutdown()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [address, "3.0"], run.stdout
