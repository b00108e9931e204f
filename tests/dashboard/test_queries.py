"""rollout.queries against a seeded SQLite state DB."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update

from rollout import lifecycle, queries
from rollout.db.session import session_scope
from rollout.settings import Settings


def test_portfolio_rows(seeded: dict[str, Any]) -> None:
    with session_scope() as s:
        rows = {r["name"]: r for r in queries.portfolio(s)}
    assert list(rows) == ["contract-summarisation", "document-qa", "support-chat"]
    c = rows["contract-summarisation"]
    assert c["decision"] == "GO" and c["waits_for"] == "approval to promote"
    assert c["decision_id"] == seeded["contract-summarisation:decision"]
    # quality delta and its interval come from the decision's evidence, not the evaluation
    assert (c["quality_delta"], c["quality_low"], c["quality_high"]) == (-0.005, -0.011, 0.001)
    assert (c["speedup"], c["speedup_low"], c["speedup_high"]) == (2.4, 2.1, 2.7)
    assert (c["savings_month_usd"], c["savings_month_low"], c["savings_month_high"]) == (1840, 1500, 2150)
    assert c["payback_days"] == 12.0 and c["density"] == 0.25  # the latest evaluation
    assert (c["step_index"], c["step_kind"], c["traffic_pct"]) == (1, "split", 10.0)
    assert c["observations"] == 480 and c["step_observations"] == 240
    d = rows["document-qa"]
    assert d["decision"] == "EXTEND" and d["waits_for"] == "more samples (120/300 in the smaller arm)"
    s_ = rows["support-chat"]
    # evaluated, no saving expected (-$35/month): the main job pilots nothing, so it waits for no pilot
    assert (
        s_["decision"] is None and s_["waits_for"] == "no pilot: no saving expected (-$35/month, at best $10)"
    )
    # no decision: quality and its bounds from the latest evaluation, which says so and on how many rows
    assert (s_["quality_delta"], s_["quality_low"], s_["quality_high"]) == (0.0, -0.06, 0.05)
    assert (s_["quality_source"], s_["evaluation_rows"]) == ("evaluation", 60)
    assert c["quality_source"] == "gate"
    assert s_["observations"] == 0


def test_a_plan_that_decodes_sparsely_is_not_called_dense(seeded: dict[str, Any]) -> None:
    """Review V finding 2: an evaluation whose prefill keeps every block (density 1.0) but whose ROI
    prices a measured sparse decode with an established saving waited for "no pilot: the plan keeps
    100.00% of blocks (as dense)". The plan is judged as priced: dense only when decode is dense too."""
    from rollout.db.models import EvaluationRun, UseCase

    def waits(decode_status: str) -> str:
        with session_scope() as s:
            uc_id = s.scalar(select(UseCase.id).where(UseCase.name == "support-chat"))
            last = s.scalar(select(func.max(EvaluationRun.id)).where(EvaluationRun.use_case_id == uc_id))
            run = s.get(EvaluationRun, last)
            run.roi = {**run.roi, "decode": {**run.roi["decode"], "status": decode_status}}
            run.density, run.savings_month_usd = 1.0, 1606.0
            run.savings_month_low, run.savings_month_high = 409.0, 2660.0
        with session_scope() as s:
            return {r["name"]: r for r in queries.portfolio(s)}["support-chat"]["waits_for"]

    assert waits("measured") == lifecycle.waits_for("evaluated")
    assert waits("below_break_even") == "no pilot: the plan keeps 100.00% of blocks (as dense)"


def test_portfolio_totals(seeded: dict[str, Any]) -> None:
    with session_scope() as s:
        t = queries.portfolio_totals(s)
    assert t["use_cases"] == 3 and t["evaluated"] == 3
    # established: in play and the interval above zero; support-chat ([-80, 10]) is counted apart
    assert t["established"] == 2 and t["savings_month_usd"] == pytest.approx(1840 + 620)
    assert t["savings_month_low"] == pytest.approx(1500 + 410)
    assert t["unestablished"] == {"use_cases": 1, "savings_month_usd": pytest.approx(-35)}
    assert t["ended"] == 0
    assert t["decisions"] == {"GO": 1, "EXTEND": 1} and t["decided"] == 2
    assert t["decisions_not_standing"] == {} and t["decisions_after_promotion"] == {}
    assert t["pending_approvals"] == 1 and t["observations"] == 960


