"""The files in cluster/ are checked for real: Ray's own schema and parsers, GPU counts, and the
job commands they run against the jobs' own command lines.

Nothing here starts a cluster or reaches a network; everything but the `--help` subprocesses
runs in about a second.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from support import JOB_FLAGS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
KUBERAY_FILES = [RAYCLUSTER, RAYJOB]

# Flags whose values form a closed set.
FLAG_CHOICES: dict[tuple[str, str], set[str]] = {
    ("cache", "--augment"): {"train", "eval"},
    ("cache", "--dtype"): {"float16", "float32"},
    ("train_head", "--loss"): {"ranking", "l2"},
    ("train_head", "--device"): {"cpu", "cuda", "auto"},
}
# `pvu <subcommand>` -> jobs.<module>
CONSOLE_SUBCOMMANDS = {"cache": "cache", "train-head": "train_head", "evaluate": "evaluate"}

# vCPUs and GPUs of the AWS instance types the launcher config may use. A new instance type
# must be added here, so that its declared resources are checked against the real machine.
AWS_INSTANCES: dict[str, tuple[int, int]] = {
    "m6i.xlarge": (4, 0),
    "m6i.2xlarge": (8, 0),
    "m6i.4xlarge": (16, 0),
    "m5.2xlarge": (8, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6e.xlarge": (4, 1),
    "p3.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}

PLACEHOLDER_IMAGE = "ghcr.io/pvu-project/pvu:latest"
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE|CREDENTIAL", re.I)
SECRET_VALUES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", re.I),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
]


def load(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster or a RayJob."""
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def all_groups(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return groups


def k8s_quantity(value) -> float:
    """A Kubernetes resource quantity as a number (cpu '500m' -> 0.5, '32Gi' -> bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value))
    assert m and (not m[2] or m[2] in units), f"not a Kubernetes quantity: {value!r}"
    return float(m[1]) * units.get(m[2], 1)


def group_resources(group: dict, kind: str, name: str) -> float:
    containers = group["template"]["spec"]["containers"]
    return sum(k8s_quantity(c.get("resources", {}).get(kind, {}).get(name, 0)) for c in containers)


def makefile_torch_pins() -> list[str]:
    text = (REPO / "Makefile").read_text()
    pins = re.findall(r"\b(torch(?:vision)?==[0-9][^\s'\"]*)", text)
    assert pins, "the Makefile pins no torch version"
    return sorted(set(pins))


def pinned_ray_versions() -> dict[str, str]:
    """Every place in cluster/ that fixes the cluster's Ray version."""
    image_tag = re.compile(r"rayproject/ray:([0-9][0-9.]*)-(py3[0-9]+)")
    versions = {}
    launcher_image = load(LAUNCHER)["docker"]["image"]
    versions["ray-cluster.yaml docker.image"] = image_tag.search(launcher_image)[1]
    docker_from = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)[1]
    versions["Dockerfile FROM"] = image_tag.search(docker_from)[1]
    for path in KUBERAY_FILES:
        versions[f"{path.name} rayVersion"] = cluster_spec(load(path))["rayVersion"]
    return versions


# --- job invocations referenced anywhere in cluster/ --------------------------------------


@dataclass(frozen=True)
class Invocation:
    source: str  # where it was found, for messages
    raw: str  # the command text as written
    module: str  # jobs.<module>
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: jobs.{self.module}"

    def flags(self) -> dict[str, str | None]:
        """--flag -> its value (None for a bare switch)."""
        out: dict[str, str | None] = {}
        args = list(self.args)
        for i, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            flag, eq, value = arg.partition("=")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                value = nxt if nxt is not None and not nxt.startswith("--") else None
            out[flag] = value
        return out


def shell_tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def invocations_in(command: str, source: str) -> list[Invocation]:
    tokens = shell_tokens(command)
    found = []
    for i, tok in enumerate(tokens):
        module = None
        start = None
        is_python = re.fullmatch(r"(.*/)?python(3(\.[0-9]+)?)?", tok)
        if is_python and tokens[i + 1 : i + 2] == ["-m"] and i + 2 < len(tokens):
            target = tokens[i + 2]
            if target.startswith("jobs."):
                module, start = target.removeprefix("jobs."), i + 3
        elif tok == "pvu" and i + 1 < len(tokens):
            module = CONSOLE_SUBCOMMANDS.get(tokens[i + 1], tokens[i + 1].replace("-", "_"))
            start = i + 2
        if module is None:
            continue
        args = []
        for arg in tokens[start:]:
            if arg and set(arg) <= set("&|;()<>"):
                break
            args.append(arg)
        found.append(Invocation(source, command, module, tuple(args)))
    return found


