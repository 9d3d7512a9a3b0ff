"""``--config FILE.yaml`` for every job: file values under the command line's flags, one check.

A job's YAML file holds the same settings as its flags (``batch_size`` or ``batch-size``). The
job's pydantic config validates the merged values: defaults, then the file, then the flags that
were typed. An unknown key or a bad value is a usage error (exit code 2) that names the file and
the key, or the ``--flag``.

A job adopts it with a ``ctx: typer.Context`` parameter, ``config: ConfigFile = None`` and::

    job = job_config(MyJobConfig, ctx)
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Annotated, Any, TypeVar

import fsspec
import typer
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationError

Config = TypeVar("Config", bound=BaseModel)
T = TypeVar("T")

#: What the CLI itself owns: never a job setting.
CLI_ONLY = frozenset({"config", "verbose"})
#: Where the shipped setups live (``jobs/configs/<setup>/<job>.yaml``).
CONFIGS = Path(__file__).resolve().parent / "configs"

ConfigFile = Annotated[
    str | None,
    typer.Option(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of this job's settings (keys as this job's flags, - written _: "
        "--some-flag X is some_flag: X); "
        "flags given on the command line override it. Shipped setups: jobs/configs/.",
    ),
]


def check_path(value: str) -> str:
    """``value``, a setting's path or URL, unless it is empty or has spaces around it:
    ``--output "$UNSET"`` made absolute is the working folder, ``--output " out"`` a folder
    named with a space in it; neither is what was meant. ``ValueError`` saying which."""
    if not value.strip():
        raise ValueError(f"{value!r} is empty: give a local path or an fsspec URL")
    if value != value.strip():
        raise ValueError(f"{value!r} starts or ends with a space: give it without")
    return value


def first_repeated(items: list[T]) -> T | None:
    """The first of ``items`` that an earlier one equals, if any: a setting's values given
    twice, for its validator to refuse."""
    return next((item for i, item in enumerate(items) if item in items[:i]), None)


def _check_path_text(value: Any) -> Any:
    """:func:`check_path` of a path given as text, before pydantic makes it a ``Path``
    (``Path("")`` is ``.``, the working folder)."""
    return check_path(value) if isinstance(value, str) else value


#: A path or fsspec URL setting (every input and output of every job): refused empty or with
#: spaces around it, the message naming the flag or config key (:func:`explain`).
PathOrUrl = Annotated[str, AfterValidator(check_path)]


def _refuse_url(value: Any) -> Any:
    """``value`` unless it is a URL: ``Path("s3://b/x")`` is the local folder ``s3:/b/x``."""
    if isinstance(value, str) and fsspec.core.split_protocol(value)[0] is not None:
        raise ValueError(f"{value!r} is a URL: give a local path (this job writes to local disk)")
    return value


#: A local path setting, checked as :data:`PathOrUrl` is (the last validator runs first),
#: and refused as a URL.
LocalPath = Annotated[Path, BeforeValidator(_refuse_url), BeforeValidator(_check_path_text)]


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def read_config_file(
    path: str, config_type: type[BaseModel], aliases: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The settings in the YAML file at ``path`` (local or fsspec URL), keys as field names.

    ``aliases`` maps a flag's spelling to its field where the two differ (``json`` for
    ``--json`` -> ``json_output``); either spelling is read.

    Raises :class:`ConfigFileError` for a missing or unparsable file, a document that is not a
    mapping, a key that ``config_type`` does not have (with the closest names), or a YAML
    boolean (``true``, ``yes``, ``on``) for a setting that is not one: pydantic would read it
    as 1.
    """
    document = _load_yaml(path)
    aliases = aliases or {}
    self_parsed = _parsed_by_validator(config_type)
    values = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name in values:  # batch_size and batch-size: the last one won, unsaid
            raise ConfigFileError(
                f"config file {path}: {key} is given twice, also spelled another way"
            )
        values[name] = _checked_value(name, value, config_type, path, name in self_parsed)
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping: YAML calls that
    an error, but PyYAML kept the last value without a word (``batch_size: 64`` written twice
    in a long file, the first one read by the user)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *defaults, which later keys override
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice, on line {first} and", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_yaml(path: str) -> dict[Any, Any]:
    """The mapping in the YAML file at ``path`` (empty for an empty file)."""
    try:
        with fsspec.open(path, "r") as handle:
            document = yaml.load(handle, Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"config file {path} is not valid YAML: {error}") from None
    except IsADirectoryError:
        raise ConfigFileError(f"config file {path} is a folder, not a YAML file") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigFileError(f"config file {path}: expected key: value lines, not a list or text")
    return document


