"""Joining Ray for a job: the cluster at ``--ray-address`` (or ``$RAY_ADDRESS``, ``auto``
resolved as Ray resolves it), its port probed first so that a cluster that is not there is
refused in seconds, naming where the address came from; else (or ``local``) a local Ray on
127.0.0.1. An address that is no ``HOST:PORT`` (nor ``ray://``...) is refused naming it."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from jobs.terminal import console, sigterm_in_ray_init
from pipeline.cache.distribute import keep_ray_on_loopback, start_local_ray

#: Hosts of a Ray address that is this machine's loopback: a cluster started on 127.0.0.1.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: Seconds a cluster's port is tried (again each second while refused) before it is refused:
#: a head that is just starting answers within them; Ray itself retries for minutes.
PROBE_SECONDS = 5.0

#: What to do where no cluster answers, by where the address came from.
START_ONE = (
    "start one (ray start --head, cluster/README.md) or leave the address out for a local Ray"
)
FROM_ENV = (
    "start one there (ray start --head, cluster/README.md), or unset RAY_ADDRESS and leave "
    "--ray-address out for a local Ray"
)
FROM_FILE = (
    "a cluster that stopped without `ray stop` leaves this file: run `ray stop` to clear it, "
    "start one (ray start --head, cluster/README.md) or leave the address out for a local Ray"
)


@dataclass(frozen=True)
class RayAddress:
    """An address to join, how messages name it, and what to do if no cluster is there."""

    address: str
    named: str
    fix: str = START_ONE


def _host(address: str) -> str:
    """The host of a Ray address such as ``127.0.0.1:6379`` (``ray://`` and others as they are)."""
    return address.rsplit(":", 1)[0] if ":" in address and "://" not in address else address


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, set inside ``ray job submit``),
    else start a local Ray bound to 127.0.0.1."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not console.is_terminal:  # the workers' line prefixes, else in colour codes in a file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        return
    with sigterm_in_ray_init():
        given = _given_address(address)
        if given is None:
            start_local_ray(log_to_driver=True)
            return
        answered = _check_answers(given)
        loopback = _host(given.address) in LOOPBACK_HOSTS
        if loopback:  # else Ray takes 127.0.0.1 for this machine's address and never connects
            keep_ray_on_loopback()
        try:
            ray.init(
                address=given.address,
                log_to_driver=True,
                **({"_node_ip_address": "127.0.0.1"} if loopback else {}),
            )
        except ConnectionError as error:  # its words name Ray's own flag, --address
            said = str(error).split(". ")[0]
            raise (_not_joined(given, said) if answered else _no_cluster(given, said)) from None


def _given_address(address: str | None) -> RayAddress | None:
    """``--ray-address``, else ``$RAY_ADDRESS``, with ``auto`` resolved; None for a local Ray."""
    flag = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":  # Ray's own word for a new local Ray
        return None
    if address == "auto":
        return _auto_address(flag)
    return RayAddress(address, f"{flag} {address}")


def _auto_address(flag: str) -> RayAddress:
    """Where Ray's own ``auto`` leads: ``$RAY_ADDRESS``, else a Ray running on this machine or
    the address file ``ray start`` wrote (which a cluster stopped without ``ray stop`` leaves)."""
    from ray._private import services, utils

    try:
        found = services.get_ray_address_from_environment("auto", None)
    except ConnectionError as error:  # neither: Ray's words name its own flag, --address
        raise _no_cluster(RayAddress("auto", f"{flag} auto"), str(error).split(". ")[0]) from None
    if os.environ.get("RAY_ADDRESS") not in (None, "", "auto"):
        return RayAddress(found, f"{flag} auto ({found}, from $RAY_ADDRESS)", FROM_ENV)
    if found == services.find_bootstrap_address(None):
        file = utils.get_ray_address_file(None)
        return RayAddress(found, f"{flag} auto ({found}, from {file})", FROM_FILE)
    return RayAddress(found, f"{flag} auto ({found}, a Ray running on this machine)")


def _check_answers(given: RayAddress) -> bool:
    """Refuse within seconds a cluster's ``host:port`` where nothing listens, which Ray retries
    for minutes; whether something answered there (``ray://``, a client maybe through a proxy,
    and the rest are Ray's to find: False)."""
    host, _, port = given.address.rpartition(":")
    if "://" in given.address:
        return False
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{given.named}: not a Ray cluster's address; give HOST:PORT, the head's GCS port "
            "(e.g. 127.0.0.1:6379, as `ray start --head` prints it), ray://HOST:PORT for a Ray "
            "client, or auto"
        )
    try:
        _connect(host.strip("[]"), int(port))
    except OSError as error:
        raise _no_cluster(given, error.strerror or str(error)) from None
    return True


def _connect(host: str, port: int) -> None:
    """Open and close a TCP connection to ``host:port`` within PROBE_SECONDS, trying again
    each second; the last attempt's OSError if none connects."""
    deadline = time.monotonic() + PROBE_SECONDS
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(left, 0.1)).close()
            return
        except OSError:
            if left <= 1:
                raise
            time.sleep(1)


def _not_joined(given: RayAddress, said: str) -> ConnectionError:
    """Ray could not join what answers at the address: another port, or a cluster that refuses
    this driver's token (Ray says so only in its log lines: InvalidAuthToken)."""
    return ConnectionError(
        f"{given.named}: something answers there, but Ray could not join it as a cluster "
        f"({said}): give the head's GCS port (6379 by default; not the dashboard's 8265 or a "
        "client's 10001), and where the cluster takes tokens (RAY_AUTH_MODE=token) this "
        "driver's (RAY_AUTH_TOKEN or ~/.ray/auth_token) must be its own"
    )


def _no_cluster(given: RayAddress, said: str) -> ConnectionError:
    return ConnectionError(f"{given.named}: no Ray cluster found there ({said}); {given.fix}")