def readme_commands() -> list[tuple[int, str]]:
    """(line number, command) of the shell commands in the README's code blocks."""
    commands = []
    text = README.read_text()
    for block in re.finditer(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        lineno = text.count("\n", 0, block.start(1)) + 1
        command, first = "", lineno
        for offset, line in enumerate(block[1].splitlines()):
            if not command:
                first = lineno + offset
            if line.rstrip().endswith("\\"):
                command += line.rstrip()[:-1] + " "
                continue
            command += line
            if command.strip():
                commands.append((first, command))
            command = ""
    return commands


def yaml_strings(node, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from yaml_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from yaml_strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def all_invocations() -> list[Invocation]:
    found = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for key, text in yaml_strings(load(path)):
            if "jobs." in text or re.search(r"\bpvu\s+(cache|train-head|evaluate)\b", text):
                found += invocations_in(text, f"{path.name}:{key}")
    for lineno, command in readme_commands():
        found += invocations_in(command, f"{README.name}:{lineno}")
    return found


INVOCATIONS = all_invocations()


@functools.cache
def help_flags(module: str) -> frozenset[str]:
    """The flags a job's own `--help` lists (run as the cluster runs it)."""
    env = dict(os.environ, COLUMNS="240", NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{module}", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"jobs.{module} --help failed:\n{proc.stdout}\n{proc.stderr}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z0-9][A-Za-z0-9-]*", text))


# --- every file parses ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path.name}: one mapping expected"


def test_expected_files_present():
    for path in [LAUNCHER, RUNTIME_ENV, RAYCLUSTER, RAYJOB, DOCKERFILE, README]:
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


# --- Ray cluster launcher -----------------------------------------------------------------


def test_launcher_matches_ray_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(load(LAUNCHER), schema)


def test_launcher_passes_ray_up_validation():
    """What `ray up` does before it talks to AWS: fill in provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(LAUNCHER)))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_resources_match_instances():
    config = load(LAUNCHER)
    gpu_types = []
    for name, node_type in config["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in AWS_INSTANCES, f"{name}: add {instance} to AWS_INSTANCES in this test"
        cpus, gpus = AWS_INSTANCES[instance]
        resources = node_type.get("resources", {})
        if name == config["head_node_type"]:
            assert gpus == 0, "the head node should be a CPU node"
            continue  # what it offers Ray: test_the_head_takes_no_work
        assert resources.get("GPU", 0) == gpus, f"{name}: {instance} has {gpus} GPUs"
        assert resources.get("CPU", cpus) == cpus, f"{name}: {instance} has {cpus} vCPUs"
        if gpus:
            gpu_types.append(name)
            assert node_type.get("max_workers", 0) >= 1, f"{name} can never start"
    assert gpu_types, "no GPU worker node type"
    max_workers = sum(
        t.get("max_workers", 0)
        for n, t in config["available_node_types"].items()
        if n != config["head_node_type"]
    )
    assert max_workers <= config["max_workers"], "node types allow more workers than max_workers"


def test_the_head_takes_no_work():
    """The head runs the GCS, the dashboard, the autoscaler and every job's driver: it offers
    Ray no CPUs or GPUs, so that neither cache actors nor an entrypoint that asks for CPUs
    (`ray job submit --entrypoint-num-cpus 8`, train-head and evaluate) land on it."""
    launcher = load(LAUNCHER)
    head = launcher["available_node_types"][launcher["head_node_type"]]
    offered = {k: v for k, v in head.get("resources", {}).items() if k in ("CPU", "GPU") and v}
    assert "CPU" in head.get("resources", {}) and not offered, (
        f"ray-cluster.yaml: give the head resources {{CPU: 0}} (it offers {offered or 'its vCPUs'})"
    )
    for path in KUBERAY_FILES:
        params = cluster_spec(load(path))["headGroupSpec"].get("rayStartParams", {})
        assert params.get("num-cpus") == "0", f"{path.name}: give the head num-cpus '0'"
        assert params.get("num-gpus", "0") == "0", f"{path.name}: the head has num-gpus"


def test_launcher_installs_the_repo_like_the_makefile():
    config = load(LAUNCHER)
    repo_mounts = [
        remote
        for remote, local in config["file_mounts"].items()
        if (REPO / local).resolve() == REPO
    ]
    assert repo_mounts, "file_mounts must copy the repository (run `ray up` from its root)"
    commands = " && ".join(config["setup_commands"])
    assert any(
        re.search(rf"pip install\b.*\s{re.escape(m)}/?(\s|$)", commands) for m in repo_mounts
    )
    for pin in makefile_torch_pins():
        assert pin in commands, f"setup_commands should install {pin} like the Makefile"
        assert pin in DOCKERFILE.read_text(), f"cluster/Dockerfile should install {pin}"


def test_launcher_and_runtime_env_exclude_the_same():
    rsync_exclude = load(LAUNCHER)["rsync_exclude"]
    excludes = load(RUNTIME_ENV)["excludes"]
    assert sorted(rsync_exclude) == sorted(excludes)
    assert ".venv" in excludes and ".git" in excludes


# --- runtime_env --------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    # exactly what `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .` does
    merged = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    env = RuntimeEnv(**merged)  # Ray's own validation of every known field
    assert env.plugins() == [], f"unknown runtime_env keys (typos?): {env.plugins()}"
    assert set(merged.get("config", {})) <= RuntimeEnvConfig.known_fields
    assert env["working_dir"] == "."
    assert "pip" not in merged and "conda" not in merged, (
        "dependencies come from the cluster's install/image, not per job"
    )


def test_runtime_env_upload_is_the_code_only(tmp_path):
    """Pack the repository exactly as Ray would for `--working-dir .`, and look inside."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    excludes = load(RUNTIME_ENV)["excludes"]
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE) != "1"
    package = tmp_path / "working_dir.zip"
    packaging._zip_files(str(REPO), excludes, str(package), include_gitignore=include_gitignore)
    with zipfile.ZipFile(package) as zf:
        names = set(zf.namelist())
    for required in ["pyproject.toml", "jobs/__init__.py", "pipeline/__init__.py"]:
        assert required in names, f"{required} would not reach the cluster"
    for name in names:
        parts = Path(name).parts
        assert not {".venv", ".git", "__pycache__", "data"} & set(parts), f"{name} is uploaded"
    assert package.stat().st_size < packaging.PACKAGE_SIZE_WARNING, "working_dir too large"


# --- KubeRay --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_required_fields(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"kuberay-raycluster.yaml": "RayCluster"}.get(path.name, "RayJob")
    name = doc["metadata"]["name"]
    # a DNS-1123 label, short enough for the pod and service names KubeRay derives from it
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", name), f"bad name {name!r}"
    spec = cluster_spec(doc)
    assert isinstance(spec["rayVersion"], str)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"], "no worker groups"
    group_names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(group_names)) == len(group_names)
    for group_name, group in all_groups(doc):
        params = group.get("rayStartParams", {})
        not_str = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not not_str, f"{group_name}: rayStartParams must be strings (CRD): {not_str}"
        containers = group["template"]["spec"]["containers"]
        for c in containers:
            assert c["name"] and c["image"], f"{group_name}: container without name/image"
        if group_name != "head":
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31)
            assert lo <= group.get("replicas", lo) <= hi, f"{group_name}: replicas out of range"
    if doc["kind"] == "RayJob":
        assert isinstance(doc["spec"]["entrypoint"], str) and doc["spec"]["entrypoint"].strip()
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"].get("submissionMode", "K8sJobMode") in {
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        }


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_gpus_consistent(path):
    doc = load(path)
    gpu_groups = []
    for group_name, group in all_groups(doc):
        limit = group_resources(group, "limits", "nvidia.com/gpu")
        request = group_resources(group, "requests", "nvidia.com/gpu")
        assert request in (0, limit), f"{group_name}: GPU requests must equal limits"
        params = group.get("rayStartParams", {})
        # KubeRay derives num-gpus from the limit when it is not given; when it is, they agree
        num_gpus = float(params.get("num-gpus", limit))
        assert num_gpus == limit, (
            f"{group_name}: rayStartParams num-gpus={num_gpus} but nvidia.com/gpu limit={limit}"
        )
        if "num-cpus" in params:
            cpu_limit = group_resources(group, "limits", "cpu")
            assert float(params["num-cpus"]) <= cpu_limit, f"{group_name}: num-cpus > cpu limit"
        if group_name == "head":
            assert limit == 0, "the head should be a CPU pod"
        elif limit:
            gpu_groups.append(group_name)
            tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{group_name}: no toleration for GPU taints"
    assert gpu_groups, "no GPU worker group"