def _checked_value(
    key: str, value: Any, config_type: type[BaseModel], path: str, self_parsed: bool
) -> Any:
    """``value`` of setting ``key`` of the config file at ``path``, checked against
    ``config_type``; one value of a list setting becomes a list of it (unless the field's own
    validator parses it: ``self_parsed``)."""
    _check_key(key, config_type, f"config file {path}")
    annotation = config_type.model_fields[key].annotation
    item = _item_model(annotation)
    if item is not None and isinstance(value, list):
        for index, entry in enumerate(value):  # an ``also:`` target's own keys
            for inner in entry if isinstance(entry, dict) else ():
                _check_key(str(inner), item, f"config file {path}: {key}: value {index + 1}")
    if isinstance(value, bool) and not _admits_bool(annotation):
        raise ConfigFileError(
            f"config file {path}: {key}: got the YAML boolean {str(value).lower()} "
            "(YAML reads true/false, yes/no and on/off as booleans); this setting is not one"
        )
    if isinstance(value, str | int | float) and _takes_only_lists(annotation) and not self_parsed:
        return [value]  # one value of a repeatable flag, as on the command line
    return value


def _check_key(key: str, model: type[BaseModel], where: str) -> None:
    """Raise :class:`ConfigFileError` at ``where`` if ``model`` has no field ``key``, naming
    the closest ones."""
    if key in model.model_fields:
        return
    fields = sorted(model.model_fields)
    close = difflib.get_close_matches(key.lower(), fields, n=3)  # LR: difflib tells case
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    on = key.removeprefix("no_")
    if on != key and on in model.model_fields and _admits_bool(model.model_fields[on].annotation):
        # the --no-shuffle flag's key is shuffle's: "did you mean shuffle?" would turn it on
        hint = f"; --no-{on.replace('_', '-')} is {on}: false"
    raise ConfigFileError(f"{where}: unknown key '{key}'{hint} (known: {', '.join(fields)})")


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of each item of a field of type ``annotation`` (``list[AlsoTarget]``)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is list else ()
    kind = args[0] if args else None
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def comma_separated_ints(value: Any, example: str) -> Any:
    """A flag's integers as it spells them (``--hidden 512,512``; one integer from a config
    file) as a tuple, for a ``before`` validator; ``ValueError`` naming ``example`` for an
    empty or non-integer part (one comma may end the list). Other values are left to the
    field."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        text = value.strip()
        parts = text.removesuffix(",").split(",") if text else []  # a last comma ends it
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(f"expected {example}, got {value!r}") from None
    return value


def _parsed_by_validator(config_type: type[BaseModel]) -> set[str]:
    """The fields of ``config_type`` that parse their raw value themselves (a ``before``
    validator), as their flag spells it: ``--hidden 512,512`` is one string, not a list."""
    validators = config_type.__pydantic_decorators__.field_validators.values()
    return {name for v in validators if v.info.mode == "before" for name in v.info.fields}


def _takes_only_lists(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` takes a list (or tuple) and no single value."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool(kinds) and all(map(_takes_only_lists, kinds))
    return typing.get_origin(annotation) in (list, tuple, Sequence)


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` takes a boolean (``bool``, ``bool | None``...)."""
    return annotation is bool or any(map(_admits_bool, typing.get_args(annotation)))


def load_job_config(config_type: type[Config], path: str | None = None, **overrides: Any) -> Config:
    """``config_type`` from the file at ``path`` (if any) with ``overrides`` on top, validated.

    Raises :class:`ConfigFileError` naming the file's key or the override's ``--flag``.
    """
    return _build(config_type, path, aliases={}, defaults={}, overrides=overrides)


