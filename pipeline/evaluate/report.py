"""Write an evaluation: ``report.json`` (validated), ``report.md`` and the PNG/HTML figures."""

from __future__ import annotations

import contextlib
import json
import math
import re
import zlib
from typing import Any

import fsspec

from pipeline.evaluate import figures
from pipeline.evaluate.runner import UPSTREAM, Evaluation
from pipeline.evaluate.tsne import html_page
from pipeline.retry import make_folder, naming, write_bytes
from schemas import validate_report

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
_REPORT_BYTES = 2**26  # an earlier report.json larger than this is not one of ours
_FIGURE = re.compile(r"[\w.-]+\.png|tsne\.html")  # the names of the files a report draws


def write_report(evaluation: Evaluation, folder: str, *, pvu_version: str) -> str:
    """Write the report into ``folder`` (a local path or any fsspec URL; created); returns the
    URL of its ``report.md``. Figures that an earlier report in ``folder`` listed and this one
    does not draw are removed, so none is mistaken for this run's.

    ``evaluation.report`` becomes the document written (NaN as None, version, figures).
    """
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    report = finite({**evaluation.report, "pvu_version": pvu_version})
    with figures.plain_text():
        files = _figures(evaluation, report)
    validate_report(report)
    files[REPORT_MD] = markdown(report).encode()
    files[REPORT_JSON] = (json.dumps(report, indent=2) + "\n").encode()  # last: it lists the rest
    with naming(f"write the report into {folder}"):
        make_folder(fs, root)
        # the earlier report's own files first: a run stopped part-way leaves no report.json
        # (nor report.md) listing figures of two runs
        stale = sorted(_earlier_figures(fs, root) - set(files))
        for name in [REPORT_JSON, REPORT_MD, *stale]:
            # gone, or a folder: leave it; a store refusing the delete stops the report, as an
            # earlier report.json left beside new figures would read as this run's
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, ValueError):
                fs.rm(f"{root}/{name}")
    for name, data in files.items():
        write_bytes(fs, f"{root}/{name}", data)
    evaluation.report = report
    return f"{folder.rstrip('/')}/{REPORT_MD}"


