"""The pipeline commands: `pilot NAME [--observations FILE]`, `gate NAME`, `approve NAME --decision ID
--reason TEXT [--reject | --continue-ramp]`, `promote`, `rollback NAME --reason`, `monitor NAME`, `run
[--serve]`, `serve`; and the use-case form of `calibrate NAME` / `evaluate NAME`, whose commands live in
sparsepilot/commands/core.py with the standalone `--model` form."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsepilot.commands.auth import PasswordStdin, acting_person, signed_in
from sparsepilot.console import (
    console,
    emit_json,
    emit_or_say,
    err_console,
    fail,
    print_record,
    print_table,
    say,
)
from sparsepilot.options import JsonOpt, ReasonOpt, UseCaseArg

app = typer.Typer()


def _run(
    fn: Callable[[], Any], *, needs_db: bool = True, needs_prefect: bool = True, needs_mlflow: bool = True
) -> Any:
    """Run a flow from the CLI (after checking the state DB is reachable, unless ``needs_db`` is
    false, and, unless ``needs_prefect`` is false (a state-DB action that is no flow run: an abort, an
    import, which an operator must be able to do while Prefect is down), that the Prefect server
    PREFECT_API_URL names answers: `flows.common.require_prefect_api`), with the embedded MLflow store
    brought to MLflow's head next unless ``needs_mlflow`` is false (an abort, which logs nothing there):
    `rollout.mlflow_store`, a half-migrated one holding runs refused here, before the Prefect server
    starts. The Prefect check comes before the store's: one GET, where creating or upgrading the store
    takes seconds that a command bound to fail on a server that does not answer need not spend. Its
    SparsePilotErrors reach the one handler in sparsepilot/cli.py; a missing file it was given
    (FileNotFoundError, a built-in) is a clear message and exit code 2 as well."""
    from flows.common import require_prefect_api

    if needs_db:
        _require_db()
    if needs_prefect:  # one GET: a server that does not answer is said at once, before the store's work
        require_prefect_api()
    if needs_mlflow:
        _require_mlflow_store()
    try:
        return fn()
    except FileNotFoundError as exc:
        fail(str(exc))


def _require_db() -> None:
    """The state DB at this build's head revision (`init.require_schema`): a DB one migration behind used
    to get past this check and fail later with a raw "no such column" traceback."""
    from rollout.settings import configure_environment
    from sparsepilot.commands.init import require_schema

    configure_environment()
    require_schema()


def _require_mlflow_store() -> None:
    """The embedded MLflow store created, upgraded or repaired now, not by MLflow inside a flow's log
    (rollout.mlflow_store.ensure_store; StoreError is `error: ...` and exit 2)."""
    from rollout.mlflow_store import ensure_store

    ensure_store()


def _to_log_file(command: str, json_out: bool) -> None:
    """Third-party chatter (Prefect's temporary-server lines, its tracebacks of an error the command
    reports as `error: ...`, library warnings and weight-loading bars) to the command's log file, whose
    path is said on stderr first (not with --json), as calibrate, evaluate and pilot do
    (`sparsepilot.quiet.for_command`)."""
    from sparsepilot.quiet import for_command

    for_command(command, say_where=not json_out)


def _require_device() -> None:
    """SPARSEPILOT_DEVICE (where the flows load the model) checked before a flow starts: a value the
    flows cannot use (not auto|cpu|cuda, or cuda where torch sees none) is `error: SPARSEPILOT_DEVICE=...`
    and exit 2 here (a `SettingsError`), not a failed flow run's tracebacks."""
    from flows.common import pick_device

    pick_device()


# IDs are stored as 32-bit integers (PostgreSQL INTEGER): anything larger cannot name a row.
DecisionId = Annotated[
    int,
    typer.Option(
        "--decision", min=1, max=2**31 - 1, help="decision ID (see `sparsepilot gate` or the dashboard)"
    ),
]


# --- calibrate / evaluate: the use-case form (sparsepilot/commands/core.py has the commands) ---------


