"""CI check of docker-compose.yml (Docker has no engine on our machines, so the file is parsed, not run).

It fails when a required service, a healthcheck or a named volume is missing, when the MLflow or Prefect
server's healthcheck does not read its database (HEALTH_READS_DB), when state would live in a
container's writable layer, when a service does not pass a setting its program reads from .env
(SERVICE_SETTINGS), or when a variable the file reads as ${VAR} is not documented in both
.env.example and docs/operations.md. The checker is a pure function; the tests below also feed it broken
copies to show that each rule really fires.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
OPERATIONS = ROOT / "docs" / "operations.md"

REQUIRED_SERVICES = (
    "postgres",
    "migrate",
    "mlflow",
    "prefect-server",
    "deploy-flows",
    "prefect-worker",
    "prefect-worker-approvals",
    "dashboard",
)
ONE_SHOT = {"migrate", "deploy-flows"}  # run to completion; no healthcheck, restart "no"
# service -> container path that must be a named volume (the service's durable state)
STATE_MOUNTS = {
    "postgres": "/var/lib/postgresql/data",
    "mlflow": "/mlartifacts",
    "prefect-worker": "/data/sparsepilot",
    "dashboard": "/data/sparsepilot",
}
SECRET_VARS = (
    "POSTGRES_PASSWORD",
    "SPARSEPILOT_DB_PASSWORD",
    "SPARSEPILOT_APP_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "PREFECT_DB_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)

# service -> operator settings its program reads (deploy/bin/*, dashboard/) that the docs tell operators
# to set in .env: the service must pass each one through, or a value in .env is silently ignored.
SERVICE_SETTINGS = {
    "mlflow": ("MLFLOW_ALLOWED_HOSTS", "MLFLOW_WORKERS", "MLFLOW_AUTH_CACHE_TTL_S"),
    "dashboard": (
        "SPARSEPILOT_ACCOUNTS",
        "SPARSEPILOT_ACCOUNTS_FILE",
        "SPARSEPILOT_MLFLOW_UI_URL",
        "SPARSEPILOT_OIDC_APPROVERS",
    ),
}

# service -> what its healthcheck must request: an API that reads the server's database, so that a
# database outage shows as unhealthy (a bare /health only proves that the process answers)
HEALTH_READS_DB = {
    "mlflow": "/api/2.0/mlflow/experiments/search",
    "prefect-server": "/api/ready",
}

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolated_vars(value: Any) -> set[str]:
    """Names compose substitutes from the environment in every string of the file (``$$`` is a literal
    dollar and is skipped)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= interpolated_vars(v)
    elif isinstance(value, list):
        for v in value:
            found |= interpolated_vars(v)
    elif isinstance(value, str):
        for m in _VAR.finditer(value.replace("$$", "")):
            found.add(m.group(1) or m.group(2))
    return found


