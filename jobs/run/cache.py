"""``pvu cache``: WebDataset shards -> per-(epoch, shard) Parquet cache of embeddings and losses.

Runs on a local Ray by default, or on a cluster with ``--ray-address`` (what ``ray job submit``
executes). Re-running the same command resumes: committed units are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import fsspec
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from jobs import project_version
from jobs.preflight import (
    check_apart,
    check_each_storage,
    check_holds_no_cache,
    check_holds_no_shards,
    check_not_in_a_cache,
    check_output_folder,
    check_storage,
)
from jobs.run.cache_config import CacheJobConfig
from jobs.run.ray_address import connect_ray
from jobs.terminal import (
    command_line,
    console,
    counted_bar,
    progress_bar,
    summary_table,
)
from pipeline.cache.augment import resolve_transform
from pipeline.cache.backbone import (
    BackboneInfo,
    Compute,
    describe_backbone,
    file_digest,
    model_key,
)
from pipeline.cache.dedupe import deduplicate
from pipeline.cache.distribute import (
    ActorPool,
    PoolReport,
    actor_device_type,
    plan_actors,
)
from pipeline.cache.lock import CacheLocked, RunLock
from pipeline.cache.manifest import Manifest
from pipeline.cache.shards import (
    check_committed_sources,
    expand_shards,
    listed_sizes,
    shard_names,
)
from pipeline.cache.skips import SHARD_DAMAGE, SkipReason
from pipeline.cache.unit import Unit, UnitResult, UnitSettings
from pipeline.cache.verify import reconcile
from pipeline.cache.writer import check_fits, clear_staging
from pipeline.dataset.convert import CLASSES_NAME
from pipeline.dataset.remap import order_mismatch, read_label_remap, read_names, remap_mismatch
from pipeline.named import NAMED, counted
from schemas import SCHEMA_VERSION

log = logging.getLogger("pvu.cache")


def build_provenance(
    config: CacheJobConfig, info: BackboneInfo, transform: dict, compute: Compute
) -> dict[str, Any]:
    """What this cache is: the fields that must match for two runs to share an output prefix."""
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": info.name,
        "weights_digest": info.weights_digest,
        "weights_state_digest": info.weights_state,
        **({"model_kwargs": config.model_kwargs} if config.model_kwargs else {}),
        "embedding_dim": info.embedding_dim,
        "num_classes": info.num_classes,
        "transform": transform,
        "seed": config.seed,
        "dtype": config.dtype,
        "label_remap_digest": file_digest(config.label_remap) if config.label_remap else None,
        "label_space": config.resolved_label_space,
        "ambiguity_key": config.ambiguity_key,
        "compute": compute.model_dump(),
        "project_version": project_version(),
    }


def alive_node_resources() -> list[dict[str, float]]:
    """Resources of each alive Ray node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def summarize(
    report: PoolReport,
    *,
    already: int,
    seconds: float,
    manifest: Manifest,
    duplicates: dict[str, int] | None = None,
) -> Table:
    """The job's closing summary of the first target's cache (``manifest``): units, rows,
    skips by reason, duplicate keys dropped, throughput, time per stage; and every unit that
    failed, in any target."""
    results, failed = report.results, report.failed
    rows = sum(result.rows for result in results)
    table = summary_table("pvu cache: summary")
    table.add_row("output", manifest.root)
    table.add_row(
        "units done / already committed / failed",
        f"{len(results)} / {already} / {len(failed_in(report, 0))}",
    )
    table.add_row("rows computed (this run)", f"{rows:,}")  # before duplicates dropped
    table.add_row("rows in cache", f"{manifest.rows:,}")
    skipped: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for result in results:
        skipped.update(result.skipped)
        stages.update(result.timings)
    table.add_row(
        "samples skipped", ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    )
    damaged = sorted({r.source for r in results if r.skipped.keys() & SHARD_DAMAGE})
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        table.add_row(
            Text("shards empty or cut short", style="yellow"),
            f"{', '.join(damaged[:3])}{more}: samples past the damage (an empty shard's all) are "
            "not cached (see the warnings); to cache a repaired shard, delete its units and run "
            "the same command",
        )
    if duplicates:
        dropped = sum(duplicates.values())
        table.add_row(
            "duplicate keys dropped",
            Text.from_markup(
                f"{counted(dropped, 'row')} of {counted(len(duplicates), 'unit')}, the key's first "
                "row kept (in shard order)" + _restarted_keys_note(dropped, manifest.rows)
            ),
        )
    table.add_row("throughput", f"{rows / seconds:,.1f} images/s over {seconds:,.1f} s")
    table.add_row(
        "seconds by stage (all actors)",
        ", ".join(f"{k}={v:,.1f}" for k, v in stages.items()) or "-",
    )
    for why in report.nodes_left_out.values():
        table.add_row(Text("NODE LEFT OUT", style="red"), why)
    named = sorted(failed.items())[:NAMED]
    for relpath, error in named:
        table.add_row(Text(f"FAILED {relpath}", style="red"), error)
    if len(failed) > len(named):
        table.add_row(
            Text(f"FAILED ... and {len(failed) - len(named):,} more", style="red"),
            "each is named in the log ('unit ... failed'); the same command tries them again",
        )
    return table


