"""One eval cache in memory: keys, labels, embeddings and the classifier's columns.

Read through the cache index (units listed by the manifest, footers checked to belong
together); refuses caches that are not eval caches (more than one epoch, or a train
transform), and drops rows with a non-finite embedding, ``max_prob`` or ``entropy``, naming how
many and where.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.index import CacheFile, CacheIndex, open_cache, read_unit
from pipeline.named import counted

log = logging.getLogger(__name__)

COLUMNS = ("key", "epoch", "label", "embedding", "loss", "pred", "max_prob", "entropy")
OPTIONAL_COLUMNS = ("ambiguity",)


@dataclass(eq=False)
class EvalSet:
    """The rows of one eval cache, as numpy arrays (embedding as stored, float16 or float32)."""

    name: str
    url: str
    keys: np.ndarray
    labels: np.ndarray
    embedding: np.ndarray
    loss: np.ndarray
    pred: np.ndarray
    max_prob: np.ndarray
    entropy: np.ndarray
    provenance: dict[str, Any]
    ambiguity: np.ndarray | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def label_space(self) -> str:
        """'classifier' or 'dataset'; schema-v1 caches were always in the classifier's."""
        return self.provenance.get("label_space", "classifier")

    @property
    def deterioration(self) -> dict[str, Any] | None:
        """The ``{kind, strength}`` the cache's transform applied, or None for clean images."""
        transform = self.provenance.get("transform") or {}
        return transform.get("deterioration")


def load_eval_set(name: str, url: str, *, on_rows: Callable[[int], None] | None = None) -> EvalSet:
    """The eval cache at ``url`` (any fsspec URL), called ``name`` in the report."""
    return read_eval_set(name, url, open_cache([url], need_loss=False), on_rows=on_rows)


def check_eval_transform(name: str, url: str, provenance: dict[str, Any]) -> None:
    """Refuse the cache ``name`` at ``url`` if its ``provenance`` says the train transform."""
    if (provenance.get("transform") or {}).get("is_training"):
        raise ValueError(
            f"{name}: cache {url} was written with the train transform; evaluate reads eval "
            "caches (pvu cache --augment eval)"
        )


def check_one_epoch(name: str, url: str, epochs: int) -> None:
    """Refuse the cache ``name`` at ``url`` if it holds more than one epoch (``epochs``)."""
    if epochs > 1:
        raise ValueError(
            f"{name}: cache {url} holds {epochs} epochs; evaluate reads eval caches "
            "(pvu cache --augment eval, one epoch)"
        )


def index_epochs(index: CacheIndex) -> int:
    """The epochs the units of ``index`` hold, by their ``epoch=<EEEE>/`` folders (no row
    read; units outside such folders are counted when their rows are read)."""
    return len({f.epoch for f in index.files if f.epoch is not None})


def read_eval_set(
    name: str, url: str, index: CacheIndex, *, on_rows: Callable[[int], None] | None = None
) -> EvalSet:
    """The rows of the cache ``index`` (opened from ``url``); ``on_rows(n)`` after each file."""
    check_eval_transform(name, url, index.files[0].provenance)
    check_one_epoch(name, url, index_epochs(index))
    tables = []
    for cache_file in index.files:
        tables.append(_read_file(cache_file))
        if on_rows is not None:
            on_rows(cache_file.rows)
    table = pa.concat_tables(tables, promote_options="permissive")
    check_one_epoch(name, url, len(np.unique(table.column("epoch").to_numpy())))
    flat = table.column("embedding").combine_chunks().flatten()
    embedding = flat.to_numpy(zero_copy_only=False).reshape(-1, index.dim)
    finite = np.isfinite(embedding).all(axis=1)
    for baseline in ("max_prob", "entropy"):  # the classifier's baselines rank every row
        finite &= np.isfinite(table.column(baseline).to_numpy(zero_copy_only=False))
    if not finite.all():
        log.warning(
            "%s: dropped %s with a NaN/inf embedding, max_prob or entropy",
            *(url, counted(int((~finite).sum()), "row")),
        )
    keep = slice(None) if finite.all() else np.flatnonzero(finite)

    def column(name: str, dtype: Any) -> np.ndarray:
        values = table.column(name).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=dtype)[keep]

    keys = column("key", object)
    repeated = len(keys) - len(set(keys.tolist()))
    if repeated:
        log.warning(
            "%s: %s repeating a key (rows cached twice?): a row and its copy are each "
            "other's nearest neighbours, which inflates Recall@1",
            *(url, counted(repeated, "row")),
        )
    ambiguity = None
    if "ambiguity" in table.column_names:
        ambiguity = column("ambiguity", np.float32)
    return EvalSet(
        name=name,
        url=url,
        keys=keys,
        labels=column("label", np.int64),
        embedding=embedding[keep],
        loss=column("loss", np.float32),
        pred=column("pred", np.int64),
        max_prob=column("max_prob", np.float32),
        entropy=column("entropy", np.float32),
        provenance=index.files[0].provenance,
        ambiguity=ambiguity,
        dropped=int((~finite).sum()),
    )


def _read_file(cache_file: CacheFile) -> pa.Table:
    """The columns evaluate reads of one unit, under :func:`retry` (errors name the unit, and
    say so of one rewritten since it was indexed)."""
    names = cache_file.metadata.schema.to_arrow_schema().names
    columns = [*COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
    fs, path = fsspec.core.url_to_fs(cache_file.url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(
                handle, metadata=cache_file.metadata, page_checksum_verification=True
            ).read(columns=columns)

    again = "run the same pvu evaluate command again"
    table = read_unit(cache_file, read, what=f"read {cache_file.url}", again=again)
    return table.replace_schema_metadata(None)
