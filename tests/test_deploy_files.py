"""The container and cluster files (Dockerfile, docker-compose.yml, deploy/k8s/): linted and
validated offline, and cross-checked against the code they run.

No container engine or cluster runs here, so these checks stand in for a build: hadolint on the
Dockerfile, the Compose Specification's JSON schema (tests/schemas/README.md) on the compose
file, kubernetes-validate's schemas (strict) on every manifest, and checks that the settings,
routes, ports, commands, paths and volumes they name are the ones the code has."""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from nnoculation.benchmarks.processes import REDIS_SETTINGS
from nnoculation.online.settings import ENV_PREFIX, CommonSettings
from service.settings import ServiceSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
BIN = Path(sys.executable).parent
# The oldest Kubernetes minor still commonly offered by managed clusters, and the newest one
# kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.31.0", "1.37.0")
# deploy/k8s files that are alternatives to, not part of, kustomization.yaml.
K8S_OPTIONAL = {"worker-gpu.yaml", "s3-secret.yaml"}
# Values for the variables docker-compose.yml requires from .env.
COMPOSE_ENV = {"NNOC_ADMIN_TOKEN": "compose-test-token", "GRAFANA_ADMIN_PASSWORD": "pw"}
SETTINGS_OF = {"api": ServiceSettings, "worker": WorkerSettings}


