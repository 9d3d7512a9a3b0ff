"""Train the uncertainty head on a streamed cache: appendix A's schedule, checkpoints, resume.

One episode is ``episode_size`` rows in batches of ``batch_size`` (the last batch of an
episode takes the remainder). The learning rate is set per episode: linear warm-up from
``warmup_lr`` to ``lr`` over ``warmup_episodes``, then cosine decay towards ``min_lr`` over
the remaining episodes. At each episode end the run evaluates on the held-out slice, appends a
line to ``metrics.jsonl`` and checkpoints weights, optimiser state and the reader's position
(safetensors + JSON, no pickle), so a resumed run ends with the same head as an uninterrupted
one. The finished head is exported with :func:`pipeline.head.export.export_head`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec
import torch
from torch import nn

from pipeline.cache.index import CacheIndex, open_cache
from pipeline.cache.lock import RunLock
from pipeline.head.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_JSON,
    json_safe,
    load_checkpoint,
    metrics_log,
    save_checkpoint,
    trained_on,
)
from pipeline.head.export import HEAD_JSON, HEAD_WEIGHTS, export_head, image_input
from pipeline.head.memory import available_memory
from pipeline.head.model import HeadConfig, LossName, UncertaintyHead, create_head, create_objective
from pipeline.head.rows import unused_rows
from pipeline.head.stream import (
    Batch,
    CacheStream,
    StreamConfig,
    StreamState,
    held_bytes,
    read_validation,
)
from pipeline.head.validate import validation_metrics
from pipeline.named import counted
from pipeline.precision import exact_float32
from pipeline.retry import exists, make_folder

log = logging.getLogger(__name__)

#: Fewer held-out rows than this give validation metrics too noisy to follow: warned about.
MIN_VALIDATION_ROWS = 100
#: A cache of at most this many row groups has its validation split counted key by key (a
#: read of each group's keys: on S3 a request or two each); a larger one's is taken as its
#: share of the rows, which its keys meet closely (within 0.1% at 262,144 rows).
COUNTED_SPLIT_GROUPS = 64
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)


@dataclass(frozen=True)
class ScheduleConfig:
    """Appendix A's optimiser and learning-rate schedule (the defaults are the paper's)."""

    episodes: int = 460
    episode_size: int = 200_000
    batch_size: int = 2048
    lr: float = 2.8e-3
    warmup_lr: float = 1e-4
    min_lr: float = 1e-8
    warmup_episodes: int = 25
    betas: tuple[float, float] = (0.8, 0.95)
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("episodes", "episode_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_episodes < self.episodes:
            raise ValueError(
                f"warmup_episodes must be in [0, episodes), got {self.warmup_episodes}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained head (the identity a resume must match)."""

    hidden: tuple[int, ...] = (512, 512)
    loss: LossName = "ranking"
    margin: float = 0.1
    leeway: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    val_rows: int = 20_000
    precision: str = "fp32"

    @property
    def seed(self) -> int:
        """The run's seed (head initialisation and data order)."""
        return self.stream.seed

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint, as JSON-able values."""
        doc = json.loads(json.dumps(asdict(self)))
        for name in ("prefetch_windows", "io_threads", "extra_columns"):
            doc["stream"].pop(name)
        return doc


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train): device, resume, early stop, observers. ``on_start`` is
    told the samples the schedule has done once the run knows them (a resumed run's, else 0)."""

    device: str = "cpu"
    owner: str = "pvu train-head"
    resume: bool = False
    stop_after: int | None = None
    on_start: Callable[[int], None] | None = None
    on_batch: Callable[[int], None] | None = None
    on_episode: Callable[[dict[str, Any]], None] | None = None


