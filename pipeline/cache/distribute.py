"""Ray layer: a pool of backbone actors, pinned to GPUs or CPUs, that runs units of work.

Ray only moves units and their results; the per-sample work is ``pipeline.cache.unit``. A unit whose
actor or node dies is given to another actor; a unit that raises is retried, then reported failed,
except for a permanent storage error (a missing object, a denied access), which fails it at once.
With several targets (``--also``), a unit whose forward fails in some is committed for the others
and retried, then reported failed, for those alone.
A unit with no result by its deadline (a read that never returns, a hung device, a stopped
process) has its actor killed and is tried again like one whose actor died. The driver's own
node dying (its raylet killed) stops the run: no actor could start or report again.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray._common.utils import get_default_ray_temp_dir
from ray._private import ray_constants
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from pipeline.cache.backbone import Backbone, create_backbone_model, model_key
from pipeline.cache.unit import Fanout, Unit, UnitResult, UnitRunner, UnitSettings
from pipeline.cache.writer import EmbeddingOverflow
from pipeline.retry import (
    PERMANENT_ERRORS,
    BucketGone,
    OutputDenied,
    StorageFull,
    StorageRefused,
)

log = logging.getLogger(__name__)

_ACTOR_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


class RayNodeLost(ConnectionError):
    """The Ray node the driver runs on died (its raylet killed, or out of memory): no actor
    can start or report to it, so the run would wait forever."""


class NodeUnfit(ConnectionError):
    """A Ray node whose environment cannot use the job's storage, which the driver's could: no
    cache actor runs there. ``node`` names it (host, IP, Ray id); ``node_id`` is its Ray id."""

    def __init__(self, message: str, node: str = "", node_id: str = "") -> None:
        super().__init__(message)
        self.node, self.node_id = node, node_id


def check_node(check: Callable[[], None], node_id: str) -> None:
    """Run the driver's storage ``check`` on this node; where it raises :class:`StorageRefused`,
    raise :class:`NodeUnfit` naming the node (host, IP, Ray id) and the error. A cache actor
    runs it as it starts: the node's own S3 settings are the ones its units would use. Any
    other error (a passing one: a reset connection) is raised as it is, a failed start like
    any other (the actor is replaced, the failure counted)."""
    try:
        check()
    except StorageRefused as error:  # the driver's check passed: this node's settings differ
        node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, Ray node {node_id[:12]})"
        raise NodeUnfit(
            f"node {node} cannot use the job's storage, which the driver could: {error}. The "
            "node's environment (its AWS_* variables, ~/.aws, fsspec's config) differs from the "
            "driver's: give it the same settings and its own credentials (an IAM role, or its "
            "environment; pvu ships none to the nodes)",
            node,
            node_id,
        ) from error


#: Without ``--unit-timeout``: a unit is taken as hung after this many times the longest unit
#: finished so far (or, for a larger shard, the slowest per byte), and no sooner than
#: ``MIN_UNIT_DEADLINE_S``; before any unit has finished, after ``FIRST_UNIT_DEADLINE_S``.
SLOW_UNIT_FACTOR = 10
MIN_UNIT_DEADLINE_S = 15 * 60
FIRST_UNIT_DEADLINE_S = 2 * 3600


def keep_ray_on_loopback() -> None:
    """Make the Ray nodes this process starts listen on 127.0.0.1 only.

    Ray takes a node address of 127.0.0.1 to mean the machine's routable address, and its
    servers then listen on every interface, unless multi-node clusters are off (the setting
    Ray keeps for Windows and macOS). This turns them off in this process (Ray read the setting
    when it was imported) and in the processes Ray starts. Not for a driver that joins a real
    cluster: it would take its own node to be 127.0.0.1.
    """
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _is_under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both made absolute)."""
    folder = os.path.abspath(folder)
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def start_local_ray(**init_options: Any) -> None:
    """Start a Ray of this machine alone, every server of it on 127.0.0.1 (no dashboard).

    ``init_options`` go to ``ray.init`` (``num_cpus``, ``log_to_driver``, ...).
    """
    keep_ray_on_loopback()
    try:
        ray.init(
            address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **init_options
        )
    except Exception as error:  # Ray's own startup failures, as one line
        # a full temp folder: RuntimeError "Timed out waiting for file .../gcs_server_port_...";
        # a raylet that died as it started (a resource limit): a bare Exception, "The current
        # node timed out during startup"
        folder = get_default_ray_temp_dir()  # RAY_TMPDIR, TMPDIR or /tmp, then ray/
        path = error.filename if isinstance(error, OSError) else None
        if path and not _is_under(path, folder):
            # a path outside its temp folder: ~/.ray/auth_token, with HOME read-only or a file
            or_home = (
                ", or set HOME to a writable folder (Ray keeps its token in $HOME/.ray)"
                if _is_under(path, os.path.expanduser("~"))
                else ""
            )
            raise OSError(
                f"could not start a local Ray: it could not write {path} ({error.strerror}); "
                f"make that folder writable{or_home}"
            ) from None
        free = shutil.disk_usage(os.path.dirname(folder)).free / 2**20
        room = "free space there, or set TMPDIR to a folder with room; " if free < 1024 else ""
        raise OSError(
            f"could not start a local Ray ({error}): it keeps its session files under "
            f"{folder}, where {free:,.0f} MiB are free; {room}its processes' logs are in "
            f"{folder}/session_latest/logs"
        ) from None


