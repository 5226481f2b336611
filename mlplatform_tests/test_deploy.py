"""The production deployment: Docker images, the compose stack and the Dagster instance.

There is no Docker engine in the test environment, so the Dockerfiles and the compose file are
checked statically, for the mistakes that would only show at `docker compose up` (a COPY of a
missing file, a variable the run launcher forwards but no service sets, a network name that does
not match). The Dagster instance configuration is loaded through Dagster's public loaders: without
a database where that suffices (a missing credential is refused before any connection), and for
real against a throwaway PostgreSQL server, which the storage, launcher, coordinator and settings
are built against and through which a small asset is materialized and read back.
"""

import contextlib
import dataclasses
import fnmatch
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from dagster import (
    AssetExecutionContext,
    AssetKey,
    DagsterInstance,
    DagsterInvalidConfigError,
    DagsterRunStatus,
    DefaultRunLauncher,
    QueuedRunCoordinator,
    asset,
    materialize,
)
from dagster_docker import DockerRunLauncher
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from packaging.requirements import Requirement

from mlplatform.serving.ingress import SERVE_ENVIRONMENT
from mlplatform.serving.keys import ApiKeyError, parse_api_keys

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DAGSTER_YAML = DEPLOY / "dagster.yaml"
COMPOSE_YAML = DEPLOY / "docker-compose.yaml"
WORKSPACE_YAML = DEPLOY / "workspace.yaml"

# The services that load deploy/dagster.yaml (or, for user_code, run its runs' code).
DAGSTER_SERVICES = ("webserver", "daemon", "user_code")
PG_ENV_VARS = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USER",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
)
# Shared services whose address every platform container is given.
PLATFORM_ENV_VARS = (
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "MLPLATFORM_HOME",
    "MLPLATFORM_SOURCE",
    "MLPLATFORM_TARGET",
    "MLPLATFORM_MODEL_NAME",
    "MLPLATFORM_SERVE_HOST",
    "MLPLATFORM_SERVE_PORT",
    "MLPLATFORM_ENDPOINT_URL",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
)
ROOT_USERS = {"", "root", "0", "0:0", "root:root"}


# ---------------------------------------------------------------------------------------------
# Helpers: YAML, Dockerfiles, .dockerignore