def run_use_case_form(command: str, name: str, quick: bool, json_out: bool) -> None:
    """The use-case form of `calibrate NAME` (validate the dataset, calibrate to the spec's budget,
    register @challenger) and of `evaluate NAME` (quality and speed vs dense on the use case's data, ROI
    with its interval): its flow run, its result printed. Needs no sign-in; its audit rows name who ran
    it (`acting_person`), not the pipeline."""
    _require_device()
    _require_use_case(name)  # a typo is refused in a second, not after a Prefect server and a Failed run
    if command == "calibrate":
        from flows.calibrate import calibrate_flow as flow
    else:
        from flows.evaluate import evaluate_flow as flow
    who = acting_person()
    result = _run(lambda: flow(name, quick=quick, actor=who))
    if json_out:
        emit_json(result)
    elif command == "calibrate":
        print_calibration(name, result)
    else:
        print_evaluation(name, result)


def print_calibration(name: str, result: dict[str, Any]) -> None:
    """`calibrate NAME`'s record: the run, its registered version and fidelity, with the columns only some
    runs have (a prefill part that stays dense, the task bound's verdict, a reused calibration's source)."""
    cols = [
        "calibration_run_id",
        "model_version_id",
        "density",
        "kl",
        "agree",
        "nll_delta",
        "met_budget",
        "reused",
    ]
    if result.get("met_budget") != result.get("prefill_met_budget", result.get("met_budget")):
        cols.append("prefill_met_budget")  # the decode part alone met the budget: prefill stays dense
    if result.get("task_bound_verdict"):  # the task bound: certified with its drop, or why not
        cols.append("task_bound_verdict")
    if result.get("reused_from"):  # another spec version's calibration, which this one leaves standing
        cols.append("reused_from")
    print_record(f"calibration of {name}", result, cols)


MONEY = ("savings_month_usd", "savings_month_low", "savings_month_high")


def print_evaluation(name: str, result: dict[str, Any]) -> None:
    """`evaluate NAME`'s record, and the warning its speed-up and $ carry when their timings were kept
    under overload (`measured_under_overload`, rollout.roi.timing_overload). Its money as the dashboard
    shows it (`rollout.roi.plan_money`, dollars by `rollout.roi.usd`): the saving with its interval, the
    payback only of an established saving, and for a plan that keeps every block the verdict that it
    saves nothing (it printed 1.235e+04, no interval, and that plan's payback); a reused run, which has no
    verdict of the flow's, says why its saving is not established (its payback "-" said no why)."""
    from rollout.roi import plan_money, usd

    money = plan_money(result)
    shown = {**result, **{k: None if money[k] is None else usd(money[k]) for k in MONEY}}
    payback = money["payback_days"]
    shown["payback_days"] = None if payback is None else f"{payback:,.0f} days"
    # the flow's verdict; a reused run has none, and then why no saving is established, where it is not
    shown["verdict"] = money["saves_nothing"] or result.get("verdict") or money["not_established"]
    cols = ["evaluation_run_id", "device", "density", "quality_delta", "quality_low", "quality_high",
            "speedup", "speedup_low", "speedup_high", *MONEY, "payback_days",
            *(["verdict"] if shown["verdict"] else []), "reused"]  # fmt: skip
    print_record(f"evaluation of {name}", shown, cols)
    if result.get("tasks_not_scored"):  # the quality columns above are empty, and this says why
        console.print(f"warning: {result['tasks_not_scored']}", style="yellow", soft_wrap=True, markup=False)
    if result.get("measured_under_overload"):  # the speed-up and $ above are a busy host's figures
        console.print(
            f"warning: {result['measured_under_overload']}", style="yellow", soft_wrap=True, markup=False
        )


# --- pilot / gate / approve / promote / rollback / monitor -----------------------------------------