def pick_device(gpu_ids: list, cuda_available: bool) -> torch.device:
    """The GPU Ray assigned to this actor, else the CPU (logged when GPUs were assigned)."""
    if gpu_ids and cuda_available:
        return torch.device("cuda", 0)
    if gpu_ids:
        log.warning(
            "Ray assigned GPU %s but CUDA is not available here: running on the CPU", gpu_ids
        )
    return torch.device("cpu")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


#: Seconds the device probe waits for a free GPU before saying that it waits.
PROBE_NOTICE_S = 15.0


def actor_device_type(gpus_per_actor: float, timeout_s: float = 300.0) -> str:
    """'cuda' if an actor given ``gpus_per_actor`` GPUs will see CUDA, else 'cpu'.

    A node may declare GPUs that CUDA does not see (a test cluster, a broken driver); its actors
    then run on the CPU, so the cache's compute precision is probed there with one task. The
    task needs a free GPU: while every GPU is held (another job's actors) it waits, saying so
    after ``PROBE_NOTICE_S``, and after ``timeout_s`` raises :class:`TimeoutError` saying why.
    """
    if gpus_per_actor <= 0:
        return "cpu"
    probe = ray.remote(num_gpus=gpus_per_actor, num_cpus=0)(_cuda_available)
    ref = probe.remote()
    ready, _ = ray.wait([ref], timeout=min(PROBE_NOTICE_S, timeout_s))
    if not ready:
        log.warning(
            "waiting for %g free GPU(s) to see whether CUDA works on the cluster's GPU nodes: "
            "all are held (by another job? `ray status` shows them); giving up after %.0f s",
            gpus_per_actor,
            timeout_s,
        )
        ready, _ = ray.wait([ref], timeout=max(0.0, timeout_s - PROBE_NOTICE_S))
    if not ready:
        ray.cancel(ref, force=True)
        raise TimeoutError(
            f"no {gpus_per_actor:g} GPU(s) of the Ray cluster came free in {timeout_s:.0f} s to "
            "run the cache actors on (another job or actor holds them? `ray status` shows "
            "them): run the same command again once they are free, or cache on CPUs with "
            "--gpus-per-actor 0"
        )
    return "cuda" if ray.get(ref) else "cpu"


