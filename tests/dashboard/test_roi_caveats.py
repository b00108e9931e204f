"""What the speed-up and the dollars carry beside them on every surface (docs/roi.md): timings kept under
overload (review V finding 5) and dollars priced at a spec version that is no longer current, after
`usecase add --new-version` changed the traffic or cost (review V finding 3)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from rollout import queries, runs
from rollout.db.models import EvaluationRun, ModelVersion, SpecVersion, UseCase
from rollout.db.session import session_scope
from rollout.settings import Settings
from tests.dashboard.apptest_helpers import new_app, open_page, texts

NAME = "contract-summarisation"  # seeded: established saving $1,840 [$1,500, $2,150]
OVERLOAD = {"pairs_timed": 3, "pairs_kept_under_overload": 2, "threads": 1}
STALE = "priced at spec v1; current is v2: re-evaluate to re-price"


def _latest(s: Any, uc_id: int) -> EvaluationRun:
    return s.get(
        EvaluationRun, s.scalar(select(func.max(EvaluationRun.id)).where(EvaluationRun.use_case_id == uc_id))
    )


def _overloaded_and_superseded() -> None:
    """contract-summarisation: its latest evaluation timed 2 of 3 prefill pairs under overload, priced at
    spec v1; then v2 became current (as `usecase add --new-version` makes it)."""
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        run = _latest(s, uc.id)
        run.roi = {**run.roi, "timing_host": {"prefill": OVERLOAD, "decode": None}}
        run.spec_version = 1
        uc.current_spec_version = 2


def test_the_queries_carry_the_caveats(seeded: dict[str, Any]) -> None:
    with session_scope() as s:
        before = {r["name"]: r for r in queries.portfolio(s)}[NAME]
    assert before["measured_under_overload"] is None and before["priced_at"] is None
    _overloaded_and_superseded()
    with session_scope() as s:
        rows = {r["name"]: r for r in queries.portfolio(s)}
        totals = queries.portfolio_totals(s)
        summary = {r["use_case"]: r for r in queries.job_summary(s, list(rows))}
        evals = queries.evaluations(s, rows[NAME]["id"])
    row = rows[NAME]
    assert row["measured_under_overload"].startswith("measured under overload: 2 of 3 timed pairs")
    assert row["priced_at"] == STALE and summary[NAME]["priced_at"] == STALE
    assert summary[NAME]["measured_under_overload"] == row["measured_under_overload"]
    assert all(rows[n]["priced_at"] is None for n in ("document-qa", "support-chat"))
    assert (
        totals["established"],
        totals["established_under_overload"],
        totals["established_superseded"],
    ) == (
        2,
        1,
        1,
    )
    assert evals[-1]["priced_at"] == STALE and evals[0]["priced_at"] is None  # recorded before 0011


def test_the_pages_say_so_beside_the_figures(seeded: dict[str, Any]) -> None:
    _overloaded_and_superseded()
    at = new_app()
    assert not at.exception
    df = at.dataframe[0].value.set_index("name")
    assert df.loc[NAME, "caveats"] == f"⚠ timed under overload; ⚠ {STALE}"
    assert df.loc["document-qa", "caveats"] == ""
    captions = [c.value for c in at.caption]
    assert any("1 of them timed under overload; 1 of them priced at a spec version" in c for c in captions)
    assert any(
        c.startswith(f"Caveats on the plotted figures: {NAME}: ⚠ timed under overload") for c in captions
    )
    at.query_params["name"] = NAME
    open_page(at, "use_case")
    assert f"$/month {STALE}." in texts(at)


def test_an_evaluation_records_the_spec_version_it_is_priced_at(seeded: dict[str, Any]) -> None:
    from flows.main_job import render_table
    from rollout import roi

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "document-qa"))
        ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
        uc.current_spec_version = 3
    result = roi.compute_roi(
        roi.RoiInputs(2000.0, 1.5, 1.2, 1.8, 10_000, 3000, 100, 2.0, 0.5, 1000.0)
    ).to_dict()
    run = runs.open_evaluation(*ids, "priced-at-v2", None)
    runs.evaluation_succeeded(
        "document-qa", run["id"], report={"device": "cpu"}, roi=result, mlflow_run_id="m", spec_version=2
    )
    with session_scope() as s:
        assert _latest(s, ids[0]).spec_version == 2
        rows = queries.job_summary(s, ["document-qa"])
    assert rows[0]["priced_at"] == "priced at spec v2; current is v3: re-evaluate to re-price"
    table = render_table(rows, {})
    assert table.caption == "document-qa: priced at spec v2; current is v3: re-evaluate to re-price"


def test_a_spec_back_at_an_earlier_version_shows_the_evaluation_priced_there(seeded: dict[str, Any]) -> None:
    """Review T1: a spec that goes back to an earlier version's content makes that version current again,
    and its evaluate reuses the run priced there (no new row). The portfolio showed the newest run by id,
    priced at the version left, with a "re-evaluate to re-price" note no re-evaluation could clear."""
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        older, newest = s.scalars(
            select(EvaluationRun).where(EvaluationRun.use_case_id == uc.id).order_by(EvaluationRun.id)
        ).all()[-2:]
        older.spec_version, newest.spec_version = 1, 2
        uc.current_spec_version = 1
        newest.savings_month_usd = 2 * older.savings_month_usd  # priced at v2's dearer GPU hour
        want = older.savings_month_usd
        older.roi = {**(older.roi or {}), "decode": {"short": "1.40x (v1's run)", "line": "decode: 1.40x"}}
        newest.roi = {**(newest.roi or {}), "decode": {"short": "dense (v2's run)", "line": "decode: dense"}}
        # v2, the version left, is the highest; v1 (current again) has another traffic
        v1 = s.scalar(select(SpecVersion).where(SpecVersion.use_case_id == uc.id, SpecVersion.version == 1))
        v2_spec = {**v1.spec, "owner": "v2-owner"}
        s.add(SpecVersion(use_case_id=uc.id, version=2, spec=v2_spec, spec_hash="v2", created_by="t"))
        uc_id, older_id = uc.id, older.id
    with session_scope() as s:
        row = {r["name"]: r for r in queries.portfolio(s)}[NAME]
        summary = {r["use_case"]: r for r in queries.job_summary(s, [NAME])}[NAME]
        page = queries.use_case(s, NAME)
        shown = [e["id"] for e in queries.evaluations(s, uc_id) if e["shown"]]
    assert row["savings_month_usd"] == want and row["priced_at"] is None
    assert summary["priced_at"] is None
    # s46 D1: the use-case page and the main job's decode cell read the current version and its run too
    assert summary["decode"] == "1.40x (v1's run)"
    assert page["spec_version"] == 1 and page["spec"]["owner"] != "v2-owner"
    assert shown == [older_id]
    at = new_app()
    at.query_params["name"] = NAME
    open_page(at, "use_case")
    assert not at.exception
    shown_text = texts(at)
    assert "· spec v1\n" in shown_text and "spec v2" not in shown_text
    assert "re-evaluate to re-price" not in shown_text


def test_a_loss_timed_under_overload_waits_for_no_pilot_as_not_established(sp_home: Settings) -> None:
    """An evaluated use case whose loss was timed under overload: the row's "Waits for" says what the pilot
    rule finds of its run (`roi.evaluation_pilot_skip` of `runs.evaluation_summary`: not established, timed
    under overload), as its caveat does. It said "no pilot: no saving expected (-$35/month, at best $10)",
    the finding the rule never makes of overloaded timings, beside the caveat's "timed under overload" (the
    portfolio, the use-case page and `usecase show`)."""
    from dashboard.bench import SeedUseCase, evaluation, write_use_case
    from rollout import roi

    u = SeedUseCase("busy-host", "o", "low", "evaluated", "tests", {"name": "busy-host"}, "h")
    u.version = dict(
        base_model_ref="smollm2-135m", plan={}, plan_hash="p", mlflow_model_name="m", mlflow_version="1"
    )
    timing = {"timing_host": {"prefill": OVERLOAD, "decode": None}}
    money = dict(savings=(-35.0, -80.0, 10.0), payback_days=None, roi=timing)
    u.evaluations = [evaluation("e", "r", density=0.4, quality_delta=0.0, speedup=(0.97, 0.9, 1.05), **money)]
    with session_scope() as s:
        write_use_case(s, u)
        finding = roi.evaluation_pilot_skip(runs.evaluation_summary(s.scalars(select(EvaluationRun)).one()))
    assert finding is not None and finding.why.endswith("timed under overload)")
    (row,) = queries.read(queries.portfolio)
    assert row["waits_for"] == f"no pilot: {finding.why}" and row["not_established"] == finding.why
