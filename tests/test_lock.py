"""One `pvu cache` run per output prefix: the second is refused naming the first; the lock of a
killed run expires (at once on its own host, after its lease elsewhere)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import fsspec
import psutil
import pytest
import ray
from support import SMALL_BACKBONE_FLAGS, record_fsyncs

from pipeline.cache import lock as lock_module
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.index import open_cache
from pipeline.cache.lock import LOCK_NAME, CacheLocked, Holder, RunLock
from pipeline.cache.manifest import MANIFEST_NAME, Manifest, read_manifest
from pipeline.cache.verify import list_unit_files
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

STORAGES = ["local", pytest.param("s3", marks=pytest.mark.slow)]


@pytest.fixture(params=STORAGES)
def prefix(request, tmp_path) -> str:
    """An output prefix on a local disk or on the S3 protocol server."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/cache"
    return str(tmp_path / "cache")


def plant(prefix: str, holder: Holder) -> None:
    """Leave ``holder``'s lock at ``prefix``, as a run elsewhere would have."""
    fs, root = fsspec.core.url_to_fs(prefix)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps(asdict(holder)).encode())


def test_the_second_run_is_refused_naming_the_first(prefix: str) -> None:
    with RunLock(prefix, owner="pvu cache --output first", lease=60):
        with pytest.raises(CacheLocked) as refused, RunLock(prefix, owner="second"):
            pass
        message = str(refused.value)
        assert "another pvu run is writing to" in message and prefix in message
        assert "pvu cache --output first" in message and f"pid {os.getpid()}" in message
    with RunLock(prefix, owner="third"):  # released: free again
        pass
    fs, root = fsspec.core.url_to_fs(prefix)
    assert not fs.exists(f"{root}/{LOCK_NAME}")


def test_reading_a_cache_still_being_written_warns(tmp_path, caplog) -> None:
    """train-head on a cache that pvu cache was still writing trained on the units committed
    so far (1 of 3 epochs), saying nothing."""
    url = str(tmp_path / "cache")
    write_synthetic_cache(url, SyntheticCache(dim=8, samples_per_shard=20, shards=1, epochs=1))
    caplog.set_level(logging.WARNING, logger="pipeline.cache.index")
    with RunLock(url, owner="pvu cache --output cache", lease=60):
        open_cache([url])
    assert "still being written, by run" in caplog.text and "pvu cache --output" in caplog.text
    caplog.clear()
    open_cache([url])  # the run ended: its lock is gone
    dead = replace(RunLock(url, owner="a dead run").holder, host="node-7")  # not this process
    plant(url, replace(dead, heartbeat=time.time() - 600))
    open_cache([url])
    assert "still being written" not in caplog.text


def test_a_heartbeat_keeps_a_live_lock_past_its_lease(tmp_path) -> None:
    prefix = str(tmp_path / "cache")
    with RunLock(prefix, owner="long run", lease=0.4):
        time.sleep(1.2)  # three leases
        with pytest.raises(CacheLocked, match="long run"), RunLock(prefix, owner="second"):
            pass


def test_a_run_that_loses_its_lock_is_stopped(tmp_path, caplog) -> None:
    """A run whose lock another took (its lease ran out on another host) went on writing
    beside the new holder: the heartbeat only logged the loss, and the run's last manifest
    write, as it stopped, landed over the new holder's."""
    prefix = str(tmp_path / "cache")
    write_synthetic_cache(prefix, SyntheticCache(dim=8, samples_per_shard=20, shards=2, epochs=1))
    fs, root = fsspec.core.url_to_fs(prefix)
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        with caplog.at_level(logging.WARNING), RunLock(prefix, owner="first", lease=0.4) as lock:
            manifest = Manifest.open(prefix, read_manifest(prefix)["provenance"], lock.lost)
            now = time.time()
            plant(prefix, Holder("other", "node-7", 4242, "pvu cache on node-7", now, now, 60.0))
            fs.pipe_file(f"{root}/{MANIFEST_NAME}", b'{"written by": "other"}')
            deadline = time.monotonic() + 10
            while not stopped and time.monotonic() < deadline:
                time.sleep(0.05)
            manifest.forget(next(iter(manifest.units)))
            manifest.flush(force=True)  # as the stopping run's unwinding does
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == [signal.SIGTERM]
    assert "lost the lock" in caplog.text and "stopping this run" in caplog.text
    assert json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == "other"  # left to it
    assert fs.cat_file(f"{root}/{MANIFEST_NAME}") == b'{"written by": "other"}'
    assert f"{prefix}/{MANIFEST_NAME} not written: this run lost its lock" in caplog.text