def load_yaml(path: Path) -> Any:
    """Parse a YAML file (anchors and merge keys resolved, as Compose does)."""
    return yaml.safe_load(path.read_text())


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        # Docker drops comment and blank lines, also in the middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
            pending = []
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def instruction_args(instructions: list[Instruction], keyword: str) -> list[str]:
    """The arguments of every instruction with this keyword, in order."""
    return [i.args for i in instructions if i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    """Parse a JSON (exec) form argument list; fails for the shell form."""
    assert args.startswith("["), f"expected the JSON exec form, got: {args}"
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def copy_sources(args: str) -> list[str]:
    """The source paths of a COPY/ADD instruction (flags and the destination removed)."""
    if args.lstrip().startswith("["):
        words = json.loads(args)
    else:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
    assert len(words) >= 2, f"COPY needs a source and a destination: {args}"
    return words[:-1]


def env_assignments(instructions: list[Instruction]) -> dict[str, str]:
    """The variables set by ENV instructions (``K=V`` form and the legacy ``K V`` form)."""
    env: dict[str, str] = {}
    for args in instruction_args(instructions, "ENV"):
        words = shlex.split(args)
        if "=" in words[0]:
            env.update(word.split("=", 1) for word in words)
        else:
            env[words[0]] = " ".join(words[1:])
    return env


def dockerignore_excludes(context: Path, relative: str) -> bool:
    """Whether the build context's ``.dockerignore`` leaves ``relative`` out of the context.

    Implements the subset of Docker's rules these files use: patterns in order, the last match
    wins, ``!`` re-includes, a trailing slash is ignored and ``**/`` matches any depth.
    """
    ignore_file = context / ".dockerignore"
    if not ignore_file.exists():
        return False
    excluded = False
    for raw in ignore_file.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        # Go's filepath.Match `*` does not cross `/`, fnmatch's does: without `**`, the pattern
        # and the path must also have the same depth.
        if any(
            fnmatch.fnmatchcase(relative, c) and ("**" in c or c.count("/") == relative.count("/"))
            for c in candidates
        ):
            excluded = not negate
    return excluded


def dagster_yaml_env_vars(node: Any) -> set[str]:
    """Every environment variable a Dagster config reads via ``{env: NAME}``."""
    if isinstance(node, Mapping):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(*(dagster_yaml_env_vars(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(dagster_yaml_env_vars(v) for v in node))
    return set()


def build_dockerfile(service: Mapping[str, Any]) -> Path:
    """The Dockerfile a compose service builds, resolved against deploy/."""
    build = service["build"]
    context = (DEPLOY / build["context"]).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def locked_versions() -> dict[str, str]:
    """The exact version of every package in uv.lock, by (normalized) name."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"]}


def pip_install_requirements(instructions: list[Instruction]) -> dict[str, Requirement]:
    """The quoted requirement specifiers installed by ``pip install`` in RUN instructions."""
    found: dict[str, Requirement] = {}
    for args in instruction_args(instructions, "RUN"):
        if "pip install" not in args:
            continue
        for word in shlex.split(args):
            if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*[<>=!~]", word):
                requirement = Requirement(word)
                found[requirement.name.lower()] = requirement
    return found


@pytest.fixture(scope="module")
def deploy_config() -> dict[str, Any]:
    return load_yaml(DAGSTER_YAML)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_YAML)


def fake_pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the credentials deploy/dagster.yaml reads (values irrelevant without a database)."""
    for name, value in zip(
        PG_ENV_VARS, ("db", "5432", "dagster", "secret", "dagster"), strict=True
    ):
        monkeypatch.setenv(name, value)


# ---------------------------------------------------------------------------------------------
# deploy/dagster.yaml without a database


def test_deploy_dagster_yaml_requires_the_database_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pg_env(monkeypatch)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    shutil.copy(DAGSTER_YAML, tmp_path / "dagster.yaml")

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))

    # Environment variables are resolved when the storage is built, before any connection, so
    # the public loader reports the missing credential without a database.
    with pytest.raises(DagsterInvalidConfigError, match="DAGSTER_PG_PASSWORD"):
        DagsterInstance.get()


def test_instance_storage_paths_are_on_the_shared_volume(
    deploy_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    # Runs happen in their own containers: Dagster's step outputs and compute logs must be on the
    # volume every container mounts at MLPLATFORM_HOME, or the next run and the UI cannot see them.
    home = compose["services"]["webserver"]["environment"]["MLPLATFORM_HOME"]
    for section in ("local_artifact_storage", "compute_logs"):
        base_dir = deploy_config[section]["config"]["base_dir"]
        assert Path(base_dir).is_relative_to(home), f"{section} base_dir {base_dir} not in {home}"


# ---------------------------------------------------------------------------------------------
# deploy/workspace.yaml and deploy/docker-compose.yaml


def test_workspace_points_at_the_user_code_server(compose: dict[str, Any]) -> None:
    workspace = load_yaml(WORKSPACE_YAML)
    (location,) = workspace["load_from"]
    server = location["grpc_server"]
    tool_dagster = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]

    assert server == {"host": "user_code", "port": 4000, "location_name": "mlplatform"}
    assert server["location_name"] == tool_dagster["code_location_name"]
    assert server["host"] in compose["services"]
    # The port the user-code image serves on.
    dockerfile = parse_dockerfile(REPO / "Dockerfile")
    assert str(server["port"]) in instruction_args(dockerfile, "EXPOSE")
    cmd = exec_form(instruction_args(dockerfile, "CMD")[-1])
    assert cmd[cmd.index("-p") + 1] == str(server["port"])


def test_compose_services_build_the_right_dockerfiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "mlflow",
        "user_code",
        "webserver",
        "daemon",
        "ray-head",
        "prometheus",
        "grafana",
    }

    assert build_dockerfile(services["user_code"]) == REPO / "Dockerfile"
    assert build_dockerfile(services["webserver"]) == DEPLOY / "Dockerfile.dagster"
    assert build_dockerfile(services["daemon"]) == DEPLOY / "Dockerfile.dagster"
    assert build_dockerfile(services["mlflow"]) == DEPLOY / "Dockerfile.mlflow"
    # The Ray head runs the platform image, so Serve replicas import the code runs deploy.
    assert build_dockerfile(services["ray-head"]) == REPO / "Dockerfile"
    assert services["ray-head"]["image"] == services["user_code"]["image"]
    for name, service in services.items():
        if "build" in service:
            assert build_dockerfile(service).is_file(), f"{name}: Dockerfile missing"
        assert "image" in service, f"{name}: name the image so it can be referenced"

    # Run containers start from the image the code location reports.
    user_code = services["user_code"]
    assert user_code["environment"]["DAGSTER_CURRENT_IMAGE"] == user_code["image"]


