"""Decoding in worker processes: the same rows, in the same order, as decoding in-thread."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import make_runner, unit_settings

from pipeline.cache.augment import build_transform, split_transform
from pipeline.cache.decode_pool import DecodePool, Skip, prepare_image
from pipeline.cache.unit import Unit, UnitRunner
from pipeline.demo.data import write_bad_shard, write_digit_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    digits = write_digit_shards(str(root), shards=2, per_shard=20, size=40)
    write_bad_shard(str(root / "bad.tar"))
    return {"digits-0000": digits[0], "digits-0001": digits[1], "bad": str(root / "bad.tar")}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> UnitRunner:
    runner = make_runner(str(tmp_path_factory.mktemp("pooled")), decode_workers=2)
    assert runner.decode_pool is not None and runner.decode_pool.workers == 2
    yield runner
    runner.close()


def worker_pids(runner: UnitRunner) -> set[int]:
    return set(runner.decode_pool.pids)


def run_both(tmp_path, pooled: UnitRunner, unit: Unit):
    threaded = make_runner(str(tmp_path / "threaded"))
    assert threaded.decode_pool is None
    expected = threaded.run(unit)
    result = pooled.run(unit)
    table = pq.read_table(f"{pooled.settings.output}/{result.relpath}")
    assert table.equals(pq.read_table(f"{tmp_path}/threaded/{expected.relpath}"))
    return expected, result, table


@pytest.mark.parametrize("epoch", [0, 1])
def test_rows_and_skips_equal_the_in_thread_path(tmp_path, shards, pooled, epoch):
    pids = worker_pids(pooled)
    for shard in ("digits-0000", "bad"):
        expected, result, table = run_both(tmp_path, pooled, Unit(shards[shard], shard, epoch))
        assert result.rows == expected.rows == table.num_rows > 0
        assert result.skipped == expected.skipped
    assert expected.skipped, "the bad shard has samples that decoding rejects"
    assert worker_pids(pooled) == pids, "one pool per runner, reused by every unit"


def test_eval_transform_and_partial_batches(tmp_path, shards):
    pooled = make_runner(str(tmp_path / "pooled"), augment="eval", decode_workers=1)
    try:
        threaded = make_runner(str(tmp_path / "threaded"), augment="eval")
        unit = Unit(shards["digits-0001"], "digits-0001", 0)
        a, b = pooled.run(unit), threaded.run(unit)
        assert pq.read_table(f"{tmp_path}/pooled/{a.relpath}").equals(
            pq.read_table(f"{tmp_path}/threaded/{b.relpath}")
        )
    finally:
        pooled.close()
    assert pooled.decode_pool is None


def test_large_images_grow_the_shared_input_and_close_frees_it(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) > 2**20  # over a slot's first input area
    tasks = [(f"k{i}", data, i) for i in range(3)] + [("bad", b"not an image", 3)]
    settings = unit_settings(str(tmp_path))
    transform = build_transform(settings.transform)
    split = split_transform(transform)
    with DecodePool([settings.transform], 1, chunk=2) as pool:
        results = list(pool.map(tasks))
        segments = [s for slot in pool._slots for s in (slot.input, slot.output)]
    for (key, image, seed), (result,) in zip(tasks[:3], results[:3], strict=True):
        assert np.array_equal(result, prepare_image(transform, split, image, key, seed))
    assert isinstance(results[3], Skip) and results[3].key == "bad"
    assert all(segment.buf.closed for segment in segments)


def test_a_code_bug_in_a_worker_is_raised(pooled):
    with pytest.raises(TypeError):
        list(pooled.decode_pool.map([("k", 12345, 0)]))  # not bytes: a bug, not a bad sample


def test_tasks_are_read_a_bounded_window_ahead(shards, pooled):
    data = Path(shards["digits-0000"]).read_bytes()  # a tar, not an image: every result skips
    read = 0

    def endless():
        nonlocal read
        for i in itertools.count():
            read += 1
            yield f"k{i}", data, i

    results = pooled.decode_pool.map(endless())
    first = next(results)
    assert first.key == "k0" and first.reason.value == "undecodable"
    pool = pooled.decode_pool
    assert read <= pool.in_flight * pool.chunk + pool.chunk
    results.close()
    # the chunks still in flight answered that map, not the next one
    again = list(pool.map((f"j{i}", data, i) for i in range(3)))
    assert [skip.key for skip in again] == ["j0", "j1", "j2"]


_TINY = {
    "is_training": False,
    "input_size": [3, 32, 32],
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
}


def test_a_worker_that_dies_is_reported_then_replaced(shards):
    data = Path(shards["digits-0000"]).read_bytes()
    with DecodePool([_TINY], 1) as pool:
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited"):  # not a hang
            list(pool.map((f"k{i}", data, i) for i in range(3)))
        again = list(pool.map((f"j{i}", data, i) for i in range(3)))
        assert [skip.key for skip in again] == ["j0", "j1", "j2"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed():
    script = (
        "import sys, time\n"
        "from pipeline.cache.decode_pool import DecodePool\n"
        f"pool = DecodePool([{_TINY!r}], 1)\n"
        "print(*pool.pids, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.send_signal(signal.SIGKILL)  # as ray.kill does to an actor: no clean-up runs
        parent.wait()
    assert pids
    deadline = time.monotonic() + 30  # a loaded machine tears torch down slowly
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists /dev/shm")
def test_killing_the_pool_and_its_whole_process_tree_leaves_no_shared_memory(tmp_path):
    """Ray kills an actor's children with it, and the OOM killer gives no clean-up: the named
    segments stayed in /dev/shm (64 MiB at 224 px with 15 workers, all of Docker's default),
    and the next pool found no room there."""
    script = (
        "import sys, time\n"
        "from pipeline.cache.decode_pool import DecodePool\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        f"pool = DecodePool([{_TINY!r}], 2)\n"
        "decoded = len(list(pool.map((f'k{i}', data, i) for i in range(40))))\n"
        "maps = open('/proc/self/maps').read().split()\n"
        "print(decoded, *sorted({m for m in maps if m.startswith('/dev/shm/')}), flush=True)\n"
        "time.sleep(60)\n"
    )
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    command = [sys.executable, "-c", script, str(image)]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        decoded, *mapped = parent.stdout.readline().split()
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the pool, its workers, any resource tracker
        parent.wait()
    assert decoded == "40" and mapped  # the pool's own segments: other tests may add theirs
    left = [path for path in mapped if os.path.exists(path)]
    for path in left:  # not to fill this machine's /dev/shm
        os.unlink(path)
    assert not left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_pool_that_cannot_start_its_workers_frees_its_shared_memory():
    """A worker whose start failed (no file descriptor left for its pipe) left the slots'
    shared memory mapped and open, and the workers started before it running, until the
    process ended; under every limit that fails the pool, nothing of it stays."""
    script = (
        "import multiprocessing, os, resource, sys\n"
        "from pipeline.cache.decode_pool import DecodePool\n"
        "def held():\n"
        "    fds = [f'/proc/self/fd/{fd}' for fd in os.listdir('/proc/self/fd')]\n"
        "    return [fd for fd in fds if 'pvu-' in os.path.realpath(fd)]\n"
        "if __name__ == '__main__':\n"
        "    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "    base, failed = len(os.listdir('/proc/self/fd')), 0\n"
        "    for extra in range(40):\n"
        "        resource.setrlimit(resource.RLIMIT_NOFILE, (base + extra, hard))\n"
        "        try:\n"
        f"            pool = DecodePool([{_TINY!r}], 2)\n"
        "        except OSError:\n"
        "            failed += 1\n"
        "        else:\n"
        "            break\n"
        "        finally:\n"
        "            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))\n"
        "        assert not held(), (extra, held())\n"
        "        assert not multiprocessing.active_children(), extra\n"
        "    pool.close()\n"
        "    print(failed)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 16, "limits that fail the slots, then the workers' starts"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purposes
        return stat.read().split(") ")[-1][0] != "Z"


def _can_mount_a_private_shm() -> bool:
    """Whether this process may mount a tmpfs over /dev/shm in a mount namespace of its own."""
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_a_private_shm(), reason="needs unshare -m and mount (root)")
def test_a_dev_shm_too_small_for_the_pool_is_an_error_that_says_so_not_a_bus_error(tmp_path):
    """Docker gives a container 64 MB of /dev/shm. Segments are sparse: unreserved, the first
    write past the space killed a worker with SIGBUS ("exited (exit code -7)")."""
    large = {**_TINY, "input_size": [3, 224, 224]}  # 4 slots of 1.2 MB of images, 1 MB of input
    script = (
        "import os, sys\n"
        "from pipeline.cache.decode_pool import DecodePool\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "if __name__ == '__main__':\n"
        f"    with DecodePool([{_TINY!r}], 1) as pool:  # 2 slots of ~1 MB: it fits\n"
        "        print(len(list(pool.map((f'k{i}', data, i) for i in range(20)))))\n"
        "        try:  # a chunk of 8 MB of encoded bytes: its slot's input cannot grow\n"
        "            list(pool.map((f'b{i}', bytes(2**20), i) for i in range(8)))\n"
        "        except OSError as error:\n"
        "            print(error)\n"
        "        print(len(list(pool.map((f'k{i}', data, i) for i in range(20)))))  # still whole\n"
        "    try:\n"
        f"        with DecodePool([{large!r}], 2) as pool:\n"
        "            print(len(list(pool.map((f'k{i}', data, i) for i in range(64)))))\n"
        "    except OSError as error:\n"
        "        print(error)\n"
        "    print(sorted(os.listdir('/dev/shm')))\n"
    )
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs -o size=4m tmpfs /dev/shm && exec "$0" -c "$1" "$2"',
            sys.executable,
            script,
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 5, result.stderr  # before: "decode worker N exited (exit code -7)"
    assert lines[0] == lines[2] == "20"
    assert lines[1].startswith("[Errno 28] decode pool: no room in /dev/shm for 8.0 MiB")
    assert "no room in /dev/shm" in lines[3] and "2 of them need 8.6 MiB" in lines[3]
    assert "--decode-workers" in lines[3]
    assert lines[4] == "[]"  # every segment made before the one that did not fit is removed
