"""Decode and augment samples in worker processes, in order, a bounded number of samples ahead.

One thread decodes and augments ~150-200 ImageNet-size JPEGs/s, far below what a GPU forwards.
:class:`DecodePool` spreads that work over processes (``spawn``: no fork of a process that
already runs torch or Ray threads) and returns the results in input order. Each sample's
augmentation is seeded by its own (seed, epoch, key), so the results are bit-identical to
:func:`prepare_image` run in-thread, whatever the number of workers.

A rejected sample comes back as a :class:`Skip` value; any other exception (a code bug) is
re-raised in the parent. Workers run one torch thread each. They exit when their parent does,
even when it is killed (as ``ray.kill`` kills an actor, running no clean-up): a pool worker
holds only the read end of the task pipe, so it reads end-of-file once the parent is gone.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from typing import Any

import numpy as np
import torch

from pipeline.cache.augment import (
    SplitTransform,
    Transform,
    augment,
    augment_pil,
    build_transform,
    split_transform,
)
from pipeline.cache.decode import decode_image
from pipeline.cache.skips import BadSample, SkipReason

#: One sample to prepare: its key, encoded image bytes and augmentation seed.
Task = tuple[str, bytes, int]
Prepared = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Skip:
    """A sample a worker rejected: what :class:`BadSample` carried, as a picklable value."""

    reason: SkipReason
    key: str
    detail: str

    def error(self) -> BadSample:
        """The ``BadSample`` the worker caught."""
        return BadSample(self.reason, self.detail, self.key)


def prepare_image(
    transform: Transform, split: SplitTransform | None, data: bytes, key: str, seed: int
) -> Prepared:
    """Decode ``data`` and augment it with ``seed``: a uint8 ``(H, W, C)`` array when ``split``
    is given (its tensor steps run later, per batch), else the transform's tensor.

    Raises ``BadSample`` for bad input.
    """
    image = decode_image(data, key=key)
    if split is not None:
        return augment_pil(split, image, seed)
    return augment(transform, image, seed)


class DecodePool:
    """``workers`` processes that run :func:`prepare_image` with the transform ``resolved``
    (``resolve_transform``'s output), created once and reused for every unit."""

    def __init__(self, resolved: dict[str, Any], workers: int, *, chunk: int = 8) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        self.workers = workers
        self.chunk = max(1, chunk)
        self.in_flight = 2 * workers  # chunks queued or running: each worker has the next one
        context = multiprocessing.get_context("spawn")
        self._pool = context.Pool(workers, initializer=_start_worker, initargs=(resolved,))

    def map(self, tasks: Iterable[Task]) -> Iterator[np.ndarray | Skip]:
        """Each task's image (or :class:`Skip`), in task order.

        At most ``in_flight`` chunks of ``chunk`` tasks are read from ``tasks`` ahead of the
        result being yielded, so memory stays bounded however long ``tasks`` is.
        """
        pending: deque[AsyncResult] = deque()
        for chunk in _chunks(tasks, self.chunk):
            pending.append(self._pool.apply_async(_prepare_chunk, (chunk,)))
            if len(pending) >= self.in_flight:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

    def close(self) -> None:
        """Stop the workers (work still queued is dropped)."""
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    chunk: list[Task] = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Worker side: the transform, built once per process by ``_start_worker``.
_transform: Transform | None = None
_split: SplitTransform | None = None


def _start_worker(resolved: dict[str, Any]) -> None:
    global _transform, _split
    torch.set_num_threads(1)
    _transform = build_transform(resolved)
    _split = split_transform(_transform)


def _prepare_chunk(chunk: list[Task]) -> list[np.ndarray | Skip]:
    assert _transform is not None, "the worker was not initialized"
    results: list[np.ndarray | Skip] = []
    for key, data, seed in chunk:
        try:
            image = prepare_image(_transform, _split, data, key, seed)
        except BadSample as bad:
            results.append(Skip(bad.reason, bad.key or key, bad.detail))
            continue
        # a numpy array pickles as plain bytes; a tensor would go through torch's shared memory
        results.append(image.numpy() if isinstance(image, torch.Tensor) else image)
    return results
