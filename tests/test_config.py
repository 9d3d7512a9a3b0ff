"""``--config FILE.yaml``: shipped setups validate, flags override the file, errors name the key."""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import BaseModel
from support import pvu, unboxed

import jobs.config
import jobs.run.cache
import jobs.run.train_head
from jobs.cli import app
from jobs.config import CLI_ONLY, CONFIGS, ConfigFileError, _load_yaml, load_job_config
from jobs.info import InfoJobConfig
from jobs.run.cache_config import AlsoDeterioration, AlsoTarget, CacheJobConfig
from jobs.run.demo import DemoConfig
from jobs.run.evaluate import EvaluateJobConfig
from jobs.run.label_remap import LabelRemapJobConfig
from jobs.run.plan import PlanJobConfig
from jobs.run.train_head import TrainHeadConfig
from jobs.shards import ShardsJobConfig

#: Each shipped file's job, by file name: a config for a job missing here fails the test.
JOB_OF_FILE: dict[str, type[BaseModel]] = {
    "cache.yaml": CacheJobConfig,
    "train-head.yaml": TrainHeadConfig,
    "shards.yaml": ShardsJobConfig,
    "evaluate.yaml": EvaluateJobConfig,
    "info.yaml": InfoJobConfig,
    "label-remap.yaml": LabelRemapJobConfig,
    "plan.yaml": PlanJobConfig,
}
SHIPPED = sorted(CONFIGS.glob("*/*.yaml"))
VIT_SIZES = {"ti": "tiny", "s": "small", "b": "base", "l": "large"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_passes_the_job_validation(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's paths are relative to where `make demo` runs
    weights = tmp_path / "demo-output" / "backbone" / "backbone.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert path.name in JOB_OF_FILE, f"{path}: which job reads it? add it to JOB_OF_FILE"
    load_job_config(JOB_OF_FILE[path.name], str(path))  # raises naming the key at fault


def test_the_paper_setups_cover_four_vits_seven_epochs_and_appendix_a() -> None:
    for short, size in VIT_SIZES.items():
        folder = CONFIGS / f"in21k-vit-{short}"
        cache = load_job_config(CacheJobConfig, str(folder / "cache.yaml"))
        assert cache.backbone == f"vit_{size}_patch16_224.augreg_in21k"
        assert (cache.epochs, cache.augment, cache.weights) == (7, "train", "hub")
        head = load_job_config(TrainHeadConfig, str(folder / "train-head.yaml"))
        assert head.cache == [cache.output]
        paper = TrainHeadConfig(cache=["x"], output="y")  # the defaults are appendix A
        for field in ("episodes", "episode_size", "lr", "warmup_lr", "min_lr", "betas"):
            assert getattr(head, field) == getattr(paper, field), field
        assert (head.loss, head.hidden, head.warmup_episodes) == ("ranking", (512, 512), 25)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainHeadConfig]:
    """The configs ``pvu train-head`` would run, instead of running them."""
    configs: list[TrainHeadConfig] = []
    monkeypatch.setattr(jobs.run.train_head, "run_train_head", configs.append)
    return configs


def test_flags_typed_on_the_command_line_override_the_file(
    tmp_path: Path, captured: list[TrainHeadConfig]
) -> None:
    path = _write(tmp_path, "cache: [a, b]\noutput: out\nepisodes: 50\nlr: 0.01\nhidden: [64]\n")
    result = pvu("train-head", "--config", path, "--episodes", "40")
    assert result.exit_code == 0, result.output
    [config] = captured
    assert config.cache == ["a", "b"] and config.output == "out"
    assert (config.episodes, config.lr, config.hidden) == (40, 0.01, (64,))
    assert config.batch_size == 2048, "a flag left at its default does not override"
    pvu("train-head", "--config", path, "--cache", "c", "--lr", "0.1")
    assert captured[1].cache == ["c"] and captured[1].lr == 0.1 and captured[1].episodes == 50


def test_unknown_key_is_a_usage_error_naming_it(
    tmp_path: Path, captured: list[TrainHeadConfig]
) -> None:
    path = _write(tmp_path, "cache: [a]\noutput: out\nepisode: 5\n")
    result = pvu("train-head", "--config", path)
    assert result.exit_code == 2 and not captured
    assert "job.yaml: unknown key 'episode'; did you mean episodes" in unboxed(result.text)
    assert "Traceback" not in result.output
    # inside an --also target too (it said "output: Field required ... Extra inputs ...")
    path = _write(tmp_path, "shards: s\noutput: o\nalso:\n  - {backbone: r, outptu: c}\n")
    result = pvu("plan", "--config", path)
    said = "job.yaml: also: value 1: unknown key 'outptu'; did you mean output?"
    assert result.exit_code == 2 and said in unboxed(result.text), result.output


def test_bad_value_in_the_file_names_the_file_and_key(
    tmp_path: Path, captured: list[TrainHeadConfig]
) -> None:
    path = _write(tmp_path, "cache: [a]\noutput: out\nloss: hinge\n")
    result = pvu("train-head", "--config", path)
    assert result.exit_code == 2 and not captured
    assert "job.yaml: loss: Input should be 'ranking' or 'l2'" in unboxed(result.text)
    result = pvu("train-head", "--config", path, "--episodes", "0")
    assert result.exit_code == 2 and "--episodes" in result.output
    result = pvu("train-head", "--config", path, "--loss", "l2", "--betas", "0.9", "1")
    assert result.exit_code == 2 and "--betas: each beta must be in [0, 1)" in (
        unboxed(result.text)
    )
    flags = ["--cache", "a", "--output", "o", "--episodes", "5", "--warmup-episodes", "5"]
    result = pvu("train-head", *flags)
    expected = "Invalid value: --warmup-episodes (5) must be less than --episodes (5)"
    assert result.exit_code == 2 and expected in unboxed(result.text)


def test_required_settings_may_come_from_either_place(
    tmp_path: Path, captured: list[TrainHeadConfig]
) -> None:
    result = pvu("train-head", "--cache", "a")
    assert result.exit_code == 2 and "--output" in result.output and not captured
    result = pvu("train-head", "--output", "o")  # pydantic's "List should have at least 1 item"
    said = "--cache: required; give --cache or set cache in --config"
    assert result.exit_code == 2 and said in unboxed(result.text) and not captured
    path = _write(tmp_path, "output: out\n")
    result = pvu("train-head", "--config", path, "--cache", "a")
    assert result.exit_code == 0, result.output


def test_one_value_of_a_repeatable_setting_needs_no_list(tmp_path: Path) -> None:
    """``cache: PATH`` as ``--cache PATH`` is given once; it was refused as "not a valid list"."""
    path = _write(tmp_path, "cache: c1\noutput: out\nhidden: 256\n")
    config = load_job_config(TrainHeadConfig, path)
    assert config.cache == ["c1"] and tuple(config.hidden) == (256,)
    path = _write(tmp_path, "dataset: d=c\ntsne-classes: 3\n")
    config = load_job_config(EvaluateJobConfig, path)
    assert config.dataset == ["d=c"] and list(config.tsne_classes) == [3]
    path = _write(
        tmp_path,
        "shards: s\nbackbone: resnet10t\noutput: o\n"
        "also: {backbone: resnet14t, weights: random, output: o2}\n",
    )
    config = load_job_config(CacheJobConfig, path)
    assert [target.backbone for target in config.also] == ["resnet14t"]


def test_also_deteriorate_reads_from_a_file_as_the_flag_reads_it(tmp_path: Path) -> None:
    """``also_deteriorate:`` as ``also:``: one value or a list, each ``KIND:STRENGTH,OUTPUT``
    (the flag's text) or ``{deteriorate, output}``."""
    base = "shards: s\nbackbone: resnet10t\noutput: o\naugment: eval\n"
    for given in (
        "also_deteriorate: blur:0.5,o2\n",
        "also_deteriorate:\n  - blur:0.5,o2\n",
        "also_deteriorate: {deteriorate: 'blur:0.5', output: o2}\n",
    ):
        config = load_job_config(CacheJobConfig, _write(tmp_path, base + given))
        own, copy = config.targets()
        assert (own.deteriorate, own.output) == (None, str(Path.cwd() / "o"))
        assert (copy.deteriorate.kind, copy.deteriorate.strength) == ("blur", 0.5)
        assert (copy.output, copy.backbone) == (str(Path.cwd() / "o2"), "resnet10t")
    path = _write(tmp_path, base + "also_deteriorate: [{deteriorate: 'blur:0.5', outptu: o2}]\n")
    with pytest.raises(ConfigFileError, match="value 1: unknown key 'outptu'; did you mean output"):
        load_job_config(CacheJobConfig, path)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("augment: eval\nalso_deteriorate: [blur:0.5,o2]\n", "got 'blur:0.5', 'o2' as values"),
        ("also: [resnet18,hub,o2]\n", "got 'resnet18', 'hub', 'o2' as values"),
        ("also: [resnet18,o2]\n", "got 'resnet18', 'o2' as values"),
    ],
)
def test_a_flow_list_split_at_its_commas_says_to_quote_each_item(
    tmp_path: Path, given: str, said: str
) -> None:
    """``also_deteriorate: [blur:0.5,o2]`` is two items to YAML, 'blur:0.5' and 'o2': the
    error named 'blur:0.5' as lacking its output, which the file gives right beside it."""
    path = _write(tmp_path, "shards: s\nbackbone: resnet10t\noutput: o\n" + given)
    result = pvu("cache", "--config", path)
    text = unboxed(result.text)
    assert result.exit_code == 2, result.output
    assert said in text and "a YAML flow list [a,b] splits at every comma" in text, text
    assert "quote each item (['a,b']) or write one item per line (- a,b)" in text