def plan_actors(
    nodes: list[dict[str, float]],
    *,
    actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float | None,
) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) for a cluster whose nodes have ``nodes`` resources.

    Defaults: one actor per GPU when the cluster has GPUs, each with its node's share of CPUs;
    else one CPU actor per node using all of that node's CPUs.
    """
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if total_gpus else 0.0)
    if gpus > 0:
        gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= gpus]
        if not gpu_nodes:
            most = max((node.get("GPU", 0) for node in nodes), default=0)
            raise ValueError(
                f"--gpus-per-actor {gpus:g} asks for GPUs, but the Ray cluster's nodes have at "
                f"most {most:g} each ({total_gpus:g} in all); cache on CPUs with "
                "--gpus-per-actor 0, or wait until `ray status` lists the GPU workers"
            )
        per_node = [math.floor(node["GPU"] / gpus) for node in gpu_nodes]
        shares = [
            node.get("CPU", 0) / count for node, count in zip(gpu_nodes, per_node, strict=True)
        ]
        cpus = cpus_per_actor or max(1.0, math.floor(min(shares)))
        node_cpus = [node.get("CPU", 0) for node in gpu_nodes]
        _check_fits(cpus, node_cpus, given=cpus_per_actor is not None, gpus=gpus)
        fits = sum(
            min(count, math.floor(cores / cpus))
            for count, cores in zip(per_node, node_cpus, strict=True)
        )  # a GPU node without the CPUs for an actor holds none
        _warn_of_idle_gpu_shares(fits, sum(per_node), gpus, cpus)
        return _warn_of_shared_cores(_asked_or(actors, fits), cpus, node_cpus), gpus, cpus
    cpu_nodes = [node.get("CPU", 0) for node in nodes if node.get("CPU", 0) >= 1]
    if not cpu_nodes:
        raise ValueError("the Ray cluster has no CPUs to run cache actors on")
    cpus = cpus_per_actor or float(min(cpu_nodes))
    _check_fits(cpus, cpu_nodes, given=cpus_per_actor is not None)
    planned = _asked_or(actors, sum(math.floor(cores / cpus) for cores in cpu_nodes))
    return _warn_of_shared_cores(planned, cpus, cpu_nodes), 0.0, cpus


def _check_fits(cpus: float, node_cpus: list[float], *, given: bool, gpus: float = 0) -> None:
    """Refuse actors no node can hold: Ray would keep them pending forever. ``node_cpus`` are
    the CPUs of the nodes with the ``gpus`` an actor needs (every node for CPU actors)."""
    most = max(node_cpus)
    if cpus <= most:
        return
    if given and most >= 1:  # a smaller --cpus-per-actor fits
        nodes = f"node with {gpus:g} GPU(s)" if gpus else "node"
        also = ", or cache on CPUs with --gpus-per-actor 0" if gpus else ""
        raise ValueError(
            f"--cpus-per-actor {cpus:g} is more than any {nodes} of the Ray cluster has "
            f"({most:g}); ask for at most that many{also}"
        )
    flag = f"--cpus-per-actor {cpus:g}" if given else f"a cache actor needs {cpus:g} CPU(s)"
    raise ValueError(
        f"{flag} beside its GPU, but the Ray cluster's GPU nodes have at most {most:g}: start "
        "them with CPUs (ray start --num-cpus N), or cache on CPUs with --gpus-per-actor 0"
    )


def _warn_of_idle_gpu_shares(fits: int, shares: int, gpus: float, cpus: float) -> None:
    """Warn where the GPU nodes' CPUs hold fewer actors (``fits``) than their GPUs would at
    ``gpus`` each (``shares``): the GPUs, or shares of them, left over sit idle all run."""
    if fits < shares:
        whole = ", or --gpus-per-actor 1" if gpus < 1 else ""
        log.warning(
            "the GPU nodes' CPUs hold %d cache actor(s) of %g CPU(s), where their GPUs would "
            "hold %d at %g GPU each: the GPUs (or shares) left over sit idle all run; give a "
            "smaller --cpus-per-actor%s, or start the GPU nodes with more CPUs",
            *(fits, cpus, shares, gpus, whole),
        )


def _warn_of_shared_cores(planned: int, cpus: float, node_cpus: list[float]) -> int:
    """``planned``; warns where a fractional ``cpus`` plans more actors than the nodes
    ``node_cpus`` have cores: each actor still runs at least one thread and holds its own
    backbone, so they only share the cores and multiply the memory."""
    cores = sum(node_cpus)
    if cpus < 1 and planned > cores:
        log.warning(
            "--cpus-per-actor %g plans %d cache actors on %g CPU(s): each runs its backbone "
            "with at least one thread and holds its own copy, so they share the cores (no "
            "faster) and multiply the memory; give --cpus-per-actor 1 or more, or --actors %d",
            *(cpus, planned, cores, max(1, math.floor(cores))),
        )
    return planned


def _asked_or(actors: int | None, fits: int) -> int:
    """``actors`` where given, else the ``fits`` the cluster holds at once; warns of actors
    asked for past those, which wait unplaced all run unless the cluster grows."""
    if actors and actors > fits:
        log.warning(
            "--actors %d: the Ray cluster holds %d cache actor(s) at once; the other %d wait "
            "for room all run unless it grows (add nodes, or ask for --actors %d)",
            *(actors, fits, actors - fits, fits),
        )
    return actors or fits


def decode_workers(settings: UnitSettings, device: torch.device, cpus: float) -> int:
    """Decode processes for an actor: as ``settings`` ask, else (None) none on a CPU, where the
    forward needs the cores, or where the device decodes (``--decode device``), and on a GPU
    one per assigned CPU but the actor's own."""
    if settings.decode_workers is not None:
        return settings.decode_workers
    if device.type == "cpu" or settings.transform.get("decode") == "device":
        return 0
    return max(1, int(cpus) - 1)


