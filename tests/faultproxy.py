"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 protocol server (moto).

Clients reach it through the standard ``AWS_ENDPOINT_URL``, so the code under test runs its
real s3fs / aiobotocore / aiohttp stack and sees the errors a real object store produces:

- ``500``: ``InternalError``; ``503``: ``ServiceUnavailable``; ``slowdown``: 503 ``SlowDown``;
- ``reset``: the connection is reset (TCP RST) before any response;
- ``cut``: the request reaches the server, then its answer is cut off halfway and the
  connection reset: a read that drops mid-body, or a write that happened but whose answer was
  lost;
- ``stall``: the response waits ``stall_seconds`` before it is forwarded.

Each request draws from a seeded ``random.Random``: with probability ``rate`` it gets one of
``kinds``, chosen uniformly, if it matches ``methods`` and ``match``. ``deny`` rules inject
permanent faults (403 ``AccessDenied``, 404 ``NoSuchBucket``) for every matching request;
``fail_next`` scripts a fault for the next few matching requests.
``counts`` says what was injected; ``requests`` counts forwarded and refused requests per
(method, path), so a test can tell how often a client retried.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "slowdown", "reset", "cut", "stall")
READS = ("GET", "HEAD")
WRITES = ("PUT", "POST", "DELETE")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "deny": (403, "AccessDenied", "Access Denied"),
    "no-bucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out and hang up are part of the test, not errors to print."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@dataclass
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    methods: tuple[str, ...]
    times: int | None  # None: every matching request


class FaultProxy:
    """Forwards HTTP requests to ``upstream``, injecting faults; a context manager."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: Iterable[str] = KINDS,
        methods: Iterable[str] = READS + WRITES,
        match: str = "",
        stall_seconds: float = 1.0,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.rate = rate
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.methods = tuple(methods)
        self.match = match
        self.stall_seconds = stall_seconds
        self.counts: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self._rules: list[_Rule] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The proxy's URL, for ``AWS_ENDPOINT_URL``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def deny(
        self, pattern: str, *, kind: str = "deny", methods: Iterable[str] = READS + WRITES
    ) -> None:
        """Answer every request whose path matches ``pattern`` with a permanent error
        (``deny``: 403 AccessDenied; ``no-bucket``: 404 NoSuchBucket)."""
        if kind not in ("deny", "no-bucket"):
            raise ValueError(f"permanent fault kind must be 'deny' or 'no-bucket', got {kind!r}")
        with self._lock:
            self._rules.append(_Rule(kind, re.compile(pattern), tuple(methods), None))

    def fail_next(
        self, kind: str, times: int, *, pattern: str = "", methods: Iterable[str] = READS
    ) -> None:
        """Give the next ``times`` requests matching ``pattern`` and ``methods`` fault ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {KINDS}")
        with self._lock:
            self._rules.append(_Rule(kind, re.compile(pattern), tuple(methods), times))

    def clear(self) -> None:
        """Drop the rules, the random faults (rate 0) and the counters."""
        with self._lock:
            self._rules.clear()
            self.rate = 0.0
            self.counts.clear()
            self.requests.clear()

    def _fault_for(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests[(method, path)] += 1
            for rule in self._rules:
                if rule.times == 0 or method not in rule.methods:
                    continue
                if rule.pattern.search(path):
                    if rule.times is not None:
                        rule.times -= 1
                    self.counts[rule.kind] += 1
                    return rule.kind
            if method not in self.methods or self.match not in path:
                return None
            if self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self.counts[kind] += 1
            return kind

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes):
        upstream = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=60
        )
        try:
            upstream.request(method, path, body=body, headers=headers)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per request would drown the test output

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy._fault_for(self.command, self.path)
                if fault == "reset":
                    self._reset()
                    return
                if fault in _ERRORS:
                    self._error(*_ERRORS[fault])
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in _HOP_BY_HOP
                }
                status, response_headers, payload = proxy._forward(
                    self.command, self.path, headers, body
                )
                head = [f"HTTP/1.1 {status} {http.client.responses.get(status, '')}"]
                head += [
                    f"{name}: {value}"
                    for name, value in response_headers
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"
                ]
                if self.command == "HEAD":  # no body, but the object's length
                    length = dict((k.lower(), v) for k, v in response_headers)["content-length"]
                    payload = b""
                else:
                    length = str(len(payload))
                head.append(f"Content-Length: {length}")
                raw = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
                if fault == "cut":  # half the answer, then a reset
                    self.wfile.write(raw[: len(raw) // 2])
                    self._reset()
                    return
                self.wfile.write(raw)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                """An S3 error document, as the real service sends it."""
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><Resource>{self.path}</Resource>"
                    "<RequestId>faultproxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reset(self) -> None:
                """Close with a TCP RST, as a crashed server or a dropped link does."""
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        return Handler