def _earlier_figures(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """The figure files (``*.png``, ``tsne.html``) that the pvu report already in ``root``
    lists, if there is one; another tool's ``report.json`` lists nothing to remove."""
    path = f"{root}/{REPORT_JSON}"
    try:
        info = fs.info(path)
        if info["type"] != "file" or info["size"] > _REPORT_BYTES:  # /dev/full reads forever
            return set()
        earlier = json.loads(fs.cat_file(path))
        validate_report(earlier)
    except (OSError, ValueError):  # none, or not a report of ours
        return set()
    tsne = earlier["tsne"] or {}
    names = {*earlier["figures"], tsne.get("png"), tsne.get("html")}
    return {name for name in names if isinstance(name, str) and _FIGURE.fullmatch(name)}


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _figures(evaluation: Evaluation, report: dict[str, Any]) -> dict[str, bytes]:
    """Each figure's file name and bytes; lists them in ``report``."""
    files = {}
    sources = [s["name"] for s in report["sources"]]
    files["r_auroc.png"] = figures.png(figures.r_auroc_bars(report["datasets"], sources))
    scores = evaluation.scores
    if UPSTREAM in scores and len(scores) > 1:
        groups = {s: {name: scores[name][s] for name in scores} for s in sources}
        title = "ID (upstream) vs OOD uncertainties"
        files["id_vs_ood.png"] = figures.png(figures.distributions(groups, title=title))
    for name, flags in evaluation.ambiguous.items():
        groups = {
            s: {"clear": scores[name][s][flags == 0], "ambiguous": scores[name][s][flags == 1]}
            for s in sources
        }
        title = f"{name}: ambiguous vs clear"
        files[f"ambiguity_{_slug(name)}.png"] = figures.png(
            figures.distributions(groups, title=title)
        )
    if report["deterioration"] and report["deterioration"]["kinds"]:
        curves = report["deterioration"]["kinds"]
        heads = [s["name"] for s in report["sources"] if s["kind"] == "head"] or ["entropy"]
        figure = figures.deterioration(evaluation.deteriorated, curves, heads)
        files["deterioration.png"] = figures.png(figure)
    report["figures"] = list(files)
    if evaluation.tsne is not None:
        title = (
            f"t-SNE of {report['tsne']['dataset']}, size/transparency: {report['tsne']['source']}"
        )
        tsne_map = figures.uncertainty_map(evaluation.tsne, title=title)
        files["tsne.png"] = figures.png(tsne_map, dpi=110)
        files["tsne.html"] = html_page(evaluation.tsne, title=title).encode()
        report["tsne"] |= {"png": "tsne.png", "html": "tsne.html"}
        report["figures"].append("tsne.png")
    return files


#: The longest dataset name a figure's file name keeps whole (a name is at most 255 bytes).
SLUG_CHARS = 64


def _slug(name: str) -> str:
    """``name`` as a file name; one that had to change (or be cut to ``SLUG_CHARS``) gets a
    digest of the original, so ``a.b`` and ``a_b`` do not share a figure."""
    slug = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in name)
    if slug == name and len(slug) <= SLUG_CHARS:
        return slug
    return f"{slug[:SLUG_CHARS]}-{zlib.crc32(name.encode()):08x}"


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell (a dataset's name) is escaped."""
    lines = [header, *rows]
    cells = ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join([cells[0], "|" + " --- |" * len(header), *cells[1:]]) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: one table per metric, analysis and application."""
    sources = [s["name"] for s in report["sources"]]
    datasets = report["datasets"]
    parts = [
        *_headline(report, sources),
        *_classifier_section(datasets, sources),
        *_safe_retrieval_section(datasets, sources, report["settings"]["reject_fraction"]),
        *_id_vs_ood_section(datasets, sources),
        *_ambiguity_section(datasets, sources),
        *_deterioration_section(report["deterioration"], sources),
        *_tsne_section(report["tsne"]),
    ]
    return "\n".join(parts)


def _headline(report: dict[str, Any], sources: list[str]) -> list[str]:
    """The title, what each metric and source is, and the R-AUROC / Recall@1 table."""
    datasets = report["datasets"]
    backbone = report["backbone"]
    return [
        "# pvu evaluation report\n",
        f"Backbone `{backbone['name']}` ({backbone['embedding_dim']}-d{_kwargs(backbone)}), pvu "
        f"{report['pvu_version']}. Recall@1: leave-one-out cosine 1-NN accuracy (the query "
        "excluded by its row, so exact duplicates count; similarities within 1e-6 tie and the "
        'lowest row wins). R-AUROC: AUROC of -uncertainty against "the 1-NN has the same '
        'label" (0.5 = chance; n/a when every or no 1-NN is right). Sources: each head, and '
        "baselines from the cache: classifier entropy, 1 - max softmax, 1 / embedding norm, "
        "seeded random.\n",
        *_incomplete_note(report.get("incomplete_caches") or []),
        *_dropped_note(datasets),
        *_input_note(report["sources"], datasets),
        "## R-AUROC and Recall@1\n",
        _table(
            ["dataset", "n", "Recall@1", *sources],
            [
                [d["name"], str(d["n"]), _f(d["recall_at_1"])]
                + [_f(d["sources"][s]["r_auroc"]) for s in sources]
                for d in datasets
            ],
        ),
        "![R-AUROC](r_auroc.png)\n",
    ]


def _classifier_section(datasets: list[dict[str, Any]], sources: list[str]) -> list[str]:
    """AUROC against the classifier's correctness, where the datasets have its labels."""
    classifier = [d for d in datasets if d["classifier_accuracy"] is not None]
    if not classifier:
        return []
    return [
        "## Classifier AUROC (uncertainty vs pred == label, classifier label space)\n",
        _table(
            ["dataset", "accuracy", *sources],
            [
                [d["name"], _f(d["classifier_accuracy"])]
                + [_f(d["sources"][s]["classifier_auroc"]) for s in sources]
                for d in classifier
            ],
        ),
    ]


def _safe_retrieval_section(
    datasets: list[dict[str, Any]], sources: list[str], reject_fraction: float
) -> list[str]:
    """Table 1: the 1-NN error with the most uncertain queries or database rows rejected."""
    parts = [
        f"## Safe retrieval: 1-NN error, {reject_fraction:g} most uncertain rejected (table 1)\n"
    ]
    for variant in ("per_class", "class_agnostic"):
        rows, rejected = [], []
        for d in datasets:  # the same count for every source: it hangs on class sizes alone
            kept = d["sources"][sources[0]]["safe_retrieval"][variant]["queries"]
            rejected.append(f"{d['name']} {d['n'] - kept:,} of {d['n']:,}")
            for s in sources:
                e = d["sources"][s]["safe_retrieval"][variant]
                rows.append(
                    [
                        d["name"],
                        s,
                        _f(e["full"]),
                        _f(e["clean_queries"]),
                        _f(e["clean_database"]),
                        _reduction(e["full"], e["clean_database"]),
                    ]
                )
        parts += [
            f"### {variant.replace('_', '-')}\n",
            f"Rows rejected: {', '.join(rejected)}.\n",
            _table(
                ["dataset", "source", "full", "+ clean queries", "+ clean database", "reduction"],
                rows,
            ),
        ]
    return parts


def _id_vs_ood_section(datasets: list[dict[str, Any]], sources: list[str]) -> list[str]:
    """Figure 8: whether each downstream dataset's rows rank above upstream's."""
    downstream = [d for d in datasets if d["role"] == "downstream"]
    if all(d["sources"][sources[0]]["id_vs_ood_auroc"] is None for d in downstream):
        return []
    return [
        "## ID vs OOD (figure 8): AUROC of the uncertainty ranking each dataset's rows "
        "above upstream's (0.5 = not confounded by novelty; above: more uncertain on the "
        "unseen dataset)\n",
        _table(
            ["dataset", *sources],
            [
                [d["name"]] + [_f(d["sources"][s]["id_vs_ood_auroc"]) for s in sources]
                for d in downstream
            ],
        ),
        "![ID vs OOD](id_vs_ood.png)\n",
    ]


def _ambiguity_section(datasets: list[dict[str, Any]], sources: list[str]) -> list[str]:
    """Figure 7: uncertainty of the images people found ambiguous against the clear ones."""
    ambiguous = [d for d in datasets if d["ambiguity"]]
    if not ambiguous:
        return []
    return [
        "## Human ambiguity (figure 7): AUROC of uncertainty, ambiguous vs clear\n",
        _table(
            ["dataset", "flags", "ambiguous", "clear", *sources],
            [
                [
                    d["name"],
                    d["ambiguity"]["origin"],
                    str(d["ambiguity"]["ambiguous"]),
                    str(d["ambiguity"]["clear"]),
                ]
                + [_f(d["sources"][s]["ambiguity_auroc"]) for s in sources]
                for d in ambiguous
            ],
        ),
        *(f"![ambiguity {d['name']}](ambiguity_{_slug(d['name'])}.png)\n" for d in ambiguous),
    ]


def _deterioration_section(deterioration: dict[str, Any] | None, sources: list[str]) -> list[str]:
    """Figure 6: the median uncertainty per strength of each image deterioration."""
    if not deterioration or not deterioration["kinds"]:
        return []
    rows = []
    for kind, curve in deterioration["kinds"].items():
        for s in sources:
            c = curve["sources"][s]
            rows.append(
                [
                    kind,
                    s,
                    " / ".join(_f(m) for m in c["median"]),
                    _f(c["spearman"], 2),
                    {True: "yes", False: "no", None: "n/a"}[c["rises"]],
                ]
            )
    strengths = {k: c["strengths"] for k, c in deterioration["kinds"].items()}
    return [
        "## Deterioration (figure 6): median uncertainty per strength\n",
        "Strengths: "
        + "; ".join(f"{k} {', '.join(f'{s:g}' for s in v)}" for k, v in strengths.items())
        + "\n",
        _table(["kind", "source", "medians", "Spearman", "rises"], rows),
        "![deterioration](deterioration.png)\n",
    ]


def _tsne_section(tsne: dict[str, Any] | None) -> list[str]:
    """Figure 9: the uncertainty-aware t-SNE, where one was drawn."""
    if not tsne:
        return []
    return [
        "## Uncertainty-aware t-SNE (figure 9)\n",
        f"{tsne['points']} points of {tsne['dataset']}, classes {tsne['classes']}; larger and "
        f"fainter = more uncertain ({tsne['source']}). Interactive: [tsne.html](tsne.html).\n",
        "![t-SNE](tsne.png)\n",
    ]


def _reduction(full: float | None, cleaned: float | None) -> str:
    if full is None or cleaned is None or full == 0:
        return "n/a"
    return f"{(full - cleaned) / full:+.0%}"


def _kwargs(backbone: dict[str, Any]) -> str:
    """``, model_kwargs {...}`` where the backbone was built with timm arguments."""
    kwargs = backbone.get("model_kwargs")
    return f", model_kwargs `{json.dumps(kwargs, sort_keys=True)}`" if kwargs else ""


def _input_note(sources: list[dict[str, Any]], datasets: list[dict[str, Any]]) -> list[str]:
    """A line per head whose training images (size, mean, std) differ from a dataset's: its
    uncertainties there are outside what it learned."""
    lines = []
    for source in sources:
        learned = source.get("input")
        other = [d["name"] for d in datasets if learned and d.get("input") not in (None, learned)]
        if other:
            size = "x".join(map(str, learned["input_size"]))
            lines.append(
                f"Head `{source['name']}` learned from {size} images (mean {learned['mean']}, "
                f"std {learned['std']}); {', '.join(other)} hold(s) other images: its "
                "uncertainties there are outside what it learned.\n"
            )
    return lines


def _incomplete_note(caches: list[dict[str, str]]) -> list[str]:
    """A line per input cache that may lack units (being written, or its run unfinished)."""
    return [
        f"**Cache `{cache['url']}` may be incomplete**: {cache['note']}; this report read the "
        "units it held then.\n"
        for cache in caches
    ]


def _dropped_note(datasets: list[dict[str, Any]]) -> list[str]:
    """A line naming the datasets whose rows with a NaN/inf value were left out of every
    metric, if any."""
    dropped = [f"{d['name']} {d['dropped_rows']:,}" for d in datasets if d.get("dropped_rows")]
    if not dropped:
        return []
    return [
        "Rows left out of every figure below (a NaN or inf embedding, max_prob or entropy): "
        + ", ".join(dropped)
        + ".\n"
    ]