def test_compose_provides_every_variable_dagster_yaml_uses(
    deploy_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    read = dagster_yaml_env_vars(deploy_config)
    forwarded = set(deploy_config["run_launcher"]["config"]["env_vars"])
    assert set(PG_ENV_VARS) <= read
    assert forwarded >= read, "run containers need what the instance config reads"
    # The launcher forwards these from the daemon's (and webserver's) environment and fails the
    # launch if one is unset, so every one must be set there, even if empty.
    for name in DAGSTER_SERVICES:
        environment = compose["services"][name]["environment"]
        missing = (read | forwarded) - set(environment)
        assert not missing, f"service {name} lacks {sorted(missing)}"

    # The password has no default in the compose file: it must come from deploy/.env.
    password = compose["services"]["daemon"]["environment"]["DAGSTER_PG_PASSWORD"]
    assert password.startswith("${DAGSTER_PG_PASSWORD:?")
    # The database the instance connects to is the one the postgres service creates.
    postgres_env = compose["services"]["postgres"]["environment"]
    daemon_env = compose["services"]["daemon"]["environment"]
    assert daemon_env["DAGSTER_PG_HOST"] == "postgres"
    assert daemon_env["DAGSTER_PG_DB"] == postgres_env["POSTGRES_DB"]
    assert daemon_env["DAGSTER_PG_USER"] == postgres_env["POSTGRES_USER"]


def test_compose_network_and_volume_match_the_run_launcher(
    deploy_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    launcher = deploy_config["run_launcher"]["config"]
    networks = {key: spec["name"] for key, spec in compose["networks"].items()}
    assert launcher["network"] in networks.values()
    network_key = next(k for k, v in networks.items() if v == launcher["network"])
    for name, service in compose["services"].items():
        assert network_key in service["networks"], f"{name} is not on {launcher['network']}"

    # Volumes the launcher mounts by name must have that exact (unprefixed) name in compose,
    # and be mounted at the same place in the long-running platform containers.
    volume_names = {key: (spec or {}).get("name") for key, spec in compose["volumes"].items()}
    for mount in launcher["container_kwargs"]["volumes"]:
        volume, target = mount.split(":")[:2]
        assert volume in volume_names.values(), f"volume {volume} has no fixed name in compose"
        key = next(k for k, v in volume_names.items() if v == volume)
        for name in (*DAGSTER_SERVICES, "ray-head"):
            assert f"{key}:{target}" in compose["services"][name]["volumes"], name


def test_compose_service_addresses_are_consistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["daemon"]["environment"]

    mlflow = re.fullmatch(r"http://([\w-]+):(\d+)", env["MLFLOW_TRACKING_URI"])
    assert mlflow and mlflow[1] in services
    mlflow_cmd = exec_form(
        instruction_args(parse_dockerfile(DEPLOY / "Dockerfile.mlflow"), "CMD")[-1]
    )
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == mlflow[2]
    assert "--serve-artifacts" in mlflow_cmd
    backend = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql+psycopg2://") and backend.endswith(
        "@postgres:5432/mlflow"
    )
    init_sql = "\n".join(p.read_text() for p in (DEPLOY / "postgres-init").glob("*.sql"))
    assert re.search(r"CREATE DATABASE mlflow\b", init_sql)

    ray = re.fullmatch(r"ray://([\w-]+):(\d+)", env["RAY_ADDRESS"])
    assert ray and ray[1] in services
    assert f"--ray-client-server-port={ray[2]}" in services[ray[1]]["command"]
    assert env["MLPLATFORM_SERVE_HOST"] == "0.0.0.0"  # inside the head container
    assert env["MLPLATFORM_ENDPOINT_URL"] == f"http://{services[ray[1]]['hostname']}:8000"
    ports = [str(p).rsplit(":", 2)[-2:] for p in services[ray[1]]["ports"]]
    assert [env["MLPLATFORM_SERVE_PORT"]] * 2 in ports

    for name in ("webserver", "daemon"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["user_code"]["condition"] == "service_healthy"


def test_compose_requires_api_keys_for_the_endpoint_it_exposes(
    deploy_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    services = compose["services"]
    # The endpoint listens on 0.0.0.0 in the Ray head, which the platform refuses without keys:
    # `docker compose up` must stop on a missing MLPLATFORM_API_KEYS, as on the Ray token.
    assert services["daemon"]["environment"]["MLPLATFORM_SERVE_HOST"] == "0.0.0.0"
    for name in DAGSTER_SERVICES:
        keys = services[name]["environment"]["MLPLATFORM_API_KEYS"]
        assert keys.startswith("${MLPLATFORM_API_KEYS:?set MLPLATFORM_API_KEYS in deploy/.env"), (
            name
        )
    # Run containers deploy and smoke-test the endpoint: the launcher forwards the keys.
    assert "MLPLATFORM_API_KEYS" in deploy_config["run_launcher"]["config"]["env_vars"]
    # The Ray head serves with digests handed over by the deploying run, never the keys.
    assert "MLPLATFORM_API_KEYS" not in services["ray-head"]["environment"]
    # deploy/.env.example documents the variable, with a placeholder the platform refuses.
    example = (DEPLOY / ".env.example").read_text()
    (line,) = [line for line in example.splitlines() if line.startswith("MLPLATFORM_API_KEYS=")]
    with pytest.raises(ApiKeyError, match="a key is at least 16 characters"):
        parse_api_keys(line.split("=", 1)[1].strip('"'), "deploy/.env.example")
    assert "scope[,scope]:key" in example and "Authorization: Bearer" in example


def test_compose_ray_head_serves_on_the_fast_path(compose: dict[str, Any]) -> None:
    environment = compose["services"]["ray-head"]["environment"]
    assert {name: str(environment.get(name)) for name in SERVE_ENVIRONMENT} == SERVE_ENVIRONMENT
    # The platform's variables are there too (the merge kept them).
    assert (
        environment["MLFLOW_TRACKING_URI"]
        == compose["services"]["daemon"]["environment"]["MLFLOW_TRACKING_URI"]
    )


# ---------------------------------------------------------------------------------------------
# Dockerfiles, statically


DOCKERFILES = {
    "user-code": (REPO / "Dockerfile", REPO),
    "dagster": (DEPLOY / "Dockerfile.dagster", DEPLOY),
    "mlflow": (DEPLOY / "Dockerfile.mlflow", DEPLOY),
}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_lint(name: str) -> None:
    path, context = DOCKERFILES[name]
    instructions = parse_dockerfile(path)
    keywords = [i.keyword for i in instructions]

    assert keywords[0] == "FROM" and instructions[0].args == "python:3.11-slim"
    assert keywords.count("FROM") == 1
    users = instruction_args(instructions, "USER")
    assert users and users[-1] not in ROOT_USERS, "the image must not run as root"
    user = users[-1].split(":")[0]
    creates_user = re.compile(rf"\buseradd\b[^&;|]*\s{re.escape(user)}(\s|$)")
    assert any(creates_user.search(a) for a in instruction_args(instructions, "RUN")), user
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    for args in instruction_args(instructions, "RUN"):
        if "pip install" in args:
            assert "--no-cache-dir" in args, args
        if "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args, args
    assert "ADD" not in keywords, "use COPY"
    exec_form(instruction_args(instructions, "CMD")[-1])
    for args in instruction_args(instructions, "COPY"):
        for source in copy_sources(args):
            assert (context / source).exists(), f"{path.name}: COPY source {source} missing"
            assert not dockerignore_excludes(context, source), f"{source} is .dockerignored"


def test_user_code_dockerfile() -> None:
    instructions = parse_dockerfile(REPO / "Dockerfile")
    copied = [s for a in instruction_args(instructions, "COPY") for s in copy_sources(a)]
    assert sorted(copied) == ["README.md", "mlplatform", "pyproject.toml", "uv.lock"]
    assert instruction_args(instructions, "WORKDIR") == ["/opt/mlplatform"]
    environment = env_assignments(instructions)
    assert environment["MLPLATFORM_HOME"] == "/var/lib/mlplatform"
    assert environment["PATH"].startswith(environment["UV_PROJECT_ENVIRONMENT"] + "/bin:")
    assert instruction_args(instructions, "EXPOSE") == ["4000"]
    # The image installs uv.lock's versions with the uv the Makefile pins, code last.
    runs = [a.split() for a in instruction_args(instructions, "RUN")]
    make_uv = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert ["pip", "install", "--no-cache-dir", f"uv=={make_uv}"] in runs
    syncs = [r for r in runs if r[:2] == ["uv", "sync"]]
    assert syncs and all("--locked" in r and "--all-extras" not in r for r in syncs)
    assert "--no-install-project" not in syncs[-1]

    cmd = exec_form(instruction_args(instructions, "CMD")[-1])
    assert cmd == [
        "dagster",
        "code-server",
        "start",
        "-h",
        "0.0.0.0",
        "-p",
        "4000",
        "-m",
        "mlplatform.definitions",
    ]
    module = cmd[cmd.index("-m") + 1]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist"
    # The code location module is the one pyproject declares for `dagster dev`.
    tool_dagster = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    assert module == tool_dagster["module_name"]


def test_control_plane_images_pin_the_locked_versions() -> None:
    locked = locked_versions()
    dagster_image = pip_install_requirements(parse_dockerfile(DEPLOY / "Dockerfile.dagster"))
    assert set(dagster_image) == {
        "dagster",
        "dagster-webserver",
        "dagster-postgres",
        "dagster-docker",
    }
    mlflow_image = pip_install_requirements(parse_dockerfile(DEPLOY / "Dockerfile.mlflow"))
    assert set(mlflow_image) == {"mlflow", "psycopg2-binary"}
    for name, requirement in (dagster_image | mlflow_image).items():
        assert str(requirement.specifier) == f"=={locked[name]}", name

    dagster_env = env_assignments(parse_dockerfile(DEPLOY / "Dockerfile.dagster"))
    copied = instruction_args(parse_dockerfile(DEPLOY / "Dockerfile.dagster"), "COPY")
    assert any(a.endswith("dagster.yaml workspace.yaml ${DAGSTER_HOME}/") for a in copied)
    assert dagster_env["DAGSTER_HOME"].startswith("/")


# ---------------------------------------------------------------------------------------------
# A real PostgreSQL server


@dataclasses.dataclass
class PostgresServer:
    """A running throwaway PostgreSQL server reachable over TCP on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    user: str
    password: str
    root: Path

    def connect(self, dbname: str = "postgres") -> Any:
        """A psycopg2 connection to ``dbname`` as the superuser."""
        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            connect_timeout=5,
        )

    def create_database(self, name: str) -> None:
        """Create an empty database."""
        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def dagster_env(self, dbname: str) -> dict[str, str]:
        """The DAGSTER_PG_* variables that point deploy/dagster.yaml at this server."""
        values = ("127.0.0.1", str(self.port), self.user, self.password, dbname)
        return dict(zip(PG_ENV_VARS, values, strict=True))


INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) not found. Install them, e.g. on Debian/Ubuntu "
    "`apt-get install -y postgresql-15` (they land in /usr/lib/postgresql/15/bin)."
)


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: beside ``initdb`` on PATH, else
    Debian's /usr/lib/postgresql/<version>/bin (15 first, the version the stack runs).
    """
    candidates: list[Path] = []
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates.extend(sorted(debian, key=lambda p: (p.parent.name != "15", -int(p.parent.name))))
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return directory
    pytest.fail(INSTALL_HINT)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_account() -> tuple[dict[str, Any], int | None]:
    """Popen arguments that drop root (PostgreSQL refuses to run as root) and the owner UID.

    As root (CI containers), the server runs as ``nobody`` with no supplementary groups;
    otherwise as the current user.
    """
    if os.geteuid() != 0:
        return {}, None
    try:
        account = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("running as root and there is no `nobody` account to run PostgreSQL as")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}, account.pw_uid


@contextlib.contextmanager
def running_postgres(timeout_s: float = 20.0) -> Iterator[PostgresServer]:
    """Initialise a cluster in a temporary directory, start it, yield it, stop it by PID."""
    bin_dir = postgres_bin_dir()
    drop_root, owner = server_account()
    # Not pytest's tmp_path: it is private to the invoking user, and the server may run as
    # another one.
    root = Path(tempfile.mkdtemp(prefix="mlplatform-pg-"))
    if owner is not None:
        os.chown(root, owner, -1)
    data, log_path = root / "data", root / "postgres.log"
    user, password = "mlplatform", "mlplatform-test-password"
    (root / "pwfile").write_text(password + "\n")
    if owner is not None:
        os.chown(root / "pwfile", owner, -1)
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"}

    init = subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            user,
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        **drop_root,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")

    port = free_port()
    with log_path.open("wb") as log:
        # Throwaway data: durability settings off for speed. No Unix socket, TCP on loopback only.
        process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            **drop_root,
        )
    server = PostgresServer(process, port, user, password, root)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"postgres exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                server.connect().close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"postgres not ready in {timeout_s}s:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield server
    finally:
        # SIGINT = "fast" shutdown: disconnect clients, stop cleanly.
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@contextlib.contextmanager
def instance_from(
    config: Mapping[str, Any],
    dagster_home: Path,
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DagsterInstance]:
    """Write ``config`` as DAGSTER_HOME's dagster.yaml and load it the way Dagster's processes
    do, through ``DagsterInstance.get()``.
    """
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(dict(config)))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    instance = DagsterInstance.get()
    try:
        yield instance
    finally:
        instance.dispose()


