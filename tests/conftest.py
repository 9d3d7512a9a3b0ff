"""Shared pytest fixtures: real components on loopback (docs/design.md section 6)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks.local_s3 import UNSET, loopback_s3
from pipeline.cache.distribute import keep_ray_on_loopback

# Ray on loopback only (local Rays, `ray.cluster_utils.Cluster` nodes, `ray start` in a child
# process), and no usage reports are sent.
keep_ray_on_loopback()
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# --- S3 protocol server (moto, loopback) ---------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 protocol server on 127.0.0.1 (moto), reached via the standard AWS environment.

    Sets ``AWS_ENDPOINT_URL`` and dummy credentials for the session; yields the endpoint URL.
    """
    server, env = loopback_s3()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in UNSET:
            patch.delenv(name, raising=False)
        _clear_s3fs_cache()
        yield env["AWS_ENDPOINT_URL"]
        _clear_s3fs_cache()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on :func:`s3_server`; yields its ``s3://`` URL."""
    import s3fs

    name = f"pvu-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def fault_proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """A :class:`faultproxy.FaultProxy` in front of :func:`s3_server`, made the AWS endpoint
    of this process (no faults until the test asks for them); yields the proxy."""
    from faultproxy import FaultProxy

    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        _clear_s3fs_cache()
        yield proxy
    _clear_s3fs_cache()


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def tf32_on() -> Iterator[Callable[[], tuple[str, ...]]]:
    """TF32 turned on for CUDA's float32 products and convolutions, as NVIDIA's containers
    (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) and cuDNN's own default do, restored afterwards; yields
    a reader of the two settings as they are when it is called (a CPU computes no TF32: what
    code runs under is what a test can check)."""
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "tf32"
    yield lambda: tuple(setting.fp32_precision for setting in settings)
    for setting, precision in zip(settings, before, strict=True):
        setting.fp32_precision = precision


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs' consoles 250 columns wide, so summary tables keep each value on one line."""
    from jobs.terminal import answer, console

    monkeypatch.setattr(console, "width", 250)
    monkeypatch.setattr(answer, "width", 250)
