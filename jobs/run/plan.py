"""``pvu plan``: a dry run of ``pvu cache`` that says what a job will cost before it starts.

Takes exactly the cache job's flags (plus how to sample and rate GPUs), reads the shard list
and the first few hundred samples, and really decodes, augments, runs the backbone on and
writes that sample on this machine. Prints units, rows, bytes on storage and actor-hours;
starts no Ray and writes nothing to ``--output``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import torch
from pydantic import Field
from rich.table import Table

from jobs.preflight import check_storage
from jobs.run.cache import (
    archives_advice,
    build_provenance,
    check_outputs,
    check_outputs_apart_from_shards,
    checked_backbones,
    member_advice,
    unit_settings,
    warn_of_label_order,
)
from jobs.run.cache_config import CacheJobConfig
from jobs.terminal import binary_size, console, summary_table
from pipeline.cache.augment import resolve_transform
from pipeline.cache.backbone import Backbone, BackboneInfo, Compute, create_backbone_model
from pipeline.cache.info import read_cache_info
from pipeline.cache.manifest import MANIFEST_NAME, provenance_differences
from pipeline.cache.plan import (
    Estimate,
    Measurement,
    ShardPrefix,
    estimate,
    forward_rate,
    measure,
    sample_shards,
    shard_sizes,
)
from pipeline.cache.shards import check_committed_sources, expand_shards, shard_names
from pipeline.cache.verify import check_cache, list_unit_files, rewritten_by_the_pass
from pipeline.named import counted

log = logging.getLogger("pvu.plan")


class PlanJobConfig(CacheJobConfig):
    """The cache job's configuration, plus how the plan samples and rates GPUs."""

    sample_images: int = Field(default=256, ge=1)
    images_per_second_per_gpu: float | None = Field(default=None, gt=0, allow_inf_nan=False)


@dataclass(frozen=True)
class Plan:
    """What ``pvu plan`` found: the estimate, the measured sample and the GPU rate used."""

    estimate: Estimate
    measurement: Measurement
    threads: int
    gpu_rate: float | None
    gpu_rate_source: str
    shares_decode: bool = False  # an --also target: the first backbone's pass decodes for it
    #: An --also-deteriorate copy: the first backbone's measurement, its own units done.
    copy: bool = False


def committed_units(
    config: PlanJobConfig, provenance: dict[str, Any], sizes: dict[str, int]
) -> set:
    """(epoch, shard URL) units the output already holds (with or without its manifest: pvu
    cache adopts units it finds) of the shards ``sizes`` lists (URL -> bytes); ``ValueError``
    if ``pvu cache`` would refuse the output because it holds a different cache, or units of
    shards rebuilt since."""
    urls = list(sizes)
    fs, root = fsspec.core.url_to_fs(config.output)
    root = root.rstrip("/")
    manifest = fs.exists(f"{root}/{MANIFEST_NAME}")
    if not manifest and not list_unit_files(config.output):
        return set()  # nothing there yet, or an empty folder: every unit is to do
    try:  # without a manifest: its units' footers, as cache reads them to adopt the units
        info = read_cache_info(config.output)
    except ValueError as error:
        if manifest:
            raise
        # cache recomputes a damaged unit and leaves a foreign file alone
        log.warning("planned --output %s as if empty: %s", config.output, error)
        return set()
    differences = provenance_differences(info.provenance, provenance)
    if differences:
        raise ValueError(
            f"pvu cache would refuse --output {config.output}: it holds another cache; "
            + "; ".join(differences)
        )
    if not info.rows:
        return set()  # a cache without a row is computed afresh by pvu cache
    units = info.units
    if manifest:  # pvu cache recomputes a listed unit missing or resized, but one the
        # duplicate-key pass rewrote before a kill it keeps: done
        check = check_cache(config.output, units, info.provenance, footers=False)
        kept = rewritten_by_the_pass(check, units, info.provenance)
        units = {
            relpath: kept.get(relpath, unit)
            for relpath, unit in units.items()
            if relpath not in check.damaged or relpath in kept
        }
    by_name = dict(zip(shard_names(urls), urls, strict=True))
    check_committed_sources(units, by_name, sizes, config.output.rstrip("/"))
    return {
        (unit["epoch"], by_name[unit["shard"]])
        for unit in units.values()
        if unit["shard"] in by_name and unit["epoch"] < config.epochs
    }


