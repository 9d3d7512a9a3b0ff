"""Shards: turn a ``--shards`` spec into the list of tar URLs to read, and name each shard.

A spec is one of (docs/design.md 3.1, issue 2):

- a brace pattern, ``s3://bucket/train-{0000..2047}.tar`` (also ``{a,b}``), expanded in order;
- a glob, ``s3://bucket/train-*.tar``;
- a directory or prefix (local or any fsspec URL): the ``*.tar`` files directly under it, sorted;
- a single ``.tar`` file;
- a text file (any other file) listing one URL per line; blank lines and ``#`` comments are
  ignored, relative entries are relative to the list file's folder.

Local and remote specs go through the same fsspec code path. URLs come back with the spec's
protocol (``s3://bucket/key.tar``); local paths come back absolute.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: The shards pvu reads, in the advice for a file it does not (a .tar.zst, a zip, a .tar.xz).
TAR_FORMATS = "a .tar or .tar.gz"
#: Archives that are no shard pvu lists: other compressions of a tar and other archivers'.
_OTHER_ARCHIVE = re.compile(
    r".*\.(tar\.(xz|bz2|zst|zstd|lz4|lzma|lz|z|br)|tbz2?|txz|tzst|tlz|zip|7z|rar)", re.IGNORECASE
)
#: How to make an archive pvu lists no shards of (:data:`_OTHER_ARCHIVE`) one it reads.
_DECOMPRESS = "a .tar.xz, .tar.bz2 or .tar.zst decompressed, as by `xz -d`, is its .tar"
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 120
#: The file ``pvu shards`` keeps in its output while it writes: shards beside it are unfinished.
UNFINISHED_NAME = "_unfinished"
#: The most URLs a brace pattern may name. braceexpand makes every URL at once (and each range
#: whole first), so a range a few digits too long (``{0..99999999999}``) filled the memory and
#: the kernel killed the run; a list file or a folder names more shards than this.
MAX_BRACE_URLS = 1_000_000
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # braceexpand's own
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def expand_shards(spec: str, *, verify: bool = True) -> list[str]:
    """The shard URLs a ``--shards`` spec names, in order, without duplicates.

    With ``verify`` (the default), every URL of a brace pattern or list file must exist:
    a missing one raises ``FileNotFoundError`` naming the spec and the missing URLs, so a typo
    fails before any work starts. A spec that matches nothing raises ``FileNotFoundError``;
    an empty or malformed spec raises ``ValueError``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"shard spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    protocol = _protocol(spec)

    if _BRACE.search(spec):
        if (count := brace_count(spec)) > MAX_BRACE_URLS:
            raise ValueError(
                f"--shards {spec!r} names {count:,} URLs, more than the {MAX_BRACE_URLS:,} a "
                "brace pattern may: check its ranges ({0000..2047} names 2,048); for more "
                "shards, give their folder or a text file of their URLs, one a line"
            )
        urls = _dedupe(braceexpand.braceexpand(spec))
        if verify:
            _verify_exist(urls, spec)
        return urls

    fs, path = fsspec.core.url_to_fs(spec)
    if fs.isdir(path):  # before globbing: a folder or file named 'run[1]' is itself
        return _found_or_raise(fs, fs.ls(path, detail=True), protocol, spec, "the directory")
    if fs.isfile(path):
        if is_tar(path):
            _refuse_unfinished(fs, [posixpath.dirname(path)], protocol)
            return [storage_url(fs, path, protocol)]
        if _OTHER_ARCHIVE.fullmatch(path):
            raise ValueError(
                f"--shards {spec!r} is no shard pvu reads: make it {TAR_FORMATS} ({_DECOMPRESS})"
            )
        return _read_list_file(fs, path, protocol, spec, verify=verify)
    if isinstance(fs, LocalFileSystem) and os.path.exists(path):  # neither: a FIFO, a socket
        raise ValueError(f"--shards {spec!r} is {_not_a_file(fs, path)}")
    if _GLOB_CHARS.search(path):
        return _found_or_raise(fs, fs.glob(path, detail=True).values(), protocol, spec, "the glob")
    if is_tar(path):
        raise FileNotFoundError(f"shard {spec!r} does not exist")
    # Neither a file nor a directory: a prefix such as s3://bucket/train- or /data/train-.
    infos = fs.glob(path + "*", detail=True).values()
    return _found_or_raise(fs, infos, protocol, spec, "the prefix")