def failed_in(report: PoolReport, target: int) -> list[str]:
    """The units ``report`` has failed in the pool's ``target`` (each with no targets named
    failed in every one)."""
    return [r for r in report.failed if target in report.failed_targets.get(r, (target,))]


def unit_settings(
    config: CacheJobConfig,
    info: BackboneInfo,
    transform: dict,
    provenance: dict[str, Any],
    compute: Compute,
) -> UnitSettings:
    """What every unit of this job shares."""
    return UnitSettings(
        output=config.output,
        seed=config.seed,
        batch_size=config.batch_size,
        transform=transform,
        provenance=provenance,
        embedding_dim=info.embedding_dim,
        compute=compute,
        dtype=config.dtype,
        image_keys=config.image_keys,
        label_key=config.label_key,
        label_remap=config.label_remap,
        label_space=config.resolved_label_space,
        ambiguity_key=config.ambiguity_key,
        decode_workers=config.decode_workers,
    )


def run_cache(config: CacheJobConfig) -> PoolReport:
    """Run the cache job: every (epoch, shard) unit not yet committed, on Ray actors.

    One run per output prefix: a second is refused with ``CacheLocked`` naming the first.
    """
    check_storage(config.shards, flag="--shards")
    check_outputs(config)
    urls = expand_shards(config.shards)
    check_outputs_apart_from_shards(config, urls)
    owner = command_line()
    with contextlib.ExitStack() as stack:
        locks = [
            stack.enter_context(RunLock(target.output, owner=owner)) for target in config.targets()
        ]
        return _run_cache(config, urls, [lock.lost for lock in locks])


def storage_urls(config: CacheJobConfig) -> list[tuple[str, str]]:
    """``(flag, url)`` of the storage the job reads and writes: ``--shards`` and each target's
    output."""
    outputs = [(flag, target.output) for flag, target in config.flagged_targets()]
    return [("--shards", config.shards), *outputs]


def check_outputs(config: CacheJobConfig) -> None:
    """Refuse an ``--output`` (or another target's) that cannot be written, that lies
    inside another cache or another target's, or that holds another cache; creates nothing."""
    outputs = [(flag, target.output) for flag, target in config.flagged_targets()]
    for flag, url in outputs:
        check_output_folder(url, flag=flag)
        check_not_in_a_cache(url, flag=flag)
        check_holds_no_cache(url, flag=flag)
    check_apart(outputs)


@dataclass(frozen=True)
class _Target:
    """One backbone of the job and the cache it writes."""

    config: CacheJobConfig
    settings: UnitSettings
    manifest: Manifest