def test_a_dead_runs_lock_expires_after_its_lease(prefix: str, caplog) -> None:
    now = time.time()
    elsewhere = Holder("abc", "node-7", 4242, "pvu cache on node-7", now, now, lease=1.0)
    plant(prefix, elsewhere)
    with pytest.raises(CacheLocked, match=r"node-7, pid 4242.*expires 1 s after"):
        RunLock(prefix, owner="too early").acquire()
    plant(prefix, replace(elsewhere, heartbeat=now - 1.5))  # its last beat: over a lease ago
    with caplog.at_level(logging.WARNING), RunLock(prefix, owner="later") as lock:
        assert "taking over the lock of a dead run: run abc" in caplog.text
        fs, root = fsspec.core.url_to_fs(prefix)
        assert json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == lock.holder.run_id


def test_a_lock_that_is_not_one_blocks_no_run_for_good(prefix: str, caplog) -> None:
    """A crash mid-write (a full disk) left an empty lock: every later run failed with
    'Expecting value: line 1 column 1', naming no file. One a later version wrote, with a
    field this one lacks, is still a live run's lock."""
    fs, root = fsspec.core.url_to_fs(prefix)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", b"")
    with pytest.raises(CacheLocked, match=r"_lock.json is unreadable .* If none is, delete it"):
        RunLock(prefix, owner="at once", lease=5.0).acquire()  # S3 times are whole seconds
    time.sleep(1.2)
    with caplog.at_level(logging.WARNING), RunLock(prefix, owner="a lease later", lease=0.5):
        assert "taking over the lock" in caplog.text and "unreadable" in caplog.text
    fs.pipe_file(
        f"{root}/{LOCK_NAME}",
        json.dumps({**asdict(Holder("x", "h", 1, "o", 0, 0, 1)), "heartbeat": None}).encode(),
    )
    with pytest.raises(CacheLocked, match=r"_lock.json is unreadable"):
        RunLock(prefix, owner="a field of the wrong type", lease=5.0).acquire()
    now = time.time()
    later = {**asdict(Holder("new", "node-9", 1, "pvu 2", now, now, 60.0)), "zone": "eu"}
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps(later).encode())
    with pytest.raises(CacheLocked, match="node-9"):
        RunLock(prefix, owner="second").acquire()


def test_a_lock_whose_write_fails_is_not_left_behind(tmp_path) -> None:
    """Writes past RLIMIT_FSIZE fail as a full disk's do, after the file was created."""
    prefix = str(tmp_path / "cache")
    script = (
        "import resource, signal; from pipeline.cache.lock import RunLock;"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY));"
        f"RunLock({prefix!r}, owner='no room').acquire()"
    )
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and f"{prefix}/{LOCK_NAME} failed" in last, failed.stderr
    assert "create" in last and "File too large" in last
    assert not os.path.exists(f"{prefix}/{LOCK_NAME}")
    with RunLock(prefix, owner="next"):
        pass


def test_a_new_lock_is_on_the_disk_once_taken(tmp_path, monkeypatch) -> None:
    """The lock's first write was not synced: after a power loss it could be empty, which
    reads as a run starting, and refused the next run for a lease. A power loss cannot be
    produced in a test; the lock is synced, whole, before the run goes on."""
    prefix = tmp_path / "cache"
    synced = record_fsyncs(monkeypatch, lambda path: os.path.getsize(path))
    with RunLock(str(prefix), owner="first") as held:
        written = len(RunLock._encode(held.holder))
        assert (str(prefix / LOCK_NAME), written) in synced, synced


