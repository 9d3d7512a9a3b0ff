"""The memory a process may still take: the machine's, within its cgroup's limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.head.memory import available_memory

GIB = 2**30


def _tree(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(root)


def test_a_cgroup_v2_limit_lowers_what_the_machine_has_left(tmp_path):
    pod = "sys/fs/cgroup/kubepods/pod1"
    root = _tree(
        tmp_path,
        {
            "proc/meminfo": "MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n",
            "proc/self/cgroup": "0::/kubepods/pod1\n",
            f"{pod}/memory.max": f"{4 * GIB}\n",
            f"{pod}/memory.current": f"{GIB}\n",
            f"{pod}/memory.stat": f"anon 1\ninactive_file {GIB // 4}\n",
        },
    )
    # the page cache it could drop does not count as used, as Kubernetes counts it
    assert available_memory(root) == 4 * GIB - (GIB - GIB // 4)


def test_a_limit_on_an_ancestor_cgroup_counts(tmp_path):
    """Slurm limits its job's cgroup, not the task's below it: the whole machine's
    MemAvailable was taken, and the run killed part way."""
    job = "sys/fs/cgroup/system.slice/slurmstepd.scope/job_42"
    task = f"{job}/step_0/user/task_0"
    unlimited = {"memory.max": "max\n", "memory.current": "1\n", "memory.stat": "anon 1\n"}
    root = _tree(
        tmp_path,
        {
            "proc/meminfo": "MemAvailable: 67108864 kB\n",
            "proc/self/cgroup": "0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n",
            **{f"{task}/{name}": text for name, text in unlimited.items()},
            f"{job}/memory.max": f"{4 * GIB}\n",
            f"{job}/memory.current": f"{GIB}\n",
            f"{job}/memory.stat": "inactive_file 0\n",
        },
    )
    assert available_memory(root) == 3 * GIB


def test_without_a_limit_it_is_what_the_machine_has_left(tmp_path):
    root = _tree(
        tmp_path,
        {
            "proc/meminfo": "MemAvailable: 1048576 kB\n",
            "proc/self/cgroup": "0::/\n",  # in a cgroup namespace: its own at the mount
            "sys/fs/cgroup/memory.max": "max\n",
            "sys/fs/cgroup/memory.current": "5\n",
            "sys/fs/cgroup/memory.stat": "inactive_file 0\n",
        },
    )
    assert available_memory(root) == GIB
    assert available_memory(str(tmp_path / "elsewhere")) is None  # nothing known: no check


def _memory_cgroup() -> Path | None:
    """A folder for a child of this process's cgroup v1 memory controller, if it can be made."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line.split(":", 2)[2] for line in lines if ":memory:" in line), None)
    base = Path("/sys/fs/cgroup/memory") / (own or "").lstrip("/")
    return base / f"pvu-test-{os.getpid()}" if own and os.access(base, os.W_OK) else None


@pytest.mark.skipif(_memory_cgroup() is None, reason="needs a writable cgroup v1 memory controller")
def test_a_real_cgroup_limit_is_seen_from_inside_it():
    group = _memory_cgroup()
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(GIB))
        script = "from pipeline.head.memory import available_memory; print(available_memory())"
        inside = f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"'
        result = subprocess.run(
            ["sh", "-c", inside, sys.executable, script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
            check=True,
        )
        assert GIB // 2 < int(result.stdout) < GIB  # the limit less the interpreter itself
    finally:
        group.rmdir()
