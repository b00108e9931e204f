"""The Approvals page, where a promotion is signed, showed no money: "The gate recommends: approve" on a
plan whose own ROI says it costs $35/month more, and on one whose $1,840/month was timed on a busy host
(review s46 D3). Each card now carries the portfolio's figures and caveats (`queries.roi_summary`).
Seeded portfolio (tests.fixtures.dashboard), a GO awaiting approval added on support-chat."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from tests.dashboard.apptest_helpers import new_app, open_page


def _cards(at: Any) -> dict[str, str]:
    """Each card's text (subheader to the next), by use case, from the page's elements in order."""
    out: dict[str, str] = {}
    name = None
    for el in at.main:
        for node in _walk(el):
            kind = getattr(node, "type", "")
            value = getattr(node, "value", None)
            if kind == "subheader" and "waiting for" in str(value):
                name = str(value).split(": ")[0].split(" ", 1)[1]
                out[name] = ""
            elif name is not None and kind == "metric":
                out[name] += f"\n{node.label}: {node.value}"
            elif name is not None and isinstance(value, str):
                out[name] += "\n" + value.replace("\\", "")  # markdown escapes (fmt.plain) off
    return out


def _walk(node: Any) -> Any:
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def _go_on_support_chat() -> None:
    """A GO awaiting approval on support-chat, of a pilot of its seeded model version."""
    from rollout.db.models import GateDecision, ModelVersion, Pilot, PilotStep, UseCase
    from rollout.db.session import session_scope
    from tests.fixtures.dashboard import evidence

    with session_scope() as s:
        sc = s.scalar(select(UseCase).where(UseCase.name == "support-chat"))  # ROI -$35 [-$80, $10]
        mv = s.scalar(select(ModelVersion).where(ModelVersion.use_case_id == sc.id))
        p = Pilot(use_case_id=sc.id, model_version_id=mv.id, salt="x", status="running", pilot_number=1)
        s.add(p)
        s.flush()
        step = PilotStep(pilot_id=p.id, index=0, kind="split", traffic_pct=50.0, min_samples=50)
        s.add(step)
        s.flush()
        sc.phase = "awaiting_approval"
        s.add(
            GateDecision(
                idempotency_key="go-sc",
                use_case_id=sc.id,
                pilot_id=p.id,
                pilot_step_id=step.id,
                look_index=1,
                outcome="GO",
                awaiting="approval",
                # 40 sparse-arm rows measured under CPU overload: out of the p95 (review s48 L3)
                evidence={**evidence(0.0, -0.01, 0.01, 300, "GO"), "overloaded_treatment_rows": 40},
                explanation="support-chat: treatment quality is within the margin; GO.",
                data_fingerprint="a" * 64,
            )
        )


def test_each_approval_card_shows_what_the_promotion_is_worth(seeded: dict[str, Any]) -> None:
    from rollout.db.models import EvaluationRun, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        cs = s.scalar(select(UseCase).where(UseCase.name == "contract-summarisation"))
        last = s.scalar(select(func.max(EvaluationRun.id)).where(EvaluationRun.use_case_id == cs.id))
        run = s.get(EvaluationRun, last)
        run.roi = {**run.roi, "timing_host": {"prefill": {"pairs_timed": 3, "pairs_kept_under_overload": 3}}}
    _go_on_support_chat()
    at = new_app()
    open_page(at, "approvals")
    cards = _cards(at)
    chat, contract = cards["support-chat"], cards["contract-summarisation"]
    assert "$/month saved: -$35" in chat and "interval -$80 to $10" in chat
    assert "no saving is established: no saving expected (-$35/month, at best $10)" in chat
    assert "Payback: -" in chat  # no payback claimed for a plan that saves nothing
    assert "p95 latency, treatment: 305 ms\n40 sparse-arm rows under CPU overload left out" in chat
    assert "under CPU overload" not in contract
    assert "$/month saved: $1,840" in contract and "interval $1,500 to $2,150" in contract
    assert "measured under overload: 3 of 3 timed pairs" in contract
    assert "no saving is established" not in contract


def test_a_card_whose_evaluation_measured_no_interval_says_so(seeded: dict[str, Any]) -> None:
    """Review-a P1: a plan evaluated with one timing pair measures no interval (docs/roi.md); its card read
    "interval - to -" under the $/month. It now says what is true, in the evaluate flow's words."""
    from rollout import roi, runs
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope
    from rollout.spec import UseCaseSpec
    from tests.fixtures.dashboard import seeded_spec

    spec = UseCaseSpec.model_validate(seeded_spec("contract-summarisation"))  # its prices
    one_pair = roi.roi_for_spec(spec, dense_tps=1000.0, sparse_tps=2000.0)
    assert not one_pair.inputs.interval_measured
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "support-chat"))
        ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
    run = runs.open_evaluation(*ids, "one-pair", None)
    runs.evaluation_succeeded(
        "support-chat", run["id"], report={"device": "cpu"}, roi=one_pair.to_dict(), mlflow_run_id="m",
        spec_version=1,
    )  # fmt: skip
    _go_on_support_chat()
    at = new_app()
    open_page(at, "approvals")
    chat = _cards(at)["support-chat"]
    assert f"$/month saved: {roi.usd(one_pair.saved_usd_month)}\nno interval: one timing pair" in chat, chat
    assert " - to -" not in chat