def test_a_killed_runs_lock_frees_at_once_on_its_host(tmp_path) -> None:
    prefix = str(tmp_path / "cache")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.cache.lock import RunLock;"
            f"RunLock({prefix!r}, owner='doomed', lease=3600).acquire();"
            "print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CacheLocked, match="doomed"), RunLock(prefix, owner="second"):
        pass
    holder.send_signal(signal.SIGKILL)
    while psutil.Process(holder.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    # exited, not yet reaped by its parent: its /proc entry stays, and was taken as alive
    with RunLock(prefix, owner="after the kill"):  # no hour-long wait
        pass
    holder.wait()


def test_a_stopped_runs_lock_is_not_taken_while_it_lives(tmp_path) -> None:
    """A run stopped (Ctrl-Z) past its lease, or a clock stepped forward, lost its lock to a
    second run while it lived: once resumed, both wrote. Its host tells it is alive."""
    prefix = str(tmp_path / "cache")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pipeline.cache.lock import RunLock;"
            f"RunLock({prefix!r}, owner='stopped', lease=0.5).acquire();"
            "print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # three leases without a beat
        with pytest.raises(CacheLocked) as refused, RunLock(prefix, owner="second"):
            pass
        message = str(refused.value)
        assert "alive on this host but not beating" in message, message
        assert f"kill -CONT {holder.pid}" in message and "stopped" in message
        assert lock_module.live_holder(prefix) is not None  # readers are warned too
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
    with RunLock(prefix, owner="after the kill"):  # its process gone: free at once
        pass


NAMED_NOT_UTF8 = (
    "import ctypes, time; ctypes.CDLL(None).prctl(15, b'a) \\xff\\xfe'); time.sleep(60)"
)


def test_a_lock_whose_process_id_was_reused_or_whose_host_rebooted_frees_at_once(
    tmp_path, caplog
) -> None:
    """A dead run's process id taken by another process since, or a reboot since, held the
    lock for a whole lease. The process is told by its start in clock ticks since boot, so a
    clock step cannot make a live holder look dead; a holder in another PID namespace (another
    container of the pod, PID 1 too) is left to its lease."""
    prefix = str(tmp_path / "cache")
    now = time.time()
    host = socket.gethostname()
    parent = os.getppid()  # alive, and not this process
    context = lock_module._context()
    ticks = lock_module._start_ticks(parent)
    alive = Holder(
        "live", host, parent, "pvu cache, alive", now - 1e6, now, 3600, f"{context}/{ticks}"
    )
    boot, namespace = context.split("/", 1)
    for dead in (
        replace(alive, run_id="reused", process=f"{context}/{int(ticks) + 1}"),  # id reused
        replace(alive, run_id="rebooted", process=f"not-{boot}/{namespace}/{ticks}"),
    ):
        plant(prefix, dead)
        with caplog.at_level(logging.WARNING), RunLock(prefix, owner="later"):
            assert f"taking over the lock of a dead run: run {dead.run_id}" in caplog.text
    named = subprocess.Popen([sys.executable, "-c", NAMED_NOT_UTF8])  # a comm of any bytes
    try:
        comm = f"/proc/{named.pid}/comm"
        deadline = time.monotonic() + 30
        while b"\xff" not in open(comm, "rb").read():  # noqa: SIM115
            assert time.monotonic() < deadline, "the process never took its name"
            time.sleep(0.05)
        assert lock_module._start_ticks(named.pid) is not None  # was a UnicodeDecodeError
    finally:
        named.kill()
        named.wait()
    for live in (alive, replace(alive, process=f"{boot}/pid:[1]/{ticks}")):  # the lease decides
        plant(prefix, live)
        with pytest.raises(CacheLocked, match="pvu cache, alive"), RunLock(prefix, owner="x"):
            pass


@pytest.fixture(scope="module")
def local_ray(s3_server):
    start_local_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.faults
def test_two_cache_commands_at_once_one_refused_and_the_cache_exact(local_ray, tmp_path) -> None:
    write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=8, size=32)
    output = tmp_path / "cache"
    command = [
        *(sys.executable, "-m", "jobs.cache", "--shards", str(tmp_path / "shards")),
        *("--output", str(output), "--ray-address", local_ray, *SMALL_BACKBONE_FLAGS),
    ]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    runs.append(
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    codes = sorted(run.returncode for run in runs)
    if codes == [0, 2]:  # the usual outcome: the second to reach the lock is refused
        refused = outputs[[run.returncode for run in runs].index(2)]
        winner = runs[[run.returncode for run in runs].index(0)]
        assert "another pvu run is writing to" in " ".join(refused.split())
        assert f"pid {winner.pid}" in refused
    else:  # or one finished before the other started: the second found nothing to do
        assert codes == [0, 0], outputs
    assert sorted(list_unit_files(str(output))) == [
        "epoch=0000/digits-0000.parquet",
        "epoch=0000/digits-0001.parquet",
    ]
    assert not (output / LOCK_NAME).exists()


def test_a_library_run_that_lost_its_lock_stops_before_rewriting_units(tmp_path) -> None:
    """A library caller (no SIGTERM handler to unwind it) went on from a lost lock to the
    duplicate-key pass, which rewrites units, and returned a normal report."""
    from jobs.run.cache import _finish, _Target
    from jobs.run.cache_config import CacheJobConfig
    from pipeline.cache.distribute import PoolReport

    output = str(tmp_path / "cache")
    lost = threading.Event()
    lost.set()
    config = CacheJobConfig(shards="s", backbone="resnet10t", output=output)
    target = _Target(config, None, Manifest(output, {}, lock_lost=lost))  # type: ignore[arg-type]
    with pytest.raises(CacheLocked, match=f"lost the lock on {output} to another run"):
        _finish(config, PoolReport(), [target], [], [[]], already=0, started=0.0)


def test_a_lock_being_created_is_read_again_and_its_holder_named(prefix: str) -> None:
    """Another run's exclusive create makes the lock file before it writes it: a run reading it
    in between refused with 'the lock is unreadable ... another run may be starting', naming
    no one."""
    fs, root = fsspec.core.url_to_fs(prefix)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", b"")  # made, not yet written
    now = time.time()
    first = Holder("first", socket.gethostname(), os.getppid(), "pvu cache, first", now, now, 60)
    writer = threading.Timer(0.3, plant, (prefix, first))
    writer.start()
    try:
        with pytest.raises(CacheLocked, match="another pvu run is writing to"):
            RunLock(prefix, owner="second").acquire()
    finally:
        writer.join()
