"""Decode and augment samples in worker processes, in order, a bounded number of samples ahead.

One thread decodes and augments ~150-200 ImageNet-size JPEGs/s, far below what a GPU forwards.
:class:`DecodePool` spreads that work over processes (``spawn``: no fork of a process that
already runs torch or Ray threads) and returns the results in input order. Each sample's
augmentation is seeded by its own (seed, epoch, key), so the results are bit-identical to
:func:`prepare_image` run in-thread, whatever the number of workers.

Images go both ways through shared memory (:class:`DecodePool`), and each worker has its own
pipe that the parent's one thread writes requests to and reads replies from (no pool threads
handing work on), so the parent, which is the actor feeding the GPU, spends a few hundredths
of a millisecond per image, however many workers it has. The shared memory has no name: it
is freed with the last process that holds it, however that process ends.

A rejected sample comes back as a :class:`Skip` value; any other exception (a code bug) is
re-raised in the parent, and a worker that dies is reported, not waited for. Workers run one
torch thread each. They exit when their parent does, even when it is killed (as ``ray.kill``
kills an actor, running no clean-up): a worker holds only its own end of its pipe, so it reads
end-of-file once the parent is gone.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recvfds, sendfds
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
START_SECONDS = 300
_READY = "ready"
_SHM = "/dev/shm"  # where Linux keeps shared memory (elsewhere: the temporary directory)
_NO_ROOM = (errno.ENOSPC, errno.ENOMEM)
_INPUT_BYTES = 2**20  # a slot's first area for encoded images; it grows for larger chunks


@dataclass(frozen=True)
class Skip:
    """A sample a worker rejected: what :class:`BadSample` carried, as a picklable value."""

    reason: SkipReason
    key: str
    detail: str

    def error(self) -> BadSample:
        """The ``BadSample`` the worker caught."""
        return BadSample(self.reason, self.detail, self.key)


#: A built transform and its split (None when it does not split).
Prepare = tuple[Transform, SplitTransform | None]


def prepare_image(
    transform: Transform, split: SplitTransform | None, data: bytes, key: str, seed: int
) -> Prepared:
    """Decode ``data`` and augment it with ``seed``: a uint8 ``(H, W, C)`` array when ``split``
    is given (its tensor steps run later, per batch), else the transform's tensor.

    Raises ``BadSample`` for bad input.
    """
    return prepare_images([(transform, split)], data, key, seed)[0]


def prepare_images(prepares: list[Prepare], data: bytes, key: str, seed: int) -> list[Prepared]:
    """:func:`prepare_image` for several transforms, decoding ``data`` once: each transform
    starts from the same decoded image and the same seed, as it would on its own."""
    image = decode_image(data, key=key)
    return [
        augment(transform, image, seed) if split is None else augment_pil(split, image, seed)
        for transform, split in prepares
    ]


def build_prepare(resolved: dict[str, Any]) -> Prepare:
    """The transform ``resolved`` describes, and its split."""
    transform = build_transform(resolved)
    return transform, split_transform(transform)


class DecodePool:
    """``workers`` processes that run :func:`prepare_images` with the transforms ``resolved``
    (``resolve_transform``'s outputs), created once and reused for every unit.

    Images never cross a pipe: each chunk in flight owns a :class:`_Slot` of shared memory,
    into which the parent copies the encoded bytes and the worker writes the prepared images;
    only keys, offsets, seeds and shapes are pickled, and the slot's two file descriptors go
    with them (its files have no name, so no crash leaves them in ``/dev/shm``). Chunks go
    to the workers in turn, two per worker in flight, and come back in order from the worker
    that has each: the parent's cost per image is two memory copies (about 0.02 ms for a
    224x224 image) and its share of one small message each way per chunk, with no thread of
    its own to wake. The slots' shared memory is reserved as the pool starts: a ``/dev/shm``
    too small for them is an ``OSError`` that says how much they need, not a SIGBUS in
    whichever process writes first.
    """

    def __init__(self, resolved: list[dict[str, Any]], workers: int, *, chunk: int = 8) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        self.workers = workers
        self.chunk = max(1, chunk)
        self.in_flight = 2 * workers  # chunks queued or running: each worker has the next one
        sizes = [prepared_bytes(one) for one in resolved]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes))]  # within one task's images
        self._task_bytes = sum(sizes)
        self._workers: list[tuple[BaseProcess, Connection]] = []
        self._slots: list[_Slot] = []
        try:
            for _ in range(self.in_flight):
                self._slots.append(_Slot(self.chunk * self._task_bytes))
        except OSError as error:
            self.close()
            if error.errno not in _NO_ROOM:
                raise
            needed = self.in_flight * (self.chunk * self._task_bytes + _INPUT_BYTES)
            raise OSError(
                error.errno, f"{error.strerror} ({workers} of them need {needed / 2**20:.1f} MiB)"
            ) from None
        self._resolved = resolved
        try:  # each worker kept as it starts: a start that fails (no fds left) stops those
            for _ in range(workers):
                self._workers.append(self._spawn())
        except BaseException:
            self.close()  # and frees the slots, which nothing else would until the process ends
            raise
        self._wait_ready(range(workers))

    def _spawn(self) -> tuple[BaseProcess, Connection]:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_work, args=(self._resolved, theirs), name="pvu-decode", daemon=True
        )
        process.start()
        theirs.close()  # the worker's end lives in the worker only
        return process, ours

    def _wait_ready(self, indices: Iterable[int]) -> None:
        """Wait until the workers ``indices`` have imported torch and built their transforms
        (seconds, many workers at once): a pool still starting would stall the first unit."""
        deadline = time.monotonic() + START_SECONDS
        try:
            for index in indices:
                if not self._workers[index][1].poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"decode workers did not start within {START_SECONDS} s")
                self._receive(index)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def map(self, tasks: Iterable[Task]) -> Iterator[list[np.ndarray] | Skip]:
        """Each task's images, one per transform (or its :class:`Skip`), in task order; one
        ``map`` at a time.

        At most ``in_flight`` chunks of ``chunk`` tasks are read from ``tasks`` ahead of the
        result being yielded, so memory stays bounded however long ``tasks`` is.
        """
        if not self._workers:
            raise RuntimeError("the decode pool is closed")
        dead = [i for i, (process, _) in enumerate(self._workers) if not process.is_alive()]
        for index in dead:  # one that died (reported by the map it failed) is replaced
            self._workers[index][1].close()
            self._workers[index] = self._spawn()
        self._wait_ready(dead)
        free = deque(self._slots)
        pending: deque[tuple[_Slot, int]] = deque()  # each chunk's slot and worker, in order
        try:
            for turn, chunk in enumerate(_chunks(tasks, self.chunk)):
                if not free:
                    yield from self._collect(*pending.popleft(), free)
                slot = free.popleft()
                placed = slot.load(chunk)  # first: it may move the input to a new segment
                worker = turn % self.workers  # in turn: a worker's replies come in chunk order
                request = (placed, self._offsets, self._task_bytes)
                self._send(worker, request, [slot.input.fd, slot.output.fd])
                pending.append((slot, worker))
            while pending:
                yield from self._collect(*pending.popleft(), free)
        finally:
            # Stopped early: the chunks in flight still write into their slots, and their
            # replies must not answer the next map's requests. Wait for them.
            for _, worker in pending:
                if self._workers:
                    with contextlib.suppress(EOFError, OSError):  # a dead one fails the next map
                        self._workers[worker][1].recv()

    def _collect(self, slot: _Slot, worker: int, free: deque[_Slot]) -> list[Any]:
        """The chunk's images, copied out of ``slot``, which goes back to ``free``."""
        images = [
            item
            if isinstance(item, Skip)
            else [
                slot.image(i * self._task_bytes + offset, *layout)
                for offset, layout in zip(self._offsets, item, strict=True)
            ]
            for i, item in enumerate(self._receive(worker))
        ]
        free.append(slot)
        return images

    def _send(self, worker: int, request: tuple, descriptors: list[int]) -> None:
        connection = self._workers[worker][1]
        try:
            connection.send(request)
            _send_descriptors(connection, descriptors)
        except OSError:  # its end is closed: it died
            raise self._died(worker) from None

    def _receive(self, worker: int) -> Any:
        """Worker ``worker``'s next reply; raises what the worker raised, or that it died."""
        try:
            reply = self._workers[worker][1].recv()
        except (EOFError, OSError):
            raise self._died(worker) from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _died(self, worker: int) -> RuntimeError:
        process = self._workers[worker][0]
        process.join(timeout=5)
        return RuntimeError(f"decode worker {process.pid} exited (exit code {process.exitcode})")

    def close(self) -> None:
        """Stop the workers (work still queued is dropped) and free the shared memory."""
        for process, connection in self._workers:
            process.terminate()
            process.join()
            connection.close()
        self._workers = []
        for slot in self._slots:
            slot.release()
        self._slots = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepared_bytes(resolved: dict[str, Any]) -> int:
    """Bytes of one prepared image: uint8 ``(H, W, 3)`` when the transform splits, else the
    float32 ``(3, H, W)`` tensor."""
    channels, height, width = resolved["input_size"]
    itemsize = 1 if build_prepare(resolved)[1] is not None else 4
    return channels * height * width * itemsize


