"""One run per output prefix: a lease in ``<output>/_lock.json``, kept alive by a heartbeat.

``pvu cache`` holds one on its cache, ``pvu train-head`` on its output folder, ``pvu evaluate``
on its ``--report`` folder.

The lock is created with an exclusive write (``O_EXCL`` on a local disk, ``If-None-Match: *`` on
S3), so of two runs started at once exactly one gets it; the other is refused with a message
naming the holder. The holder rewrites the lock's heartbeat every ``lease / 4`` seconds. A lock
whose heartbeat is older than its lease belongs to a run that died (killed, node lost): the next
run takes it over with a warning. On the holder's own host its process decides, whatever the
heartbeat: in the same boot and PID namespace, its id gone or now another process's (told
apart by its start in clock ticks since boot, which no clock step moves) frees the lock at
once, and a live one keeps it however long it has not beaten (stopped by Ctrl-Z or SIGSTOP, or
a clock stepped forward); after a reboot, the lock is free. A holder in another PID namespace
(another container of a pod) or on another host is left to its lease.
A lock file that is not a lock (a crash mid-write) counts as dead once it is a lease old; one
that storage refused to remove as its run ended is free to this process's next run.
Clocks of the machines that share a prefix must agree to well within the lease.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

import fsspec

from pipeline.retry import (
    bucket_kept,
    make_folder,
    naming,
    place,
    read_bytes,
    remove_partial,
    sync_local,
)

log = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
LEASE_SECONDS = 120.0
#: How long an unreadable lock is read again before it counts as one: another run creating
#: it has made the file but not yet written it.
CREATING_SECONDS = 2.0


class CacheLocked(ValueError):
    """Another live run holds the output prefix."""


class UnreadableLock(ValueError):
    """The lock file is not a lock: empty, cut short, or not JSON of a holder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: run id, host, process, what it runs, and its last heartbeat."""

    run_id: str
    host: str
    pid: int
    owner: str
    started: float
    heartbeat: float
    lease: float
    #: ``<boot id>/<PID namespace>/<start ticks>`` of the holding process ("": not known).
    process: str = ""

    def expired(self, now: float) -> bool:
        """Whether the lease ran out: the holder stopped beating ``lease`` seconds ago."""
        return now > self.heartbeat + self.lease

    def alive_here(self) -> bool | None:
        """Whether the holder's process runs, as this host can tell (see the module): True or
        False where it can, None where it cannot (another host or PID namespace; a process id
        that exists, in a lock that records no process start)."""
        if self.run_id in _ENDED_RUNS:
            return False  # a run of this process that ended, its lock left by storage
        if self.host != socket.gethostname():
            return None
        here = _context()
        if not self.process or not here:  # a lock from before processes were recorded
            return None if _exists(self.pid) else False
        context, _, ticks = self.process.rpartition("/")
        if context.split("/")[0] != here.split("/")[0]:
            return False  # another boot: its process ended with it
        if context != here:
            return None  # another PID namespace: its id means nothing here
        return _start_ticks(self.pid) == ticks

    def dead_here(self) -> bool:
        """Whether the holder ran on this host and its process is gone (see the module)."""
        return self.alive_here() is False

    def live(self, now: float) -> bool:
        """Whether the holder still runs: as this host tells where it can, whatever the
        heartbeat (a stopped process, a clock step); else while its lease lasts."""
        alive = self.alive_here()
        return not self.expired(now) if alive is None else alive

    def describe(self, now: float) -> str:
        """One line naming the run, e.g. for the refusal of a second one."""
        started = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return (
            f"run {self.run_id} ({self.owner}) on host {self.host}, pid {self.pid}, started "
            f"{started}, last heartbeat {now - self.heartbeat:.0f} s ago"
        )


_TYPES = {"str": str, "int": int, "float": float}  # Holder's field annotations, as written
#: Run ids of the locks this process released (or tried to: storage may have refused).
_ENDED_RUNS: set[str] = set()


def _context() -> str:
    """This process's ``<boot id>/<PID namespace>`` ("" where ``/proc`` does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot; None where there is none, or
    it has exited and awaits its parent (a zombie holds no lock)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:  # comm may be any bytes, ")" too
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # field 3, the state: exited
        return None
    return fields[19].decode()  # field 22