#: Another backbone of a one-pass run: (timm name, weights, its unit settings).
Target = tuple[str, str, UnitSettings]


class CacheWorker:
    """Holds the job's backbones on one device and runs units with them (the body of a Ray
    actor): every backbone from one read and decode of each unit (``Fanout``).

    The constructor only keeps its arguments; :meth:`start` loads the backbones and starts the
    decode workers, so that a failure there reaches the driver as the error raised (one raised
    in a constructor comes back as an opaque ``ActorDiedError`` holding its traceback as text).
    ``check`` (the driver's storage check) runs first there, through :func:`check_node`.
    """

    def __init__(
        self,
        backbone: str,
        weights: str,
        settings: UnitSettings,
        also: tuple[Target, ...] = (),
        check: Callable[[], None] | None = None,
    ) -> None:
        self._targets = ((backbone, weights, settings), *also)
        self._check = check

    def start(self) -> dict[str, Any]:
        """Check the storage from this node, load the backbones onto this actor's device and
        start its decode workers; returns :meth:`describe`."""
        context = ray.get_runtime_context()
        if self._check is not None:
            check_node(self._check, context.get_node_id())
        cpus = context.get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = pick_device(ray.get_gpu_ids(), torch.cuda.is_available())
        self.decode_workers = decode_workers(self._targets[0][2], self.device, cpus)
        models: dict[str, Backbone] = {}  # targets of one model (--also-deteriorate) share it
        runners = [self._runner(*target, models) for target in self._targets]
        self.fanout = Fanout(runners, self.decode_workers)
        self.node_id = context.get_node_id()
        return self.describe()

    def _runner(
        self, backbone: str, weights: str, settings: UnitSettings, models: dict[str, Backbone]
    ) -> UnitRunner:
        """A runner of ``settings``' cache, its model taken from ``models`` where an earlier
        target loaded the same one (an eval forward changes nothing in it)."""
        kwargs = settings.provenance.get("model_kwargs")  # the model the cache says it holds
        autocast = settings.compute.autocast_dtype
        key = f"{model_key(backbone, weights, kwargs)} {autocast}"
        if key not in models:
            models[key] = Backbone(
                create_backbone_model(backbone, weights, kwargs), self.device, autocast
            )
        return UnitRunner(models[key], settings.model_copy(update={"decode_workers": 0}))

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: node, device, GPU ids and torch threads."""
        return {
            "node_id": self.node_id,
            "device": str(self.device),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "threads": torch.get_num_threads(),
            "decode_workers": self.decode_workers,
        }

    def run(
        self, unit: Unit, targets: tuple[int, ...] | None = None
    ) -> dict[int, UnitResult | Exception]:
        """Compute and commit one unit for ``targets`` (indices of the targets; default all):
        per target, its result or the error its forward raised (``Fanout.run``)."""
        outcomes = self.fanout.run(unit, targets)
        return {target: _portable(outcome) for target, outcome in outcomes.items()}

    def close(self) -> None:
        """Stop the decode workers (they also exit on their own once the actor is gone)."""
        self.fanout.close()


def _portable(outcome: UnitResult | Exception) -> UnitResult | Exception:
    """``outcome``, or, for an error that would not come back through Ray (pickled and
    unpickled, as an error with required arguments of its own), a ``RuntimeError`` that says
    the same."""
    if not isinstance(outcome, Exception):
        return outcome
    try:
        pickle.loads(pickle.dumps(outcome))
    except Exception:  # whatever its pickling raises, its text still comes back
        portable = RuntimeError(f"{type(outcome).__name__}: {outcome}")
        for note in getattr(outcome, "__notes__", ()):
            portable.add_note(note)
        return portable
    return outcome


def describe_failure(source: str, error: BaseException) -> str:
    """How a unit of ``source`` failed, as one line: the error, then its notes (with
    ``--also``, the backbone and cache it failed in)."""
    notes = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
    return f"{source}: {type(error).__name__}: {error}{notes}"


def _check_alive(node_id: str) -> None:
    """Raise :class:`RayNodeLost` if the driver's Ray node ``node_id`` is dead: its actors'
    results and new actors' starts would never come (Ray marks it dead within ~15 s)."""
    if not any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()):
        raise RayNodeLost(
            f"the Ray node this run's driver is on ({node_id[:12]}) died: its raylet was "
            "killed, or ran out of memory? No unit can run; run the same command again (the "
            "units written are kept)"
        )


