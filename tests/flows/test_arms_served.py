"""The registered versions serve: `sparsepilot serve-model` starts real `mlflow models serve` processes
(loopback, env manager local) for the tiny model's champion (the dense baseline, recorded as apply_promotion
does before a first promotion) and its calibrated challenger, and a pilot whose spec points `pilot.arms` at
them runs a shadow step and a split step over HTTP through the real flows (Prefect, MLflow, GX, SQLite).

One home, one calibration and one server per arm for the whole module: a scoring server takes tens of
seconds to start on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.fixtures.flows import QUICK_CAL, skip_if_host_overloaded, tiny_spec
from tests.fixtures.ports import free_port
from tests.flows.test_pipeline_e2e import _pilot_until_decided

# the module's servers and calibration take minutes to set up (281 s at -n 0 on a host at load 12): it runs
# first, whole (tests/conftest.py)
pytestmark = pytest.mark.slow

NAME = "served-chat"
START_TIMEOUT_S = 420
# what `serve-model`'s caller holds and its scoring server must not (review s46 A5)
SECRETS = {
    "SPARSEPILOT_AUTH_KEY": "k" * 40,
    "SPARSEPILOT_OWNER_DATABASE_URL": "postgresql+psycopg://sparsepilot:OwnerPw@db/sparsepilot",
    "PREFECT_API_AUTH_STRING": "admin:PrefectPw",
}


def _wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve-model exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not serving after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(
    prefect_harness: str,
    tiny_model_dir: Path,
    pilot_dataset: Path,
    mlflow_template_db: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    from flows.calibrate import calibrate_flow
    from rollout import registry, tracking
    from rollout.approvals import baseline_version_id
    from rollout.auth import Identity
    from rollout.db import migrate
    from rollout.settings import configure_environment, get_settings
    from rollout.usecases import add_usecase
    from sparsepilot.cli import app

    root = tmp_path_factory.mktemp("served")
    urls = {arm: f"http://127.0.0.1:{free_port()}" for arm in ("control", "treatment")}
    procs: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEPILOT_HOME", str(root / "sp-home"))
        mp.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        settings = configure_environment(get_settings())
        migrate.upgrade(settings.database_url)
        shutil.copyfile(mlflow_template_db, settings.home / "mlflow.db")
        tracking.configure(settings)

        arms = {
            arm: {"kind": "mlflow", "url": url, "timeout_s": 120, "max_concurrency": 2}
            for arm, url in urls.items()
        }
        spec_file = root / f"{NAME}.yaml"
        spec_file.write_text(
            yaml.safe_dump(tiny_spec(tiny_model_dir, NAME, dataset_file=pilot_dataset, pilot={"arms": arms}))
        )
        add_usecase(spec_file, actor="test-owner")
        cal = calibrate_flow(NAME, limits=QUICK_CAL)
        base = baseline_version_id(NAME)
        assert base is not None and cal["mlflow_version"]
        no_champion = CliRunner().invoke(app, ["serve-model", NAME, "--alias", "champion"])
        # Before the first promotion the dense baseline is what serves: recorded as champion (as
        # rollout.approvals.apply_promotion does), so the control arm is models:/...@champion.
        registry.set_alias(
            NAME,
            "champion",
            model_version_id=base,
            actor=Identity("alice", "approver", "cli-env"),
            reason="the dense baseline serves today",
            idempotency_key="test-baseline",
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **SECRETS}
        exe = str(Path(sys.executable).with_name("sparsepilot"))
        for arm, alias in (("control", "champion"), ("treatment", "challenger")):
            log = root / f"serve-{alias}.log"
            port = urls[arm].rsplit(":", 1)[1]
            with log.open("w") as fh:
                procs.append(
                    subprocess.Popen(
                        [exe, "serve-model", NAME, "--alias", alias, "--port", port],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        try:
            for proc, (arm, alias) in zip(
                procs, (("control", "champion"), ("treatment", "challenger")), strict=True
            ):
                _wait_until_serving(proc, urls[arm], root / f"serve-{alias}.log")
            yield {"urls": urls, "calibration": cal, "no_champion": no_champion, "root": root, "procs": procs}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)


def test_serve_model_names_what_is_missing(served: dict[str, Any]) -> None:
    from rollout.approvals import baseline_version_id
    from rollout.db.models import ModelVersion
    from rollout.db.session import session_scope
    from sparsepilot.cli import app

    with session_scope() as s:
        baseline = s.get(ModelVersion, baseline_version_id(NAME)).mlflow_version
    res = served["no_champion"]
    assert res.exit_code == 2
    assert f"use case '{NAME}' has no 'champion' alias" in res.output
    assert f"dense baseline (what serves today) is version {baseline}: --version {baseline}" in res.output
    runner = CliRunner()
    res = runner.invoke(app, ["serve-model", NAME, "--version", "99"])
    assert res.exit_code == 2 and f"sparsepilot-{NAME} has no version 99; registered versions:" in res.output
    res = runner.invoke(app, ["serve-model", "no-such-case"])
    assert res.exit_code == 2 and "unknown use case 'no-such-case' (known: " in res.output
    res = runner.invoke(app, ["serve-model", NAME, "--dry-run"])
    assert res.exit_code == 0 and f"models:/sparsepilot-{NAME}@challenger" in res.output
    assert "--env-manager local -h 127.0.0.1 -p 5001" in res.output


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0") if "=" in item)


def test_the_scoring_servers_hold_none_of_the_callers_secrets(served: dict[str, Any]) -> None:
    """Review s46 A5: `serve-model` passed its whole environment to MLflow's scoring server. Each
    server's processes (`mlflow models serve`, uvicorn: the serve-model's process group) now hold none of
    the secrets its caller held, and still serve (the other tests here)."""
    for proc in served["procs"]:
        assert SECRETS.items() <= _environ(proc.pid).items()  # the caller holds them
        group = [
            int(d.name)
            for d in Path("/proc").iterdir()
            if d.name.isdigit() and int(d.name) != proc.pid and _pgid(int(d.name)) == proc.pid
        ]
        assert len(group) >= 2, group  # mlflow's CLI and its uvicorn server at least
        for pid in group:
            env = _environ(pid)
            assert not set(SECRETS) & set(env), (pid, sorted(set(SECRETS) & set(env)))
            assert env["MLFLOW_TRACKING_URI"] and "PATH" in env


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_shadow_and_a_split_step_run_against_the_served_versions(served: dict[str, Any]) -> None:
    """The pilot's arms are the two scoring servers: every observation came over HTTP (the servers'
    answers match the same versions loaded in-process), and the gate decides both steps."""
    from sqlalchemy import func, select

    from rollout.db.models import Observation, Pilot, PilotStep
    from rollout.db.session import session_scope

    shadow = _pilot_until_decided(NAME, "shadow")
    skip_if_host_overloaded(shadow)  # the servers run on this host: its overload slows them (review s48 L1)
    assert shadow["outcome"] == "GO", shadow["explanation"]
    split = _pilot_until_decided(NAME, "split")
    skip_if_host_overloaded(split)
    assert split["outcome"] == "GO" and split["awaiting"] == "approval", split["explanation"]
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        steps = {st.index: st for st in s.scalars(select(PilotStep).where(PilotStep.pilot_id == pilot.id))}
        counts = dict(
            s.execute(
                select(Observation.arm, func.count())
                .where(Observation.pilot_step_id == steps[0].id)
                .group_by(Observation.arm)
            ).all()
        )
        assert counts["control"] == counts["treatment"] >= 8
        split_rows = s.execute(
            select(
                Observation.request_id,
                Observation.arm,
                Observation.error,
                Observation.latency_ms,
                Observation.overloaded,
            ).where(Observation.pilot_step_id == steps[1].id)
        ).all()
    assert {r.arm for r in split_rows} == {"control", "treatment"}
    assert len({r.request_id for r in split_rows}) == len(split_rows)
    assert not any(r.error for r in split_rows) and min(r.latency_ms for r in split_rows) > 0
    # the servers run on this host (127.0.0.1): their rows are flagged as the host's load says, and a GO
    # means the latency guardrail judged enough of them
    assert sum(not r.overloaded for r in split_rows if r.arm == "treatment") >= 1


def test_the_servers_answer_as_the_registered_versions_in_process(
    served: dict[str, Any], tiny_model_dir: Path
) -> None:
    """loglik over POST /invocations (mode 'loglik') equals the in-process score of the same version: the
    champion server is the dense model, the challenger server the model with the calibrated plan."""
    from flows.common import model_arm, version_plan
    from rollout.arms import ArmRequest, build_arm
    from rollout.arms.inprocess import InProcessArm
    from rollout.db.models import ModelVersion
    from rollout.db.session import session_scope
    from rollout.spec import ArmSpec
    from sparse_core import load_model
    from tests.rollout.test_arms import REQUESTS

    with session_scope() as s:
        mv = s.get(ModelVersion, served["calibration"]["model_version_id"])
        plan = version_plan(mv.plan, mv.mlflow_model_name, mv.mlflow_version)
    model, tok = load_model(str(tiny_model_dir))
    rid, row = REQUESTS[3]
    req = ArmRequest(rid, row["prompt"], row["reference"])
    kw: dict[str, Any] = {"max_new_tokens": 4, "max_prompt_tokens": None}
    for arm, in_process_plan in (("control", None), ("treatment", plan)):
        served_arm = build_arm(ArmSpec(kind="mlflow", url=served["urls"][arm]), arm, in_process=lambda: None)
        over_http = served_arm.answer(req, "loglik", **kw)
        text = served_arm.answer(req, "contains", **kw)
        served_arm.close()
        assert not over_http.error and not text.error and text.latency_ms > 0, (over_http, text)
        local = InProcessArm(model.eval(), tok, in_process_plan, model_arm).answer(req, "loglik", **kw)
        assert over_http.quality == pytest.approx(local.quality, rel=1e-4), arm
