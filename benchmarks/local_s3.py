"""A moto S3 server on 127.0.0.1, for the benchmarks and the tests that go through s3fs."""

from __future__ import annotations

import logging
import os
from typing import Any

# variables that would point boto elsewhere than the loopback server
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN")


def loopback_s3() -> tuple[Any, dict[str, str]]:
    """A started moto S3 server on 127.0.0.1 and the AWS environment that points at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    return server, env


def start_s3() -> tuple[Any, str]:
    """:func:`loopback_s3`, its environment set for this process (before boto or Ray start);
    returns the server and its endpoint URL."""
    server, env = loopback_s3()
    os.environ.update(env)
    for name in UNSET:
        os.environ.pop(name, None)
    return server, env["AWS_ENDPOINT_URL"]