def job_config(config_type: type[Config], ctx: typer.Context) -> Config:
    """The job's validated config from its command line (``ctx``) and its ``--config`` file.

    Flags typed on the command line override the file; flags left at their defaults do not.
    Any error is a ``typer.BadParameter`` (exit code 2) naming the file's key or the flag.
    """
    params = {name: value for name, value in ctx.params.items() if name not in CLI_ONLY}
    typed = {name: value for name, value in params.items() if _typed(ctx, name)}
    defaults = {  # None means "not set": the config's own default applies
        name: value for name, value in params.items() if name not in typed and value is not None
    }
    try:
        return _build(
            config_type,
            ctx.params.get("config"),
            aliases=_flag_aliases(ctx),
            spelled=_spelled(ctx),
            defaults=defaults,
            overrides=typed,
        )
    except ConfigFileError as error:
        raise typer.BadParameter(str(error)) from None


def explain(
    error: ValidationError,
    *,
    from_file: Set[str],
    path: str | None,
    spelled: Mapping[str, str] | None = None,
) -> str:
    """A validation error as ``--flag: message`` clauses (the message alone where it begins with
    its flag), or ``config file F: key: message``;
    ``spelled`` gives a field's name on the command line where it is not ``--field`` (an
    argument's ``CACHE``, a flag named otherwise)."""
    clauses = []
    for part in error.errors():
        field = str(part["loc"][0]) if part["loc"] else None
        # a validator's own ValueError: its words, without pydantic's "Value error, " prefix
        raised = part.get("ctx", {}).get("error") if part["type"] == "value_error" else None
        message = part["msg"] if raised is None else str(raised)
        loc = part["loc"]
        index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        if index is not None:  # one value of a list setting, or a key inside it
            inner = ".".join(map(str, loc[2:]))
            if part["type"] == "missing" and not inner:
                message = f"too few values, no value {index + 1}"
            else:
                message = f"value {index + 1}: {inner + ': ' if inner else ''}{message}"
        if field is None:
            where = f"config file {path}" if path else None
        elif field in from_file:
            where = f"config file {path}: {field}"
        else:
            where = (spelled or {}).get(field, f"--{field.replace('_', '-')}")
            empty = part["type"] == "too_short" and not part["input"]  # a repeatable flag
            if (part["type"] == "missing" or empty) and len(loc) == 1:
                message = f"required; give {where} or set {field} in --config"
        clauses.append(message if _names_first(message, where) else f"{where}: {message}")
    return "; ".join(clauses)


def _names_first(message: str, where: str | None) -> bool:
    """Whether ``message`` needs no ``where:`` prefix: there is none, or the message (a
    parser's own, ``--also takes ...``) already begins with that flag."""
    return where is None or message == where or message.startswith((f"{where} ", f"{where}:"))


def _build(
    config_type: type[Config],
    path: str | None,
    *,
    aliases: Mapping[str, str],
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    spelled: Mapping[str, str] | None = None,
) -> Config:
    if path is not None:  # --config "$UNSET" read no file, unsaid
        try:
            check_path(path)
        except ValueError as error:
            raise ConfigFileError(f"--config: {error}") from None
    values = read_config_file(path, config_type, aliases) if path is not None else {}
    try:
        return config_type(**{**defaults, **values, **overrides})
    except ValidationError as error:
        from_file = set(values) - set(overrides)
        raise ConfigFileError(
            explain(error, from_file=from_file, path=path, spelled=spelled)
        ) from None


def _flag_aliases(ctx: typer.Context) -> dict[str, str]:
    """Each long flag's name as a config key, where it differs from its parameter's name."""
    aliases = {}
    for param in ctx.command.params:
        for flag in param.opts:
            key = flag.removeprefix("--").replace("-", "_")
            if flag.startswith("--") and key != param.name and param.name is not None:
                aliases[key] = param.name
    return aliases


def _spelled(ctx: typer.Context) -> dict[str, str]:
    """Each parameter's name as the command line spells it: an argument's metavar (``CACHE``),
    an option's first long flag."""
    spelled = {}
    for param in ctx.command.params:
        if param.name is None:
            continue
        if param.param_type_name == "argument":
            spelled[param.name] = param.human_readable_name
        else:
            spelled[param.name] = next((f for f in param.opts if f.startswith("--")), param.opts[0])
    return spelled


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter ``name`` was given on the command line (or its env variable)."""
    source = ctx.get_parameter_source(name)  # typer's own ParameterSource enum, not click's
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