class _Slot:
    """Shared memory for one chunk in flight: its encoded inputs and its prepared images.

    The input area grows (a new segment) when a chunk does not fit.
    """

    def __init__(self, output_bytes: int, input_bytes: int = _INPUT_BYTES) -> None:
        self.output = _segment(output_bytes)
        try:
            self.input = _segment(input_bytes)
        except BaseException:
            self.output.close()
            raise

    def load(self, chunk: list[Task]) -> list[tuple[str, int, int, int]]:
        """Copy the chunk's encoded bytes in; returns each task as (key, offset, size, seed)."""
        total = sum(len(data) for _, data, _ in chunk)
        if total > self.input.size:  # the new one first: if it does not fit, the slot stays whole
            grown = _segment(max(total, 2 * self.input.size))
            self.input.close()
            self.input = grown
        placed, offset = [], 0
        for key, data, seed in chunk:
            self.input.buf[offset : offset + len(data)] = data
            placed.append((key, offset, len(data), seed))
            offset += len(data)
        return placed

    def image(self, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A copy of the prepared image at ``offset`` of the output area."""
        view = np.ndarray(shape, np.dtype(dtype), buffer=self.output.buf, offset=offset)
        return view.copy()

    def release(self) -> None:
        """Unmap and close both segments."""
        self.input.close()
        self.output.close()


class _Segment:
    """A shared-memory file of ``size`` bytes, open and mapped in this process, with no name:
    the kernel frees it once every process that has it open or mapped closes it or exits."""

    def __init__(self, descriptor: int, size: int) -> None:
        self.fd = descriptor
        self.size = size
        self.buf = mmap.mmap(descriptor, size)

    def close(self) -> None:
        """Unmap and close it (its memory goes once no worker holds it either)."""
        self.buf.close()
        os.close(self.fd)


def _segment(size: int) -> _Segment:
    """A new shared-memory segment of ``size`` bytes, its pages reserved at once.

    Its file is removed as it is made, before it takes any memory, so no exit (a SIGKILL of
    the actor and its workers, the OOM killer) leaves it in ``/dev/shm``, which it would fill.

    A segment is sparse until written, and a write into it that finds ``/dev/shm`` full kills
    the writer with SIGBUS (a worker "exited (exit code -7)", or the actor itself); Docker's
    default ``/dev/shm`` is 64 MiB. Reserving it up front turns that into this error, which
    names the remedy.
    """
    shared = os.path.isdir(_SHM)
    descriptor, path = tempfile.mkstemp(prefix="pvu-", dir=_SHM if shared else None)
    os.unlink(path)
    try:
        os.ftruncate(descriptor, size)
        if shared:
            _reserve(descriptor, size)
        return _Segment(descriptor, size)
    except BaseException:
        os.close(descriptor)
        raise


def _reserve(descriptor: int, size: int) -> None:
    """Allocate the file's pages now, or raise the error that says ``/dev/shm`` is too small."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno not in _NO_ROOM:
            return  # a file system that cannot reserve: its pages come as written
        free = shutil.disk_usage(_SHM).free
        raise OSError(
            error.errno,
            f"decode pool: no room in {_SHM} for {size / 2**20:.1f} MiB of shared memory "
            f"({free / 2**20:.1f} MiB free there); give the node a larger {_SHM} (docker run "
            "--shm-size, or an emptyDir of medium Memory on Kubernetes) or run fewer "
            "--decode-workers",
        ) from None


def _send_descriptors(connection: Connection, descriptors: list[int]) -> None:
    """Send ``descriptors`` down ``connection`` (a Unix socket), after the message just sent."""
    with socket.fromfd(connection.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as channel:
        sendfds(channel, descriptors)


def _receive_descriptors(connection: Connection, count: int) -> list[int]:
    """The ``count`` descriptors :func:`_send_descriptors` sent; ``EOFError`` once it is closed."""
    with socket.fromfd(connection.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as channel:
        return recvfds(channel, count)


def _chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    chunk: list[Task] = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _work(resolved: list[dict[str, Any]], connection: Connection) -> None:
    """A worker: build the transforms once, then prepare each chunk the parent sends until it
    closes the pipe or dies."""
    torch.set_num_threads(1)
    prepares = [build_prepare(one) for one in resolved]
    try:
        connection.send(_READY)
        while True:
            request = connection.recv()
            source, target = _receive_descriptors(connection, 2)
            try:
                reply: Any = _prepare_chunk(prepares, source, target, *request)
            except Exception as error:  # a code bug: raised again in the parent
                reply = error
            finally:
                os.close(source)
                os.close(target)
            connection.send(reply)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone


Layout = tuple[tuple[int, ...], str]  # a prepared image's shape and dtype


def _prepare_chunk(
    prepares: list[Prepare],
    source: int,
    target: int,
    tasks: list[tuple[str, int, int, int]],
    offsets: list[int],
    task_bytes: int,
) -> list[list[Layout] | Skip]:
    """Prepare the chunk read from shared-memory file ``source`` into ``target`` (task ``i``'s
    image for transform ``j`` at ``i * task_bytes + offsets[j]``); returns each task's image
    layouts, or its :class:`Skip`."""
    ends = [*offsets[1:], task_bytes]
    results: list[list[Layout] | Skip] = []
    for i, (key, offset, size, seed) in enumerate(tasks):
        data = os.pread(source, size, offset)
        try:
            images = prepare_images(prepares, data, key, seed)
        except BadSample as bad:
            results.append(Skip(bad.reason, bad.key or key, bad.detail))
            continue
        layouts = []
        for image, start, end in zip(images, offsets, ends, strict=True):
            pixels = image.numpy() if isinstance(image, torch.Tensor) else image
            array = np.ascontiguousarray(pixels)
            if array.nbytes > end - start:
                raise ValueError(f"{key}: prepared image {array.shape} exceeds its slot")
            written = os.pwrite(target, array.reshape(-1).view(np.uint8), i * task_bytes + start)
            if written != array.nbytes:  # a file system that could not reserve, now full
                raise OSError(errno.ENOSPC, f"{key}: no room for its prepared image")
            layouts.append((array.shape, array.dtype.str))
        results.append(layouts)
    return results