def checked_backbones(config: CacheJobConfig) -> list[BackboneInfo]:
    """Each backbone of the job (the first, then each ``--also`` target), described by a probe;
    refuses, before any work, one whose probe embeds past what ``--dtype`` holds, or a
    ``--label-remap`` past its classifier's classes."""
    size = config.transform_config().input_size
    probes: dict[str, BackboneInfo] = {}  # one probe per model (--also-deteriorate shares it)
    infos = []
    for c in config.targets():
        key = model_key(c.backbone, c.weights, c.model_kwargs)
        if key not in probes:
            probes[key] = describe_backbone(
                c.backbone, c.weights, input_size=size, model_kwargs=c.model_kwargs
            )
        infos.append(probes[key])
    for target, info in zip(config.targets(), infos, strict=True):
        check_fits(info.embedding_peak, target.dtype, f"backbone {info.name} (a probe)")
        check_label_remap(target, info.num_classes)
    return infos


def check_label_remap(config: CacheJobConfig, num_classes: int) -> None:
    """Refuse a ``--label-remap`` that maps a shard label past the classifier's classes: each
    such sample would be skipped, one warning apiece, naming the shard label only."""
    if config.label_remap is None or config.resolved_label_space != "classifier":
        return
    table = read_label_remap(config.label_remap)
    outside = (table >= num_classes).nonzero()[0]
    if len(outside):
        first = int(outside[0])
        raise ValueError(
            f"--label-remap {config.label_remap} maps {len(outside)} shard label(s) past the "
            f"{num_classes} classes of {config.backbone}'s classifier, e.g. {first} to "
            f"{int(table[first])}"
        )


def warn_of_label_order(config: CacheJobConfig, shards: list[str]) -> None:
    """Warn when the shards' ``classes.json`` names their labels in another order than the hub
    classifier's classes, with no ``--label-remap``: every loss would be against another
    class (``pvu shards`` numbers a folder's classes by name); with one, when it maps a label
    to a class of another name (a remap made for another head)."""
    if config.resolved_label_space != "classifier" or config.weights != "hub":
        return
    classes = f"{shards[0].rsplit('/', 1)[0]}/{CLASSES_NAME}"
    fs, path = fsspec.core.url_to_fs(classes)
    if not fs.isfile(path):
        return
    try:
        names = read_names(classes)
        warning = (_remap_warning if config.label_remap else _order_warning)(config, classes, names)
    except (OSError, ValueError) as error:  # not pvu's classes.json: nothing to compare
        log.debug("%s not compared with the classifier's classes: %s", classes, error)
        return
    if warning:
        log.warning("%s", warning)


def _remap_warning(config: CacheJobConfig, classes: str, names: list[str]) -> str | None:
    """What is wrong with ``--label-remap`` for the label ``names`` of ``classes``: a label
    it sends to a class of another name (a remap made for another head); None if nothing."""
    table = read_label_remap(config.label_remap).tolist()
    mismatch = remap_mismatch(names, table, config.backbone)
    if mismatch is None:
        return None
    return (
        f"--label-remap {config.label_remap} maps the labels of {classes} to classes of "
        f"{config.backbone}'s classifier of other names ({mismatch}): was it made for another "
        "head? The losses would be against other classes. Make it with `pvu label-remap "
        f"--classes {classes} --head {config.backbone}`"
    )


def _order_warning(config: CacheJobConfig, classes: str, names: list[str]) -> str | None:
    """What is wrong with the label ``names`` of ``classes``, with no remap: another order
    than the classifier's classes; None if nothing."""
    problem = order_mismatch(names, config.backbone)
    if problem is None:
        return None
    where, shared = problem
    fix = (
        f"Map them with `pvu label-remap --classes {classes} --head {config.backbone}` and "
        "--label-remap"
        if shared
        else "None of its names is one of the classifier's classes (synsets such as "
        "n01440764): give weights trained on these classes (--weights FILE)"
    )
    return (
        f"{classes} does not list the classes of {config.backbone}'s classifier in its order "
        f"({where}): the losses would be against other classes. {fix}, or cache with "
        "--label-space dataset (an evaluation cache of the dataset's own labels)"
    )


def check_outputs_apart_from_shards(config: CacheJobConfig, urls: list[str]) -> None:
    """Refuse an ``--output`` (or ``--also`` / ``--also-deteriorate`` target's) at or above
    the folder of a shard of ``urls``: pyarrow's dataset of that cache would read the tar
    files as Parquet."""
    for flag, target in config.flagged_targets():
        check_holds_no_shards(target.output, urls, flag=flag)