# ---------------------------------------------------------------- helpers


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def instruction_args(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def exec_form(name: str) -> list[str]:
    """The JSON (exec) form of the last ``name`` instruction."""
    return json.loads(instruction_args(name)[-1])


def dockerfile_args() -> dict[str, str]:
    """Default values of every ARG."""
    return dict(a.split("=", 1) for a in instruction_args("ARG") if "=" in a)


def dockerfile_env() -> dict[str, str]:
    pairs = re.findall(r"(\w+)=(\S+)", " ".join(instruction_args("ENV")))
    return {k: v.strip('"') for k, v in pairs}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, over the files kustomization.yaml applies."""
    objects = {}
    for name in kustomization()["resources"]:
        for doc in load_all(K8S / name):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


def container_env(obj: dict[str, Any]) -> dict[str, str]:
    """Environment of a workload's only container: ConfigMap keys, then ``env`` over them."""
    (c,) = containers(obj)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env |= k8s_objects()["ConfigMap", source["configMapRef"]["name"]]["data"]
    env |= {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return env


@cache
def api_paths() -> dict[str, set[str]]:
    """OpenAPI path -> methods of the app as ``nnoculation serve`` builds it."""
    from service.app import create_app

    paths = create_app(ServiceSettings()).openapi()["paths"]
    return {path: {m.upper() for m in ops} for path, ops in paths.items()}


@cache
def cli_help(*args: str) -> str:
    done = subprocess.run(
        [str(BIN / "nnoculation"), *args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def subcommands() -> set[str]:
    match = re.search(r"\{([a-z,-]+)\}", cli_help())
    assert match, cli_help()
    return set(match.group(1).split(","))


def serve_default_port() -> int:
    """The port ``nnoculation serve`` listens on without --port."""
    from service.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve"]).port


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, over nested data."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yml with the variables of a filled-in .env."""
    return interpolate(compose_raw(), COMPOSE_ENV)


def url_of_healthcheck(test: list[str]) -> str:
    """The URL a healthcheck command opens."""
    match = re.search(r"https?://[^'\"\s]+", " ".join(test))
    assert match, test
    return match.group(0)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of a compose service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def repo_file_for(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a bind mount puts at ``container_path``, if any."""
    for target, source in mounts(service).items():
        if source.startswith("./") and (
            container_path == target or container_path.startswith(target + "/")
        ):
            return ROOT / source / Path(container_path).relative_to(target)
    return None


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?"
            else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )  # fmt: skip
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def tracked_files(untracked: bool = False) -> list[str]:
    """The repository's files (with ``untracked``: also new ones git does not ignore)."""
    extra = ["--others", "--exclude-standard"] if untracked else []
    done = subprocess.run(
        ["git", "ls-files", "--cached", *extra], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def check_settings(env: dict[str, str], cls: type[CommonSettings], where: str) -> None:
    """Every NNOC_* variable is a field of ``cls``, and ``cls`` accepts the values."""
    nnoc = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    unknown = sorted(k for k in nnoc if k.removeprefix(ENV_PREFIX).lower() not in cls.model_fields)
    assert not unknown, f"{where}: not settings of {cls.__name__}: {unknown}"
    with pytest.MonkeyPatch.context() as mp:  # the process reads them from its environment
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                mp.delenv(key)
        for key, value in nnoc.items():
            mp.setenv(key, value)
        cls()


def redis_persistence() -> list[tuple[str, str]]:
    """The (option, value) pairs the service's "lose nothing" needs (README, "Redis")."""
    pairs = list(zip(REDIS_SETTINGS[::2], REDIS_SETTINGS[1::2], strict=True))
    wanted = [
        (k, v) for k, v in pairs if k in ("--appendonly", "--appendfsync", "--maxmemory-policy")
    ]
    assert len(wanted) == 3, REDIS_SETTINGS
    return wanted


def has_pairs(args: list[str], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs missing from an argument list."""
    present = set(itertools.pairwise(args))
    return [p for p in pairs if p not in present]


# ---------------------------------------------------------------- Dockerfile


def hadolint(path: Path, workdir: Path) -> tuple[int, list[dict[str, Any]]]:
    """hadolint's findings, failing on any level, with no project or user config applying."""
    config = workdir / "hadolint.yaml"
    config.write_text("ignored: []\n")
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style",
         "--disable-ignore-pragma", "--config", str(config), str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.startswith("["), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    code, findings = hadolint(DOCKERFILE, tmp_path)
    assert (code, findings) == (0, [])


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    code, findings = hadolint(bad, tmp_path)
    assert code != 0
    assert {"DL3007", "DL3008"} <= {f["code"] for f in findings}


def test_dockerfile_runs_the_cli_and_serves_by_default() -> None:
    assert exec_form("ENTRYPOINT") == ["nnoculation"]
    cmd = exec_form("CMD")
    assert cmd[0] in subcommands()
    assert cmd == ["serve", "--host", "0.0.0.0"]
    assert "--host" in cli_help("serve") and "--port" in cli_help("serve")


def test_dockerfile_base_images_are_pinned_tags() -> None:
    args = dockerfile_args()
    for ref in instruction_args("FROM"):
        image = ref.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image


def test_dockerfile_user_is_numeric_and_not_root() -> None:
    user = instruction_args("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # runAsNonRoot can only verify a number


def test_dockerfile_torch_is_the_tested_one_from_the_cpu_index() -> None:
    import torch
    import torchvision

    args = dockerfile_args()
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["TORCHVISION_VERSION"] == torchvision.__version__.split("+")[0]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in (("torch", args["TORCH_VERSION"]), ("torchvision",
                          args["TORCHVISION_VERSION"])):  # fmt: skip
        (spec,) = [d[len(name) :] for d in deps if re.match(rf"{name}\b[<>=!~]", d)]
        assert version in SpecifierSet(spec), (name, version, spec)
    runs = " ".join(instruction_args("RUN"))
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs


def test_dockerfile_copies_every_package_and_the_context_has_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {src.strip("./") for rest in instruction_args("COPY") if "--from" not in rest
              for src in rest.split()[:-1]}  # fmt: skip
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied, copied
    files = tracked_files()
    needed = [f for f in files if f.split("/")[0] in copied]
    assert len(needed) > 50
    dropped = [f for f in needed if dockerignore_excludes(f)]
    assert not dropped, f"COPYed but excluded by .dockerignore: {dropped[:10]}"
    kept_out = [".env", ".git/HEAD", ".venv/bin/python", "runs/x/model.pt", "tests/x.py",
                "service/__pycache__/app.cpython-311.pyc", "docs/results/demo.json"]  # fmt: skip
    assert [p for p in kept_out if not dockerignore_excludes(p)] == []


def test_the_image_install_ships_every_package_file(tmp_path: Path) -> None:
    """What the Dockerfile's ``pip install ./[s3]`` gets: the build context it COPYs (after
    .dockerignore) built into a wheel, offline; every file of the packages must be in it."""
    copied = {src.strip("./") for rest in instruction_args("COPY") if "--from" not in rest
              for src in rest.split()[:-1]}  # fmt: skip
    src = tmp_path / "src"
    context = [f for f in tracked_files(untracked=True)
               if f.split("/")[0] in copied and not dockerignore_excludes(f)]  # fmt: skip
    for name in context:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--quiet", "--wheel-dir", str(tmp_path / "out"), str(src)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "out").glob("nnoculation-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    missing = [f for f in context if f not in {"pyproject.toml", "README.md"} and f not in shipped]
    assert not missing, f"files the image would lack: {missing}"


def test_dockerfile_settings_ports_and_healthcheck_match_the_code() -> None:
    env = dockerfile_env()
    check_settings(env, ServiceSettings, "Dockerfile ENV")  # the image runs both processes
    worker_env = {k: v for k, v in env.items() if k != "NNOC_SPOOL_DIR"}
    check_settings(worker_env, WorkerSettings, "Dockerfile ENV")
    exposed = {int(p) for a in instruction_args("EXPOSE") for p in a.split()}
    serve_port = serve_default_port()
    assert exposed == {serve_port, WorkerSettings.model_fields["metrics_port"].default}
    health = instruction_args("HEALTHCHECK")[-1]
    url = urlsplit(url_of_healthcheck([health]))
    assert url.path == "/healthz" and "GET" in api_paths()["/healthz"]
    assert url.port == serve_port
    # The writable places the image prepares for the non-root user.
    run = " ".join(instruction_args("RUN"))
    for key in ("NNOC_STORE_ROOT", "NNOC_SPOOL_DIR"):
        assert env[key] in run, f"{key}={env[key]} is not created in the image"


# ---------------------------------------------------------------- docker-compose.yml


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(schema).iter_errors(doc)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(compose_raw()) == []


def test_compose_schema_is_the_vendored_one() -> None:
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest in (COMPOSE_SCHEMA.parent / "README.md").read_text()


def test_compose_schema_does_reject_mistakes() -> None:
    doc = copy.deepcopy(compose_raw())
    doc["services"]["api"]["helthcheck"] = doc["services"]["api"].pop("healthcheck")
    doc["services"]["redis"]["depends_on"] = {"api": {"condition": "service_done"}}
    errors = compose_errors(doc)
    assert any("helthcheck" in e for e in errors) and any("service_done" in e for e in errors)


def test_compose_requires_the_admin_token_from_env() -> None:
    with pytest.raises(AssertionError, match="NNOC_ADMIN_TOKEN"):
        interpolate(compose_raw(), {})
    assert compose()["services"]["api"]["environment"]["NNOC_ADMIN_TOKEN"] == "compose-test-token"


def test_compose_services_run_real_commands_with_valid_settings() -> None:
    services = compose()["services"]
    for name, cls in SETTINGS_OF.items():
        service = services[name]
        assert service["command"][0] in subcommands()
        assert service["image"] == services["api"]["image"] and "build" in service
        check_settings(service["environment"], cls, f"compose {name}")
    assert services["api"]["command"][0] == "serve" and services["worker"]["command"] == ["worker"]
    assert int(services["api"]["environment"]["NNOC_WORKERS"]) == 2
    redis_url = urlsplit(services["api"]["environment"]["NNOC_REDIS_URL"])
    assert redis_url.hostname in services and redis_url.port == 6379


def test_compose_redis_keeps_the_quarantine() -> None:
    redis = compose()["services"]["redis"]
    assert has_pairs(redis["command"], redis_persistence()) == []
    assert mounts(redis)["/data"] in compose()["volumes"]


def test_compose_ports_and_healthchecks_match_the_code() -> None:
    services = compose()["services"]
    api, worker = services["api"], services["worker"]
    port = int(api["command"][api["command"].index("--port") + 1])
    assert f"{port}:{port}" in api["ports"]
    api_health = urlsplit(url_of_healthcheck(api["healthcheck"]["test"]))
    assert api_health.port == port and api_health.path in api_paths()
    env = worker["environment"]
    assert env["NNOC_METRICS_HOST"] == "0.0.0.0"  # else Prometheus cannot reach it
    worker_health = urlsplit(url_of_healthcheck(worker["healthcheck"]["test"]))
    assert worker_health.port == int(env["NNOC_METRICS_PORT"]) and worker_health.path == "/metrics"
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)


def test_compose_store_is_one_volume_and_every_written_path_is_mounted() -> None:
    doc = compose()
    services = doc["services"]
    stores = set()
    for name in SETTINGS_OF:
        service, env = services[name], services[name]["environment"]
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        mounted = mounts(service)
        written = [env["NNOC_STORE_ROOT"], env["NNOC_STORE_CACHE_DIR"]]
        written += [env["NNOC_SPOOL_DIR"]] if name == "api" else []
        for path in written:
            assert path in mounted and mounted[path] in doc["volumes"], (name, path)
        stores.add(mounted[env["NNOC_STORE_ROOT"]])
    assert len(stores) == 1, stores
    for name, service in services.items():
        for source in mounts(service).values():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in doc["volumes"], (name, source)


def test_compose_takes_the_s3_store_from_env_files() -> None:
    s3 = interpolate(compose_raw(), COMPOSE_ENV | {"NNOC_STORE_ROOT": "s3://bucket/nnoc"})
    for name, cls in SETTINGS_OF.items():
        service = s3["services"][name]
        assert service["environment"]["NNOC_STORE_ROOT"] == "s3://bucket/nnoc"
        check_settings(service["environment"], cls, f"compose {name} with S3")
        # Optional: compose must start without it (the volume store needs no credentials).
        assert service["env_file"] == [{"path": "./s3.env", "required": False}]
        cache = service["environment"]["NNOC_STORE_CACHE_DIR"]
        assert mounts(service)[cache] in s3["volumes"], name


def test_compose_prometheus_scrapes_the_api_and_the_worker() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    config_file = repo_file_for(prometheus, config_path)
    assert config_file and config_file.is_file(), config_path
    config = yaml.safe_load(config_file.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}  # fmt: skip
    api_port = services["api"]["command"][services["api"]["command"].index("--port") + 1]
    worker_port = services["worker"]["environment"]["NNOC_METRICS_PORT"]
    assert {f"api:{api_port}", f"worker:{worker_port}"} <= targets
    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        path = str(PurePosixPath(config_path).parent / rule_file)
        mounted = repo_file_for(prometheus, path)
        assert mounted and mounted.is_file(), f"rule file {path} is not mounted"


def test_compose_grafana_is_provisioned_from_the_repo() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = repo_file_for(grafana, "/etc/grafana/provisioning")
    assert provisioning and provisioning.is_dir()
    sources = [ds for f in sorted((provisioning / "datasources").glob("*.y*ml"))
               for ds in yaml.safe_load(f.read_text()).get("datasources", [])]  # fmt: skip
    prometheus = [ds for ds in sources if ds.get("type") == "prometheus"]
    assert prometheus and all(
        urlsplit(ds["url"]).hostname == "prometheus" and urlsplit(ds["url"]).port == 9090
        for ds in prometheus
    ), prometheus
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]  # no auth: loopback only
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text()).get("providers", [])]  # fmt: skip
    assert providers
    for provider in providers:
        folder = repo_file_for(grafana, provider["options"]["path"])
        assert folder and list(folder.glob("*.json")), provider["options"]["path"]


# ---------------------------------------------------------------- deploy/k8s


def k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in load_all(path):
                yield path.name, doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_follow_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {err.message}")
        checked += 1
    assert checked >= 15


def test_k8s_validation_does_reject_mistakes() -> None:
    deployment = copy.deepcopy(k8s_objects()["Deployment", "nnoc-api"])
    containers(deployment)[0]["readinesProbe"] = containers(deployment)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustom = kustomization()
    assert kustom["kind"] == "Kustomization" and kustom["namespace"] == "nnoculation"
    listed = set(kustom["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed <= files, listed - files
    assert files - listed == K8S_OPTIONAL
    images = {c["image"].split(":")[0] for obj in k8s_objects().values()
              if obj["kind"] in ("Deployment", "StatefulSet") for c in containers(obj)}  # fmt: skip
    assert {i["name"] for i in kustom["images"]} <= images


def probe_path(container: dict[str, Any], probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = {p["name"]: p["containerPort"] for p in container["ports"]}[port]
    return get["path"], port


def test_k8s_api_probes_ports_and_scrape_annotations_match_the_code() -> None:
    api = k8s_objects()["Deployment", "nnoc-api"]
    (c,) = containers(api)
    assert c["args"][0] in subcommands() and c["args"][0] == "serve"
    port = int(c["args"][c["args"].index("--port") + 1])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert probe_path(c, "readinessProbe") == ("/readyz", port)
    assert probe_path(c, "livenessProbe") == ("/healthz", port)
    assert probe_path(c, "startupProbe") == ("/healthz", port)
    for path in ("/readyz", "/healthz", "/metrics"):
        assert "GET" in api_paths()[path], path
    notes = api["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert (notes["prometheus.io/path"], int(notes["prometheus.io/port"])) == ("/metrics", port)
    assert api["spec"]["replicas"] == 2 and container_env(api)["NNOC_WORKERS"] == "2"
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_k8s_worker_metrics_and_rollout() -> None:
    for obj in (k8s_objects()["Deployment", "nnoc-worker"], *load_all(K8S / "worker-gpu.yaml")):
        (c,) = containers(obj)
        assert c["args"] == ["worker"]
        env = container_env(obj)
        port = int(env["NNOC_METRICS_PORT"])
        assert env["NNOC_METRICS_HOST"] == "0.0.0.0"
        assert [p["containerPort"] for p in c["ports"]] == [port]
        assert probe_path(c, "livenessProbe") == ("/metrics", port)
        notes = obj["spec"]["template"]["metadata"]["annotations"]
        assert (notes["prometheus.io/path"], int(notes["prometheus.io/port"])) == ("/metrics", port)
        assert obj["spec"]["replicas"] == 1 and obj["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_gpu_worker_is_the_worker_plus_a_gpu() -> None:
    (gpu,) = load_all(K8S / "worker-gpu.yaml")
    cpu = k8s_objects()["Deployment", "nnoc-worker"]
    (c,) = containers(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container_env(gpu)["NNOC_DEVICE"] == "cuda"
    check_settings(container_env(gpu), WorkerSettings, "worker-gpu.yaml")
    # Apart from those, and the CUDA image, the two must not drift apart.
    stripped = copy.deepcopy(gpu)
    spec = stripped["spec"]["template"]["spec"]
    del spec["tolerations"]
    (s,) = spec["containers"]
    del s["resources"]["limits"]["nvidia.com/gpu"]
    s["env"] = [e for e in s["env"] if e["name"] not in ("NNOC_DEVICE", "CUDA_CACHE_PATH")]
    assert s["image"] == containers(cpu)[0]["image"] + "-cu126"
    s["image"] = containers(cpu)[0]["image"]
    assert stripped == cpu


def test_k8s_settings_are_real_and_valid() -> None:
    config = k8s_objects()["ConfigMap", "nnoc-config"]["data"]
    check_settings(config, CommonSettings, "ConfigMap nnoc-config (read by API and worker)")
    s3_config = config | {"NNOC_STORE_ROOT": "s3://bucket/nnoc"}  # the documented alternative
    check_settings(s3_config, CommonSettings, "ConfigMap nnoc-config with the S3 store")
    secret = k8s_objects()["Secret", "nnoc-admin"]["stringData"]
    assert set(secret) == {"NNOC_ADMIN_TOKEN"}
    for name, cls in (("nnoc-api", ServiceSettings), ("nnoc-worker", WorkerSettings)):
        obj = k8s_objects()["Deployment", name]
        extra = secret if name == "nnoc-api" else {}
        check_settings(container_env(obj) | extra, cls, name)
        refs = [s["secretRef"] for s in containers(obj)[0]["envFrom"] if "secretRef" in s]
        assert {"name": "nnoc-s3", "optional": True} in refs, name
    (s3,) = load_all(K8S / "s3-secret.yaml")
    assert all(key.startswith("AWS_") for key in s3["stringData"])
    redis_url = urlsplit(config["NNOC_REDIS_URL"])
    service = k8s_objects()["Service", redis_url.hostname]
    assert [p["port"] for p in service["spec"]["ports"]] == [redis_url.port]


def test_k8s_pods_run_read_only_as_the_image_user_with_every_written_path_mounted() -> None:
    uid = int(instruction_args("USER")[-1].split(":")[0])
    for name in ("nnoc-api", "nnoc-worker"):
        obj = k8s_objects()["Deployment", name]
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        env = container_env(obj)
        written = ["/tmp", env["NNOC_STORE_ROOT"], env["NNOC_STORE_CACHE_DIR"]]
        written += [env["NNOC_SPOOL_DIR"]] if name == "nnoc-api" else [env["NNOC_WORK_DIR"]]
        for path in written:
            assert path in mounted, (name, path)
        # The CLI empties PROMETHEUS_MULTIPROC_DIR by removing it: it must lie inside a mount.
        metrics = PurePosixPath(env["PROMETHEUS_MULTIPROC_DIR"])
        assert str(metrics) not in mounted and str(metrics.parent) in mounted, (name, metrics)
        assert "emptyDir" in mounted[str(metrics.parent)]
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert ("PersistentVolumeClaim", claim["claimName"]) in k8s_objects()
    api = k8s_objects()["Deployment", "nnoc-api"]
    store = k8s_objects()["PersistentVolumeClaim", "nnoc-store"]
    spool = k8s_objects()["PersistentVolumeClaim", "nnoc-spool"]
    assert store["spec"]["accessModes"] == ["ReadWriteMany"]
    assert spool["spec"]["accessModes"] == ["ReadWriteMany"]  # another replica replays it
    assert {v["persistentVolumeClaim"]["claimName"] for v in api["spec"]["template"]["spec"][
        "volumes"] if "persistentVolumeClaim" in v} == {"nnoc-store", "nnoc-spool"}  # fmt: skip


def test_k8s_services_hpa_and_pdb_select_the_api_pods() -> None:
    objects = k8s_objects()
    api = objects["Deployment", "nnoc-api"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service", "nnoc-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in containers(api)[0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = objects["HorizontalPodAutoscaler", "nnoc-api"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == (
        "Deployment", "nnoc-api",
    )  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = objects["PodDisruptionBudget", "nnoc-api"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_redis_keeps_the_quarantine_on_a_volume() -> None:
    redis = k8s_objects()["StatefulSet", "redis"]
    (c,) = containers(redis)
    assert has_pairs(c["args"], redis_persistence()) == []
    data_dir = c["args"][c["args"].index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[data_dir] == claim["metadata"][
        "name"
    ]
    assert ("Service", redis["spec"]["serviceName"]) in k8s_objects()
    assert c["image"] == compose()["services"]["redis"]["image"]
