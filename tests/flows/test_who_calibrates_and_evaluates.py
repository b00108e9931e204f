"""Who did it: `sparsepilot calibrate NAME` and `evaluate NAME` need no sign-in, but their audit rows (a
run started, succeeded or failed, the phase move) always named the pipeline (`sparsepilot-pipeline`), even
when a person ran them from the CLI. They now name the signed-in account (a `sparsepilot login` token),
else the OS user of the process marked unproven ("os:<user> (not signed in)", a name no account may
take); `run` names the operator it signed in for a person's use case, as it does for its pilot and gate;
the scheduled cycle and the samples, which nobody runs by hand, stay the pipeline's. Real
`sparsepilot` commands in this process, a real Prefect API, the state DB and MLflow; the model is
config-only, so each run fails at its first model load, seconds in, after it started."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.trust import password_of
from tests.rollout.usecase_helpers import add_calibrated


def _run_rows(name: str) -> list[tuple[str, str]]:
    """(action, actor) of the use case's audit rows about its calibration and evaluation runs and its
    phase, in order (the helper's own rows left out)."""
    from sqlalchemy import select

    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case

    with session_scope() as s:
        uc = get_use_case(s, name)
        rows = s.scalars(select(AuditEntry).where(AuditEntry.use_case_id == uc.id).order_by(AuditEntry.id))
        return [
            (r.action, r.actor)
            for r in rows
            if r.action.startswith(("calibration.", "evaluation.", "usecase.phase"))
        ]


def _cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> int:
    from typer.testing import CliRunner

    from sparsepilot.cli import app

    return CliRunner().invoke(app, list(args), input=stdin, env=env).exit_code


def _unproven() -> str:
    from rollout.audit import origin

    return f"os:{origin()[0]} (not signed in)"


def test_a_calibration_and_an_evaluation_run_from_the_cli_name_who_ran_them(
    trust_env, mlflow_home, prefect_harness: str, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    from sparse_core import SparsePlan

    name = "olgas-chat"
    add_calibrated(tmp_path, name, SparsePlan(tau=0.9), density=0.5, metrics={}, key=f"calibrate:{name}")
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    olga = {"SPARSEPILOT_USER": "olga"}
    assert _cli("login", "--password-stdin", stdin=password_of("olga") + "\n", env=olga) == 0
    assert _cli("calibrate", name, "--quick") == 2  # no weights to load: failed, after it started
    assert _run_rows(name) == [("calibration.started", "olga"), ("calibration.failed", "olga")]

    assert _cli("logout") == 0  # nobody signed in: the OS user, marked as unproven
    assert _cli("evaluate", name, "--quick") == 2
    assert _run_rows(name)[2:] == [("evaluation.started", _unproven()), ("evaluation.failed", _unproven())]


def test_a_run_that_succeeds_is_its_actors_and_the_pipelines_by_default(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    """What `calibrate NAME` / `evaluate NAME` record on success (the run and the phase move) names whom
    the flow was given; the cycle and the main job give nobody: the pipeline."""
    from rollout import runs
    from rollout.audit import SYSTEM_ACTOR
    from sparse_core import SparsePlan

    uc_id, mv_id = add_calibrated(tmp_path, "chat", SparsePlan(tau=0.9), density=0.5, metrics={}, key="k")
    cal = runs.open_calibration(uc_id, 1, "calibrate:by-olga", {}, None, actor="olga")
    mv = SimpleNamespace(id=mv_id, mlflow_version=None)
    runs.calibration_succeeded(
        "chat", cal["id"], model_version=mv, mlflow_run_id="m", metrics={}, density=0.5, actor="olga"
    )
    roi = {
        "inputs": {"speedup": 1.2, "speedup_low": 1.1, "speedup_high": 1.3},
        **{"saved_usd_month": 10.0, "saved_usd_month_low": 5.0, "saved_usd_month_high": 15.0},
        **{"payback_days": 3.0, "certain": True},
    }
    ev = runs.open_evaluation(uc_id, mv_id, "evaluate:by-the-pipeline", None)
    runs.evaluation_succeeded("chat", ev["id"], report={}, roi=roi, mlflow_run_id="m", spec_version=1)
    assert _run_rows("chat") == [
        ("calibration.started", "olga"),
        ("calibration.succeeded", "olga"),
        ("usecase.phase", "olga"),
        ("evaluation.started", SYSTEM_ACTOR),
        ("evaluation.succeeded", SYSTEM_ACTOR),
        ("usecase.phase", SYSTEM_ACTOR),
    ]


@pytest.mark.parametrize("name", ["os:alice", "OS:alice (not signed in)"])
def test_no_local_account_takes_the_name_of_someone_not_signed_in(name: str, tmp_path: Path) -> None:
    from rollout.auth import AccountsConfigError, load_accounts_file
    from tests.fixtures.accounts import cheap_hash

    path = tmp_path / "accounts.toml"
    path.write_text(f'[accounts."{name}"]\nrole = "approver"\npassword_hash = "{cheap_hash("x" * 12)}"\n')
    with pytest.raises(AccountsConfigError, match="kept for people the CLI did not sign in"):
        load_accounts_file(path)


def test_a_run_calibrates_a_persons_use_case_as_its_operator(
    trust_env, mlflow_home, prefect_harness: str, tmp_path: Path
) -> None:  # noqa: ANN001
    """`sparsepilot run`, signed in for a person's use case, piloted and gated it as the operator but
    calibrated and evaluated it as the pipeline (`flows.main_job.pilot_actor` now covers all four)."""
    from flows.main_job import MainJobSettings, run_use_case
    from sparse_core import SparsePlan

    add_calibrated(tmp_path, "olgas-run", SparsePlan(tau=0.9), density=0.5, metrics={}, key="k")
    out = run_use_case("olgas-run", MainJobSettings(), lambda _stage: None, "olga")
    assert not out.ok and "cannot load weights" in (out.error or "")  # the config-only model
    assert _run_rows("olgas-run") == [("calibration.started", "olga"), ("calibration.failed", "olga")]