def test_a_pair_given_one_value_names_what_is_missing(tmp_path: Path) -> None:
    """``betas: 0.9`` was 'betas: Field required', for a key the file does set."""
    path = _write(tmp_path, "cache: c1\noutput: out\nbetas: [0.9, x]\n")
    with pytest.raises(ConfigFileError, match="betas: value 2: Input should be a valid number"):
        load_job_config(TrainHeadConfig, path)
    path = _write(tmp_path, "cache: c1\noutput: out\nbetas: 0.9\n")
    with pytest.raises(ConfigFileError, match=r"betas: too few values, no value 2$"):
        load_job_config(TrainHeadConfig, path)
    path = _write(tmp_path, "shards: s\nbackbone: resnet10t\noutput: o\nalso: [{backbone: b}]\n")
    with pytest.raises(ConfigFileError, match="also: value 1: output: Field required"):
        load_job_config(CacheJobConfig, path)


def test_a_setting_spelled_as_its_flag_is_read_as_the_flag_reads_it(tmp_path: Path) -> None:
    """``hidden: 256,128`` as ``--hidden 256,128``; it was taken as one width "256,128"."""
    path = _write(tmp_path, "cache: c1\noutput: out\nhidden: 256,128\n")
    assert tuple(load_job_config(TrainHeadConfig, path).hidden) == (256, 128)
    path = _write(tmp_path, "dataset: d=c\ntsne-classes: 3,5,7,\n")  # a trailing comma too
    assert list(load_job_config(EvaluateJobConfig, path).tsne_classes) == [3, 5, 7]


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "expected key: value"), ("a: [\n", "not valid YAML")],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigFileError, match=message):
        load_job_config(TrainHeadConfig, _write(tmp_path, text))
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_job_config(TrainHeadConfig, str(tmp_path / "missing.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.1 # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigFileError, match=r"latin1\.yaml is not valid YAML"):
        load_job_config(TrainHeadConfig, str(tmp_path / "latin1.yaml"))
    with pytest.raises(ConfigFileError, match="is a folder"):
        load_job_config(TrainHeadConfig, str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cache: c\nbatch_size: 64\nlr: 0.1\nbatch_size: 8\n",
            r"'batch_size' is given twice, on line 2",
        ),
        ("cache: c\nbatch_size: 64\nbatch-size: 8\n", "batch-size is given twice, also spelled"),
        ("cache: [c, {a: 1, a: 2}]\n", "'a' is given twice"),
    ],
)
def test_a_key_given_twice_is_refused_not_the_last_one_taken(
    tmp_path: Path, text: str, message: str
) -> None:
    """PyYAML kept the last of two equal keys without a word (YAML calls it an error), and a
    setting spelled both ways (batch_size, batch-size) kept the later one: a long file's first
    value, the one the user read, was not the one trained with."""
    with pytest.raises(ConfigFileError, match=message):
        load_job_config(TrainHeadConfig, _write(tmp_path, text), output="o")
    merged = "defaults: &d {lr: 0.1}\nbatches: {<<: *d, lr: 0.2}\n"  # a merge key is overridden
    assert _load_yaml(_write(tmp_path, merged))["batches"] == {"lr": 0.2}


