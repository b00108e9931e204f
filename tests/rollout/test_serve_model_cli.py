"""`sparsepilot serve-model` before any server starts: an unknown use case is named as every command names
it, and `--dry-run` prints a line that works pasted (review O7, O10). Real SQLite state DB and MLflow
store; the pasted line is checked by running its environment in a fresh process elsewhere (a scoring
server's start takes minutes here: tests/flows/test_arms_served.py starts real ones)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.fixtures.flows import tiny_spec

runner = CliRunner()


def _registered(tmp_path: Path, tiny_model_dir: Path, name: str) -> str:
    """A use case with a registered challenger (no model work): what `serve-model` serves."""
    from rollout import registry
    from rollout.usecases import add_usecase
    from sparse_core import SparsePlan

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, name)))
    add_usecase(path, actor="olga")
    mv, _ = registry.register_challenger(
        name, SparsePlan(tau=0.9), str(tiny_model_dir), run_id=None, n_layers=None, density=None,
        calibration_run=1,
    )  # fmt: skip
    return mv.mlflow_version


def test_serve_model_on_an_unknown_use_case_says_unknown_use_case(sp_home) -> None:  # noqa: ANN001
    from sparsepilot.cli import app

    res = runner.invoke(app, ["serve-model", "nosuch", "--dry-run"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: unknown use case 'nosuch' (known: none yet)"), res.output
    assert "calibrate" not in res.output.split("(known")[0]


def test_the_dry_run_prints_a_line_that_works_pasted(
    mlflow_home,  # noqa: ANN001
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from rollout import tracking
    from sparsepilot.cli import app

    version = _registered(tmp_path, tiny_model_dir, "served-tiny")
    res = runner.invoke(app, ["serve-model", "served-tiny", "--dry-run"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    words = shlex.split(line)
    assigned = dict(w.split("=", 1) for w in words[:3])
    uri = tracking.configure()
    assert assigned["MLFLOW_TRACKING_URI"] == uri and assigned["MLFLOW_REGISTRY_URI"] == uri, line
    assert assigned["PATH"].startswith(str(Path(sys.executable).parent) + ":"), line
    cmd = words[3:]
    assert cmd[:6] == [sys.executable, "-m", "mlflow", "models", "serve", "-m"], line
    assert cmd[6] == "models:/sparsepilot-served-tiny@challenger", line
    # the line's environment, from another directory in a shell without SparsePilot's or MLflow's
    # settings, finds the version the model URI names (the bare command said "Registered Model with
    # name=sparsepilot-served-tiny not found" and left an mlflow.db in the working directory)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARSEPILOT_", "MLFLOW_"))}
    probe = (
        "import mlflow; print(mlflow.MlflowClient().get_model_version_by_alias("
        "'sparsepilot-served-tiny', 'challenger').version)"
    )
    prefix = line.split(" -m mlflow ", 1)[0]  # the pasted line's variables and its python
    proc = subprocess.run(
        ["sh", "-c", f"{prefix} -c {shlex.quote(probe)}"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == version, proc.stdout
    assert list(elsewhere.iterdir()) == [], list(elsewhere.iterdir())


def test_the_dry_run_never_prints_a_password() -> None:
    """The MLflow URI's password is referred to in the environment it came from, or masked; a URI without
    one is printed as it is."""
    from rollout.arms.serve import shell_line

    uri = "postgresql://mlflow:S3cretPw@db.internal:5432/mlflow"
    cmd = ["/venv/bin/python", "-m", "mlflow", "models", "serve"]
    from_env = shell_line(cmd, {"MLFLOW_TRACKING_URI": uri}, {"MLFLOW_TRACKING_URI": uri})
    assert "S3cretPw" not in from_env and from_env.startswith('MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI" ')
    configured = shell_line(cmd, {"MLFLOW_TRACKING_URI": uri}, {})
    assert "S3cretPw" not in configured and "mlflow:***@db.internal" in configured
    plain = shell_line(cmd, {"MLFLOW_TRACKING_URI": "sqlite:////srv/mlflow.db"}, {})
    assert plain.startswith("MLFLOW_TRACKING_URI=sqlite:////srv/mlflow.db ")


def test_the_scoring_server_gets_no_secret_of_the_callers_environment(
    sp_home,  # noqa: ANN001
    monkeypatch,  # noqa: ANN001
) -> None:
    """Review s46 A5: `serve_environment` was this process's whole environment: the token-signing key,
    the accounts' hashes, the state DB URLs with their passwords went to a network-facing server. Review
    s46 T3-4: the model stack's torch settings are kept, `PYTORCH_*` (PYTORCH_CUDA_ALLOC_CONF) as well
    as `TORCH*`."""
    from rollout.arms.serve import serve_environment

    caller = {
        "LANG": "C.UTF-8",
        "https_proxy": "http://proxy:3128",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "PYTORCH_ENABLE_MPS_FALLBACK": "1",
        "TORCH_HOME": "/srv/torch",
        "SPARSEPILOT_CACHE_DIR": str(sp_home.home / "cache"),
        "MLFLOW_TRACKING_USERNAME": "ops",
        "AWS_ACCESS_KEY_ID": "for-the-artifact-store",
        "SPARSEPILOT_AUTH_KEY": "k" * 40,
        "SPARSEPILOT_ACCOUNTS": "alice:approver:scrypt$131072$8$1$c2FsdA$aGFzaA",
        "SPARSEPILOT_ACCOUNTS_FILE": "/etc/sp/accounts.toml",
        "SPARSEPILOT_OWNER_DATABASE_URL": "postgresql+psycopg://owner:OwnerPw@db/sp",
        "SPARSEPILOT_TOKEN_FILE": "/home/ops/.config/sparsepilot/token",
        "PREFECT_API_AUTH_STRING": "admin:PrefectPw",
        "GITHUB_TOKEN": "ghp_x",
    }
    for key, value in caller.items():
        monkeypatch.setenv(key, value)
    env = serve_environment()
    kept = {k for k in caller if k in env}
    assert kept == {
        "LANG", "https_proxy", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF",
        "PYTORCH_ENABLE_MPS_FALLBACK", "TORCH_HOME", "SPARSEPILOT_CACHE_DIR", "MLFLOW_TRACKING_USERNAME",
        "AWS_ACCESS_KEY_ID",
    }  # fmt: skip
    assert env["SPARSEPILOT_HOME"] == os.environ["SPARSEPILOT_HOME"] and env["HOME"] == os.environ["HOME"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["MLFLOW_TRACKING_URI"] and env["MLFLOW_REGISTRY_URI"]
    assert not any(secret in repr(env) for secret in ("OwnerPw", "PrefectPw", "kkkk", "scrypt", "ghp_"))