def _process_identity() -> str:
    """:attr:`Holder.process` of this process."""
    here = _context()
    return f"{here}/{_start_ticks(os.getpid())}" if here else ""


def _exists(pid: int) -> bool:
    """Whether a process has the id ``pid`` here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class RunLock:
    """Hold ``<root>/_lock.json`` while a run writes ``root``; a context manager."""

    def __init__(self, root: str, *, owner: str, lease: float = LEASE_SECONDS) -> None:
        if lease <= 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease}")
        self.root = root.rstrip("/")
        self._fs, root_path = fsspec.core.url_to_fs(self.root)
        self._path = f"{root_path}/{LOCK_NAME}"
        now = time.time()
        self.holder = Holder(
            run_id=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=os.getpid(),
            owner=owner,
            started=now,
            heartbeat=now,
            lease=lease,
            process=_process_identity(),
        )
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        #: Set once another run took the lock: what this run writes no longer counts.
        self.lost = threading.Event()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`CacheLocked` naming the live run that holds it."""
        make_folder(self._fs, self._path.rsplit("/", 1)[0])
        try:
            with bucket_kept(self._fs, self._path):
                self._create()
        except FileExistsError:
            self._take_over()
        current = self._read()  # a store without exclusive writes lets the last writer win
        if current is None or current.run_id != self.holder.run_id:
            raise self._refusal(current) if current else CacheLocked(f"lost {self._path}")
        self._beating = threading.Thread(target=self._beat, name="pvu-lock", daemon=True)
        self._beating.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        _ENDED_RUNS.add(self.holder.run_id)
        try:
            current = self._read()
            if current is not None and current.run_id == self.holder.run_id:
                self._fs.rm(self._path)
        except (OSError, UnreadableLock) as error:  # storage failing: the run's own error stands
            log.warning(
                "left %s in place (%s): a later run in this process takes it over at once, "
                "one in another process once this process has ended (on this host) or after "
                "its lease (elsewhere)",
                self._url,
                error,
            )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def _url(self) -> str:
        return self._fs.unstrip_protocol(self._path)

    def _create(self) -> None:
        """Create the lock with an exclusive write (``FileExistsError`` if there is one). A
        local write that fails (a full disk) leaves no empty lock behind to block later runs,
        nor does a power loss: the lock is synced (its folder need not be: a lock gone after a
        power loss blocks nothing; an empty one is unreadable, and refuses runs for a lease)."""
        try:
            with naming(f"create {self._url}"):
                with self._fs.open(self._path, "xb") as handle:
                    handle.write(self._encode(self.holder))
                sync_local(self._fs, self._path)
        except FileExistsError:
            raise
        except OSError:
            remove_partial(self._fs, self._path)
            raise

    def _take_over(self) -> None:
        """Replace a dead run's lock; refuse a live one's. An unreadable lock (cut short, or
        not pvu's) counts as dead once it is older than a lease."""
        now = time.time()
        try:
            current = self._read_settled()
        except UnreadableLock as error:
            try:
                age = now - self._fs.modified(self._path).timestamp()
            except FileNotFoundError:  # its holder removed it meanwhile
                self._write(self.holder)
                return
            if age <= self.holder.lease:
                raise CacheLocked(
                    f"{error}, written {age:.0f} s ago: another run may be starting. If none "
                    f"is, delete it; it is taken over {self.holder.lease:.0f} s after it was "
                    "written"
                ) from None
            log.warning("taking over %s, written %.0f s ago", error, age)
            self._write(self.holder)
            return
        if current is not None and current.run_id == self.holder.run_id:
            return  # our own create landed, but its answer was lost and the retry refused
        if current is not None and current.live(now):
            raise self._refusal(current)
        if current is not None:
            log.warning("taking over the lock of a dead run: %s", current.describe(now))
        self._write(self.holder)

    def _refusal(self, current: Holder) -> CacheLocked:
        now = time.time()
        if current.expired(now):  # live all the same: its process runs here
            return CacheLocked(
                f"another pvu run is writing to {self.root}: {current.describe(now)}. It is "
                "alive on this host but not beating (stopped, e.g. by Ctrl-Z?): resume it "
                f"with `kill -CONT {current.pid}` (or `fg` in its shell), or end it with "
                f"`kill {current.pid}`"
            )
        return CacheLocked(
            f"another pvu run is writing to {self.root}: {current.describe(now)}. "
            "Wait for it to finish. If it was killed, its lock expires "
            f"{current.lease:.0f} s after its last heartbeat (in "
            f"{max(0.0, current.heartbeat + current.lease - now):.0f} s), or at once "
            f"for a run started on {current.host} in the same container"
        )

    def _beat(self) -> None:
        interval = self.holder.lease / 4
        missing = 0  # beats in a row that found no lock: one may be a store's passing 404
        while not self._stop.wait(interval):
            try:
                current = self._read()
                missing = missing + 1 if current is None else 0
                if missing == 1:
                    continue
                if current is None or current.run_id != self.holder.run_id:
                    log.error(
                        "lost the lock on %s to %s; stopping this run, so that two do not "
                        "write there",
                        self.root,
                        current.describe(time.time()) if current else "nobody",
                    )
                    # the job's SIGTERM handler unwinds it, keeping what it wrote (nothing
                    # where no handler is set: a library caller decides for itself)
                    self.lost.set()
                    _thread.interrupt_main(signal.SIGTERM)
                    return
                self._write(Holder(**{**asdict(self.holder), "heartbeat": time.time()}))
            except (OSError, UnreadableLock) as error:  # the next beat tries again
                log.warning("lock heartbeat on %s failed: %r", self.root, error)

    def _read_settled(self) -> Holder | None:
        """:meth:`_read`, read again for up to ``CREATING_SECONDS`` while the lock is
        unreadable: another run's exclusive create makes the file before it writes it."""
        deadline = time.monotonic() + CREATING_SECONDS
        while True:
            try:
                return self._read()
            except UnreadableLock:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _read(self) -> Holder | None:
        """The lock's holder, None when there is no lock, ``UnreadableLock`` when it is not
        one (fields a later version added are ignored)."""
        try:
            document = json.loads(read_bytes(self._fs, self._path))
            return Holder(
                **{
                    f.name: _TYPES[f.type](document[f.name])
                    for f in fields(Holder)
                    if f.name in document or f.default is MISSING  # added later: its default
                }
            )
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as error:
            raise UnreadableLock(f"the lock {self._url} is unreadable ({error!r})") from None

    def _write(self, holder: Holder) -> None:
        """Write aside, then move into place, so a reader never sees half a lock."""
        staging = f"{self._path}.{uuid.uuid4().hex}"
        self._fs.pipe_file(staging, self._encode(holder))
        place(self._fs, staging, self._path)

    @staticmethod
    def _encode(holder: Holder) -> bytes:
        document: dict[str, Any] = asdict(holder)
        return json.dumps(document, indent=1).encode()


def live_holder(root: str) -> Holder | None:
    """The live run holding ``root``'s lock, if any (no lock, an expired or unreadable one, or
    one whose process died on this host: None). For readers, which take no lock."""
    try:
        holder = RunLock(root, owner="a reader")._read()
    except (UnreadableLock, NotADirectoryError):  # a file's path: the reader refuses it so
        return None
    return holder if holder is not None and holder.live(time.time()) else None