@app.command("pilot")
def pilot_cmd(
    name: UseCaseArg,
    observations: Annotated[
        str | None,
        typer.Option("--observations", help="import observations (JSONL or CSV) instead of running"),
    ] = None,
    batches: Annotated[
        int | None, typer.Option("--batches", min=1, max=10_000, help="pilot batches to run (default 1)")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, max=4096)] = None,
    external_assignment: Annotated[
        bool,
        typer.Option(
            "--external-assignment",
            help="with --observations at a split step: your serving system assigned the arms (not the hash)",
        ),
    ] = False,
    abort: Annotated[bool, typer.Option("--abort", help="stop the active pilot (needs --reason)")] = False,
    again: Annotated[
        bool,
        typer.Option("--again", help="pilot the challenger of an aborted pilot again (needs --reason)"),
    ] = False,
    pilot_anyway: Annotated[
        bool,
        typer.Option(
            "--pilot-anyway",
            help="start a pilot even where the evaluation says it cannot pay (a dense plan, no saving "
            "established); never where no plan met the quality budget",
        ),
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="why (with --abort or --again; kept in the audit log)")
    ] = None,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """One pilot batch (or --batches N) in the current step, import observations from a file, --abort the
    pilot, or pilot an aborted pilot's challenger --again (operators and approvers)."""
    from flows.pilot import abort as abort_pilot
    from flows.pilot import import_observations, pilot_flow

    batch_options = max_new_tokens is not None or external_assignment or batches is not None or pilot_anyway
    if again and (abort or observations or batch_options):
        fail("--again starts a new pilot: it takes --reason only (then pilot or import as usual)")
    if abort and observations:
        fail("--abort and --observations exclude each other")
    if abort and batch_options:
        fail("--abort stops the pilot: it takes --reason only, no batch or import options")
    if observations and (batches is not None or max_new_tokens is not None):
        fail("--observations imports answers your serving system gave; --batches, --max-new-tokens run ours")
    if reason is not None and not (abort or again):
        fail("--reason goes with --abort or --again (a pilot batch or import keeps no reason)")
    doing = "abort the pilot of" if abort else "pilot again" if again else "pilot"
    who = signed_in("operator", f"{doing} {name}", password_stdin)
    if again:
        from rollout.pilot_batches import start_again

        out = _run(
            lambda: start_again(name, actor=who.name, reason=reason or ""),
            needs_prefect=False,
            needs_mlflow=False,
        )
        said = f"{name}: {out['pilot']} started, the challenger of aborted {out['aborted']} again"
        emit_or_say(out, json_out, f"{said} (GO at alpha {out['go_alpha']:.3g})")
        return
    if abort:
        out = _run(lambda: abort_pilot(name, who.name, reason or ""), needs_prefect=False, needs_mlflow=False)
        closed = out["closed_decisions"] or "none"
        emit_or_say(out, json_out, f"{name}: {out['pilot']} aborted; closed decisions: {closed}")
        return
    from sparsepilot.quiet import for_command

    for_command("pilot", say_where=not json_out)
    if observations:  # a database import, no model work: not a flow run
        result = _run(
            lambda: import_observations(
                name,
                observations,
                external_assignment=external_assignment,
                actor=who.name,
                pilot_anyway=pilot_anyway,
            ),
            needs_prefect=False,
        )
    else:
        _require_use_case(name)
        # an ordinary refusal (an ended pilot, one waiting for approval, a missed budget, a plan that
        # cannot pay), made before Prefect starts, in the flow's own words (no Failed flow run)
        from rollout.pilot_batches import pilot_refusal

        refused = pilot_refusal(name, pilot_anyway=pilot_anyway)
        if refused is not None:
            raise refused
        _require_device()
        result = _run(
            lambda: pilot_flow(
                name,
                batches=batches or 1,
                max_new_tokens=max_new_tokens,
                pilot_anyway=pilot_anyway,
                actor=who.name,  # the pilot's start is theirs in the audit log, not the pipeline's
            )
        )
    if json_out:
        emit_json(result)
        return
    say_pilot_result(name, result)


def say_pilot_result(name: str, result: dict[str, Any]) -> None:
    """`pilot`'s table of batches, then a line on the rows whose latency the gate leaves out (timed while
    the host was overloaded: `latency_left_out`), and why the run stopped early, if it did."""
    rows = [{"step": result["step_index"], "kind": result["step_kind"], **b} for b in result["batches"]]
    cols = ["step", "kind", "batch_id", "passed", "inserted", "already_present"]
    print_table(f"{result['pilot']} of {name}", rows, cols)
    left_out = latency_left_out(result["batches"])
    if left_out:
        say(f"{name}: {left_out}")
    if result.get("stopped"):  # aborted (or moved on) while the run answered: what was not stored
        say(f"{name}: {result['stopped']}: {result['explanation']}")