def run_plan(config: PlanJobConfig) -> list[Plan]:
    """Sample the shards once, then measure each backbone of the job (the first, then each
    ``--also`` target) on the sample on this machine and extrapolate to the job; one plan per
    cache of the job (:meth:`CacheJobConfig.targets`). An ``--also-deteriorate`` copy is not
    measured again: it is the first backbone's model on the same samples, so its rows, bytes
    and forwards are the first plan's, less the units its own output holds."""
    check_storage(config.shards, flag="--shards")
    check_outputs(config)  # as pvu cache checks them
    urls = expand_shards(config.shards)
    shard_names(urls)  # refuses what pvu cache refuses: two shards of one name
    check_outputs_apart_from_shards(config, urls)  # and an output that holds the shards
    for target in config.targets():
        warn_of_label_order(target, urls)  # as pvu cache warns
    infos = checked_backbones(config)  # as pvu cache refuses, every one before any work
    sizes = shard_sizes(urls)
    prefixes = sample_shards(sizes, config.sample_images)
    if not any(prefix.samples for prefix in prefixes.values()):
        named = ", ".join(list(prefixes)[:3]) + (", ..." if len(prefixes) > 3 else "")
        raise ValueError(
            f"--shards {config.shards}: the {len(prefixes)} shards sampled hold no samples "
            f"({named}): empty, damaged from their start, or not tar files; pvu cache would "
            "count each as empty_shard or truncated_tar"
        )
    sample = (urls, sizes, prefixes)
    plans: list[Plan] = []
    for (flag, target), info in zip(config.flagged_targets(), infos, strict=True):
        if flag == "--also-deteriorate":
            plans.append(_plan_copy(target, info, sample, plans[0]))
        else:
            plans.append(_plan_target(target, info, sample, first=not plans))
    return plans


def _provenance(config: PlanJobConfig, info: BackboneInfo) -> tuple[dict, dict[str, Any]]:
    """The resolved transform and the provenance ``pvu cache`` records for ``config``'s cache
    (``info``: its backbone's probe)."""
    transform = resolve_transform(config.transform_config(), info.data_config)
    # No Ray here: the cache actors' device is taken to be a GPU when --gpus-per-actor asks for
    # one or this machine has one.
    on_gpu = bool(config.gpus_per_actor) or torch.cuda.is_available()
    compute = Compute.resolve("cuda" if on_gpu else "cpu", config.precision)
    return transform, build_provenance(config, info, transform, compute)


def _plan_copy(
    config: PlanJobConfig,
    info: BackboneInfo,
    sample: tuple[list[str], dict[str, int], dict[str, ShardPrefix]],
    first: Plan,
) -> Plan:
    """The plan of an ``--also-deteriorate`` copy: ``first``'s measurement, extrapolated over
    the units its own output lacks (refused, as ``pvu cache`` would, if it holds another
    cache)."""
    _, sizes, prefixes = sample
    done = committed_units(config, _provenance(config, info)[1], sizes)
    return replace(
        first,
        estimate=estimate(
            sizes=sizes,
            prefixes=prefixes,
            measurement=first.measurement,
            epochs=config.epochs,
            done=done,
        ),
        shares_decode=True,
        copy=True,
    )