def _run_cache(
    config: CacheJobConfig, urls: list[str], locks_lost: list[threading.Event]
) -> PoolReport:
    names = shard_names(urls)
    by_name = dict(zip(names, urls, strict=True))
    sizes = listed_sizes(urls)
    for target in config.targets():
        warn_of_label_order(target, urls)
    infos = checked_backbones(config)
    # The actors' device is part of the provenance, so the cluster is planned first.
    connect_ray(config.ray_address)
    actors, gpus, cpus = plan_actors(
        alive_node_resources(),
        actors=config.actors,
        gpus_per_actor=config.gpus_per_actor,
        cpus_per_actor=config.cpus_per_actor,
    )
    compute = Compute.resolve(actor_device_type(gpus), config.precision)
    targets = [
        _open_target(target, info, compute, by_name, sizes, lost)
        for target, info, lost in zip(config.targets(), infos, locks_lost, strict=True)
    ]
    units = [
        Unit(source=url, shard=name, epoch=epoch, source_bytes=sizes.get(url))
        for epoch in range(config.epochs)
        for url, name in zip(urls, names, strict=True)
    ]
    # A unit runs if any backbone lacks it, for the backbones that lack it: a committed unit
    # is not computed again, and a cache that holds them all takes no part.
    todo = [u for u in units if not all(t.manifest.is_done(u.relpath) for t in targets)]
    running = [t for t in targets if not all(t.manifest.is_done(u.relpath) for u in todo)]
    lacking = {
        u.relpath: tuple(i for i, t in enumerate(running) if not t.manifest.is_done(u.relpath))
        for u in todo
    }
    lead = targets.index(running[0]) if running else 0  # whose results the report holds
    held = sum(targets[lead].manifest.is_done(u.relpath) for u in units)  # before the run
    for target in targets:  # until it ends, readers warn that units may be missing
        target.manifest.begin_run(len(units))
    log.info(
        "%s x %s = %s; %d already committed, %d to do",
        counted(len(urls), "shard"),
        counted(config.epochs, "epoch"),
        counted(len(units), "unit"),
        len(units) - len(todo),
        len(todo),
    )
    started = time.monotonic()
    report = PoolReport()
    if todo:
        log.info("%s, %g GPU and %g CPU each", counted(actors, "actor"), gpus, cpus)
        for target in targets:
            if target not in running:
                log.info("%s holds every unit: not computed again", target.manifest.root)
        pool = ActorPool(
            size=actors,
            gpus=gpus,
            cpus=cpus,
            backbone=running[0].config.backbone,
            weights=running[0].config.weights,
            settings=running[0].settings,
            max_attempts=config.max_attempts,
            unit_timeout=config.unit_timeout,
            also=tuple((t.config.backbone, t.config.weights, t.settings) for t in running[1:]),
            check=functools.partial(check_each_storage, storage_urls(config)),
        )
        report = _run_with_progress(pool, todo, lacking, [t.manifest for t in running], started)
        for target in running:  # the actors wrote there: this process's listings are stale
            fsspec.core.url_to_fs(target.config.output)[0].invalidate_cache()
    failed = [failed_in(report, running.index(t)) if t in running else [] for t in targets]
    _finish(
        config,
        report,
        targets,
        names,
        failed,
        lead=lead,
        already=held,
        started=started,
    )
    planned = {unit.relpath for unit in units}
    for target in targets:
        _warn_of_units_not_planned(target.manifest, planned)
    return report


def _warn_of_units_not_planned(manifest: Manifest, planned: set[str]) -> None:
    """Warn of units of ``manifest``'s cache that this run did not plan (of shards since left
    out of ``--shards``, or epochs past ``--epochs``): readers take their rows too."""
    others = {relpath: unit for relpath, unit in manifest.units.items() if relpath not in planned}
    if not others:
        return
    relpath, unit = min(others.items())
    rows = sum(u["rows"] for u in others.values())
    log.warning(
        "%s holds %s, %s, that this run's --shards and --epochs do not make (an "
        "earlier run's), e.g. %s (shard %s, epoch %d): pvu train-head and evaluate read them "
        "too; delete them, or cache into a new --output, to leave them out",
        *(manifest.root, counted(len(others), "unit"), counted(rows, "row"), relpath),
        *(unit["shard"], unit["epoch"]),
    )