@asset
def deploy_check_numbers() -> list[int]:
    """A tiny upstream asset, stored by the default IO manager."""
    return [1, 2, 3, 4]


@asset
def deploy_check_total(context: AssetExecutionContext, deploy_check_numbers: list[int]) -> int:
    """Sums its upstream asset and records the sum as metadata."""
    total = sum(deploy_check_numbers)
    context.add_output_metadata({"total": total})
    return total


def test_materialize_through_postgres_storage(
    postgres_server: PostgresServer,
    deploy_config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    postgres_server.create_database("dagster_materialize")
    # The production file minus what needs Docker (the run launcher falls back to Dagster's
    # default) and the container paths (artifacts and compute logs default into DAGSTER_HOME).
    config = {
        key: value
        for key, value in deploy_config.items()
        if key not in ("run_launcher", "local_artifact_storage", "compute_logs")
    }
    assert config["storage"] == deploy_config["storage"]
    env = postgres_server.dagster_env("dagster_materialize")

    with instance_from(config, tmp_path / "dagster", env, monkeypatch) as instance:
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
        result = materialize([deploy_check_numbers, deploy_check_total], instance=instance)
        assert result.success

        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(AssetKey("deploy_check_total"))
        assert event is not None and event.run_id == result.run_id
        materialization = event.asset_materialization
        assert materialization is not None and materialization.metadata["total"].value == 10

    # Read back from the database itself, not through Dagster's caches.
    connection = postgres_server.connect("dagster_materialize")
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM runs WHERE run_id = %s AND status = 'SUCCESS'",
                (result.run_id,),
            )
            assert cursor.fetchone() == (1,)
            cursor.execute(
                "SELECT asset_key FROM event_logs WHERE run_id = %s"
                " AND dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY asset_key",
                (result.run_id,),
            )
            # Asset keys are stored as JSON arrays of their path components.
            assert [json.loads(row[0]) for row in cursor.fetchall()] == [
                ["deploy_check_numbers"],
                ["deploy_check_total"],
            ]
    finally:
        connection.close()