def latency_left_out(batches: list[dict[str, Any]]) -> str | None:
    """The rows of a pilot run's batches timed while the host was overloaded (each batch's `latency`,
    flows.pilot.latency_judged; an import's batch has none), in words, or None where there are none."""
    judged = [b["latency"] for b in batches if b.get("latency")]
    left_out = sum(j["rows_left_out"] for j in judged)
    if not left_out:
        return None
    from rollout.words import counted

    total = sum(j["rows_left_out"] + j["rows_judged"] for j in judged)
    per_batch = ", ".join(
        f"{b['latency']['rows_left_out']} in {b['batch_id']}"
        for b in batches
        if b.get("latency") and b["latency"]["rows_left_out"]
    )
    return (
        f"{left_out:,} of {counted(total, 'row')} timed while the host was overloaded ({per_batch}): they "
        "count for quality, not for the gate's p95 latencies or latency guardrail"
    )


@app.command("gate")
def gate_cmd(name: UseCaseArg, password_stdin: PasswordStdin = False, json_out: JsonOpt = False) -> None:
    """Decide the current pilot step (GO / EXTEND / NO-GO / INVALID) and act on it (operators and
    approvers: a GO moves the pilot to its next traffic step)."""
    from flows.gate import gate_flow

    _require_use_case(name)
    who = signed_in("operator", f"gate {name}", password_stdin)
    _to_log_file("gate", json_out)
    result = _run(lambda: gate_flow(name, actor=who.name))  # the look and what it changes are theirs
    if json_out:
        emit_json(result)
        return
    cols = ["decision_id", "outcome", "awaiting", "step_index", "look_index", "estimate", "interval_low",
            "interval_high"]  # fmt: skip
    print_record(f"gate of {name}", result, cols)
    say(result["explanation"])


def _require_use_case(name: str) -> None:
    """Refuse an unknown use case before a flow run starts (its failure would be a logged traceback, after
    the flow module's imports and a temporary Prefect server: up to a minute, review U7)."""
    from rollout.usecases import require_use_case

    _require_db()
    require_use_case(name)


def _require_run_use_cases(specs: Path | None, names: list[str]) -> None:
    """`run --use-case NAME`: a name that is neither a spec in the folder the main job adds nor a
    registered use case is refused before the job starts (review U7)."""
    from flows.main_job import MainJobSettings, sample_names
    from sparse_core.errors import SparsePilotError

    folder = specs if specs is not None else MainJobSettings().examples_dir
    samples = set(sample_names(folder))
    for n in names:
        if n in samples:
            continue
        try:
            _require_use_case(n)
        except SparsePilotError:
            fail(
                f"--use-case {n!r}: not a spec in {folder} ({', '.join(sorted(samples)) or 'none'}) nor a "
                "registered use case"
            )


def _check_decision(name: str, decision_id: int) -> None:
    from rollout.approvals import check_decision_of

    check_decision_of(name, decision_id)