def brace_count(pattern: str) -> int:
    """How many URLs ``braceexpand`` makes of ``pattern`` (duplicates included), counted as
    it parses the pattern but without making any."""
    count, start, depth = 1, 0, 0
    for pos, char in _unescaped(pattern):
        if char == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                count *= _expression_count(pattern[start + 1 : pos])
    return count


def _unescaped(text: str) -> Iterator[tuple[int, str]]:
    """``(position, character)`` of each character of ``text`` that a backslash does not
    escape (braceexpand's escapes: the backslash and the character after it are skipped)."""
    pos = 0
    while pos < len(text):
        if text[pos] == "\\":
            pos += 2
            continue
        yield pos, text[pos]
        pos += 1


def _expression_count(expr: str) -> int:
    """The URLs one ``{...}`` of a brace pattern makes: a range, a sequence, or a literal."""
    if match := _INT_RANGE.match(expr):
        first, last, step = int(match[1]), int(match[2]), int(match[3] or 1) or 1
        return abs(last - first) // step + 1
    if match := _CHAR_RANGE.match(expr):
        alphabet = string.ascii_uppercase + string.ascii_lowercase
        first, last, step = alphabet.index(match[1]), alphabet.index(match[2]), int(match[3] or 1)
        return abs(last - first) // (step or 1) + 1
    parts, start, depth = [], 0, 0
    for pos, char in _unescaped(expr):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(expr[start:pos])
            start = pos + 1
    if depth or not parts:  # no sequence: braceexpand keeps the braces, expands what is inside
        return brace_count(expr)
    return sum(brace_count(part) for part in [*parts, expr[start:]])


def shard_name(url: str) -> str:
    """The shard's name for unit files: its basename without ``.tar``/``.tar.gz``/``.tgz``.

    The name is filesystem-safe (``[A-Za-z0-9._-]``, at most 120 characters) and never starts
    with ``_`` or ``.`` (which Parquet dataset readers skip). Characters outside that set, or an
    overlong name, add a short hash of the URL, so different URLs keep different names.
    """
    path = urlsplit(url).path if "://" in url else url
    base = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    safe = _UNSAFE.sub("_", base).lstrip("._")
    if safe == base and 0 < len(safe) <= _MAX_NAME:
        return safe
    digest = hashlib.sha1(url.encode(errors="surrogateescape")).hexdigest()[:8]
    return f"{safe[: _MAX_NAME - 9]}-{digest}" if safe else f"shard-{digest}"


def shard_names(urls: Sequence[str]) -> list[str]:
    """``shard_name`` of each URL; ``ValueError`` if two different URLs share a name."""
    owners: dict[str, str] = {}
    names = []
    for url in urls:
        name = shard_name(url)
        other = owners.setdefault(name, url)
        if other != url:
            raise ValueError(
                f"shards {other!r} and {url!r} have the same name {name!r}; "
                "unit files are named by shard, so shard basenames must be unique (pvu shards "
                "--prefix names a set's shards apart)"
            )
        names.append(name)
    return names