def test_deploy_dagster_yaml_builds_postgres_storage_and_the_docker_launcher(
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deploy_config: dict[str, Any],
) -> None:
    # The production file as Dagster's public loader builds it from a directory, connected to a
    # real database: the storage, the run launcher and coordinator, and the instance settings.
    postgres_server.create_database("dagster_components")
    for name, value in postgres_server.dagster_env("dagster_components").items():
        monkeypatch.setenv(name, value)
    # Constructing the launcher must not need a Docker engine: point the client at nothing.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    shutil.copy(DAGSTER_YAML, tmp_path / "dagster.yaml")

    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        # dagster_postgres.DagsterPostgresStorage: runs, event logs and schedules in PostgreSQL.
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)

        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.networks == ["mlplatform_network"]
        assert set(launcher.env_vars) >= set(PG_ENV_VARS) | set(PLATFORM_ENV_VARS)
        assert "mlplatform_data:/var/lib/mlplatform" in launcher.container_kwargs["volumes"]

        coordinator = instance.run_coordinator
        assert isinstance(coordinator, QueuedRunCoordinator)
        queue = coordinator.get_run_queue_config()
        assert queue.max_concurrent_runs > 0
        assert queue.tag_concurrency_limits, "expected at least one tag concurrency limit"

        assert instance.get_settings("telemetry")["enabled"] is False
        assert not instance.telemetry_enabled
        assert instance.get_settings("run_monitoring")["enabled"] is True
        assert instance.run_monitoring_enabled
    finally:
        instance.dispose()

    # Every connection setting comes from the environment: no credential in the file.
    postgres_db = dict(deploy_config["storage"]["postgres"]["postgres_db"])
    # SQLAlchemy 2.1 reads a bare "postgresql" scheme as psycopg 3, which is not installed.
    assert postgres_db.pop("scheme") == "postgresql+psycopg2"
    assert {key: value["env"] for key, value in postgres_db.items()} == {
        "hostname": "DAGSTER_PG_HOST",
        "port": "DAGSTER_PG_PORT",
        "username": "DAGSTER_PG_USER",
        "password": "DAGSTER_PG_PASSWORD",
        "db_name": "DAGSTER_PG_DB",
    }


def test_production_instance_loads_unmodified(
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deploy_config: dict[str, Any],
) -> None:
    # The exact production file, through the public loader, against a real database: storage
    # connects and creates its schema, the Docker launcher is built without a Docker engine.
    postgres_server.create_database("dagster_production")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    env = postgres_server.dagster_env("dagster_production")

    with instance_from(deploy_config, tmp_path / "dagster", env, monkeypatch) as instance:
        assert isinstance(instance.run_launcher, DockerRunLauncher)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.get_runs() == []

    connection = postgres_server.connect("dagster_production")
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_name IN ('runs', 'event_logs', 'jobs')"
            )
            assert cursor.fetchone() == (3,)
    finally:
        connection.close()