def learning_rate(episode: int, schedule: ScheduleConfig) -> float:
    """Learning rate during ``episode`` (0-based): linear warm-up, then cosine decay."""
    s = schedule
    if episode < s.warmup_episodes:
        return s.warmup_lr + (s.lr - s.warmup_lr) * episode / s.warmup_episodes
    progress = (episode - s.warmup_episodes) / (s.episodes - s.warmup_episodes)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def create_optimizer(head: nn.Module, schedule: ScheduleConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases)."""
    decay = [p for p in head.parameters() if p.ndim >= 2]
    no_decay = [p for p in head.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": schedule.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=schedule.warmup_lr, betas=schedule.betas)


def keep_freed_memory() -> bool:
    """Have glibc keep the memory each training step frees for the next step; False where the
    C library has no ``mallopt`` (not glibc).

    glibc serves a large block with a fresh mmap and gives free heap above its trim threshold
    back to the kernel, adapting both as blocks come and go. Depending on the order of a
    process's allocations, a step's transient tensors (3-6 MB each at batch 2048, D=768) then
    fault their pages in afresh every step: measured about one page fault per row, 1.5-3.5 us
    of system time per row, more than the reader's whole budget. Blocks up to glibc's 32 MB
    ceiling come from the heap instead, and up to 256 MB of free heap is kept.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls in hardware (oneDNN's check: AVX-512 or AMX).

    Without it torch emulates them: a bf16 step ran ~12x slower than fp32 on an AVX2 host
    (BENCHMARKS.md). True where torch offers no such check.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


def train_step(
    head: UncertaintyHead,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    embedding: torch.Tensor,
    loss: torch.Tensor,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """One optimiser step on a batch; returns the (detached) objective value.

    ``embedding`` may be in any float dtype (a stream hands over the stored float16): it is
    widened here, on its device, to float32 (bf16 autocast then casts it for each layer). On
    the CPU this is also the fast way to bfloat16: torch converts float16 to bfloat16 directly
    ~4x slower than through float32.
    """
    optimizer.zero_grad(set_to_none=True)
    with _autocast(embedding.device, precision):
        value = objective(head(embedding.float()).float(), loss)
    value.backward()
    optimizer.step()
    return value.detach()


@dataclass
class TrainResult:
    """What a run produced: the head, this run's metrics lines, the export document, whether
    the schedule is done, and the episodes done (a resumed checkpoint's included)."""

    head: UncertaintyHead
    metrics: list[dict[str, Any]]
    export: dict[str, Any] | None
    finished: bool
    episodes: int


@exact_float32()  # fp32 on a GPU as on a CPU: no TF32, whatever the process sets
def fit_head(
    caches: Sequence[str], output: str, config: TrainConfig, options: RunOptions | None = None
) -> TrainResult:
    """Train a head on the rows of ``caches``; checkpoints and metrics go under ``output``."""
    options = options or RunOptions()
    device = torch.device(options.device)
    if config.precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(
            "--precision bf16 on a CPU with no native bfloat16 (AVX-512 or AMX): torch emulates "
            "it, many times slower than fp32 (~12x on an AVX2 host); use --precision fp32"
        )
    sched = config.schedule
    index = open_cache(caches, io_threads=config.stream.io_threads)
    check_memory(index, config.stream, reserved=check_head_memory(index.dim, config.hidden, device))
    train_rows = training_rows(index, config)
    head = create_head(HeadConfig(index.dim, config.hidden), seed=config.seed).to(device)
    optimizer = create_optimizer(head, sched)
    objective = create_objective(config.loss, margin=config.margin, leeway=config.leeway)
    data = trained_on(index)
    fs, root = fsspec.core.url_to_fs(output)
    make_folder(fs, root)
    with RunLock(output, owner=options.owner):
        _check_output(output, resume=options.resume)
        done, position = (
            _restore(output, head, optimizer, config, data, index)
            if options.resume
            else (0, StreamState())
        )
        _log_passes(sched, train_rows, index.epochs)
        earlier, append_metrics = metrics_log(output, done if done else -1)
        val = _validation_rows(index, config)
        history: list[dict[str, Any]] = []
        if done == 0:
            record = {
                "episode": 0,
                "samples": 0,
                "passes": 0.0,
                "schedule_passes": round(sched.episodes * sched.episode_size / train_rows, 4),
                **validation_metrics(head, val.embedding, val.loss),
            }
            append_metrics(record)
            history.append(record)
        last = (
            sched.episodes
            if options.stop_after is None
            else min(sched.episodes, options.stop_after)
        )
        if last <= done < sched.episodes:  # --stop-after counts from the schedule's start
            log.warning(
                "--stop-after %d: the run already trained %d of %d episodes, so this one trains "
                "none; give a --stop-after above %d, or none to finish the schedule",
                options.stop_after, done, sched.episodes, done,
            )  # fmt: skip
        if options.on_start:
            options.on_start(done * sched.episode_size)
        with CacheStream(index, config.stream, position) as stream:
            for episode in range(done, last):
                record = _run_episode(episode, head, optimizer, objective, stream, config, options)
                _check_finite(head, episode, record)
                record["passes"] = round(record["samples"] / train_rows, 4)
                record |= validation_metrics(head, val.embedding, val.loss)
                record["val_rows"] = len(val)
                record["nonfinite_rows"] = stream.state.nonfinite  # a resumed run's included
                # metrics first: a kill before the checkpoint redoes the episode and its line
                append_metrics(record)
                save_checkpoint(
                    output,
                    head=head,
                    optimizer=optimizer,
                    episode=episode + 1,
                    stream_state=stream.state,
                    settings=config.identity(),
                    data=data,
                )
                history.append(record)
                if options.on_episode:
                    options.on_episode(record)
        finished = max(done, last) == sched.episodes  # a finished run resumed with --stop-after
        records = [*earlier, *map(json_safe, history)]  # a finished run resumed has no history
        document = (
            _export(head, output, index, config, caches, records, train_rows) if finished else None
        )
        return TrainResult(head, history, document, finished, max(done, last))


def _check_output(output: str, *, resume: bool) -> None:
    """Refuse an ``output`` holding a run, unless resuming it, or an exported head alone."""
    fs, root = fsspec.core.url_to_fs(output)
    has_run = exists(fs, f"{root}/{CHECKPOINT_DIR}/{CHECKPOINT_JSON}")
    if not resume and has_run:
        raise ValueError(
            f"{output} already holds a training run; pass --resume to continue it, "
            "or choose another --output"
        )
    exported = all(exists(fs, f"{root}/{name}") for name in (HEAD_JSON, HEAD_WEIGHTS))
    if exported and not has_run:  # a head copied there, say
        raise ValueError(
            f"{output} holds an exported head ({HEAD_JSON}) and no training run to resume; "
            "choose another --output, or remove that head"
        )


def training_rows(index: CacheIndex, config: TrainConfig) -> float:
    """Rows a pass over ``index`` trains on. In a cache of up to ``COUNTED_SPLIT_GROUPS`` row
    groups, those outside the validation slice with a finite loss, counted by their keys and
    losses (a row whose embedding alone is NaN/inf is counted, though the stream drops it:
    knowing it takes reading every embedding); in a larger cache, rows x (1 - val_fraction).
    Refuses a split that leaves fewer than two (no pair to order); warns of fewer than a batch."""
    fraction, batch = config.stream.val_fraction, config.schedule.batch_size
    rows: float = index.rows * (1.0 - fraction)
    dropped = 0
    groups = index.row_groups()
    if len(groups) <= COUNTED_SPLIT_GROUPS:
        with ThreadPoolExecutor(config.stream.io_threads, "pvu-split") as pool:
            unused = list(pool.map(lambda ref: unused_rows(index, ref, fraction), groups))
            dropped = sum(nonfinite for _, nonfinite in unused)
            rows = index.rows - sum(held for held, _ in unused) - dropped
    left = f"--val-fraction {fraction:g} leaves {rows:,.0f} of the cache's {index.rows:,} rows"
    if dropped:  # not the split's doing: lowering --val-fraction does not bring them back
        left += f" ({dropped:,} more have a NaN/inf loss, which training drops)"
    if rows < 2:
        raise ValueError(
            f"{left} to train on, and a head learns the order of pairs of rows' losses: lower "
            "--val-fraction, or cache more images"
        )
    if rows < batch:
        log.warning(
            "%s to train on, fewer than one batch (--batch-size %s): every batch repeats rows; "
            "lower --batch-size or --val-fraction, or cache more images",
            *(left, f"{batch:,}"),
        )
    return rows


def _validation_rows(index: CacheIndex, config: TrainConfig) -> Batch:
    """The held-out rows the run validates on; warns when there are none, or too few."""
    val = read_validation(
        index,
        val_fraction=config.stream.val_fraction,
        max_rows=config.val_rows,
        io_threads=config.stream.io_threads,
    )
    few = min(MIN_VALIDATION_ROWS, config.val_rows)  # --val-rows may cap them on purpose
    if config.stream.val_fraction == 0:
        log.warning("--val-fraction 0: no validation rows, so no validation metrics")
    elif config.val_rows == 0:  # the slice is held out all the same: its rows go unused
        log.warning(
            "--val-rows 0: no validation metrics, yet the --val-fraction %g slice is still "
            "held out of training; give --val-fraction 0 as well to train on every row",
            config.stream.val_fraction,
        )
    elif len(val) < few:
        log.warning(
            "%s (--val-fraction %g of %s): the validation metrics say little; cache more "
            "rows or raise --val-fraction",
            *(counted(len(val), "validation row"), config.stream.val_fraction),
            counted(index.rows, "row"),
        )
    return val


def _export(
    head: UncertaintyHead,
    output: str,
    index: CacheIndex,
    config: TrainConfig,
    caches: Sequence[str],
    records: list[dict[str, Any]],
    train_rows: float,
) -> dict[str, Any]:
    """Export the finished ``head`` with what it was trained on (``train_rows`` a pass);
    returns ``head.json``."""
    samples = config.schedule.episodes * config.schedule.episode_size
    summary = {
        "episodes": config.schedule.episodes,
        "samples": samples,
        "passes": round(samples / train_rows, 4),
        "cached_epochs": index.epochs,
        "config": config.identity(),
        "caches": list(caches),
        "final": records[-1] if records else None,
    }
    if index.incomplete:  # a cache still being written, or left unfinished, when opened
        summary["incomplete_caches"] = index.incomplete
    return export_head(
        head,
        output,
        backbone=str(index.provenance["backbone"]),
        weights_digest=str(index.provenance["weights_digest"]),
        loss=config.loss,
        input_dtype=index.dtype,
        num_classes=_agreed(index, lambda provenance: provenance.get("num_classes")),
        weights_state_digest=_agreed(
            index, lambda provenance: provenance.get("weights_state_digest")
        ),
        model_kwargs=index.provenance.get("model_kwargs"),
        image_input=_agreed(index, image_input),
        training=summary,
    )


def _agreed(index: CacheIndex, field: Callable[[dict[str, Any]], Any]) -> Any:
    """``field`` of the provenance of ``index``'s units, where all agree on it; else None."""
    values = {json.dumps(field(unit.provenance), sort_keys=True) for unit in index.files}
    return json.loads(values.pop()) if len(values) == 1 else None


def _check_finite(head: nn.Module, episode: int, record: dict[str, Any]) -> None:
    """Stop a run whose head diverged, before its checkpoint or export holds NaN/inf weights."""
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise ValueError(
            f"training diverged in episode {episode + 1} (train loss {record.get('train_loss')}):"
            " the head's weights are no longer finite; train again with a lower --lr into "
            "another --output (--resume keeps a run's --lr)"
            + (", or remove this one" if episode else "")
        )


def check_head_memory(dim: int, hidden: Sequence[int], device: torch.device) -> int:
    """Refuse a head whose weights, gradients and AdamW moments would not fit in the memory
    left on ``device`` (a --hidden typo): torch's allocation failed with a traceback, a width
    past 64 bits with a TypeError, and one that fit only on paper got the run killed. Returns
    the bytes the head takes of the host's memory (none on a GPU)."""
    widths = (dim, *hidden, 1)
    params = sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(widths))
    needed = 16 * params  # float32 weights, their gradients and AdamW's two moments
    if device.type == "cuda":
        available: int | None = torch.cuda.mem_get_info(device)[0]
    else:
        available = available_memory()
    room = (1 << 62) if available is None else available  # unknown: still refuse 64-bit overflow
    if needed <= room:
        return 0 if device.type == "cuda" else needed
    left = "" if available is None else f", but {available / 2**20:,.1f} MiB is left here"
    raise ValueError(
        f"a head of --hidden {','.join(map(str, hidden))} on {dim}-wide embeddings has "
        f"{params:,} parameters, {needed / 2**20:,.1f} MiB with their gradients and AdamW's "
        f"moments{left}; give narrower --hidden widths (the paper's are 512,512)"
    )


def check_memory(index: CacheIndex, stream: StreamConfig, *, reserved: int = 0) -> None:
    """Refuse a stream whose rows held would not fit in the memory left (the kernel would kill
    the run part way, with no message), with a ``--shuffle-rows`` that fits, if one does;
    ``reserved``: bytes of it the head takes."""
    needed, available = held_bytes(index, stream), available_memory()
    if available is None or needed <= (available := max(0, available - reserved)):
        return
    fits, budget = stream.shuffle_rows, 0.8 * available
    while (held := held_bytes(index, replace(stream, shuffle_rows=fits))) > budget and fits > 1:
        fits //= 2
    fitting = held <= budget
    raise ValueError(
        f"the shuffle pool would hold {needed / 2**20:,.1f} MiB of rows (--shuffle-rows "
        f"{stream.shuffle_rows:,} of {index.dim}-wide {index.dtype} embeddings, and the reads "
        f"ahead), but {available / 2**20:,.1f} MiB of memory is left here; "
        + (f"lower --shuffle-rows (to {fits:,}, say) or " if fitting else "")
        + "train where there is more memory"
    )


def _restore(
    output: str,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    data: dict[str, Any],
    index: CacheIndex,
) -> tuple[int, StreamState]:
    """``--resume``: the episodes done and the stream's position of the checkpoint in
    ``output``, loaded into ``head`` and ``optimizer``; (0, the start) if there is none.
    Refuses a position past a pass over ``index``: what a checkpoint that predates its
    ``data`` record says of its caches."""
    restored = load_checkpoint(
        output, head=head, optimizer=optimizer, settings=config.identity(), data=data
    )
    if restored is None:
        log.warning("--resume: no checkpoint in %s; training from the start", output)
        return 0, StreamState()
    position = restored[1]
    windows = len(index.row_groups())  # a pass reads one window per row group
    if position.window >= windows:  # the reader would wait for a window no pass has
        raise ValueError(
            f"cannot resume from {output}: its checkpoint's reader stopped at window "
            f"{position.window} of pass {position.pass_index}, past the {windows} windows of "
            "a pass over this run's caches, so it was trained on other caches (a checkpoint "
            "of a pvu that did not record its caches is checked no further); pass the --cache "
            "it was trained on, or use another --output"
        )
    log.info("resuming %s after episode %d", output, restored[0])
    return restored


def _log_passes(schedule: ScheduleConfig, train_rows: float, epochs: int) -> None:
    """Log how many passes over the cache the schedule makes; warn when views repeat."""
    samples = schedule.episodes * schedule.episode_size
    passes = samples / train_rows
    log.info(
        "schedule: %s samples = %.2f passes over ~%s training rows (%s cached, so %.1f views "
        "of each image)",
        *(f"{samples:,}", passes, f"{train_rows:,.0f}", counted(epochs, "epoch"), passes * epochs),
    )
    if passes > 1.0:
        log.warning(
            "the schedule makes %.2f passes over the cache: each of its %s "
            "is seen ~%.1f times, so augmented views repeat; cache more epochs (pvu cache "
            "--epochs) for fresh views, or shorten the schedule (--episodes x --episode-size "
            "samples; one pass is ~%s)",
            *(passes, counted(epochs, "augmented epoch"), passes, f"{train_rows:,.0f}"),
        )


def _run_episode(
    episode: int,
    head: UncertaintyHead,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    stream: CacheStream,
    config: TrainConfig,
    options: RunOptions,
) -> dict[str, Any]:
    """Train on one episode's rows; returns its metrics record (without validation)."""
    sched = config.schedule
    lr = learning_rate(episode, sched)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(head.parameters()).device
    head.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    start, seen = time.perf_counter(), 0
    while seen < sched.episode_size:
        size = min(sched.batch_size, sched.episode_size - seen)
        batch = stream.next_batch(size)
        embedding = batch.embedding.to(device, non_blocking=True)
        target = batch.loss.to(device, non_blocking=True)
        value = train_step(
            head, optimizer, objective, embedding, target, precision=config.precision
        )
        total += value * size
        seen += size
        if options.on_batch:
            options.on_batch(size)
    seconds = time.perf_counter() - start
    return {
        "episode": episode + 1,
        "samples": (episode + 1) * sched.episode_size,
        "train_loss": float(total) / sched.episode_size,
        "lr": lr,
        "seconds": round(seconds, 3),
        "samples_per_s": round(sched.episode_size / seconds, 1),
    }