@pytest.mark.parametrize("key", ["no_shuffle", "no-shuffle"])
def test_a_no_flag_as_a_key_says_which_value_it_is(tmp_path: Path, key: str) -> None:
    """``no_shuffle: true``, the ``--no-shuffle`` flag as a key, was answered "did you mean
    shuffle?", which written ``shuffle: true`` does the opposite."""
    path = _write(tmp_path, f"{key}: true\n")
    with pytest.raises(ConfigFileError, match="--no-shuffle is shuffle: false") as error:
        load_job_config(ShardsJobConfig, path, input="i", output="o")
    assert "did you mean" not in str(error.value)


def test_a_yaml_boolean_is_no_number(tmp_path: Path) -> None:
    """YAML reads ``yes`` as true, which pydantic would take as 1 for an integer setting."""
    with pytest.raises(ConfigFileError, match=r"job\.yaml: seed: got the YAML boolean true"):
        load_job_config(TrainHeadConfig, _write(tmp_path, "seed: yes\n"), cache=["a"], output="o")
    config = load_job_config(
        TrainHeadConfig, _write(tmp_path, "resume: on\n"), cache=["a"], output="o"
    )
    assert config.resume is True


def test_cache_reads_its_config_file_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[CacheJobConfig] = []
    monkeypatch.setattr(
        jobs.run.cache, "run_cache", lambda config: runs.append(config) or _NoFailures
    )
    path = _write(tmp_path, "shards: s\nbackbone: resnet10t\noutput: o\nweights: random\n")
    result = pvu("cache", "--config", path, "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert (runs[0].backbone, runs[0].epochs, runs[0].weights) == ("resnet10t", 3, "random")


class _NoFailures:
    failed: dict[str, str] = {}  # noqa: RUF012


#: Each command's required settings, with the config type its job validates them into.
REQUIRED = [
    ("cache", CacheJobConfig, {"shards": "s", "backbone": "resnet10t", "output": "o"}),
    ("train-head", TrainHeadConfig, {"cache": ["c"], "output": "o"}),
    ("shards", ShardsJobConfig, {"input": "i", "output": "o"}),
    ("evaluate", EvaluateJobConfig, {"dataset": ["d=c"]}),
    ("info", InfoJobConfig, {"cache": "c"}),
    ("plan", PlanJobConfig, {"shards": "s", "backbone": "resnet10t", "output": "o"}),
    ("label-remap", LabelRemapJobConfig, {"classes": "c", "head": "h", "output": "o"}),
    ("demo", DemoConfig, {}),
]


@pytest.mark.parametrize(("command", "config_type", "required"), REQUIRED)
def test_a_file_alone_can_hold_every_setting_keyed_as_the_flags_are_spelled(
    command, config_type, required, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config`` alone runs every job: no flag is required on the command line, and a key
    may be spelled as its flag (``json`` for ``--json``, whose field is ``json_output``)."""
    click_command = typer.main.get_command(app).job(command)
    module = sys.modules[click_command.callback.__module__]
    built: list[BaseModel] = []

    def build_then_stop(config_type, ctx):
        built.append(jobs.config.job_config(config_type, ctx))
        raise typer.Exit(0)

    monkeypatch.setattr(module, "job_config", build_then_stop)
    flagged = {"json": True} if command == "info" else {}
    document = {name.replace("_", "-"): value for name, value in required.items()} | flagged
    result = pvu(command, "--config", _write(tmp_path, yaml.safe_dump(document)))
    assert result.exit_code == 0, result.output
    expected = config_type(**required, **({"json_output": True} if flagged else {}))
    assert built == [expected]


@pytest.mark.parametrize(("command", "config_type", "required"), REQUIRED)
def test_help_shows_the_defaults_the_job_uses(command, config_type, required) -> None:
    """A flag's default in --help is the config's, so a file plus defaults means what it says."""
    params = typer.main.get_command(app).job(command).params
    reference = config_type(**required)
    for param in params:
        if param.name in CLI_ONLY | {"help"} or param.name in required or param.default is None:
            continue  # None: not set, the config's default applies
        from_cli = config_type(**required, **{param.name: param.default})
        assert getattr(from_cli, param.name) == getattr(reference, param.name), param.name


#: Every path or URL flag of every job: (command, flag, its value with ``{}`` the path);
#: ``CACHE`` is ``pvu info``'s argument.
PATH_FLAGS = [
    *((command, flag, "{}") for command in ("cache", "plan")
      for flag in ("--shards", "--output", "--weights", "--label-remap")),
    ("cache", "--also", "resnet18,random,{}"),
    ("cache", "--also", "resnet18,{},o2"),
    ("cache", "--also-deteriorate", "blur:0.5,{}"),
    ("train-head", "--cache", "{}"),
    ("train-head", "--output", "{}"),
    ("shards", "--input", "{}"),
    ("shards", "--output", "{}"),
    ("evaluate", "--dataset", "d={}"),
    ("evaluate", "--head", "{}"),
    ("evaluate", "--upstream", "{}"),
    ("evaluate", "--report", "{}"),
    ("evaluate", "--deterioration", "{}"),
    ("info", "CACHE", "{}"),
    ("label-remap", "--classes", "{}"),
    ("label-remap", "--head", "{}"),
    ("label-remap", "--output", "{}"),
    ("demo", "--output", "{}"),
    *((command, "--config", "{}") for command, _, _ in REQUIRED),
]  # fmt: skip


def _command_line(command: str, flag: str, value: str) -> list[str]:
    """``pvu command`` with its required settings (:data:`REQUIRED`), ``flag``'s among them
    given as ``value``."""
    required = next(settings for name, _, settings in REQUIRED if name == command)
    args = [command]
    for name, setting in required.items():
        spelled = "CACHE" if (command, name) == ("info", "cache") else f"--{name.replace('_', '-')}"
        if spelled != flag:
            given = setting[0] if isinstance(setting, list) else setting
            args += [given] if spelled == "CACHE" else [spelled, given]
    return [*args, *([value] if flag == "CACHE" else [flag, value])]


@pytest.mark.parametrize("path", ["", " x "], ids=["empty", "spaces"])
@pytest.mark.parametrize(("command", "flag", "value"), PATH_FLAGS)
def test_every_path_flag_refuses_an_empty_or_space_padded_path_naming_the_flag(
    command: str, flag: str, value: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--output "$UNSET"`` wrote into the working folder (pvu demo), ``--config ""`` read no
    file, unsaid; the others were refused, each job in its own words or not at all (``pvu
    shards --input ' x '`` did not exist). One type, :data:`jobs.config.PathOrUrl`, refuses
    every one in one form, naming the flag."""
    if flag in ("--also", "--also-deteriorate") and path.strip():
        pytest.skip(f"{flag} trims its parts: 'resnet18, random, out' reads 'out'")
    monkeypatch.chdir(tmp_path)
    result = pvu(*_command_line(command, flag, value.format(path)))
    reason = "is empty: give a local path" if not path.strip() else "starts or ends with a space"
    said = rf"{flag}: (value 1: |'d=[^']*': )?{re.escape(repr(path))} {reason}"
    assert result.exit_code == 2, result.output
    assert re.search(said, unboxed(result.output)), result.output
    assert not list(tmp_path.iterdir())  # nothing made, or read, in the working folder


def _checks_path(annotation: object, metadata: Sequence[object] = ()) -> bool:
    """Whether a field of ``annotation`` (``metadata`` its own validators) is checked as a
    path, in any of its parts (``list[PathOrUrl]``, ``PathOrUrl | None``)."""
    checked = (jobs.config.check_path, jobs.config._check_path_text)
    parts = [*metadata, *typing.get_args(annotation)]
    return any(getattr(part, "func", None) in checked or _checks_path(part) for part in parts)


def _holds_text(annotation: object) -> bool:
    """Whether a field of ``annotation`` takes text or a path (a ``Literal`` aside)."""
    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return False
    return any(_holds_text(arg) for arg in typing.get_args(annotation))


#: Each job's settings that take text but name no path or URL.
NOT_PATHS = {
    "backbone", "model_kwargs", "image_key", "label_key", "ray_address", "ambiguity_key",
    "deteriorate", "prefix", "path_column", "label_column", "tsne_dataset", "kinds",
    "dataset",  # NAME=URL: its URL is checked by check_path in its own validator
}  # fmt: skip


@pytest.mark.parametrize(
    "config_type", [*(c for _, c, _ in REQUIRED), AlsoTarget, AlsoDeterioration]
)
def test_every_path_setting_is_checked_as_one(config_type: type[BaseModel]) -> None:
    """A new path or URL setting gets PathOrUrl (or LocalPath), not a check of its own."""
    for name, field in config_type.model_fields.items():
        if _holds_text(field.annotation) and name not in NOT_PATHS:
            assert _checks_path(field.annotation, field.metadata), f"{config_type.__name__}.{name}"


def test_local_paths_are_made_absolute_for_the_actors(tmp_path, monkeypatch) -> None:
    """Ray actors do not start in the driver's folder: a relative path would point elsewhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    config = CacheJobConfig(shards="s", backbone="resnet10t", output="out", weights="w.safetensors")
    assert config.output == str(tmp_path / "out")
    assert config.weights == str(tmp_path / "w.safetensors")
    assert CacheJobConfig(shards="s", backbone="resnet10t", output="s3://b/c").output == "s3://b/c"


def test_image_key_takes_several_extensions_as_its_help_shows_them(tmp_path: Path) -> None:
    """'--image-key jpg/png', copied from the help's default, matched no member at all."""
    base = {"shards": "s", "backbone": "resnet10t", "output": "s3://b/c"}
    assert CacheJobConfig(**base, image_key="jpg/png").image_keys == ("jpg", "png")
    assert CacheJobConfig(**base, image_key="webp").image_keys == ("webp",)
    # webdataset's own separator: taken as the one extension "jpg;png", so no sample matched
    assert CacheJobConfig(**base, image_key="jpg;png").image_keys == ("jpg", "png")
    default = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
    default += ("pnm",)
    assert CacheJobConfig(**base).image_keys == default
    with pytest.raises(ValueError, match="names no file extension"):
        CacheJobConfig(**base, image_key=" / ;")
    # an entry that is no extension failed every unit at run time, each try
    assert CacheJobConfig(**base, image_key="jpg/.").image_keys == ("jpg",)
    with pytest.raises(ValueError, match=r"--ambiguity-key '\.' names no member"):
        CacheJobConfig(**base, ambiguity_key=".")
    path = tmp_path / "cache.yaml"  # a config file's list, as the flag's jpg/png
    path.write_text("shards: s\nbackbone: resnet10t\noutput: o\nimage_key: [jpg, png]\n")
    assert load_job_config(CacheJobConfig, str(path)).image_keys == ("jpg", "png")


def test_a_label_key_names_a_member_or_a_json_members_field() -> None:
    base = {"shards": "s", "backbone": "resnet10t", "output": "s3://b/c"}
    for good in ("cls", "json:label", "json:annotation.class_id"):
        assert CacheJobConfig(**base, label_key=good).label_key == good
    for bad in ("", " ", ":label", "json:", "json:a..b"):
        with pytest.raises(ValueError, match="EXT:FIELD for a field of a JSON member"):
            CacheJobConfig(**base, label_key=bad)
    result = pvu("cache", *("--shards", "s", "--backbone", "resnet10t", "--output", "o"),
                 "--label-key", "json:")  # fmt: skip
    assert result.exit_code == 2 and "--label-key 'json:'" in unboxed(result.output)


def test_model_kwargs_are_a_mapping_in_a_file_and_json_on_the_command_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "shards: s\nbackbone: resnet10t\noutput: o\nmodel_kwargs: {global_pool: max}\n"
        "also: {backbone: resnet14t, weights: random, output: o2, model_kwargs: {drop_rate: 0}}\n",
    )
    config = load_job_config(CacheJobConfig, path)
    first, second = config.targets()
    assert first.model_kwargs == {"global_pool": "max"} and second.model_kwargs == {"drop_rate": 0}
    flag = CacheJobConfig(shards="s", backbone="resnet10t", output="o", model_kwargs='{"a": 1}')
    assert flag.model_kwargs == {"a": 1}
    refused = (
        ("{global_pool", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"num_classes": 3}', "may not set num_classes"),
        ('{"in_chans": 1}', "in_chans=1: pvu decodes every image to RGB"),
    )
    for bad, said in refused:
        with pytest.raises(ValueError, match=said):
            CacheJobConfig(shards="s", backbone="resnet10t", output="o", model_kwargs=bad)


def test_a_key_in_capitals_is_told_its_field(tmp_path: Path) -> None:
    """``LR: 0.1`` got the list of known keys and no hint: difflib scores case as a difference."""
    with pytest.raises(ConfigFileError, match="unknown key 'LR'; did you mean lr"):
        load_job_config(TrainHeadConfig, _write(tmp_path, "LR: 0.1\n"), output="o")