@app.command("approve")
def approve_cmd(
    name: UseCaseArg,
    decision: DecisionId,
    reason: ReasonOpt,
    reject: Annotated[bool, typer.Option("--reject", help="reject instead of approve")] = False,
    continue_ramp: Annotated[
        bool,
        typer.Option(
            "--continue-ramp",
            help="on a GO before the plan's last step: move the pilot to the plan's next step and gate "
            "there (one approver; promotes nothing)",
        ),
    ] = False,
    withdraw: Annotated[
        bool,
        typer.Option(
            "--withdraw",
            help="take back your own first signature of an override that no second approver has confirmed "
            "(changes nothing else)",
        ),
    ] = False,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """Approve (or reject) a decision waiting for a person, or --continue-ramp a GO before the plan's
    last step; resumes its paused approval flow run. --withdraw takes back your unconfirmed override
    signature. The output says what happened to the pilot."""
    from flows.approval import approve_decision

    if sum((reject, continue_ramp, withdraw)) > 1:
        fail("--reject, --continue-ramp and --withdraw exclude each other")
    if withdraw:
        who = signed_in("approver", f"withdraw a signature on decision {decision}", password_stdin)

        def take_back() -> dict[str, Any]:
            from rollout.approvals import withdraw as withdraw_signature

            _check_decision(name, decision)
            return withdraw_signature(decision, who, reason).to_dict()

        result = _run(take_back, needs_prefect=False)  # a state-DB row, no flow run
        emit_or_say(result, json_out, result["message"])
        return
    what = "continue the ramp on" if continue_ramp else "reject" if reject else "approve"
    who = signed_in("approver", f"{what} decision {decision}", password_stdin)

    def go() -> dict[str, Any]:
        _check_decision(name, decision)
        if reject:
            done = _finish_rejection(name, decision, who.name, reason)
            if done is not None:
                return done
        return approve_decision(decision, who, reason, reject=reject, continue_ramp=continue_ramp)

    _to_log_file("approve", json_out)
    result = _run(go)
    emit_or_say(result, json_out, result["message"])


def _finish_rejection(name: str, decision: int, by: str, reason: str | None) -> dict[str, Any] | None:
    """`approve --reject` again on a rejection that did not take effect (its approver's run died after
    the signature): finished through its effect (the pilot stopped, or the champion kept), which is safe
    to repeat; the effect stays the signer's, `approval.finished` names `by`. None where there is none."""
    from flows.promote import keep_flow, reject_flow
    from rollout.approvals import checked_reason, unfinished_rejection

    text = checked_reason(reason)  # checked before the claim: a refused reason claims nothing
    # MoveInProgress while its signer, its approval run or another finisher carries it out; else claimed
    found = unfinished_rejection(decision, by=by)
    if found is None:
        return None
    approval_id, effect = found
    flow = keep_flow if effect == "keep" else reject_flow
    done = flow(decision, approval_id, text, actor=by, finished_by=by)
    what = "the champion is kept, the monitor resumes" if effect == "keep" else "the pilot is stopped"
    said = what if done.get("done", True) else "it was in effect already, nothing changed"
    return {**done, "message": f"{name}: finished decision {decision} (rejected earlier): {said}"}


@app.command("promote")
def promote_cmd(
    name: UseCaseArg,
    decision: DecisionId,
    reason: ReasonOpt,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """Promote the challenger to champion on a decision: approves it (resuming its approval run), or
    finishes an approved promotion that did not complete (e.g. MLflow was down) once its signer's
    process has had two minutes to; on one in effect, says so (exit 0)."""
    from flows.approval import approve_decision
    from flows.promote import promote_flow

    who = signed_in("approver", f"promote on decision {decision}", password_stdin)

    def go() -> dict[str, Any]:
        from rollout.approvals import checked_reason, promotion_in_effect, unfinished_promotion

        _check_decision(name, decision)
        # checked before the claim below: a refused reason left a claim in the audit log, and the
        # decision's approval run, waking, declined it for a finisher who did nothing (review V2)
        text = checked_reason(reason)  # redacted, as every store keeps a reason
        # MoveInProgress while its signer, its approval run or another finisher carries it out; else
        # claimed for `who`
        approval_id = unfinished_promotion(decision, by=who.name)
        if approval_id is not None:  # the moves stay the signer's; `approval.finished` names who finished
            done = promote_flow(
                decision_id=decision,
                approval_id=approval_id,
                reason=text,
                actor=who.name,
                finished_by=who.name,
            )
            return {**done, "message": finished_said(name, done)}
        in_effect = promotion_in_effect(decision)  # ApprovalError where a later move superseded it
        if in_effect is not None:  # a retried promote: nothing to do, exit 0
            return {"decision_id": decision, "done": False, "message": in_effect}
        return approve_decision(decision, who, reason)

    _to_log_file("promote", json_out)
    result = _run(go)
    emit_or_say(result, json_out, result["message"])


def finished_said(name: str, result: dict[str, Any]) -> str:
    """`promote`'s line for an approved promotion it finished: its decision and each champion move."""

    def v(version: str | None) -> str:
        return f"v{version}" if version else "none"

    moves = "; ".join(
        f"{m['alias']} {v(m['from_version'])} -> {v(m['to_version'])} ({m['status']})"
        for m in result.get("alias_moves") or []
    )
    if result.get("action") == "superseded":  # its GO measured against a champion no longer serving
        return f"{name}: decision {result['decision_id']} not promoted: {result['reason']}"
    if result.get("done") is False:  # its own run completed it meanwhile
        return f"{name}: decision {result['decision_id']} was in effect already, nothing changed"
    # a rollback came between the GO's signature and its move (rollout.approvals.promotion_moves)
    changed = f" ({result['champion_changed']})" if result.get("champion_changed") else ""
    return f"{name}: finished decision {result['decision_id']}" + (f": {moves}" if moves else "") + changed


@app.command("rollback")
def rollback_cmd(
    name: UseCaseArg,
    reason: ReasonOpt,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """Roll the champion back to the previous one from SparsePilot's own alias history (approvers only)."""
    from flows.common import flow_run_is_live
    from flows.promote import rollback_flow
    from rollout.approvals import checked_reason, request_rollback

    who = signed_in("approver", f"roll back {name}", password_stdin)

    def go() -> dict[str, Any]:
        ids = request_rollback(name, who, reason, apply=False, run_is_live=flow_run_is_live)
        return rollback_flow(
            decision_id=ids["decision_id"],
            approval_id=ids["approval_id"],
            reason=checked_reason(reason),  # redacted, as every store keeps a reason (the run's parameters)
            automatic=ids["approval_id"] is None,  # finishing the monitor's own: no person's signature
            actor=who.name,
            finished_by=who.name if ids["finishing"] else "",
        )

    _to_log_file("rollback", json_out)
    result = _run(go)
    move = result.get("alias_move") or {}
    moved = f"{move.get('from_version')} -> {move.get('to_version')} ({move.get('status')})"
    emit_or_say(result, json_out, f"{name}: champion {moved}")


@app.command("monitor")
def monitor_cmd(
    name: UseCaseArg,
    observations: Annotated[
        list[str] | None,
        typer.Option(
            "--observations",
            metavar="FILE",
            help="production observations (JSONL/CSV) to check, one look per command: a slice of traffic "
            "in time; give every page of an export together (--observations PAGE1 --observations PAGE2 "
            "...), never a page alone (its look would judge a sorted order)",
        ),
    ] = None,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """Sample traffic of a promoted use case; a guardrail breach or failed data check rolls back
    automatically when the spec allows it, else leaves a rollback waiting for approval (operators and
    approvers)."""
    from flows.monitor import monitor_flow, require_file

    _require_use_case(name)
    signed_in("operator", f"monitor {name}", password_stdin)
    for path in observations or []:  # before a flow starts: a file that is not there, whatever the state
        require_file(path)
    _require_device()
    _to_log_file("monitor", json_out)
    given = observations[0] if observations and len(observations) == 1 else observations or None
    result = _run(lambda: monitor_flow(name, observations_file=given))
    emit_or_say(result, json_out, monitor_said(name, result))
    if not json_out and result.get("control_caveat"):  # what its quality checks compare: the flow's warning
        console.print(f"warning: {result['control_caveat']}", style="yellow", soft_wrap=True, markup=False)


def monitor_said(name: str, result: dict[str, Any]) -> str:
    """The monitor's line: its look's explanation and, where the champion moved (the automatic rollback,
    or a decision made earlier that this run carried out first), which version serves now; then the rows
    of its batch whose latency the monitor left out (`monitor_latency_left_out`), where there are any."""
    if result.get("status") == "finished":
        done = result["finished"]
        said = f"{name}: carried out decision {done['decision_id']} ({done['action']}), decided earlier"
        effect = result.get("result") or {}
    else:
        said = result.get("explanation") or f"{name}: {result.get('status', 'looked')}"
        effect = result.get("rollback") or {}
    moves = effect.get("alias_moves") or ([effect["alias_move"]] if effect.get("alias_move") else [])
    for m in moves:
        said += f"; {m['alias']} {m['from_version']} -> {m['to_version']} ({m['status']})"
    left_out = monitor_latency_left_out(result.get("latency"))
    return said if left_out is None else f"{said}; {left_out}"


def monitor_latency_left_out(latency: dict[str, Any] | None) -> str | None:
    """The rows of the monitor's sampled batch timed while the host was overloaded (its `latency`,
    flows.pilot.latency_judged; an imported file's look has none), in words, or None where there are none."""
    if not latency or not latency["rows_left_out"]:
        return None
    from rollout.words import counted

    total = latency["rows_left_out"] + latency["rows_judged"]
    return (
        f"{latency['rows_left_out']:,} of the batch's {counted(total, 'row')} timed while the host was "
        "overloaded: they count for quality, not for the monitor's latency guardrail"
    )


# --- main job and schedules ------------------------------------------------------------------------


@app.command("run")
def run_cmd(
    serve: Annotated[bool, typer.Option("--serve", help="serve the dashboard afterwards")] = False,
    use_case: Annotated[
        list[str] | None, typer.Option("--use-case", help="only these use cases (repeatable)")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="pilot answer length")] = 16,
    full: Annotated[
        bool, typer.Option("--full", help="the spec's full calibration/evaluation settings")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="dashboard port (with --serve)")] = 8501,
    pilot_all: Annotated[
        bool,
        typer.Option("--pilot-all", help="pilot even a dense plan or one with no projected saving"),
    ] = False,
    shadow_seconds: Annotated[
        float | None,
        typer.Option("--shadow-seconds", min=0, help="extra shadow time per use case [default: 180]"),
    ] = None,
    split_seconds: Annotated[
        float | None,
        typer.Option("--split-seconds", min=0, help="split-step time per use case [default: 90]"),
    ] = None,
    specs: Annotated[
        Path | None,
        typer.Option("--specs", help="folder of use-case specs to run [default: examples/usecases]"),
    ] = None,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """The main job: for each sample use case validate -> calibrate -> evaluate -> pilot (shadow + first
    split step) -> gate, then a summary table; GO decisions wait for approval. A use case a person added
    (`usecase add`) is piloted and gated only for an operator, as by `pilot` and `gate`."""
    import os

    # Our progress display owns the terminal; Prefect's INFO logs still reach its API (set before import).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows.main_job import MainJobSettings, render_table, run_main_job, serve_after
    from rollout.pilot_plan import describe_to_approval

    _require_db_for_run()
    if use_case:
        _require_run_use_cases(specs, use_case)
    settings = MainJobSettings(
        **({"examples_dir": specs} if specs is not None else {}),
        use_cases=use_case or None,
        quick=not full,
        pilot_max_new_tokens=max_new_tokens,
        pilot_unprofitable=pilot_all,
    )
    if shadow_seconds is not None:
        settings.shadow_seconds = shadow_seconds
    if split_seconds is not None:
        settings.split_seconds = split_seconds
    out_console = err_console if json_out else console
    from rich.console import Console

    from rollout.settings import get_settings
    from sparsepilot.quiet import to_log_file

    _require_operator_for_theirs(settings, password_stdin)
    _require_device()
    log_path = to_log_file(get_settings().home, "run")
    out_console.print(f"log file (warnings and library output): {log_path}", highlight=False, soft_wrap=True)
    # the main job prepares both stores itself before its first flow (flows.main_job.run_main_job)
    result = _run(lambda: run_main_job(settings, console=out_console), needs_db=False, needs_mlflow=False)
    if json_out:
        emit_json(result)
    else:
        # off a terminal (CI, `make run | tee`) rich would squeeze the table into 80 columns
        wide = console if console.is_terminal else Console(width=220)
        wide.print(render_table(result["rows"], result["outcomes"]))
        console.print(f"pipeline wall time: {result['pipeline_seconds'] / 60:.1f} min")
        waiting = [r for r in result["rows"] if r["awaiting"] != "none"]
        for r in waiting:
            say(
                f"decision {r['decision_id']} ({r['use_case']}) waits for approval: "
                "SPARSEPILOT_USER=<approver> sparsepilot login, then "
                f"sparsepilot approve {r['use_case']} --decision {r['decision_id']} "
                '--reason "..."'
            )
        waits = {r["use_case"] for r in waiting}
        for name, plan in result.get("plans", {}).items():
            if name not in waits and plan is not None:
                say(f"{name}: {describe_to_approval(plan)}")
    if serve:
        from sparsepilot.commands.dashboard import serve_dashboard

        code = serve_after(result["rows"], lambda: serve_dashboard(port))
        raise typer.Exit(code)
    if not result["ok"]:
        raise typer.Exit(1)


def _require_db_for_run() -> None:
    """`run` migrates a SQLite state DB itself (`rollout.db.migrate.prepare_for_run`); a PostgreSQL one,
    which only `init` as the owner role migrates, must be at this build's head before anything reads it
    (`_require_db`: the sign-in check and `--use-case` read it), else one error line naming that init."""
    from rollout.settings import configure_environment

    if not configure_environment().is_sqlite:
        _require_db()


def _require_operator_for_theirs(settings: Any, password_stdin: bool) -> None:
    """`run` adds the specs of its folder and pilots and gates what it is given: the samples it adds
    itself need nobody, but a use case a person added (`rollout.usecases.added_by_people`), and one it
    would add from a folder of a person's specs (`run --specs DIR`, as `usecase add` does), need an
    operator's sign-in, as `pilot`, `gate` and `usecase add` do; refused (exit 2) before anything runs.
    The operator is kept on ``settings`` (`MainJobSettings.operator`): the use cases added are theirs."""
    from flows.main_job import is_samples_folder, sample_names
    from rollout.settings import configure_environment
    from rollout.usecases import added_by_people, not_added

    configure_environment()
    folder = settings.examples_dir
    theirs = added_by_people(settings.use_cases or sample_names(folder))
    new = [] if is_samples_folder(folder) else not_added(sample_names(folder))
    doing = [f"usecase add {', '.join(new)} from {folder}"] if new else []
    doing += [f"pilot and gate {', '.join(theirs)}"] if theirs else []
    if doing:
        who = signed_in("operator", f"run ({'; '.join(doing)})", password_stdin)
        settings.operator = who.name


def _require_operator_for_scheduled(names: list[str] | None, password_stdin: bool) -> None:
    """`serve` schedules the cycle of each use case (`flows.cycle`), which pilots and gates it: as for
    `run`, the samples need nobody, but serving the schedule of a use case a person added needs an
    operator's sign-in (`rollout.usecases.added_by_people`), refused (exit 2) before anything is
    scheduled. A name no use case has is left to `serve_schedules`, which says so."""
    from rollout.usecases import added_by_people, schedules

    _require_db()
    served = [s["use_case"] for s in schedules() if not names or s["use_case"] in names]
    theirs = added_by_people(served)
    if theirs:
        signed_in("operator", f"serve (the cycle pilots and gates) {', '.join(theirs)}", password_stdin)


@app.command("serve")
def serve_cmd(
    use_case: Annotated[
        list[str] | None, typer.Option("--use-case", help="only these use cases (repeatable)")
    ] = None,
    work_pool: Annotated[
        str | None, typer.Option("--work-pool", help="deploy to this work pool (needs PREFECT_API_URL)")
    ] = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """One cron schedule per use case (from its spec): served here with prefect.serve, or deployed to a
    work pool for workers when a Prefect server is configured (PREFECT_API_URL). A use case a person
    added is served for an operator only, as `run` pilots it. The flow runs served here, each in a
    process of its own, write to the serve's log file too (`flows.quiet.SERVED_LOG_FILE`)."""
    import os

    from flows.deployments import serve_schedules
    from sparsepilot.quiet import SERVED_LOG_FILE, for_command

    if not work_pool:  # the flows run here (a work pool's workers have their own environment)
        _require_device()
    log_file = for_command("serve")
    if not work_pool:  # inherited by the runner's flow-run processes
        os.environ[SERVED_LOG_FILE] = str(log_file)
    _require_operator_for_scheduled(use_case or None, password_stdin)
    _run(lambda: serve_schedules(use_case or None, work_pool=work_pool, console=console))