def test_empty_install(sp_home: Settings) -> None:
    with session_scope() as s:
        assert queries.portfolio(s) == []
        t = queries.portfolio_totals(s)
        assert queries.pending_decisions(s) == []
    assert t["use_cases"] == 0 and t["savings_month_usd"] is None and t["decisions"] == {}


def test_use_case_detail(seeded: dict[str, Any]) -> None:
    uc_id = seeded["contract-summarisation"]
    with session_scope() as s:
        uc = queries.use_case(s, "contract-summarisation")
        evals = queries.evaluations(s, uc_id)
        stats = queries.step_arm_stats(s, uc_id)
        latencies = queries.latency_histogram(s, uc_id, bins=10)
        decs = queries.decisions(s, uc_id)
        moves = queries.alias_moves(s, uc_id)
        assert queries.use_case(s, "nope") is None
    assert uc is not None and uc["spec"]["model"] == "smollm2-135m" and uc["spec_version"] == 1
    assert [e["density"] for e in evals] == [0.55, 0.25]
    by = {(r["step_index"], r["arm"]): r for r in stats}
    assert by[(1, "control")]["n"] == 120
    expected_latency = 250 + 5 * sum(i % 13 for i in range(120)) / 120
    assert by[(1, "treatment")]["latency_mean"] == pytest.approx(expected_latency)
    assert by[(0, "treatment")]["error_rate"] == 0.0
    hist = latencies["bins"]
    assert sum(h["count"] for h in hist if h["arm"] == "treatment") == 240 and latencies["overloaded"] == {}
    assert {h["arm"] for h in hist} == {"control", "treatment"}
    assert all(h["count"] > 0 for h in hist)
    assert decs[0]["outcome"] == "GO" and decs[0]["step_index"] == 1
    assert moves[0]["to_version"] == "2"


def test_step_latencies_are_the_ones_the_gate_judges(seeded: dict[str, Any]) -> None:
    """The use-case page's "Mean latency (ms)" per step and arm averaged the rows timed while the host was
    overloaded with the rest, beside a latency chart (and a gate) that leave them out; it now averages the
    judged rows and counts the others (`latency_left_out`), None where every row was left out."""
    from rollout.db.models import Observation, PilotStep

    uc_id = seeded["contract-summarisation"]
    judged: list[float] = []
    with session_scope() as s:
        rows = s.execute(
            select(Observation, PilotStep.index)
            .join(PilotStep, Observation.pilot_step_id == PilotStep.id)
            .where(Observation.use_case_id == uc_id)
            .order_by(Observation.id)
        ).all()
        treated = [o for o, i in rows if (i, o.arm) == (1, "treatment")]
        for o in treated[:10]:
            o.overloaded, o.latency_ms = True, 5000.0
        judged = [o.latency_ms for o in treated[10:]]
        for o, i in rows:
            if (i, o.arm) == (0, "control"):
                o.overloaded = True
    with session_scope() as s:
        by = {(r["step_index"], r["arm"]): r for r in queries.step_arm_stats(s, uc_id)}
    t = by[(1, "treatment")]
    assert t["latency_mean"] == pytest.approx(sum(judged) / len(judged))
    assert (t["n"], t["latency_left_out"]) == (120, 10)
    assert (t["latency_min"], t["latency_max"]) == (min(judged), max(judged))
    c = by[(0, "control")]
    assert (c["latency_mean"], c["latency_max"], c["latency_left_out"]) == (None, None, c["n"])
    assert by[(1, "control")]["latency_left_out"] == 0


