"""Evaluate heads and baselines on eval caches: metrics, analyses and applications.

Reads like the evaluation it is: per dataset, load the cache -> uncertainty per source ->
exact leave-one-out 1-NN -> R-AUROC / Recall@1 -> ambiguity and safe retrieval; then ID vs OOD
across datasets, deterioration curves and the t-SNE map. Returns the report document
(``schemas/report.schema.json``) and the arrays its figures are drawn from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.cache.index import CacheIndex, open_cache
from pipeline.cache.manifest import spelled_out
from pipeline.evaluate.analyses import (
    DeterioratedSet,
    deterioration_curves,
    id_vs_ood,
    real_ambiguous,
)
from pipeline.evaluate.evalset import (
    EvalSet,
    check_eval_transform,
    check_one_epoch,
    index_epochs,
    read_eval_set,
)
from pipeline.evaluate.knn import BLOCK_BYTES, nearest_neighbours, normalize
from pipeline.evaluate.metrics import auroc, neighbour_correct, r_auroc
from pipeline.evaluate.retrieval import most_uncertain, retrieval_errors
from pipeline.evaluate.sources import (
    BACKBONE_FIELDS,
    BASELINES,
    LoadedHead,
    check_head_fits,
    load_heads,
    shown,
    uncertainties,
)
from pipeline.evaluate.tsne import TsnePoints, pick_rows, tsne_map
from pipeline.head.export import image_input
from pipeline.named import counted
from pipeline.precision import exact_float32

log = logging.getLogger(__name__)

REPORT_VERSION = 1
UPSTREAM = "upstream"
MIN_TSNE_POINTS = 5
Track = Callable[[str, int], Callable[[int], None]]
"""``track(description, total)`` returns ``advance(n)``: how the runner reports progress."""


def no_progress(description: str, total: int) -> Callable[[int], None]:
    """A :data:`Track` that reports nothing."""
    return lambda n: None


@dataclass(frozen=True)
class EvaluateOptions:
    """What to evaluate and how (the job validates it before it gets here)."""

    heads: tuple[str, ...]
    datasets: tuple[tuple[str, str], ...]
    upstream: str | None = None
    deteriorated: tuple[str, ...] = ()
    reject_fraction: float = 0.1
    ambiguity: Literal["auto", "column", "real", "none"] = "auto"
    ambiguity_threshold: float = 0.0
    tsne_dataset: str | None = None
    tsne_classes: tuple[int, ...] | None = None
    tsne_max_classes: int = 6
    tsne_points: int = 1500
    seed: int = 0
    device: str = "cpu"
    block_bytes: int = BLOCK_BYTES


@dataclass
class Evaluation:
    """The report document and the arrays behind its figures."""

    report: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    ambiguous: dict[str, np.ndarray] = field(default_factory=dict)
    deteriorated: list[DeterioratedSet] = field(default_factory=list)
    tsne: TsnePoints | None = None


@exact_float32()  # the heads' uncertainties and the searches as on a CPU: no TF32 on a GPU
def evaluate(options: EvaluateOptions, *, track: Track = no_progress) -> Evaluation:
    """Run every metric, analysis and application ``options`` asks for."""
    heads = load_heads(list(options.heads), device=options.device)
    named = list(options.datasets) + ([(UPSTREAM, options.upstream)] if options.upstream else [])
    inputs = [*named, *((url, url) for url in options.deteriorated)]
    indexes = _check_inputs(inputs, heads)
    for name, url in named:  # searched for neighbours, unlike the deteriorated copies
        _check_searchable(name, url, indexes[url].rows)
    _check_one_decode(list(options.deteriorated), indexes)
    tsne_dataset = options.tsne_dataset or named[0][0]
    result = Evaluation(report={})
    entries = []
    for name, url in named:
        data = _load(name, url, indexes[url], track)
        tsne_rows = _tsne_rows(data, options) if name == tsne_dataset else None
        if not result.report:
            result.report = _header(options, heads, data)
        scores = uncertainties(data, heads, device=options.device, seed=options.seed)
        result.scores[name] = scores
        entries.append(_evaluate_set(data, scores, options, result, track))
        entries[-1]["role"] = UPSTREAM if options.upstream and name == UPSTREAM else "downstream"
        if tsne_rows is not None:
            tsne = _tsne(data, tsne_rows, scores, heads, options.seed)
            result.tsne, result.report["tsne"] = tsne or (None, None)
    if options.upstream:
        _add_id_vs_ood(entries, result.scores)
    for url in options.deteriorated:
        data = _load(url, url, indexes[url], track)
        if not len(data):  # a curve point of no rows: its medians, and the curve's rho, are NaN
            raise ValueError(
                f"--deterioration cache {url}: every one of its {counted(data.dropped, 'row')} "
                "has a NaN/inf embedding, max_prob or entropy; cache it again, or leave it out"
            )
        kind = data.deterioration or {"kind": None, "strength": 0.0}
        scores = uncertainties(data, heads, device=options.device, seed=options.seed)
        result.deteriorated.append(DeterioratedSet(kind["kind"], float(kind["strength"]), scores))
    result.report["datasets"] = entries
    incomplete = [
        {"url": url, "note": note}
        for index in indexes.values()
        for url, note in index.incomplete.items()
    ]
    if incomplete:
        result.report["incomplete_caches"] = incomplete
    result.report["deterioration"] = (
        {"caches": list(options.deteriorated), "kinds": deterioration_curves(result.deteriorated)}
        if result.deteriorated
        else None
    )
    return result


def _check_inputs(inputs: list[tuple[str, str]], heads: list[LoadedHead]) -> dict[str, CacheIndex]:
    """Every input cache's index (``(name, url)`` pairs), each checked against its storage, the
    first cache's backbone and every head before any row is read: a mismatch in the last
    cache is named in seconds, not after the others are evaluated."""
    indexes = {url: open_cache([url], need_loss=False) for _, url in inputs}
    first = indexes[inputs[0][1]].files[0].provenance
    for name, url in inputs:
        provenance = indexes[url].files[0].provenance
        check_eval_transform(name, url, provenance)
        check_one_epoch(name, url, index_epochs(indexes[url]))
        for key in BACKBONE_FIELDS:
            if provenance.get(key) != first.get(key):
                raise ValueError(
                    f"{name}: cache {url} has {key} {shown(provenance.get(key))}, but the first "
                    f"cache has {shown(first.get(key))}; a report compares one backbone"
                )
        for head in heads:
            check_head_fits(head, name, url, provenance, indexes[url].dim)
    return indexes


def _check_searchable(name: str, url: str, rows: int) -> None:
    """Refuse the cache ``name`` at ``url`` if its ``rows`` are too few for a 1-NN search."""
    if rows < 2:
        raise ValueError(f"{name}: cache {url} has {counted(rows, 'row')}, Recall@1 needs 2")


def _check_one_decode(deteriorated: list[str], indexes: dict[str, CacheIndex]) -> None:
    """Refuse ``--deterioration`` caches decoded two ways: a curve would then compare the
    decoders (~0.3 levels apart) along with the deteriorations."""
    by_decode: dict[str, list[str]] = {}
    for url in deteriorated:
        transform = spelled_out(indexes[url].files[0].provenance).get("transform") or {}
        by_decode.setdefault(transform.get("decode", "pil"), []).append(url)
    if len(by_decode) > 1:
        decodes = "; ".join(f"{decode}: {', '.join(urls)}" for decode, urls in by_decode.items())
        raise ValueError(
            f"--deterioration caches were decoded two ways ({decodes}); a curve compares one "
            "decode's images (deteriorated caches are made with --decode pil, so make the "
            "clean one with it too)"
        )


def _add_id_vs_ood(entries: list[dict[str, Any]], scores: dict[str, dict[str, np.ndarray]]) -> None:
    """Each downstream entry's AUROC of every source separating it from the upstream set."""
    for entry in entries:
        if entry["role"] == "downstream":
            for source, values in entry["sources"].items():
                values["id_vs_ood_auroc"] = id_vs_ood(
                    scores[UPSTREAM][source], scores[entry["name"]][source]
                )