def _plan_target(
    config: PlanJobConfig,
    info: BackboneInfo,
    sample: tuple[list[str], dict[str, int], dict[str, ShardPrefix]],
    *,
    first: bool,
) -> Plan:
    """The plan of one backbone (``info``: its probe); ``first``: the one whose pass decodes
    (``--also`` targets share it), and which ``--images-per-second-per-gpu`` rates."""
    _, sizes, prefixes = sample
    transform, provenance = _provenance(config, info)
    done = committed_units(config, provenance, sizes)
    model = create_backbone_model(config.backbone, config.weights, config.model_kwargs)
    settings = unit_settings(config, info, transform, provenance, Compute())  # measured on CPU
    with console.status(f"measuring {config.backbone} on the sampled images on this machine"):
        measurement = measure(Backbone(model, torch.device("cpu")), settings, prefixes)
        gpu_rate = config.images_per_second_per_gpu if first else None
        source = "--images-per-second-per-gpu"
        if gpu_rate is None and torch.cuda.is_available():
            autocast = Compute.resolve("cuda", config.precision).autocast_dtype
            backbone = Backbone(model, torch.device("cuda"), autocast)
            gpu_rate = forward_rate(backbone, transform["input_size"], config.batch_size)
            source = f"measured here on {torch.cuda.get_device_name()}, forward only"
    return Plan(
        estimate(
            sizes=sizes, prefixes=prefixes, measurement=measurement, epochs=config.epochs, done=done
        ),
        measurement,
        torch.get_num_threads(),
        gpu_rate,
        source if gpu_rate else "",
        shares_decode=not first,
    )


def _hours(rows: int, rate: float) -> str:
    """How long ``rows`` take at ``rate`` rows per second, in hours (minutes when short)."""
    if not rate:
        return "-"
    hours = rows / rate / 3600
    return f"{hours:,.2f} h" if hours >= 1 else f"{hours * 60:,.1f} min"


def describe(plan: Plan, config: PlanJobConfig) -> Table:
    """The plan of one backbone (``config``: its own target) as a two-column table."""
    est, m = plan.estimate, plan.measurement
    title = f"pvu plan: what `pvu cache` will do for {config.backbone} into {config.output}"
    table = summary_table(title)
    how = (
        "all counted"
        if est.counted_shards == est.shards
        else f"{est.counted_shards:,} counted, the others estimated from their size"
    )
    table.add_row("shards", f"{est.shards:,} ({how})")
    epochs = counted(est.epochs, "epoch")
    table.add_row("units", f"{est.units:,} ({epochs}), {est.units_done:,} already in --output")
    about = "" if est.counted_shards == est.shards else "~"  # every shard counted: exact
    table.add_row("samples per epoch", f"{about}{est.samples:,}")
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(m.result.skipped.items())) or "none"
    table.add_row(
        "rows to compute",
        f"~{est.rows:,} ({m.kept:.1%} of the sample kept; skipped there: {skipped})",
    )
    table.add_row(
        "bytes on storage",
        f"~{est.bytes:,} ({binary_size(est.bytes)}: {m.bytes_per_row:,.0f} per row, "
        f"{m.unit_file_bytes:,.0f} per unit file)",
    )
    table.add_row(
        "measured sample",
        f"{counted(m.samples, 'image')} decoded, augmented, forwarded and written on this "
        f"machine's CPU ({counted(plan.threads, 'thread')}): {m.images_per_second:,.1f} images/s, "
        f"{m.cpu_seconds_per_image * 1000:,.1f} CPU-ms per image",
    )
    _add_time_rows(table, plan, config)
    return table