def test_pending_and_audit(seeded: dict[str, Any]) -> None:
    with session_scope() as s:
        pending = queries.pending_decisions(s)
        assert [p["use_case"] for p in pending] == ["contract-summarisation"]
        assert pending[0]["approvals"] == [] and pending[0]["traffic_pct"] == 10.0
        facets = queries.audit_facets(s)
        assert facets["actions"] == ["gate.decide", "usecase.add"]
        only_gate = queries.audit_entries(s, actions=["gate.decide"])
        assert {e["use_case"] for e in only_gate} == {"contract-summarisation", "document-qa"}
        assert queries.audit_entries(s, use_cases=["support-chat"])[0]["action"] == "usecase.add"
        assert queries.audit_entries(s, actors=["nobody"]) == []


def test_an_override_signed_once_waits_for_a_second_approver(seeded: dict[str, Any]) -> None:
    from rollout.db.models import Approval
    from tests.fixtures.dashboard import later_look_awaiting_approval

    with session_scope() as s:
        did = later_look_awaiting_approval(s, seeded["document-qa:decision"])
        s.add(Approval(decision_id=did, actor="alice", role="approver", action="approve", reason="r",
                       against_recommendation=True))  # fmt: skip
    with session_scope() as s:
        rows = {r["name"]: r for r in queries.portfolio(s)}
    assert rows["document-qa"]["waits_for"] == "a second approver"
    assert rows["contract-summarisation"]["waits_for"] == "approval to promote"


def test_the_approvals_page_reads_oidc_subjects_in_one_query_however_many_signatures(
    seeded: dict[str, Any],
) -> None:
    """`queries.approvals` read each OIDC override signature's subject with a query of its own once the
    approver list was known, and each decision's withdrawals again (N+1, review fix-s): the statements
    it runs grow neither with the signatures nor with the decisions, and each signer is still judged by
    their own subject (listed by it: counts; else lapsed; u0 withdrew hers)."""
    from sqlalchemy import event

    from rollout import audit, auth
    from rollout.db.models import Approval, GateDecision
    from rollout.db.session import get_engine
    from tests.fixtures.dashboard import later_look_awaiting_approval

    def sign(s: Any, d: GateDecision, i: int, action: str) -> None:
        who, subject = f"oidc:u{i}@corp.example", {"subject": f"https://idp.example#u{i}"}
        s.add(Approval(decision_id=d.id, actor=who, role="approver", action=action, reason="r",
                       against_recommendation=action != "withdraw"))  # fmt: skip
        audit.record(s, who, f"approval.{action}", on=d, details=subject)

    listed = [f"https://idp.example#u{i}" for i in range(0, 10, 2)]  # the even ones, by subject
    decisions, look = {}, seeded["document-qa:decision"]
    with session_scope() as s:
        for k in (1, 10):
            d = s.get(GateDecision, look := later_look_awaiting_approval(s, look))
            for i in range(k):
                sign(s, d, i, "approve")
            sign(s, d, 0, "withdraw")
            decisions[k] = d.id
    statements: list[str] = []
    event.listen(get_engine(), "before_cursor_execute", lambda *a: statements.append(a[2]))
    counted, status = {}, {}
    with auth.oidc_approvers_known(listed):
        for k, ids in {1: [decisions[1]], 10: [decisions[10]], 11: list(decisions.values())}.items():
            statements.clear()
            with session_scope() as s:
                rows = queries.approvals(s, ids)
            counted[k] = len(statements)
            status[k] = [r["status"].split(" ")[0] for r in rows]
    assert counted[1] == counted[10] == counted[11], counted
    signed = ["withdrawn"] + ["no" if i % 2 else "counts" for i in range(1, 10)]
    assert status[1] == ["withdrawn", "a"] and status[10] == [*signed, "a"]
    assert status[11] == status[1] + status[10]


