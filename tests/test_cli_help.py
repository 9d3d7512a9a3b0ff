"""``pvu --help`` and every sub-command's ``--help``: each flag listed, none with a value metavar.

typer 0.29 renders every on/off flag, ``--help`` and ``--version`` included, as if it took a
``<bool>`` value (pyproject.toml keeps typer below 0.29 for that).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from jobs.cli import app

PVU = typer.main.get_command(app)
SUBCOMMANDS = sorted(PVU.commands)


def listed_options(command: typer.core.TyperCommand | typer.core.TyperGroup) -> list[str]:
    """The option strings ``command --help`` should list: its own, and ``--help``."""
    options = ["--help"]
    for param in command.params:
        if param.param_type_name == "option" and not getattr(param, "hidden", False):
            options += [*param.opts, *param.secondary_opts]
    return options


def heavy_modules_after(script: str, heavy: tuple[str, ...]) -> list[str]:
    """The modules of ``heavy`` that a fresh Python has imported once it has run ``script``."""
    script += f"import json, sys; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    answer = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return json.loads(answer.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [[], *([name] for name in SUBCOMMANDS)], ids=["pvu", *SUBCOMMANDS])
def test_help_lists_every_flag_without_a_bool_metavar(args: list[str]) -> None:
    command = PVU.job(args[0]) if args else PVU
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output, result.output
    for option in listed_options(command):
        assert option in result.output, f"{option} missing from pvu {' '.join(args)} --help"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_text_flag_says_what_it_takes(name: str) -> None:
    """A flag taking text shows what to give (``URL``, ``DIR``, ``NAME=URL``), not typer's
    ``<str>``, which tells a user nothing."""
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    bare = [
        param.opts[0]
        for param in PVU.job(name).params
        if param.param_type_name == "option" and param.metavar is None and param.type.name == "str"
    ]
    assert bare == [], f"pvu {name} --help shows {bare} as <str>: give each a metavar"
    assert "<str>" not in result.output.split("Options")[-1], result.output


def test_pvu_help_lists_each_job_by_its_own_help_without_importing_the_jobs() -> None:
    """The listing reads the jobs' docstrings from source: it matches each job's own help, and
    ``pvu --help`` answers without importing torch (seconds on a small machine)."""
    for name in SUBCOMMANDS:
        assert PVU.commands[name].help == PVU.job(name).help, name
    script = (
        "from typer.testing import CliRunner; from jobs.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'train-head' in result.output, result.output\n"
    )
    assert heavy_modules_after(script, ("torch", "timm", "ray", "pyarrow")) == []


def test_every_job_is_covered() -> None:
    jobs = {"cache", "train-head", "shards", "label-remap", "evaluate", "info", "plan", "demo"}
    assert jobs <= set(SUBCOMMANDS)
    assert "--version" in listed_options(PVU)


def test_every_jobs_help_answers_without_importing_torch_timm_or_ray() -> None:
    """``pvu <job> --help`` and ``python -m jobs.<job> --help`` import the job's flags, not the
    job: torch, timm and Ray cost seconds to import on a small machine."""
    script = (
        "import runpy, sys; from typer.testing import CliRunner; from jobs.cli import JOBS, app\n"
        "for name, target in JOBS.items():\n"
        "    result = CliRunner().invoke(app, [name, '--help'])\n"
        "    assert result.exit_code == 0 and '--config' in result.output, result.output\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_module(target.split(':')[0], run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
    )
    assert heavy_modules_after(script, ("torch", "timm", "ray")) == []


@pytest.mark.parametrize("job", ["cache", "train_head", "label_remap", "evaluate", "plan", "demo"])
def test_a_commands_module_still_offers_its_jobs_config_and_run(job: str) -> None:
    """``from jobs.cache import CacheJobConfig, run_cache`` still works: the command's module
    finds its job's names in ``jobs.run.<job>`` when asked for them."""
    command, run = (
        importlib.import_module(f"jobs.{job}"),
        importlib.import_module(f"jobs.run.{job}"),
    )
    public = [name for name in vars(run) if name.startswith(("run_", "Config")) or "Config" in name]
    assert public and all(getattr(command, name) is getattr(run, name) for name in public)
    with pytest.raises(AttributeError):
        command.no_such_name  # noqa: B018


#: Each command's config class, and the fewest settings it validates with.
CONFIGS = {
    "cache": (
        "jobs.run.cache_config:CacheJobConfig",
        {"shards": "s", "backbone": "resnet18", "output": "o"},
    ),
    "plan": ("jobs.run.plan:PlanJobConfig", {"shards": "s", "backbone": "resnet18", "output": "o"}),
    "train-head": ("jobs.run.train_head:TrainHeadConfig", {"cache": ["c"], "output": "o"}),
    "evaluate": ("jobs.run.evaluate:EvaluateJobConfig", {"dataset": ["a=c"]}),
    "label-remap": (
        "jobs.run.label_remap:LabelRemapJobConfig",
        {"classes": "c", "head": "imagenet-1k", "output": "o.json"},
    ),
    "info": ("jobs.info:InfoJobConfig", {"cache": "c"}),
    "shards": ("jobs.shards:ShardsJobConfig", {"input": "i", "output": "o"}),
    "demo": ("jobs.run.demo:DemoConfig", {}),
}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_flags_default_is_its_configs_default(name: str) -> None:
    """The default ``--help`` shows is the one a ``--config`` file or ``load_job_config`` gets
    where the setting is left out: a command line without the flag and a config without the key
    run alike."""
    module, config = CONFIGS[name][0].split(":")
    config_type, required = getattr(importlib.import_module(module), config), CONFIGS[name][1]
    left_out = config_type(**required)
    differ = []
    for param in PVU.job(name).params:
        if param.name in ("config", "verbose") or param.default is None:
            continue
        given = config_type(**required, **{param.name: param.default})
        if getattr(given, param.name) != getattr(left_out, param.name):
            differ.append(
                f"{param.opts[0]}: {param.default!r} vs {getattr(left_out, param.name)!r}"
            )
    assert differ == [], f"pvu {name}: flag default vs config default: {differ}"


def test_every_setting_a_resume_compares_is_named_by_a_train_head_flag() -> None:
    """`--resume` refuses other settings naming each by its flag (`--lr: the checkpoint has
    ...`): a setting without a flag of that name would send the user to no flag."""
    from pipeline.head.train import TrainConfig

    def leaves(doc: dict) -> list[str]:
        return [k for key, v in doc.items() for k in (leaves(v) if isinstance(v, dict) else [key])]

    flags = set(listed_options(PVU.job("train-head")))
    named = {f"--{leaf.replace('_', '-')}" for leaf in leaves(TrainConfig().identity())}
    assert named and named <= flags, sorted(named - flags)
