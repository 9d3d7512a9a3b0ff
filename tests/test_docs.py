"""The documentation names what the code has: its files, modules and the fields it checks.

Docs drift as code moves: a module renamed, a test file split, an identity field added to the
cache but not to the sentence listing them. These read the Markdown files as text and check
each name against the repository, without importing torch, timm or Ray.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.cache.manifest import IDENTITY_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "RELIABILITY.md", "BENCHMARKS.md", "docs/usage.md", "docs/design.md",
        "cluster/README.md")  # fmt: skip


def text(doc: str) -> str:
    """The Markdown file ``doc``, its lines unwrapped (a name may break across two)."""
    return re.sub(r"\s*\n\s*", " ", (ROOT / doc).read_text(encoding="utf-8"))


#: How the docs name each field of a cache's identity (pipeline/cache/manifest.py).
IDENTITY_WORDS = {
    "schema_version": "schema version",
    "backbone": "backbone",
    "weights_digest": "weights",
    "model_kwargs": "model kwargs",
    "transform": "transform",
    "seed": "seed",
    "dtype": "dtype",
    "label_remap_digest": "label remap",
    "label_space": "label space",
    "ambiguity_key": "ambiguity member",
    "compute": "compute",
}


@pytest.mark.parametrize("doc", ["docs/usage.md", "docs/design.md"])
def test_the_docs_name_every_field_that_refuses_a_cache_run(doc: str) -> None:
    """The sentence saying which differences refuse a run into an existing cache names each
    identity field the manifest compares."""
    assert set(IDENTITY_WORDS) == set(IDENTITY_FIELDS), "name the new field in IDENTITY_WORDS"
    [listed] = re.findall(r"different ([^.]*?) into the same prefix", text(doc))
    missing = [field for field, words in IDENTITY_WORDS.items() if words not in listed]
    assert missing == [], f"{doc}: '{listed}' leaves out {missing}"