def _open_target(
    target: CacheJobConfig,
    info: BackboneInfo,
    compute: Compute,
    by_name: dict[str, str],
    sizes: dict[str, int],
    lock_lost: threading.Event,
) -> _Target:
    """One backbone's cache, its manifest reconciled with storage and its committed units
    checked against this run's shards (``by_name``: name -> URL; ``sizes``: URL -> bytes);
    the manifest is not written once ``lock_lost`` is set."""
    transform = resolve_transform(target.transform_config(), info.data_config)
    provenance = build_provenance(target, info, transform, compute)
    manifest = reconcile(Manifest.open(target.output, provenance, lock_lost))
    _forget_if_empty(manifest)
    check_committed_sources(manifest.units, by_name, sizes, manifest.root)
    settings = unit_settings(target, info, transform, provenance, compute)
    return _Target(target, settings, manifest)


def _finish(
    config: CacheJobConfig,
    report: PoolReport,
    targets: list[_Target],
    names: list[str],
    failed: list[list[str]],
    *,
    lead: int = 0,
    already: int,
    started: float,
) -> None:
    """After the pool: each key once per epoch, the run recorded as ended with the units
    ``failed`` in each target, staging cleared (where none failed), the summary printed (of
    ``targets[lead]``, whose results ``report`` holds); a cache without rows is an error."""
    for target in targets:  # stopped by SIGTERM in a job; a library caller gets here
        if target.manifest.lock_lost.is_set():
            raise CacheLocked(f"lost the lock on {target.manifest.root} to another run")
    duplicates = _deduplicate_with_progress(targets, names)
    for target, its_failed in zip(targets, failed, strict=True):
        target.manifest.end_run(its_failed)
        if not its_failed:
            clear_staging(target.config.output)
    console.print(
        summarize(
            report,
            already=already,
            seconds=time.monotonic() - started,
            manifest=targets[lead].manifest,
            duplicates=duplicates[lead],
        )
    )
    for place, (target, its_failed) in enumerate(zip(targets, failed, strict=True)):
        if place == lead:
            continue
        rows, deteriorate = target.manifest.rows, target.config.deteriorate
        how = f" {deteriorate.kind}:{deteriorate.strength:g}" if deteriorate else ""
        lost = f", {counted(len(its_failed), 'unit')} failed (named above)" if its_failed else ""
        console.print(
            f"also {target.config.backbone}{how}: {rows:,} rows in {target.manifest.root}{lost}"
        )
    if not report.failed and not targets[0].manifest.rows:
        skipped = {reason for result in report.results for reason in result.skipped}
        if not skipped:
            raise ValueError(
                "the cache has no rows: its shards hold no sample's files (tars without "
                "members, or of folders and links alone, each named in a warning above): give "
                "shards of <key>.<image> files, such as pvu shards writes"
            )
        raise ValueError(
            "the cache has no rows: every sample was skipped (see 'samples skipped'); "
            f"{member_advice(config, skipped)} and run again (a cache without rows is computed "
            "afresh)"
            f"{archives_advice(skipped)}"
        )


def _deduplicate_with_progress(targets: list[_Target], names: list[str]) -> list[dict[str, int]]:
    """Later copies of a key (in shard order) leave their units, whichever run committed them;
    a cache without duplicates is only read. The keys read show as a bar per target; returns
    the rows dropped per rewritten unit, per target."""
    with counted_bar("duplicate keys", "units read", transient=True) as progress:

        def deduplicated(manifest: Manifest) -> dict[str, int]:
            task = progress.add_task("units", total=0)
            return deduplicate(
                manifest,
                names,
                on_read=lambda done, total: progress.update(task, completed=done, total=total),
            )

        return [deduplicated(target.manifest) for target in targets]


#: A share of rows dropped as duplicate keys past which the keys likely restart in each shard.
MANY_DUPLICATES = 0.1


