"""Where state lives. Everything comes from the environment so the embedded default and the
multi-service stack run the same code."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sparse_core.errors import SparsePilotError


class SettingsError(SparsePilotError, ValueError):
    """An environment setting SparsePilot cannot use, named with its value."""


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    mlflow_tracking_uri: str
    mlflow_artifact_root: Path
    cache_dir: Path
    # PostgreSQL with two roles: migrations run as the owner (rollout.db.roles); else the same URL
    owner_database_url: str = ""

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


# SQLAlchemy's reading of a URL: the password ends at the first '@', the host runs to '/', ':' or '?'
_AT_IN_HOST = re.compile(r"^[\w+]+://[^:/]*(?::[^@]*)?@[^/:?]*@")


def _db_url(variable: str) -> str | None:
    """A database URL from the environment, refused where its password holds a raw '@': the driver
    would read the password's tail as part of the host and print it ("failed to resolve host
    'tail@db'"), on the console and in the logs."""
    url = os.environ.get(variable)
    if url and _AT_IN_HOST.match(url):
        raise SettingsError(
            f"{variable} holds more than one '@' before its host: a password with '@' must be "
            "percent-encoded ('%40'), or use a hex password (docs/operations.md, \"Start\"); the URL is "
            "not shown, it holds a secret"
        )
    return url


def get_settings() -> Settings:
    """Read settings fresh each call: tests and the CLI change the environment between calls."""
    home = Path(os.environ.get("SPARSEPILOT_HOME", ".sparsepilot")).expanduser().resolve()
    db_url = _db_url("SPARSEPILOT_DATABASE_URL") or f"sqlite:///{home / 'state.db'}"
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    cache = Path(os.environ.get("SPARSEPILOT_CACHE_DIR", home / "cache")).expanduser().resolve()
    return Settings(
        home=home,
        database_url=db_url,
        owner_database_url=_db_url("SPARSEPILOT_OWNER_DATABASE_URL") or db_url,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_artifact_root=home / "mlartifacts",
        cache_dir=cache,
    )


def configure_environment(settings: Settings | None = None) -> Settings:
    """Set the third-party defaults we rely on (offline hub, no telemetry, Prefect home inside
    our data dir) without overriding anything the user set explicitly."""
    s = settings or get_settings()
    try:
        s.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only place, ...
        raise SettingsError(
            f"SPARSEPILOT_HOME={s.home}: cannot be used as the data directory ({exc.strerror or exc})"
        ) from None
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_HOME": str(s.home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return s


def state_db_id(database_url: str) -> str:
    """A short id of the state DB a URL reaches (10 hex digits): its backend, host, port and database (a
    SQLite file's absolute path), not the role, password or options, so the app's and the owner's URLs
    of one database give one id. What keeps apart the things several state DBs share on one server (the
    approval deployment on a Prefect server: `flows.deployments.approval_deployment_name`)."""
    import hashlib

    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    where = os.path.abspath(url.database or "") if url.get_backend_name() == "sqlite" else url.database
    key = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{where or ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]
