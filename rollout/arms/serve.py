"""Serve a registered SparsePilot version with MLflow's pyfunc scoring server (`sparsepilot serve-model`).

`serve_command` resolves what will be served first, so a missing alias or version is a clear error naming
the use case and the alias (with what exists instead), never a scoring server that dies at start-up. The
command is `python -m mlflow models serve -m models:/sparsepilot-NAME@ALIAS --env-manager local -h HOST -p
PORT`: the environment of this installation (`local`: no conda/virtualenv build), loopback by default.
The served endpoint is what a `kind: mlflow` arm points at (docs/serving.md)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeTarget:
    use_case: str
    model_uri: str  # models:/sparsepilot-NAME@alias or models:/sparsepilot-NAME/version
    version: str  # the MLflow version the alias points at now
    alias: str | None


def resolve(use_case: str, *, alias: str | None = "challenger", version: str | None = None) -> ServeTarget:
    """The registered version to serve. Raises UnknownUseCase for a name that is no use case (as every
    command says it), else RegistryError naming the use case and alias/version."""
    from rollout import registry, tracking
    from rollout.usecases import require_use_case

    require_use_case(use_case)  # before "no registered model: run calibrate", which could never help
    if (alias is None) == (version is None):
        raise registry.RegistryError("give exactly one of an alias (champion/challenger) or a version")
    if alias is not None and alias not in registry.ALIASES:
        raise registry.RegistryError(f"alias must be one of {list(registry.ALIASES)}, got {alias!r}")
    name = registry.model_name(use_case)
    versions = sorted(
        (str(v.version) for v in tracking.client().search_model_versions(f"name = '{name}'")), key=int
    )
    if not versions:
        raise registry.RegistryError(
            f"use case {use_case!r} has no registered model {name!r} yet: "
            f"run `sparsepilot calibrate {use_case}` first"
        )
    if version is not None:
        if str(version) not in versions:
            raise registry.RegistryError(
                f"{name} has no version {version}; registered versions: {', '.join(versions)}"
            )
        return ServeTarget(use_case, f"models:/{name}/{version}", str(version), None)
    aliases = registry.current_aliases(use_case)
    if alias not in aliases:
        have = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items())) or "no aliases"
        baseline = _baseline_version(use_case) if alias == "champion" else None
        if alias == "champion":
            hint = "nothing has been promoted yet; " + (
                f"the dense baseline (what serves today) is version {baseline}: --version {baseline}"
                if baseline
                else "serve the challenger with --alias challenger"
            )
        else:
            hint = f"run `sparsepilot calibrate {use_case}` to register and set one"
        raise registry.RegistryError(
            f"use case {use_case!r} has no {alias!r} alias on {name} "
            f"({have}; versions {', '.join(versions)}): {hint}"
        )
    return ServeTarget(use_case, registry.model_uri(use_case, alias), aliases[alias], alias)


def _baseline_version(use_case: str) -> str | None:
    """The MLflow version of the use case's registered dense baseline, if any."""
    from rollout.approvals import baseline_version_id
    from rollout.db.models import ModelVersion
    from rollout.db.session import session_scope

    mv_id = baseline_version_id(use_case)
    if mv_id is None:
        return None
    with session_scope() as session:
        return session.get(ModelVersion, mv_id).mlflow_version


def serve_command(
    target: ServeTarget, *, host: str = LOOPBACK, port: int = 5001, workers: int = 1, timeout_s: int = 60
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        target.model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(int(port)),
        "-w",
        str(int(workers)),
        "-t",
        str(int(timeout_s)),
    ]


def serve_variables() -> dict[str, str]:
    """The variables the scoring server needs beyond a plain shell's: the tracking/registry URI of
    SparsePilot's MLflow store (the environment's own where set, as `serve_environment` keeps them)."""
    from rollout import tracking

    uri = tracking.configure()
    return {key: os.environ.get(key) or uri for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


# What the scoring server (`mlflow models serve`, then uvicorn loading the pyfunc) may see of this
# process's environment: the shell's basics, MLflow's own settings and credentials (it fetches the
# model), an artifact store's (S3, GCS, Azure), the model stack's (Hugging Face, torch: `TORCH*` and
# `PYTORCH_*` such as PYTORCH_CUDA_ALLOC_CONF, CUDA, BLAS threads), Python's, TLS trust and proxies,
# and the two settings the pyfunc reads (the model cache, `sparse_core.loading`). Nothing else: not
# the token-signing key, the accounts, the state DB URLs or a Prefect credential (review s46 A5): a
# flaw in a network-facing server, or a tampered model artifact, gets none of them.
SERVE_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "TMPDIR", "TMP",
        "TEMP", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "GUNICORN_CMD_ARGS",
        "SPARSEPILOT_HOME", "SPARSEPILOT_CACHE_DIR",
    }
)  # fmt: skip
SERVE_ENV_PREFIXES = (
    "LC_", "XDG_", "PYTHON", "MLFLOW_", "UVICORN_", "AWS_", "GOOGLE_", "AZURE_", "HF_", "HUGGINGFACE_",
    "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_",
    "KMP_",
)  # fmt: skip


_PROXIES = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"})


def _serves(key: str) -> bool:
    return key in SERVE_ENV_NAMES or key.startswith(SERVE_ENV_PREFIXES) or key.upper() in _PROXIES


def serve_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The scoring server's environment: of this process's (``environ``), only what it needs
    (`SERVE_ENV_NAMES`, `SERVE_ENV_PREFIXES`; proxy names in either case), plus `serve_variables`,
    with this Python's bin directory first on PATH: MLflow starts the scoring server as `uvicorn` by
    name, which must be this installation's even when the virtual environment is not activated."""
    environ = os.environ if environ is None else environ
    env = {key: value for key, value in environ.items() if _serves(key)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)]
    )
    env.update(serve_variables())
    return env


def shell_line(cmd: list[str], variables: dict[str, str], environ: Mapping[str, str] | None = None) -> str:
    """What `serve-model --dry-run` prints: one POSIX shell line that runs `cmd` as `serve-model` would,
    from any directory and without the virtual environment activated: the variables, this Python's bin
    directory first on PATH (for `uvicorn`), every word shell-quoted (pure). A value holding a secret (a
    password in the MLflow URI) is never printed: taken from the environment (`environ`) it is referred to
    there (`KEY="$KEY"`, as it works pasted in that environment), else printed with the secret masked
    (`rollout.redact`), for the reader to fill in."""
    from rollout.redact import redact

    environ = os.environ if environ is None else environ
    bin_dir = shlex.quote(str(Path(cmd[0]).parent))
    assigned = []
    for key, value in variables.items():
        if redact(value) == value:
            assigned.append(f"{key}={shlex.quote(value)}")
        elif environ.get(key) == value:
            assigned.append(f'{key}="${key}"')
        else:
            assigned.append(f"{key}={shlex.quote(redact(value))}")
    return " ".join([*assigned, f'PATH={bin_dir}:"$PATH"', *map(shlex.quote, cmd)])