def warn_of_other_sources(units: Iterable[Mapping], by_name: Mapping[str, str]) -> None:
    """Warn where committed units were made from a shard at another URL than the one of
    their name in this run (``by_name``: name -> URL): units are named by shard, so such a
    unit counts as done. Right for a shard set moved or recompressed; another set of the same
    names (two ``pvu shards`` outputs are both ``shard-000000.tar``, ...) is then never read."""
    moved = {}
    for unit in units:
        url = by_name.get(unit["shard"])
        if url is not None and spelled_alike(unit["source"]) != spelled_alike(url):
            moved.setdefault(unit["shard"], (unit["source"], url))
    if moved:
        name, (old, new) = next(iter(moved.items()))
        logger.warning(
            "%d committed shard(s) were read from other URLs than this run's shards of their "
            "names (e.g. %r from %s, now %s) and count as done: right if the shards moved; if "
            "these are other shards, their samples are not cached: cache them into another "
            "--output, or name the sets apart (pvu shards --prefix)",
            *(len(moved), name, old, new),
        )


def check_committed_sources(
    units: Mapping[str, Mapping], by_name: Mapping[str, str], sizes: Mapping[str, int], root: str
) -> None:
    """:func:`warn_of_other_sources` and :func:`refuse_rebuilt_shards` for the committed
    ``units`` (relpath -> manifest entry) of the cache at ``root``."""
    warn_of_other_sources(units.values(), by_name)
    refuse_rebuilt_shards(units, by_name, sizes, root)


def refuse_rebuilt_shards(
    units: Mapping[str, Mapping], by_name: Mapping[str, str], sizes: Mapping[str, int], root: str
) -> None:
    """Raise ``ValueError`` where committed units (``units``: relpath -> manifest entry) were
    read from this run's shard URL of their name and that shard now has another size
    (``sizes``: URL -> bytes): the set was rebuilt under the same URLs, and the units would
    count as done with the old samples. Units without a recorded size (cached before pvu kept
    it), of a shard at another URL (moved: :func:`warn_of_other_sources`) or of a shard whose
    size is unknown are not checked."""
    rebuilt = {
        relpath: url for relpath, unit in units.items() if (url := _rebuilt(unit, by_name, sizes))
    }
    if not rebuilt:
        return
    relpath, url = next(iter(sorted(rebuilt.items())))
    shards = len(set(rebuilt.values()))
    files = [f"{root}/{path}" for path in sorted(rebuilt)]
    more = f" and {len(files) - 3:,} more" if len(files) > 3 else ""
    raise ValueError(
        f"{shards:,} shard(s) of this run have another size than when their committed units "
        f"were cached (e.g. {url} was {units[relpath]['source_bytes']:,} bytes, now "
        f"{sizes[url]:,}): the shards were rebuilt under the same URLs, and their new samples "
        f"would never be read. Delete those {len(files):,} unit(s) ({', '.join(files[:3])}{more}: "
        "every epoch=*/<shard>.parquet of these shards) and run the same command to recompute "
        "them, or cache into another --output"
    )


def _rebuilt(unit: Mapping, by_name: Mapping[str, str], sizes: Mapping[str, int]) -> str | None:
    """The URL of ``unit``'s shard if the unit was read from it and recorded another size."""
    url = by_name.get(unit["shard"])
    recorded = unit.get("source_bytes")
    if url is None or recorded is None or url not in sizes:
        return None
    if spelled_alike(unit["source"]) != spelled_alike(url):
        return None
    return url if sizes[url] != recorded else None


def listed_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Bytes of each of ``urls`` as its folder's listing gives them: one listing per folder (a
    couple of requests for 2,000 shards on S3), none per shard. Shards of a folder that cannot
    be listed, or missing from its listing, are left out."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_folder[url.rsplit("/", 1)[0]].append(url)
    sizes: dict[str, int] = {}
    for folder, members in by_folder.items():
        listed = _folder_sizes(folder)
        for url in members:
            size = listed.get(fsspec.core.url_to_fs(url)[1])
            if size is not None:
                sizes[url] = int(size)
    return sizes


def _folder_sizes(folder: str) -> dict[str, int | None]:
    """Bytes of each entry of ``folder`` by path, from one listing; empty where it cannot be
    listed (its shards' sizes are then unknown, not an error)."""
    fs, path = fsspec.core.url_to_fs(folder)
    try:
        return {info["name"].rstrip("/"): info.get("size") for info in fs.ls(path, detail=True)}
    except (OSError, ValueError, NotImplementedError) as error:  # sizes are best effort
        logger.debug("shard sizes in %s not listed: %s", folder, error)
        return {}


