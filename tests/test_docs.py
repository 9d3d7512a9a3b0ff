"""The documentation names what the code has: its files, modules and the fields it checks.

Docs drift as code moves: a module renamed, a test file split, an identity field added to the
cache but not to the sentence listing them. These read the Markdown files as text and check
each name against the repository, without importing torch, timm or Ray.
"""

from __future__ import annotations

import ast
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


#: A repository path as the docs write one (``pipeline/cache/unit.py``, ``tests/x.py::test_y``),
#: with any pattern around it (``jobs/configs/in21k-vit-{ti,s}/``), which is left out.
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:benchmarks|cluster|docs|jobs|pipeline|schemas|tests)/[\w./{}*<>-]*)"
    r"(?:::(\w+))?"
)


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_and_test_the_docs_name_exists(doc: str) -> None:
    """Each repository path a doc names is there, and so is each test it names by
    ``file::function``: a renamed module or test leaves no dead pointer behind."""
    dead = []
    for path, function in REPO_PATH.findall(text(doc)):
        path = path.rstrip(".,-")  # a sentence's full stop or comma
        if any(mark in path for mark in "{}<>*"):
            continue
        if not (ROOT / path).exists():
            dead.append(path)
        elif function and not re.search(rf"def {function}\b", (ROOT / path).read_text()):
            dead.append(f"{path}::{function}")
    assert dead == [], f"{doc} names what the repository lacks: {sorted(set(dead))}"


def defines(module: Path, name: str) -> bool:
    """Whether the Python file ``module`` defines or imports ``name`` at its top level."""
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, ast.ImportFrom) and any(
            (alias.asname or alias.name) == name for alias in node.names
        ):
            return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_name_the_docs_give_exists(doc: str) -> None:
    """Each ``package.module.name`` a doc gives (``pipeline.head.export.attach_head``, or
    ``from pipeline.head.export import attach_head`` in an example) is a module, or a name its
    module defines, read from the source without importing it."""
    dead = []
    given = set(re.findall(r"`((?:jobs|pipeline|schemas)(?:\.\w+)+)[`(]", text(doc)))
    examples = (ROOT / doc).read_text(encoding="utf-8")  # one import a line
    for module, names in re.findall(r"from ((?:jobs|pipeline|schemas)[\w.]*) import ([\w, ]+)$",
                                    examples, flags=re.MULTILINE):  # fmt: skip
        given |= {f"{module}.{name.strip()}" for name in names.split(",") if name.strip()}
    for dotted in given:
        parts = dotted.split(".")
        found = False
        for cut in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:cut])
            module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if module.is_file():
                found = cut == len(parts) or defines(module, parts[cut])
                break
        if not found:
            dead.append(dotted)
    assert dead == [], f"{doc} names Python names the code lacks: {sorted(dead)}"


def test_every_module_is_in_designs_module_table() -> None:
    """docs/design.md's table of modules names each module of ``jobs/`` and ``pipeline/``: by
    its path, or by its name in the row of its folder (a job's ``jobs/run/`` twin is the
    row's "the other jobs' configs")."""
    rows = [line for line in (ROOT / "docs/design.md").read_text().splitlines()
            if line.startswith("| `")]  # fmt: skip
    unnamed = []
    for module in sorted([*ROOT.glob("jobs/**/*.py"), *ROOT.glob("pipeline/**/*.py")]):
        relative = module.relative_to(ROOT).as_posix()
        folder, name = relative.rsplit("/", 1)
        name = name.removesuffix(".py")
        if name == "__init__" or (folder == "jobs/run" and (ROOT / f"jobs/{name}.py").exists()):
            continue
        named = any(
            f"`{relative}`" in row
            or (
                f"`{folder}/" in row.split("|")[1]
                and re.search(rf"`{name}(\.py)?`", row) is not None
            )
            for row in rows
        )
        if not named:
            unnamed.append(relative)
    assert unnamed == [], f"docs/design.md section 7 does not name {unnamed}"


#: Flags docs/usage.md names that belong to another tool than pvu.
OTHER_TOOLS_FLAGS = {"--node-ip-address"}


def test_usage_names_every_flag_and_no_other() -> None:
    """docs/usage.md names each flag of each command (or its ``--no-`` form), and no flag that
    no command has (one renamed or removed)."""
    from typer.main import get_command

    from jobs.cli import app

    pvu = get_command(app)
    usage = text("docs/usage.md")
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*\w", usage))
    flags = {"--help", "--version"}
    missing = []
    for command in sorted(pvu.commands):
        for param in pvu.job(command).params:
            spellings = [*param.opts, *param.secondary_opts]
            flags |= set(spellings)
            if param.param_type_name == "option" and not named & set(spellings):
                missing.append(f"pvu {command} {param.opts[0]}")
    assert missing == [], f"docs/usage.md does not describe {missing}"
    unknown = named - flags - OTHER_TOOLS_FLAGS
    assert unknown == set(), f"docs/usage.md names flags no pvu command has: {sorted(unknown)}"