def _add_time_rows(table: Table, plan: Plan, config: PlanJobConfig) -> None:
    """The rows of ``describe`` that say how long the job takes: on CPUs, decoding, GPUs and,
    given ``--actors``, by the clock."""
    est, m = plan.estimate, plan.measurement
    # an --also target's images are decoded and augmented once, in the first backbone's pass
    cpu = m.cpu_seconds_per_image - (m.prepare_cpu_seconds_per_image if plan.shares_decode else 0)
    shared = ", decoding not counted: the first pass does it" if plan.shares_decode else ""
    table.add_row(
        "CPU actor-hours",
        f"{_hours(est.rows, m.images_per_second)} at the rate measured here; "
        f"{_hours(est.rows, 1 / cpu if cpu > 0 else 0)} of CPU time (divide by an actor's "
        f"cores){shared}",
    )
    decode_rate = 1 / m.prepare_seconds_per_image if m.prepare_seconds_per_image else 0.0
    on_gpu = config.decode == "device"  # a GPU actor decodes on its GPU, not its cores
    table.add_row(
        "decode + augment",
        "done once, in the first backbone's pass (--also)"
        if plan.shares_decode
        else f"{decode_rate:,.1f} images/s per core: {_hours(est.rows, decode_rate)} of one core"
        + (" (on CPUs; --decode device: on the GPU of a GPU node)" if on_gpu else ""),
    )
    if plan.gpu_rate:
        cores = plan.gpu_rate / decode_rate if decode_rate else 0.0
        feeding = (
            ""
            if plan.shares_decode or on_gpu
            else f"; feeding it takes ~{cores:,.1f} decode cores/GPU"
        )
        table.add_row(
            "GPU actor-hours",
            f"{_hours(est.rows, plan.gpu_rate)} at {plan.gpu_rate:,.0f} images/s per GPU "
            f"({plan.gpu_rate_source}){feeding}",
        )
    else:
        table.add_row(
            "GPU actor-hours",
            "not estimated: no GPU here; --images-per-second-per-gpu rates the first backbone"
            if plan.shares_decode
            else "not estimated: no GPU here; pass --images-per-second-per-gpu (a forward rate "
            "measured on the target GPU)",
        )
    if config.actors and not plan.shares_decode:  # --also: the pass's time is the sum
        rate = (
            plan.gpu_rate if plan.gpu_rate and config.gpus_per_actor != 0 else m.images_per_second
        )
        table.add_row(
            f"wall-clock, {counted(config.actors, 'actor')}", _hours(est.rows, rate * config.actors)
        )


def describe_copies(plans: list[Plan], configs: list[PlanJobConfig]) -> Table:
    """The ``--also-deteriorate`` copies (``plans``, ``configs``: their own targets) as one
    table, a row per copy: each is the first backbone's cache again, deteriorated otherwise."""
    backbone = configs[0].backbone
    table = summary_table(
        f"pvu plan: {_copies(len(plans), backbone)} (--also-deteriorate): the {backbone} "
        "table's rows, bytes and forwards, per copy"
    )
    for plan, config in zip(plans, configs, strict=True):
        est, how = plan.estimate, config.deteriorate
        table.add_row(
            f"{how.kind}:{how.strength:g}" if how else "-",
            f"{config.output}: ~{est.rows:,} rows, ~{binary_size(est.bytes)}; {est.units_done:,} "
            f"of {est.units:,} units already there",
        )
    return table


def _copies(count: int, backbone: str) -> str:
    """``2 deteriorated copies of resnet18``."""
    return f"{counted(count, 'deteriorated copy', 'deteriorated copies')} of {backbone}"


def print_plans(plans: list[Plan], config: PlanJobConfig) -> None:
    """Each backbone's plan as a table, the ``--also-deteriorate`` copies in one, and what the
    tables leave unsaid."""
    targets = config.targets()
    copies = [(plan, target) for plan, target in zip(plans, targets, strict=True) if plan.copy]
    backbones = [
        (plan, target) for plan, target in zip(plans, targets, strict=True) if not plan.copy
    ]
    for plan, target in backbones:
        console.print(describe(plan, target))
    if copies:
        console.print(describe_copies(*map(list, zip(*copies, strict=True))))
    if not plans[0].measurement.kept:
        skipped = plans[0].measurement.result.skipped
        log.warning(
            "`pvu cache` would cache no row: every sampled sample was skipped; %s%s",
            member_advice(config, skipped),
            archives_advice(skipped),
        )
    if len(plans) > 1:
        lead = config.backbone
        runs = f"{len(backbones)} backbones" if len(backbones) > 1 else lead
        terms = (
            "each table's actor-hours, less decoding for the --also ones"
            if len(backbones) > 1
            else "the table's actor-hours"
        )
        if copies:
            runs += f" and {_copies(len(copies), 'it' if len(backbones) == 1 else lead)}"
            terms += f"; once more per copy, {lead}'s less decoding"
        unmeasured = " (a copy's deterioration and transform add to it, not measured)"
        console.print(
            f"One pass runs {runs}: its time is the sum of their forwards' ({terms}), its "
            f"decoding the first table's{unmeasured if copies else ''}."
        )