def _load(name: str, url: str, index: CacheIndex, track: Track) -> EvalSet:
    return read_eval_set(name, url, index, on_rows=track(f"read {name}", index.rows))


def _header(options: EvaluateOptions, heads: list[LoadedHead], data: EvalSet) -> dict[str, Any]:
    prov = data.provenance
    return {
        "report_version": REPORT_VERSION,
        "backbone": {
            "name": prov.get("backbone"),
            "weights_digest": prov.get("weights_digest"),
            "embedding_dim": int(data.embedding.shape[1]),
            **({"model_kwargs": prov["model_kwargs"]} if prov.get("model_kwargs") else {}),
        },
        "settings": {
            "reject_fraction": options.reject_fraction,
            "ambiguity": options.ambiguity,
            "ambiguity_threshold": options.ambiguity_threshold,
            "seed": options.seed,
        },
        "sources": [
            {"name": h.name, "kind": "head", "path": h.path, "input": h.document.get("input")}
            for h in heads
        ]
        + [{"name": name, "kind": "baseline"} for name in BASELINES],
        "tsne": None,
    }


def _evaluate_set(
    data: EvalSet,
    scores: dict[str, np.ndarray],
    options: EvaluateOptions,
    result: Evaluation,
    track: Track,
) -> dict[str, Any]:
    """The report entry of one dataset: Recall@1 and, per source, every metric on it."""
    _check_searchable(data.name, data.url, len(data))  # rows dropped as non-finite count
    unit = normalize(data.embedding)
    full = nearest_neighbours(
        unit,
        device=options.device,
        block_bytes=options.block_bytes,
        on_chunk=track(f"1-NN {data.name}", len(data)),
    )
    correct = neighbour_correct(data.labels, full.index)
    if correct.all() or not correct.any():
        classes = len(np.unique(data.labels))
        log.warning(
            "%s: %s row's nearest neighbour has its label (%d %s): R-AUROC is n/a, with no "
            "right and wrong retrievals to rank",
            *(data.name, "every" if correct.all() else "no", classes),
            "class" if classes == 1 else "classes",
        )
    classifier = data.label_space == "classifier"
    hit = data.pred == data.labels
    flags, ambiguity = _ambiguity(data, options)
    if flags is not None:
        result.ambiguous[data.name] = flags
    known = None if flags is None else ~np.isnan(flags)
    searched = track(f"safe retrieval {data.name}", 2 * len(scores))  # per source and variant

    def safe_retrieval(u: np.ndarray, groups: np.ndarray | None) -> dict[str, float | int]:
        rejected = most_uncertain(u, options.reject_fraction, groups)
        errors = retrieval_errors(
            unit,
            data.labels,
            full,
            rejected,
            device=options.device,
            block_bytes=options.block_bytes,
        )
        searched(1)
        return errors

    sources = {}
    for source, u in scores.items():
        sources[source] = {
            "r_auroc": r_auroc(u, correct),
            "classifier_auroc": auroc(hit, -u) if classifier else None,
            "id_vs_ood_auroc": None,
            "ambiguity_auroc": None if flags is None else auroc(flags[known] > 0, u[known]),
            "safe_retrieval": {
                variant: safe_retrieval(u, groups)
                for variant, groups in (("per_class", data.labels), ("class_agnostic", None))
            },
        }
    _warn_none_rejected(data, sources, options.reject_fraction)
    return {
        "name": data.name,
        "url": data.url,
        "n": len(data),
        "dropped_rows": data.dropped,
        "classes": len(np.unique(data.labels)),
        "label_space": data.label_space,
        "input": image_input(data.provenance),
        "recall_at_1": float(correct.mean()),
        "classifier_accuracy": float(hit.mean()) if classifier else None,
        "ambiguity": ambiguity,
        "sources": sources,
    }