@functools.lru_cache(maxsize=1 << 16)  # asked once per unit of a cache, of a few shards each
def spelled_alike(url: str) -> str:
    """``url`` with a local path's ``//`` and ``/./`` undone, and a store's protocol in its
    filesystem's first spelling (``s3a://b/x.tar`` is ``s3://b/x.tar``: one object)."""
    if "://" not in url:
        return posixpath.normpath(url)
    protocol, _, rest = url.partition("://")
    try:
        spellings = fsspec.get_filesystem_class(protocol).protocol
    except (ValueError, ImportError):  # not a filesystem fsspec knows here
        return url
    return f"{spellings if isinstance(spellings, str) else spellings[0]}://{rest}"


def entry_name(entry: dict) -> str:
    """The name of the fsspec listing ``entry``, without its folder."""
    return posixpath.basename(entry["name"].rstrip("/"))


def is_file_entry(fs: fsspec.AbstractFileSystem, info: dict) -> bool:
    """Whether the fsspec listing entry ``info`` is a file to read: a file, a link to one (a
    local listing types every link ``other``) or a dangling link, whose read fails naming it;
    not a folder, nor a FIFO, socket or device (a read may never end), nor a link to one."""
    if info.get("type") == "file":
        return True
    if not info.get("islink"):
        return False
    try:
        return fs.info(info["name"])["type"] == "file"  # the link's target
    except FileNotFoundError:
        return True


def _tar_files(fs: fsspec.AbstractFileSystem, infos: Iterable[dict]) -> list[str]:
    """Sorted paths of the tar files among fsspec ``info`` dicts (folders and macOS's
    AppleDouble ``._<name>.tar`` files left out; see :func:`is_file_entry` for links)."""
    return sorted(
        info["name"].rstrip("/")
        for info in infos
        if is_file_entry(fs, info)
        and is_tar(info["name"])
        and not entry_name(info).startswith("._")
    )


def is_tar(path: str) -> bool:
    """Whether ``path`` names a tar shard (``.tar``, ``.tar.gz``, ``.tgz``, any case)."""
    return path.lower().endswith(TAR_SUFFIXES)


def _protocol(spec: str) -> str | None:
    """The spec's own protocol (``s3``, ``gs``, ...), so URLs keep the spelling the user gave."""
    head, sep, _ = spec.partition("://")
    return head if sep and "::" not in head else None


def storage_url(fs: fsspec.AbstractFileSystem, path: str, protocol: str | None = None) -> str:
    """The full URL of ``path`` on ``fs``: the path itself for local files, ``proto://...``
    otherwise (``protocol`` as the user spelled it, else the filesystem's own)."""
    if isinstance(fs, LocalFileSystem):
        return path
    full = fs.unstrip_protocol(path)
    if protocol and full != path:  # an HTTP path is its whole URL already
        return f"{protocol}://{path}"
    return full