def test_a_stopped_use_case_leaves_the_established_total(seeded: dict[str, Any]) -> None:
    from rollout.db.models import UseCase

    with session_scope() as s:
        s.execute(update(UseCase).where(UseCase.name == "document-qa").values(phase="stopped"))
    with session_scope() as s:
        t = queries.portfolio_totals(s)
    assert t["savings_month_usd"] == pytest.approx(1840) and t["established"] == 1 and t["ended"] == 1


def test_quality_from_says_which_measurement_the_quality_numbers_are() -> None:
    """One rule for the main job's summary and the portfolio page alike."""
    assert queries.quality_from({"quality_source": "gate", "evaluation_rows": 18}) == "gate"
    evaluated = {"quality_source": "evaluation", "evaluation_rows": 18}
    assert queries.quality_from(evaluated) == "evaluation, 18 rows"
    assert queries.quality_from({"quality_source": "evaluation", "evaluation_rows": None}) == "evaluation"
    assert queries.quality_from({"quality_source": None}) is None


def test_the_main_job_and_the_pages_leave_out_a_bound_at_the_edge_of_the_scale() -> None:
    """One rule for reading bounds on the quality difference (rollout.queries.quality_interval): the
    console's summary says what the dashboard says, e.g. a shadow step's usual '>= lo' before any loss."""
    from dashboard import fmt
    from flows.main_job import _quality_cell

    assert fmt.quality_interval is queries.quality_interval
    gate = {"quality_delta": 0.02, "quality_low": -0.322, "quality_high": 1.0, "quality_source": "gate"}
    assert _quality_cell(gate) == "+0.020 [>= -0.322] (gate)"
    evaluated = {"quality_delta": 0.022, "quality_low": -0.82, "quality_high": 0.863}
    evaluated |= {"quality_source": "evaluation", "evaluation_rows": 2}
    assert _quality_cell(evaluated) == "+0.022 [-0.820, +0.863] (evaluation, 2 rows)"
    futile = {"quality_delta": -0.1, "quality_low": -1.0, "quality_high": -0.06, "quality_source": "gate"}
    assert _quality_cell(futile) == "-0.100 [<= -0.060] (gate)"
    unbounded = {"quality_delta": 0.0, "quality_low": -1.0, "quality_high": 1.0, "quality_source": "gate"}
    assert _quality_cell(unbounded) == "+0.000 [not bounded yet] (gate)"
    none = {"quality_delta": None, "quality_low": None, "quality_high": None, "quality_source": None}
    assert _quality_cell(none) == "-"
    assert queries.quality_interval(-0.0123, 0.5, "+.2f") == "[-0.01, +0.50]"


@pytest.mark.parametrize("low", [-80.0, 0.0])
def test_a_positive_estimate_whose_interval_reaches_no_saving_is_not_established(
    seeded: dict[str, Any], low: float
) -> None:
    """The headline counts a saving as established by its interval's low end (> 0), not by the estimate:
    a use case expected to save $35/month whose interval reaches a loss (or exactly no saving) is counted
    apart, so the business owner's figure never includes dollars the measurement does not establish."""
    from rollout.db.models import EvaluationRun, UseCase

    with session_scope() as s:
        uc_id = s.scalar(select(UseCase.id).where(UseCase.name == "support-chat"))
        s.execute(
            update(EvaluationRun)
            .where(EvaluationRun.use_case_id == uc_id)
            .values(savings_month_usd=35.0, savings_month_low=low)
        )
    with session_scope() as s:
        t = queries.portfolio_totals(s)
    assert t["established"] == 2 and t["savings_month_usd"] == pytest.approx(1840 + 620)
    assert t["savings_month_low"] == pytest.approx(1500 + 410)
    assert t["unestablished"] == {"use_cases": 1, "savings_month_usd": pytest.approx(35)}


def _running_step(kind: str, rows: int, **extra: Any) -> dict[str, Any]:
    """A portfolio row of a running pilot whose latest gate look said EXTEND, with a 100-request minimum."""
    row = {"pilot_status": "running", "decision_kind": "gate", "decision": "EXTEND", "step_kind": kind}
    return row | {"step_observations": rows, "min_samples": 100, "awaiting": "none", "signatures": 0} | extra