def unplaceable(nodes: list[dict[str, float]], gpus: float, cpus: float) -> str | None:
    """Why no cache actor of ``gpus`` GPUs and ``cpus`` CPUs can start on a cluster of alive
    ``nodes`` (their resources), or None where a node has them (busy or not)."""
    if any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= cpus for n in nodes):
        return None
    return (
        f"no cache actor runs, and no alive node of the Ray cluster has the {gpus:g} GPU(s) and "
        f"{cpus:g} CPU(s) one asks for (its nodes died?): the run waits until such a node "
        "joins (an autoscaler adds one; `ray status` lists them), or stop it and run the same "
        "command again, planned for the nodes there are then (the units written are kept)"
    )


@dataclass
class PoolReport:
    """How a pool run went: results per unit, units that failed for good, actors replaced."""

    #: The first target's committed units (the others' reach ``on_result`` only).
    results: list[UnitResult] = field(default_factory=list)
    #: Units that failed for good in one target or more: relpath -> why.
    failed: dict[str, str] = field(default_factory=dict)
    #: The targets (indices) each failed unit failed in.
    failed_targets: dict[str, list[int]] = field(default_factory=dict)
    actors_replaced: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    nodes_left_out: dict[str, str] = field(default_factory=dict)  # node id -> why


class ActorPool:
    """Distributes units over ``size`` actors, each asking Ray for ``gpus`` and ``cpus``.

    Each actor runs ``check`` (the driver's storage check) as it starts: one that fails there
    (:class:`NodeUnfit`) leaves its node out of the run, named in the log and the report, no
    actor starts there again, and another is started on the other nodes in its place.
    """

    def __init__(
        self,
        *,
        size: int,
        gpus: float,
        cpus: float,
        backbone: str,
        weights: str,
        settings: UnitSettings,
        max_attempts: int = 3,
        worker: type[CacheWorker] = CacheWorker,
        also: tuple[Target, ...] = (),
        unit_timeout: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        self._actor_class = ray.remote(num_gpus=gpus, num_cpus=cpus, max_restarts=0)(worker)
        self._kwargs = {"check": check} if check else {}
        self._unfit: dict[str, NodeUnfit] = {}  # nodes left out: no actor starts there
        self._resources = (gpus, cpus)
        self._said_unplaceable = False  # until an actor starts again
        self._args = (backbone, weights, settings, also)
        self.targets = tuple(range(1 + len(also)))  # 0: the first, ``backbone``'s
        self.size = size
        self.max_attempts = max_attempts
        self.unit_timeout = unit_timeout
        self._idle: list[Any] = []
        self._starting: dict[ray.ObjectRef, Any] = {}
        self._running: dict[ray.ObjectRef, tuple[Any, Unit, tuple[int, ...]]] = {}
        self._given_at: dict[ray.ObjectRef, float] = {}  # when each running unit was given out
        self._longest = 0.0  # seconds, of the units finished so far
        self._slowest = 0.0  # seconds per shard byte, of the units finished so far
        self._failed_starts = 0  # in a row; a start that succeeds resets it

    def _start_actor(self) -> None:
        actor_class = self._actor_class
        if self._unfit:  # Ray's label of each node's id
            avoid = ",".join(self._unfit)
            actor_class = actor_class.options(label_selector={"ray.io/node-id": f"!in({avoid})"})
        actor = actor_class.remote(*self._args, **self._kwargs)
        self._starting[actor.start.remote()] = actor

    def run(
        self,
        units: Iterable[Unit],
        on_result: Callable[[UnitResult], None],
        targets: Mapping[str, tuple[int, ...]] | None = None,
    ) -> PoolReport:
        """Run every unit once to completion (or failure) for the ``targets`` (indices) of its
        relpath there, by default every one; ``on_result`` sees each result (each target's, its
        ``target`` the index). A unit tried again is tried for the targets that failed it alone.

        A unit's error that every other unit would meet too (a kind in ``_STOPPING``: its
        output storage full, its bucket gone, its write denied, its embeddings past the
        dtype) stops the run, as does a cluster where only nodes left out could hold an actor
        (:class:`NodeUnfit`, :meth:`_say_if_unplaceable`).
        """
        report = PoolReport()
        targets = targets or {}
        pending = deque((unit, targets.get(unit.relpath, self.targets)) for unit in units)
        attempts: dict[str, int] = {}
        own_node = ray.get_runtime_context().get_node_id()
        for _ in range(min(self.size, len(pending))):
            self._start_actor()
        try:
            while pending or self._running:
                while pending and self._idle:
                    actor, (unit, targets) = self._idle.pop(), pending.popleft()
                    ref = actor.run.remote(unit, targets)
                    self._running[ref] = (actor, unit, targets)
                    self._given_at[ref] = time.monotonic()
                if not self._running and not self._starting:
                    raise RuntimeError("no cache actor is alive and none is starting")
                ready, _ = ray.wait([*self._running, *self._starting], num_returns=1, timeout=5)
                if not ready:
                    _check_alive(own_node)
                    self._say_if_unplaceable()
                for ref in ready:
                    if ref in self._starting:
                        self._on_started(ref, report)
                    else:
                        self._on_finished(ref, report, pending, attempts, on_result)
                self._stop_hung(report, pending, attempts)
        finally:
            closing = [actor.close.remote() for actor in self._idle]
            if closing:  # stop decode workers before the kill; they would exit soon anyway
                ray.wait(closing, num_returns=len(closing), timeout=5)
            for actor in [*self._idle, *self._starting.values()]:
                ray.kill(actor)
            for actor, *_ in self._running.values():
                ray.kill(actor)
        return report

    def _say_if_unplaceable(self) -> None:
        """Where no actor is alive and none can be placed, end the run if only nodes left out
        could hold one (:meth:`_no_node_fits`), else warn, once until an actor starts again:
        the run would wait, unsaid, for a node that only an autoscaler (or a person) can add."""
        if self._idle or self._running or self._said_unplaceable:
            return
        alive = [node for node in ray.nodes() if node["Alive"]]
        fit = [node["Resources"] for node in alive if node["NodeID"] not in self._unfit]
        why = unplaceable(fit, *self._resources)
        if (
            why
            and self._unfit
            and not unplaceable([n["Resources"] for n in alive], *self._resources)
        ):
            raise self._no_node_fits()  # only the nodes left out could hold an actor
        if why:
            log.warning(why)
            self._said_unplaceable = True

    def unit_deadline(self, unit: Unit) -> float:
        """Seconds ``unit`` may run before it counts as hung: ``unit_timeout``, else
        ``SLOW_UNIT_FACTOR`` times what the units finished so far took (see the constants)."""
        if self.unit_timeout is not None:
            return self.unit_timeout
        if not self._longest:
            return FIRST_UNIT_DEADLINE_S
        expected = max(self._longest, self._slowest * (unit.source_bytes or 0))
        return max(MIN_UNIT_DEADLINE_S, SLOW_UNIT_FACTOR * expected)

    def _stop_hung(self, report: PoolReport, pending: deque, attempts: dict[str, int]) -> None:
        """Kill the actor of each unit past its deadline and try the unit again (counted as a
        try): a read that never returns or a hung device would hold the run forever. A unit
        whose result waits to be collected (the driver was busy) is not one."""
        now = time.monotonic()
        late = [
            ref
            for ref, given in self._given_at.items()
            if now - given > self.unit_deadline(self._running[ref][1])
        ]
        done, _ = ray.wait(late, num_returns=len(late), timeout=0) if late else ([], [])
        for ref in [ref for ref in late if ref not in done]:
            actor, unit, targets = self._running.pop(ref)
            deadline = self.unit_deadline(unit)
            del self._given_at[ref]
            ray.kill(actor)
            report.actors_replaced += 1
            self._start_actor()
            why = (
                f"{unit.source}: no result after {deadline:.0f} s (a read that never returns, "
                "a hung device?); its actor was killed (--unit-timeout sets the limit)"
            )
            self._retry_or_fail(unit, targets, why, report, pending, attempts)

    def _on_started(self, ref: ray.ObjectRef, report: PoolReport) -> None:
        """Take a started actor into the pool, or replace one that failed to start.

        After ``size + 3`` failed starts in a row (a node whose GPU or /dev/shm is broken
        takes every new actor Ray places there), no more are tried: the run goes on with the
        actors it has, or, with none, ends with the last start's error.
        """
        actor = self._starting.pop(ref)
        try:
            description = ray.get(ref)
        except (RayTaskError, *_ACTOR_LOST) as error:
            # start() raised (RayTaskError: the error itself), or the process or node died
            failure = error.cause if isinstance(error, RayTaskError) else error
            why = f"{type(failure).__name__}: {failure}"
            ray.kill(actor)
            if isinstance(failure, NodeUnfit):
                self._leave_out(failure, report)
                return
            self._failed_starts += 1
            if self._failed_starts <= self.size + 2:
                log.warning("cache actor failed to start (%s); starting another", why)
                report.actors_replaced += 1
                self._start_actor()
            elif not (self._idle or self._running or self._starting):
                log.error("no cache actor could start in %d tries", self._failed_starts)
                raise failure from error
            else:
                log.error(
                    "cache actors failed to start %d times in a row (the last: %s); going on "
                    "with the %d started, starting no more",
                    *(self._failed_starts, why, len(self._idle) + len(self._running)),
                )
            return
        self._failed_starts, self._said_unplaceable = 0, False
        report.workers.append(description)
        log.info("cache actor ready: %s", description)
        self._idle.append(actor)

    def _leave_out(self, failure: NodeUnfit, report: PoolReport) -> None:
        """Start no actor again on ``failure``'s node, and another in its place on the other
        nodes (Ray may have packed several of the first actors onto that node). Where only
        nodes left out could hold one, :meth:`_say_if_unplaceable` ends the run."""
        if failure.node_id not in self._unfit:
            log.error(
                "%s. No cache actor starts there again; one is asked of the other nodes", failure
            )
        self._unfit[failure.node_id] = failure
        report.nodes_left_out[failure.node_id] = str(failure)
        self._start_actor()

    def _no_node_fits(self) -> NodeUnfit:
        """The error that ends a run whose every node that could hold an actor is left out."""
        first, *others = self._unfit.values()
        if not others:
            return first
        named = ", ".join(other.node for other in others)
        return NodeUnfit(f"{first}. So do the other node(s) able to hold an actor: {named}")

    def _retry_or_fail(
        self,
        unit: Unit,
        targets: tuple[int, ...],
        why: str,
        report: PoolReport,
        pending: deque,
        attempts: dict[str, int],
    ) -> None:
        """Queue ``unit`` again for ``targets``, or, after ``max_attempts`` tries, report it
        failed in them with ``why``.

        Lost actors count too: a unit that kills every actor it runs on must not loop forever.
        """
        attempts[unit.relpath] = attempts.get(unit.relpath, 0) + 1
        if attempts[unit.relpath] >= self.max_attempts:
            _fail(report, unit, targets, f"{why}; gave up after {self.max_attempts} tries")
            return
        log.warning(
            "unit %s: try %d failed, trying again: %s", unit.relpath, attempts[unit.relpath], why
        )
        pending.append((unit, targets))

    def _on_failures(
        self,
        unit: Unit,
        failures: list[tuple[tuple[int, ...], BaseException]],
        report: PoolReport,
        pending: deque,
        attempts: dict[str, int],
    ) -> None:
        """Stop the run, fail ``unit`` or try it again, by each error of ``failures`` (the
        targets it failed in, and the error): the targets of retriable errors in one more try."""
        retry: list[int] = []
        whys: list[str] = []
        for targets, error in failures:
            why = describe_failure(unit.source, error)
            _stop_on(error, why)
            if isinstance(error, PERMANENT_ERRORS):  # no other try can fix it
                _fail(report, unit, targets, why)
            else:
                retry.extend(targets)
                whys.append(why)
        if retry:
            self._retry_or_fail(
                unit, tuple(sorted(retry)), "; ".join(whys), report, pending, attempts
            )

    def _on_finished(
        self,
        ref: ray.ObjectRef,
        report: PoolReport,
        pending: deque,
        attempts: dict[str, int],
        on_result: Callable[[UnitResult], None],
    ) -> None:
        actor, unit, targets = self._running.pop(ref)
        seconds = time.monotonic() - self._given_at.pop(ref)
        try:
            outcomes = ray.get(ref)
        except RayTaskError as error:  # the unit raised; its actor is fine
            self._idle.append(actor)
            self._on_failures(unit, [(targets, error.cause)], report, pending, attempts)
            return
        except _ACTOR_LOST as error:  # the actor's process or node died while running it
            report.actors_replaced += 1
            self._start_actor()
            why = f"{unit.source}: its actor died ({type(error).__name__})"
            self._retry_or_fail(unit, targets, why, report, pending, attempts)
            return
        self._idle.append(actor)
        self._longest = max(self._longest, seconds)
        if unit.source_bytes:
            self._slowest = max(self._slowest, seconds / unit.source_bytes)
        for result in outcomes.values():
            if isinstance(result, UnitResult):
                if result.target == 0:
                    report.results.append(result)
                on_result(result)
        failures = [((t,), e) for t, e in outcomes.items() if isinstance(e, BaseException)]
        if failures:  # in some targets only: the others are committed
            self._on_failures(unit, failures, report, pending, attempts)


def _fail(report: PoolReport, unit: Unit, targets: tuple[int, ...], why: str) -> None:
    """Report ``unit`` failed for good in ``targets`` with ``why`` (beside an earlier failure
    in other targets, if any)."""
    earlier = report.failed.get(unit.relpath)
    report.failed[unit.relpath] = why if earlier is None else f"{earlier}; {why}"
    report.failed_targets[unit.relpath] = sorted(
        {*report.failed_targets.get(unit.relpath, ()), *targets}
    )
    log.error("unit %s failed: %s", unit.relpath, why)


#: The errors of a unit that every other unit would meet too (its output storage full or gone,
#: its writes denied, its embeddings past the dtype), and what the run, stopped, tells.
_STOPPING: tuple[tuple[type[Exception], str], ...] = (
    (
        StorageFull,
        ": free space (or raise the quota) where the cache is written and run the same command "
        "again; the units written are kept",
    ),
    (BucketGone, "; the units written are gone with it"),
    (
        OutputDenied,
        ": restore write access to the output and run the same command again; the units "
        "written are kept",
    ),
    (EmbeddingOverflow, "; the units written are kept"),
)


def _stop_on(error: BaseException, why: str) -> None:
    """Stop the run on a unit's ``error`` (told as ``why``) of a kind in ``_STOPPING``."""
    for kind, told in _STOPPING:
        if isinstance(error, kind):
            raise kind(f"{why}. Stopped{told}") from None