def _restarted_keys_note(dropped: int, kept: int) -> str:
    """Advice when ``dropped`` is a large share of the rows: shards whose keys restart
    (``000000`` in each) keep only the first shard's samples of each key."""
    if dropped < MANY_DUPLICATES * (dropped + kept):
        return ""
    return (
        f"; [yellow]{dropped / (dropped + kept):.0%} of the rows[/yellow]: a key names one "
        "sample across all shards; if the shards' keys restart (000000 in each), all but one "
        "sample per key are lost: write them with unique keys (`pvu shards` does) and cache "
        "them into a new --output"
    )


def member_advice(config: CacheJobConfig, skipped: Collection[str] = ()) -> str:
    """What to set when every sample is skipped for the reasons ``skipped``: the flags that
    name a sample's members, or, when every skip is ``label_outside_head`` (the members were
    read), the flags that map its labels."""
    if set(skipped) == {SkipReason.LABEL_OUTSIDE_HEAD.value}:
        return (
            "no sample's label is a class of the classifier (label_outside_head): check "
            "--label-remap (pvu label-remap), or keep the dataset's own labels with "
            "--label-space dataset"
        )
    member, _, field = config.label_key.partition(":")
    label = f"<key>.{member}" + (f" (its field {field})" if field else "")
    return (
        f"if the shards' files are not <key>.{'/'.join(config.image_keys)} with {label}, "
        "set --image-key / --label-key"
    )


def archives_advice(skipped: Collection[str]) -> str:
    """A clause for ``member_advice`` when every sample was skipped for the reasons ``skipped``:
    all ``no_label`` is what per-class archives given as shards (a class's own tar holds no
    label member) give; empty otherwise."""
    if set(skipped) != {SkipReason.NO_LABEL.value}:
        return ""
    return (
        "; per-class archives (one class per tar, no label members, as ImageNet's "
        "n01440764.tar) are no shards: make them into shards with pvu shards --input "
        "FOLDER (the folder of the .tar files) and cache those"
    )


def _forget_if_empty(manifest: Manifest) -> None:
    """Forget the units of a cache without a row (every sample skipped, as when --image-key or
    --label-key named no member), so that a corrected run computes them instead of skipping."""
    if manifest.units and not manifest.rows:
        log.info("%s holds no rows: its units are computed again", manifest.root)
        for relpath in list(manifest.units):
            manifest.forget(relpath)


def _run_with_progress(
    pool: ActorPool,
    todo: list[Unit],
    lacking: dict[str, tuple[int, ...]],
    manifests: list[Manifest],
    started: float,
) -> PoolReport:
    """Run ``todo`` on ``pool`` under a progress bar, each unit for the backbones of the pass
    that are ``lacking`` it (by relpath, indices of ``manifests``), recording it in theirs."""
    images = 0
    with progress_bar(
        TextColumn("[bold]cache"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units {task.fields[rate]}"),
        TimeRemainingColumn(),
        plain="cache: {task.completed:,.0f}/{task.total:,.0f} units, {task.fields[rate]}",
    ) as progress:
        task = progress.add_task("units", total=len(todo), rate="")

        def on_result(result: UnitResult) -> None:  # one target's unit: a share of the unit
            nonlocal images
            manifests[result.target].record(result.relpath, result.manifest_entry())
            its = lacking[result.relpath]
            images += result.rows if result.target == its[0] else 0
            rate = images / max(time.monotonic() - started, 1e-9)
            advance = 1 / len(its)
            progress.update(task, advance=advance, rate=f"{images:,} images, {rate:,.1f}/s")

        stopped = True
        try:
            report = pool.run(todo, on_result, lacking)
            stopped = False
            return report
        finally:
            for manifest in manifests:
                _flush_after(manifest, stopped)


def _flush_after(manifest: Manifest, stopped: bool) -> None:
    """Write ``manifest`` after the pool; where an error ``stopped`` it (denied writes, say),
    a failed write is a warning, so that the error that stopped the run is the one told."""
    try:
        manifest.flush(force=True)
    except OSError as error:
        if not stopped:
            raise
        log.warning(
            "%s/_manifest.json not written (%s); the next run adopts the units committed from "
            "their footers",
            manifest.root,
            error,
        )