#: Shared memory one decode worker holds at 224x224 (docs/usage.md, `--decode-workers`).
DECODE_WORKER_SHM = 4.3 * 2**20


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_object_store_and_decode_pool_fit_in_dev_shm(path):
    """Ray puts its object store in /dev/shm only where it fits (else in /tmp, on disk, with
    "This will harm performance!"), and the decode pools need room beside it. KubeRay mounts a
    memory emptyDir there as large as the container's memory limit unless the pod mounts its
    own; Ray's default store is up to 30% of that memory."""
    from ray._private import ray_constants

    for group_name, group in all_groups(load(path)):
        spec = group["template"]["spec"]
        (ray_container, *_) = spec["containers"]  # KubeRay's Ray container is the first
        memory = k8s_quantity(ray_container["resources"]["limits"]["memory"])
        shm = memory
        mounts = ray_container.get("volumeMounts", [])
        shm_volumes = {m["name"] for m in mounts if m["mountPath"].rstrip("/") == "/dev/shm"}
        for volume in spec.get("volumes", []):
            if volume["name"] in shm_volumes:
                empty_dir = volume.get("emptyDir", {})
                assert empty_dir.get("medium") == "Memory", f"{group_name}: /dev/shm not in memory"
                shm = min(memory, k8s_quantity(empty_dir.get("sizeLimit", memory)))
        params = group.get("rayStartParams", {})
        default = ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION * memory
        store = float(params.get("object-store-memory", default))
        cpus = float(params.get("num-cpus", group_resources(group, "limits", "cpu")))
        pools = max(0.0, cpus - 1) * DECODE_WORKER_SHM  # one actor's pool per GPU pod
        assert store + pools <= shm, (
            f"{path.name} {group_name}: /dev/shm of {shm / 2**30:.1f} GiB holds no object store "
            f"of {store / 2**30:.1f} GiB beside {pools / 2**20:.0f} MiB of decode pools: mount "
            "none (KubeRay sizes it to the memory limit) or set object-store-memory"
        )