def _warn_none_rejected(data: EvalSet, sources: dict[str, dict[str, Any]], fraction: float) -> None:
    """Warn of each safe-retrieval variant of ``data`` that rejected no row: the
    ``fraction`` of each group rounds down to 0, so its "clean" errors are the full one's."""
    first = next(iter(sources.values()))["safe_retrieval"]
    for variant, largest in (
        ("per_class", int(np.unique(data.labels, return_counts=True)[1].max())),
        ("class_agnostic", len(data)),
    ):
        if first[variant]["queries"] == len(data):
            log.warning(
                "%s: safe retrieval (%s) rejects no row: --reject-fraction %g of %s rounds "
                "down to 0, so its clean errors equal the full one; raise --reject-fraction",
                *(data.name, variant.replace("_", "-"), fraction),
                ("its largest class's " if variant == "per_class" else "")
                + counted(largest, "row"),
            )


def _ambiguity(
    data: EvalSet, options: EvaluateOptions
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """Per-row ambiguity flags (1 ambiguous, 0 clear, NaN unknown) and their summary."""
    flags = None
    origin = None
    if options.ambiguity in ("auto", "column") and data.ambiguity is not None:
        known = ~np.isnan(data.ambiguity)
        if known.any():
            flags = np.where(known, data.ambiguity > options.ambiguity_threshold, np.nan)
            origin = "column"
    if flags is None and options.ambiguity in ("auto", "real"):
        real = real_ambiguous(data.keys)
        if real is not None:
            flags, origin = real.astype(np.float64), "imagenet_real"
    if flags is None:
        if options.ambiguity in ("column", "real"):
            log.warning(
                "%s: --ambiguity %s asked for, but it has none for its rows; its ambiguity "
                "analysis is skipped",
                *(data.name, options.ambiguity),
            )
        return None, None
    return flags, {
        "origin": origin,
        "ambiguous": int(np.sum(flags == 1)),
        "clear": int(np.sum(flags == 0)),
        "unknown": int(np.sum(np.isnan(flags))),
    }


def _tsne_rows(data: EvalSet, options: EvaluateOptions) -> np.ndarray | None:
    """The rows of ``data`` the t-SNE map shows: of ``--tsne-classes`` (refused when they hold
    too few, as soon as the set is read; absent ones warned of), else of the most frequent
    classes (None when those hold too few)."""
    classes = list(options.tsne_classes) if options.tsne_classes else None
    rows = pick_rows(
        data.labels,
        classes,
        max_classes=options.tsne_max_classes,
        max_points=options.tsne_points,
        seed=options.seed,
    )
    absent = sorted(set(classes or ()) - set(np.unique(data.labels).tolist()))
    if absent and len(absent) < len(classes or ()):
        log.warning("t-SNE of %s: --tsne-classes %s hold no row there", data.name, absent)
    if len(rows) < MIN_TSNE_POINTS:
        if classes is not None:
            raise ValueError(
                f"t-SNE of {data.name}: only {counted(len(rows), 'row')} in --tsne-classes "
                f"{classes}"
            )
        log.warning(
            "%s: %s, too few for a t-SNE map; skipped", data.name, counted(len(rows), "row")
        )
        return None
    return rows


def _tsne(
    data: EvalSet,
    rows: np.ndarray,
    scores: dict[str, np.ndarray],
    heads: list[LoadedHead],
    seed: int,
) -> tuple[TsnePoints, dict[str, Any]] | None:
    """The t-SNE map of ``rows`` of ``data``, coloured by the first head (else entropy); None
    when they hold too few distinct embeddings."""
    source = heads[0].name if heads else "entropy"
    rows = rows[np.linalg.norm(data.embedding[rows].astype(np.float32), axis=1) > 0]
    unit = normalize(data.embedding[rows])
    distinct = len(np.unique(unit, axis=0))
    if distinct < MIN_TSNE_POINTS:  # scikit-learn's t-SNE crashes the process on identical rows
        log.warning(
            "%s: the chosen rows hold %s, too few for a t-SNE map; skipped",
            data.name,
            counted(distinct, "distinct non-zero embedding"),
        )
        return None
    xy = tsne_map(unit, seed=seed)
    points = TsnePoints(xy, data.keys[rows], data.labels[rows], scores[source][rows])
    entry = {
        "dataset": data.name,
        "source": source,
        "classes": sorted(int(c) for c in np.unique(points.labels)),
        "points": len(rows),
    }
    return points, entry