def _normalise(url: str) -> str:
    """A URL as ``storage_url`` writes it, local paths absolute and without ``.`` or ``..``
    steps (``/x/./a.tar`` is ``/x/a.tar``; ``..`` as :func:`resolve_local` takes it)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        path = resolve_local(path)
    return storage_url(fs, path, _protocol(url))


def _dedupe(urls: Iterable[str]) -> list[str]:
    """``urls`` normalised (:func:`_normalise`: ``./a.tar`` is ``a.tar``), in order, each once."""
    return list(dict.fromkeys(map(_normalise, urls)))


def _found_or_raise(
    fs: fsspec.AbstractFileSystem,
    infos: Iterable[dict],
    protocol: str | None,
    spec: str,
    what: str,
) -> list[str]:
    """The URLs of the tar shards among the listing ``infos`` of ``spec`` (``what`` it is);
    ``FileNotFoundError`` where there are none. Archives of other kinds found are named (and
    warned of where they lie beside shards, which are read without them)."""
    infos = list(infos)
    found = _tar_files(fs, infos)
    others = [
        entry_name(info)
        for info in infos
        if is_file_entry(fs, info) and _OTHER_ARCHIVE.fullmatch(info["name"])
    ]
    named = (
        f"{len(others)} archive(s) pvu does not read, e.g. {min(others)!r}: "
        f"make each {TAR_FORMATS} ({_DECOMPRESS})"
        if others
        else ""
    )
    if not found:
        raise FileNotFoundError(
            f"no shards ({', '.join('*' + s for s in TAR_SUFFIXES)}) match {what} {spec!r}"
            + (f": it holds {named}" if named else "")
        )
    if named:
        logger.warning("%s %r: read without %s", what, spec, named)
    _refuse_unfinished(fs, sorted({posixpath.dirname(path) for path in found}), protocol)
    return [storage_url(fs, path, protocol) for path in found]


def _refuse_unfinished(
    fs: fsspec.AbstractFileSystem,
    folders: Iterable[str],
    protocol: str | None,
    listed: set[str] | None = None,
) -> None:
    """Raise ``ValueError`` if one of ``folders`` holds ``pvu shards``' unfinished marker,
    looked up in ``listed`` (the paths of a listing already made), else one request a folder."""
    for folder in folders:
        marker = f"{folder}/{UNFINISHED_NAME}"
        found = marker in listed if listed is not None else fs.exists(marker)
        if found:
            raise ValueError(
                f"the shards in {storage_url(fs, folder, protocol)} are from a `pvu shards` run "
                "that did not finish: run that command again to complete them"
            )


def _read_list_file(
    fs: fsspec.AbstractFileSystem, path: str, protocol: str | None, spec: str, *, verify: bool
) -> list[str]:
    """URLs listed in a text file, one a line; relative entries resolve against its folder."""
    try:
        text = fs.cat_file(path).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"shard spec {spec!r} is neither a tar file ({'/'.join(TAR_SUFFIXES)}) "
            f"nor a UTF-8 text file listing shard URLs"
        ) from error
    folder = storage_url(fs, posixpath.dirname(path), protocol)
    urls = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        urls.append(resolve_entry(entry, folder))
    if not urls:
        raise ValueError(f"shard list file {spec!r} lists no URLs")
    urls = _dedupe(urls)
    if verify:
        _verify_exist(urls, spec)
    return urls


def resolve_entry(entry: str, folder: str) -> str:
    """A list file's or a table's ``entry``: a URL (or an fsspec chain, ``a::b``) as it is, else
    a path, absolute or relative to ``folder`` (the file's, a URL or an absolute path), with
    ``.`` and ``..`` resolved (``..`` as the OS takes it on a local disk, see
    :func:`join_relative`), a local one named as the OS lists it (:func:`local_name`)."""
    if "://" in entry or "::" in entry:
        return entry
    if posixpath.isabs(entry) or "://" not in folder:
        entry = local_name(entry)
    if posixpath.isabs(entry):  # one file, however spelled (/a/./b.jpg, /a//b.jpg)
        return resolve_local(entry)
    return join_relative(folder, entry)


def local_name(path: str) -> str:
    """The local ``path`` read from a UTF-8 text (a list file, a table) as the OS lists it: the
    file whose name's bytes are that text's, also where Python decodes names otherwise (a
    non-UTF-8 locale, or ``LC_ALL=C`` with ``PYTHONUTF8=0``: ``ü`` is then no file's name)."""
    return os.fsdecode(path.encode())


def join_relative(folder: str, entry: str) -> str:
    """The relative path ``entry`` (of a list file's or a table's) in ``folder`` (a URL or an
    absolute path), its ``.`` and ``..`` steps resolved: on a local disk as the OS resolves
    them (:func:`resolve_local`), on a store as text (it has no such folders: the key
    ``lists/../a.tar`` is not ``a.tar``)."""
    protocol, sep, rest = folder.partition("://")
    if sep:
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return resolve_local(posixpath.join(folder, entry))


def resolve_local(path: str) -> str:
    """The absolute local ``path`` without ``.`` or ``..`` steps, each ``..`` taken as the OS
    takes it: ``link/..`` is the parent of the link's target, not the folder holding ``link``.
    Other links are kept as spelled (``/data/lists/../a.tar``, ``/data`` a link, is
    ``/data/a.tar``), so a shard's URL is the one its folder's listing gives."""
    if ".." not in path.split("/"):
        return posixpath.normpath(path)
    resolved = "/"
    for step in path.split("/"):
        if step == "..":
            resolved = _parent(resolved)
        elif step not in ("", "."):
            resolved = posixpath.join(resolved, step)
    return resolved


@functools.lru_cache(maxsize=1024)
def _parent(folder: str) -> str:
    """The parent of ``folder`` (a path without ``..``) as the OS takes it: its target's when
    ``folder`` is a link, else the folder it is spelled in (cached: a table's rows share one)."""
    if os.path.islink(folder):
        return posixpath.dirname(os.path.realpath(folder))
    return posixpath.dirname(folder)


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """``fs``'s listing entry of ``path``, or None where it does not exist (by ``fs.exists``,
    which a store that forbids the look answers as it does)."""
    try:
        return fs.info(path) if fs.exists(path) else None
    except FileNotFoundError:
        return None


def _asked_one_by_one(fs: fsspec.AbstractFileSystem, entries: list[tuple[str, str]]) -> dict:
    """The listing entries, by path, of the ``(url, path)`` ``entries`` that exist, asked
    about one by one where their folder cannot be listed."""
    return {path: info for _, path in entries if (info := _info(fs, path))}


def _not_a_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What the entry at ``path``, no file, is instead, and what to give."""
    if fs.isdir(path):
        return "a folder: list its tar files, or give the folder itself as --shards"
    return "no regular file (a FIFO, socket or device), whose read may never end: list tar files"


def _verify_exist(urls: list[str], spec: str) -> None:
    """Raise ``FileNotFoundError`` naming ``spec`` if any of ``urls`` does not exist, and
    ``ValueError`` if one is a folder, or a FIFO, socket or device, which no tar is read from
    (its unit failed on every try, or a FIFO's read waited for the unit timeout).

    Lists each parent folder once rather than asking about every object, so 2,000 shards on
    S3 cost a couple of list calls. Where listing is forbidden, asks object by object.
    """
    by_folder: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        key = (_protocol(url) or "", posixpath.dirname(path))
        filesystems[key[0]] = fs
        by_folder[key].append((url, path))

    missing: list[str] = []
    for (proto, folder), entries in by_folder.items():
        fs = filesystems[proto]
        try:
            present = {info["name"].rstrip("/"): info for info in fs.ls(folder, detail=True)}
            _refuse_unfinished(fs, [folder], proto or None, listed=set(present))
        except FileNotFoundError:  # no such folder, or a store that lists none (HTTP)
            # where the first shard is there all the same, ask for each
            there = _info(fs, entries[0][1]) is not None
            present = _asked_one_by_one(fs, entries) if there else {}
        except PermissionError:
            logger.warning("cannot list %s; checking the shards of %r one by one", folder, spec)
            _refuse_unfinished(fs, [folder], proto or None)
            present = _asked_one_by_one(fs, entries)
        missing.extend(url for url, path in entries if path not in present)
        for url, path in entries:
            if path in present and not is_file_entry(fs, present[path]):
                raise ValueError(f"shard {url!r} of {spec!r} is {_not_a_file(fs, path)}")

    if len(missing) == len(urls):
        raise FileNotFoundError(f"no shards match {spec!r} (for example {missing[0]!r})")
    if missing:
        shown = ", ".join(repr(url) for url in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist: {shown}{more}"
        )