def test_a_shadow_step_waits_for_requests_not_stored_rows() -> None:
    """Both arms answer every shadow request, so a shadow step's stored rows are halved to requests before
    they are set against the per-request minimum: 120 rows are 60 requests, short of 100."""
    short = queries.waits_for(_running_step("shadow", 120))
    assert "more samples" in short and "60/100" in short and "120" not in short
    # 200 rows = 100 requests: the minimum is met exactly (n >= need), so what is missing is a verdict
    met = queries.waits_for(_running_step("shadow", 200))
    assert "more samples" in met and "inconclusive" in met and "/100" not in met


def test_a_split_step_waits_for_its_smaller_arm() -> None:
    """The minimum is per arm: 250 control and 50 treatment rows wait for the treatment arm (50/100),
    although both together are past 100."""
    row = _running_step("split", 300, decision_n_control=250, decision_n_treatment=50)
    text = queries.waits_for(row)
    assert "50/100" in text and "smaller arm" in text


@pytest.mark.parametrize(("control", "treatment"), [(90, 10), (270, 30)])
def test_a_split_step_with_no_look_yet_waits_for_its_smaller_arm(
    sp_home: Settings, control: int, treatment: int
) -> None:
    """A pilot a shadow GO moved to a 10% split step, not looked at there yet: its own rows, per arm, are set
    against the per-arm minimum. Both arms' rows together were: "more samples (100/150)" at 90 + 10 rows,
    and "next gate look" at 270 + 30, with 30 of the 150 the gate's next look needs in the sparse arm."""
    from dashboard.bench import SeedUseCase, write_use_case
    from tests.fixtures.dashboard import evidence

    u = SeedUseCase("split-step", "o", "low", "piloting", "tests", {"name": "split-step"}, "h")
    u.version = dict(
        base_model_ref="smollm2-135m", plan={}, plan_hash="p", mlflow_model_name="m", mlflow_version="1"
    )
    u.pilot = dict(salt="s", current_step_index=1, pilot_number=1, go_alpha=0.03)
    u.steps = [
        dict(index=0, kind="shadow", traffic_pct=0.0, min_samples=20, status="passed"),
        dict(index=1, kind="split", traffic_pct=10.0, min_samples=150),
    ]
    row = {"quality": 0.8, "latency_ms": 300.0, "tokens": 10, "error": False}
    arms = [(0, "control", 20), (0, "treatment", 20), (1, "control", control), (1, "treatment", treatment)]
    u.observations = [
        {**row, "step": step, "batch_id": f"b{step}", "request_id": f"{step}{arm}{i}", "arm": arm}
        for step, arm, n in arms
        for i in range(n)
    ]
    u.looks = [
        dict(step=0, idempotency_key="go-0", look_index=1, outcome="GO", awaiting="none",
             evidence=evidence(-0.001, -0.01, 0.01, 20, "GO"), explanation="GO", data_fingerprint="f" * 64)
    ]  # fmt: skip
    with session_scope() as s:
        write_use_case(s, u)
    (r,) = queries.read(queries.portfolio)
    assert (r["decision"], r["step_kind"]) == ("GO", "split")
    assert r["waits_for"] == f"more samples ({treatment}/150 in the smaller arm)"


def test_a_missing_bound_read_back_as_nan_is_no_bound() -> None:
    """SQL (and pandas) give NaN for a missing number: a quality interval with a NaN end is shown as no
    interval ('-'), like one with None, never as a one-sided bound on the other end."""
    nan = float("nan")
    assert not queries.known(nan) and not queries.known(None) and queries.known(0.0)
    assert queries.quality_interval(nan, 0.5) == "-" and queries.quality_interval(-0.5, nan) == "-"
    assert queries.quality_interval(None, 0.5) == "-"
    assert queries.bounding_sides(nan, nan) == (False, False)