def env_example_vars(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip().strip("'\"")
    return out


def _named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> named volume, for short (``name:/path[:ro]``) and long syntax mounts."""
    mounts: dict[str, str] = {}
    for vol in service.get("volumes", []) or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2 and not parts[0].startswith((".", "/", "~", "$")):
                mounts[parts[1]] = parts[0]
        elif isinstance(vol, dict) and vol.get("type", "volume") == "volume" and vol.get("source"):
            mounts[vol["target"]] = vol["source"]
    return mounts


def _bind_sources(service: dict[str, Any]) -> list[str]:
    out = []
    for vol in service.get("volumes", []) or []:
        if isinstance(vol, str) and vol.split(":")[0].startswith((".", "/")):
            out.append(vol.split(":")[0])
    return out


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def compose_problems(
    compose: dict[str, Any], env_example: str, operations: str, root: Path = ROOT
) -> list[str]:
    """Everything wrong with the compose file, as readable sentences; [] when it is fine."""
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services") or {}
    declared_volumes = set((compose.get("volumes") or {}).keys())

    for name in REQUIRED_SERVICES:
        if name not in services:
            problems.append(f"service {name!r} is missing")

    for name, svc in services.items():
        svc = svc or {}
        one_shot = name in ONE_SHOT
        hc = svc.get("healthcheck") or {}
        if not one_shot and (not hc.get("test") or hc.get("disable")):
            problems.append(f"service {name!r} has no healthcheck")
        if one_shot and svc.get("restart", "no") != "no":
            problems.append(f"one-shot service {name!r} must not restart (restart: 'no')")
        for target, vol in _named_mounts(svc).items():
            if vol not in declared_volumes:
                problems.append(f"service {name!r} mounts volume {vol!r} at {target} but it is not declared")
        for src in _bind_sources(svc):
            if not (root / src).exists():
                problems.append(f"service {name!r} bind-mounts {src}, which does not exist in the repo")
        cmd = _command(svc)
        if cmd and cmd[0] not in ("sparsepilot", "python"):
            script = root / "deploy" / "bin" / cmd[0]
            if not (script.is_file() and os.access(script, os.X_OK)):
                problems.append(f"service {name!r} runs {cmd[0]!r}, which is not an executable in deploy/bin")
        for arg in cmd[1:]:
            if arg.startswith("/app/") and not (root / arg.removeprefix("/app/")).exists():
                problems.append(f"service {name!r} runs {arg}, which does not exist in the repo")
        # everything that reads or writes the state DB waits for the migrations
        env = svc.get("environment") or {}
        if "SPARSEPILOT_DATABASE_URL" in env and name != "migrate":
            deps = svc.get("depends_on") if isinstance(svc.get("depends_on"), dict) else {}
            dep = deps.get("migrate") or {}
            if dep.get("condition") != "service_completed_successfully":
                problems.append(f"service {name!r} uses the state DB but does not wait for migrate")

    for name, target in STATE_MOUNTS.items():
        if name in services and target not in _named_mounts(services[name] or {}):
            problems.append(f"service {name!r} keeps {target} outside a named volume (state would be lost)")

    migrate = services.get("migrate") or {}
    if migrate and _command(migrate)[:2] != ["sparsepilot", "init"]:
        problems.append("service 'migrate' must run `sparsepilot init` (Alembic migrations)")

    worker = services.get("prefect-worker") or {}
    if worker.get("container_name") or worker.get("ports"):
        problems.append("service 'prefect-worker' sets container_name or ports: --scale cannot run replicas")

    gpu = services.get("prefect-worker-gpu")
    if gpu is None:
        problems.append("service 'prefect-worker-gpu' (optional GPU profile) is missing")
    else:
        reservations = ((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
        devices = reservations.get("devices")
        if "gpu" not in (gpu.get("profiles") or []):
            problems.append("service 'prefect-worker-gpu' must be in the 'gpu' profile (optional)")
        if not devices or not any("gpu" in (d.get("capabilities") or []) for d in devices):
            problems.append("service 'prefect-worker-gpu' has no GPU device reservation")

    mlflow_env = (services.get("mlflow") or {}).get("environment") or {}
    hosts = str(mlflow_env.get("MLFLOW_ALLOWED_HOSTS", ""))
    hosts = m.group(1) if (m := re.fullmatch(r"\$\{\w+:-(.*)\}", hosts)) else hosts
    if "mlflow" not in hosts.split(","):
        problems.append("mlflow: MLFLOW_ALLOWED_HOSTS must admit the service name 'mlflow'")
    if not str(mlflow_env.get("MLFLOW_BACKEND_STORE_URI", "")).startswith("postgresql"):
        problems.append("mlflow: the backend store must be PostgreSQL")

    for name, path in HEALTH_READS_DB.items():
        test = " ".join(
            str(t) for t in ((services.get(name) or {}).get("healthcheck") or {}).get("test") or []
        )
        if path not in test:
            problems.append(f"service {name!r}: its healthcheck must request {path} (reads its database)")

    for name, settings in SERVICE_SETTINGS.items():
        env = (services.get(name) or {}).get("environment") or {}
        for var in settings:
            if var not in interpolated_vars(env.get(var, "")):
                problems.append(
                    f"service {name!r} does not pass {var} from .env: a value set there is ignored"
                )

    documented = env_example_vars(env_example)
    for var in sorted(interpolated_vars(compose)):
        if var not in documented:
            problems.append(f"${{{var}}} is not documented in .env.example")
        if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(var)}(?![A-Za-z0-9_])", operations):
            problems.append(f"${{{var}}} is not documented in docs/operations.md")
    for var in SECRET_VARS:
        if documented.get(var):
            problems.append(f".env.example carries a value for the secret {var}; leave it empty")
    return problems


@pytest.fixture(scope="module")
def files() -> tuple[dict[str, Any], str, str]:
    return (
        yaml.safe_load(COMPOSE.read_text(encoding="utf-8")),
        ENV_EXAMPLE.read_text(encoding="utf-8"),
        OPERATIONS.read_text(encoding="utf-8"),
    )


def test_compose_file_is_complete(files: tuple[dict[str, Any], str, str]) -> None:
    assert compose_problems(*files) == []


def test_mlflow_server_script_serves_artifacts_with_allowed_hosts() -> None:
    script = (ROOT / "deploy" / "bin" / "mlflow-server").read_text(encoding="utf-8")
    for flag in ("--serve-artifacts", "--artifacts-destination", "--allowed-hosts"):
        assert flag in script, flag
    # the backend store (a URL with a password) comes from the environment, never the command line
    assert "--backend-store-uri" not in script


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["services"].pop("mlflow"), "service 'mlflow' is missing"),
        (lambda c: c["services"].pop("migrate"), "service 'migrate' is missing"),
        (lambda c: c["services"]["prefect-server"].pop("healthcheck"), "'prefect-server' has no healthcheck"),
        (lambda c: c["services"]["dashboard"].pop("healthcheck"), "'dashboard' has no healthcheck"),
        (lambda c: c["volumes"].pop("postgres-data"), "volume 'postgres-data' at /var/lib/postgresql/data"),
        (lambda c: c["services"]["mlflow"].pop("volumes"), "'mlflow' keeps /mlartifacts outside a named"),
        (
            lambda c: c["services"]["dashboard"]["environment"].update(NEW_KNOB="${SPARSEPILOT_NEW_KNOB:-1}"),
            "${SPARSEPILOT_NEW_KNOB} is not documented in .env.example",
        ),
        (
            lambda c: c["services"]["dashboard"].pop("depends_on"),
            "'dashboard' uses the state DB but does not wait for migrate",
        ),
        (lambda c: c["services"]["prefect-worker"].update(container_name="w"), "--scale cannot run replicas"),
        (lambda c: c["services"]["prefect-worker-gpu"].pop("deploy"), "has no GPU device reservation"),
        (lambda c: c["services"]["migrate"].update(command=["true"]), "must run `sparsepilot init`"),
        (
            lambda c: c["services"]["prefect-server"]["healthcheck"].update(
                test=["CMD", "python", "-c", "urlopen('http://127.0.0.1:4200/api/health')"]
            ),
            "'prefect-server': its healthcheck must request /api/ready",
        ),
        (
            lambda c: c["services"]["mlflow"]["environment"].pop("MLFLOW_AUTH_CACHE_TTL_S"),
            "'mlflow' does not pass MLFLOW_AUTH_CACHE_TTL_S from .env",
        ),
        (
            lambda c: c["services"]["dashboard"]["environment"].pop("SPARSEPILOT_OIDC_APPROVERS"),
            "'dashboard' does not pass SPARSEPILOT_OIDC_APPROVERS from .env",
        ),
    ],
)
def test_check_fires_on_broken_copies(files: tuple[dict[str, Any], str, str], mutate, expected: str) -> None:  # noqa: ANN001
    compose, env_example, operations = files
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = compose_problems(broken, env_example, operations)
    assert any(expected in p for p in problems), problems


def test_undocumented_in_docs_and_secret_values_are_reported(files: tuple[dict[str, Any], str, str]) -> None:
    compose, env_example, operations = files
    docs_without = operations.replace("MLFLOW_WORKERS", "MLFLOW_W0RKERS")
    assert "${MLFLOW_WORKERS} is not documented in docs/operations.md" in compose_problems(
        compose, env_example, docs_without
    )
    leaked = env_example.replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=hunter2\n")
    assert any("secret POSTGRES_PASSWORD" in p for p in compose_problems(compose, leaked, operations))


def test_interpolation_parser_handles_defaults_errors_and_escapes() -> None:
    doc = {"a": "${A:-x} ${B:?need B} $C $${NOT_ME} $$D", "b": ["pre${E}post", {"c": "${F-y}"}]}
    assert interpolated_vars(doc) == {"A", "B", "C", "E", "F"}


def dockerfile_problems(dockerfile: str, compose: dict[str, Any], root: Path = ROOT) -> list[str]:
    """The app image as compose builds it: every build arg compose passes is an ARG, the base is
    python:3.11-slim, torch comes from the chosen index before the project, and it runs as a user."""
    problems: list[str] = []
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = {ln.split()[1].split("=")[0] for ln in lines if ln.startswith("ARG ")}
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    if froms != ["python:3.11-slim"]:
        problems.append(f"Dockerfile must build FROM python:3.11-slim, found {froms}")
    for name, svc in (compose.get("services") or {}).items():
        build = (svc or {}).get("build") or {}
        for arg in (build.get("args") or {}) if isinstance(build, dict) else {}:
            if arg not in args:
                problems.append(f"service {name!r} passes build arg {arg}, not an ARG of the Dockerfile")
    text = "\n".join(lines)
    torch_at = text.find('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    project_at = text.find("pip install --no-deps -e .")
    if torch_at < 0 or project_at < 0 or torch_at > project_at:
        problems.append("Dockerfile must install torch from ${TORCH_INDEX_URL} before the project")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile must end as a non-root USER")
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                if not src.startswith("--") and not (root / src).exists():
                    problems.append(f"Dockerfile copies {src}, which does not exist")
    if "/app/deploy/bin" not in text:
        problems.append("Dockerfile must put /app/deploy/bin on PATH (the services' commands)")
    return problems


def test_dockerfile_matches_compose(files: tuple[dict[str, Any], str, str]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile_problems(dockerfile, files[0]) == []
    broken = copy.deepcopy(files[0])
    broken["services"]["mlflow"]["build"]["args"]["CUDA_ARCH"] = "sm_90"
    assert any("build arg CUDA_ARCH" in p for p in dockerfile_problems(dockerfile, broken))
    as_root = dockerfile.replace("USER sparsepilot", "")
    assert any("non-root" in p for p in dockerfile_problems(as_root, files[0]))