def test_rayjob_runtime_env_is_valid_without_a_client():
    """In K8sJobMode nothing uploads local files: runtimeEnvYAML may hold URIs only."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _validate_no_local_paths

    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    env = RuntimeEnv(**runtime_env)
    assert env.plugins() == [], f"unknown runtime_env keys: {env.plugins()}"
    _validate_no_local_paths(env)


def test_rayjob_fits_its_cluster():
    doc = load(RAYJOB)
    (job,) = invocations_in(doc["spec"]["entrypoint"], "entrypoint")
    flags = job.flags()
    actors = int(flags["--actors"])
    gpus_per_actor = float(flags["--gpus-per-actor"])
    workers = cluster_spec(doc)["workerGroupSpecs"]
    per_node = max(float(g["rayStartParams"].get("num-gpus", 0)) for g in workers)
    total = sum(
        float(g["rayStartParams"].get("num-gpus", 0)) * g.get("maxReplicas", g["replicas"])
        for g in workers
    )
    assert gpus_per_actor <= per_node, "an actor needs more GPUs than any worker pod has"
    assert actors * gpus_per_actor <= total, f"{actors} actors need more GPUs than the {total}"


def test_a_gpu_worker_is_up_when_a_job_starts():
    """jobs.cache plans its actors from the GPU nodes alive at start (`plan_actors`) and refuses
    --gpus-per-actor on a cluster without one, so autoscaling GPU groups keep one up."""
    launcher = load(LAUNCHER)
    assert any(
        t.get("resources", {}).get("GPU", 0) >= 1 and t.get("min_workers", 0) >= 1
        for t in launcher["available_node_types"].values()
    ), "ray-cluster.yaml: no GPU node type with min_workers >= 1"
    for path in KUBERAY_FILES:
        workers = cluster_spec(load(path))["workerGroupSpecs"]
        assert any(
            float(g.get("rayStartParams", {}).get("num-gpus", 0)) >= 1
            and g.get("minReplicas", 0) >= 1
            and g.get("replicas", 0) >= 1
            for g in workers
        ), f"{path.name}: no GPU worker group with minReplicas >= 1"


@pytest.mark.parametrize("inv", [i for i in INVOCATIONS if i.module == "cache"], ids=str)
def test_cache_jobs_join_the_cluster(inv):
    """Without --ray-address, jobs.cache starts a private local Ray on the head node."""
    assert inv.flags().get("--ray-address") == "auto", f"{inv}: pass --ray-address auto"


def test_placeholder_image_is_marked():
    for path in KUBERAY_FILES:
        lines = [ln for ln in path.read_text().splitlines() if "image:" in ln]
        assert lines
        for line in lines:
            assert PLACEHOLDER_IMAGE in line and "REPLACE" in line, f"{path.name}: {line.strip()}"


# --- versions and image ------------------------------------------------------------------------


def test_ray_and_python_versions_consistent():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    versions = pinned_ray_versions()
    assert len(set(versions.values())) == 1, f"Ray versions disagree: {versions}"
    (version,) = set(versions.values())
    ray_req = next(
        Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "ray"
    )
    assert ray_req.specifier.contains(version), f"Ray {version} does not satisfy {ray_req}"
    import ray

    assert Version(version).major == Version(ray.__version__).major
    requires_python = pyproject["project"]["requires-python"]
    for text in [load(LAUNCHER)["docker"]["image"], DOCKERFILE.read_text()]:
        py = re.search(r"rayproject/ray:[0-9.]+-py3([0-9]+)", text)[1]
        assert Requirement(f"x{requires_python}").specifier.contains(f"3.{py}")


def test_dockerfile_copies_what_the_package_needs():
    text = DOCKERFILE.read_text()
    sources = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        sources += args[:-1]
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert any(s.rstrip("/") == package for s in sources), f"Dockerfile misses {package}/"
    assert pyproject["project"]["readme"] in sources


# --- no secrets ---------------------------------------------------------------------------


def test_no_secrets_in_cluster_files():
    for path in sorted(CLUSTER.iterdir()):
        if not path.is_file():
            continue
        text = path.read_text()
        for pattern in SECRET_VALUES:
            assert not pattern.search(text), f"{path.name}: looks like a secret ({pattern.pattern})"
    env_vars = dict(load(RUNTIME_ENV).get("env_vars", {}))
    env_vars |= yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    for path in KUBERAY_FILES:
        for _, group in all_groups(load(path)):
            for c in group["template"]["spec"]["containers"]:
                env_vars |= {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    literal_secrets = sorted(k for k in env_vars if SECRET_NAME.search(k))
    assert not literal_secrets, f"secrets set literally: {literal_secrets}"


# --- the jobs the files run -----------------------------------------------------------------


def test_invocations_found():
    sources = {inv.source.split(":")[0] for inv in INVOCATIONS}
    assert "kuberay-rayjob.yaml" in sources and README.name in sources
    modules = {inv.module for inv in INVOCATIONS}
    assert "cache" in modules


@pytest.mark.parametrize("inv", INVOCATIONS, ids=str)
def test_brace_patterns_are_quoted(inv):
    """Entrypoints run in a shell: an unquoted {0000..2047} would become 2048 arguments."""
    for arg in inv.args:
        if re.search(r"\{[^}]*(\.\.|,)[^}]*\}", arg):
            assert f"'{arg}'" in inv.raw or f'"{arg}"' in inv.raw, f"quote {arg}"


@pytest.mark.parametrize("inv", INVOCATIONS, ids=str)
def test_job_flags_are_the_jobs_flags(inv):
    assert inv.module in JOB_FLAGS, f"no flag list for jobs.{inv.module} in this test"
    flags = inv.flags()
    unknown = sorted(set(flags) - JOB_FLAGS[inv.module])
    assert not unknown, f"{inv}: unknown flags {unknown}"
    positional = [a for a in inv.args if not a.startswith("--") and a not in flags.values()]
    assert not positional, f"{inv}: stray arguments {positional}"
    for (module, flag), choices in FLAG_CHOICES.items():
        if module == inv.module and flag in flags:
            assert flags[flag] in choices, f"{inv}: {flag} {flags[flag]} not in {choices}"


@pytest.mark.parametrize("module", sorted({inv.module for inv in INVOCATIONS}))
def test_job_module_exists(module):
    """Every job a manifest runs is a module of the repo (`python -m jobs.<name>`)."""
    assert (REPO / "jobs" / f"{module}.py").is_file(), f"jobs/{module}.py does not exist"


@pytest.mark.parametrize("inv", INVOCATIONS, ids=str)
def test_job_flags_in_help(inv):
    """The job's own command line accepts every flag the manifests pass."""
    if not (REPO / "jobs" / f"{inv.module}.py").is_file():
        pytest.skip(f"jobs/{inv.module}.py not written yet")
    accepted = help_flags(inv.module)
    missing = sorted(set(inv.flags()) - accepted)
    assert not missing, f"{inv}: not in `python -m jobs.{inv.module} --help`: {missing}"
