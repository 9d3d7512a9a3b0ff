"""How much memory a process may still take: the machine's, within its container's limit.

A head trainer holds its shuffle pool in memory; one larger than what is left is killed by the
kernel part way (exit 137, no message) rather than refused at the start. On Linux the room is
``MemAvailable`` (free memory plus what the kernel can reclaim), lowered to the room left under
the memory cgroup limits of the process's cgroup and its ancestors (a container's, a Kubernetes
pod's, a Slurm job's), counted as Kubernetes counts it: the limit less the usage, the inactive
page cache excepted.
"""

from __future__ import annotations

from pathlib import Path

_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as about 2**63


def available_memory(root: str = "/") -> int | None:
    """Bytes this process may still allocate, or None where that is not known (not Linux).

    ``root`` is where ``/proc`` and ``/sys`` are found (tests give a fake tree).
    """
    known = [room for room in (_meminfo_available(root), _cgroup_room(root)) if room is not None]
    return min(known) if known else None


def _meminfo_available(root: str) -> int | None:
    try:
        lines = Path(root, "proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # kB
    return None


def _cgroup_room(root: str) -> int | None:
    """The limit of this process's memory cgroup less its working set; None without a limit."""
    try:
        memberships = Path(root, "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in memberships:  # "id:controllers:path"; cgroup v2 has one line "0::path"
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            return _room(Path(root, "sys/fs/cgroup/memory"), path, *files)
    for line in memberships:
        if line.startswith("0::"):
            files = ("memory.max", "memory.current", "inactive_file")
            return _room(Path(root, "sys/fs/cgroup"), line[3:], *files)
    return None


def _room(mount: Path, path: str, limit_file: str, usage_file: str, inactive: str) -> int | None:
    """The least ``limit - (usage - inactive page cache)`` of the cgroup at ``path`` under
    ``mount`` and of each cgroup above it (a Slurm job's or a systemd slice's limit sits on
    an ancestor); the mount itself when the process sees its cgroup as the root, in a cgroup
    namespace. None where none has a limit."""
    folder = mount / path.lstrip("/")
    if not (folder / limit_file).exists():
        folder = mount
    rooms = [_room_of(folder, limit_file, usage_file, inactive)]
    while folder != mount and mount in folder.parents:
        folder = folder.parent
        rooms.append(_room_of(folder, limit_file, usage_file, inactive))
    return min((room for room in rooms if room is not None), default=None)


def _room_of(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    """``limit - (usage - inactive page cache)`` of the cgroup at ``folder``; None without."""
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text())
        stat = (folder / "memory.stat").read_text().splitlines()
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= _UNLIMITED:
        return None
    cache = next((int(line.split()[1]) for line in stat if line.split()[0] == inactive), 0)
    return max(0, int(limit) - (usage - cache))
