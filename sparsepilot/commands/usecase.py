"""`sparsepilot usecase add | list | show`.

Bad input exits with code 2 and one line per problem naming the file, row and field; nothing is
written (the add is one transaction, after every check passed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sparsepilot.commands.auth import PasswordStdin, signed_in
from sparsepilot.commands.init import require_schema
from sparsepilot.console import console, emit_json, fail, print_table, say
from sparsepilot.options import JsonOpt

app = typer.Typer(no_args_is_help=True, help="Register and inspect use cases (versioned specs).")


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="use-case spec (YAML); see docs/usecase-spec.md")],
    new_version: Annotated[
        bool,
        typer.Option("--new-version", help="store a changed spec of an existing use case as a new version"),
    ] = False,
    password_stdin: PasswordStdin = False,
    json_out: JsonOpt = False,
) -> None:
    """Validate a spec, its model ref and its dataset, then register it (or a new version of it)."""
    from rollout.usecases import add_usecase
    from rollout.validation import DataValidationError

    require_schema()
    actor = signed_in("operator", f"usecase add {file}", password_stdin).name
    try:
        with console.status(f"Validating {file} (spec, model ref, dataset)...", spinner="dots"):
            result = add_usecase(file, actor=actor, new_version=new_version)
    except DataValidationError as exc:
        fail(f"dataset failed validation:\n{exc}")
    if json_out:
        emit_json(result.to_dict())
        return
    stats = result.validation.get("stats", {})
    verb = {
        "created": "registered",
        "new_version": "stored as a new version",
        "reverted": "switched back to an earlier version",
        "unchanged": "unchanged (identical to the current version); nothing written",
    }[result.status]
    say(f"{result.name} v{result.version}: {verb}")
    console.print(
        f"  dataset: {stats.get('rows')} requests, prompt tokens {stats.get('prompt_tokens_min')}-"
        f"{stats.get('prompt_tokens_max')} (counted by {stats.get('token_count')})"
    )
    if result.changed_fields:
        say(f"  changed: {', '.join(result.changed_fields)}")
    for note in result.notes:  # what the changes mean: calibrating again, restarting what serves a schedule
        say(f"  {note}")
    for w in result.validation.get("warnings", []):
        say(f"  warning: {w}")


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """All use cases with their current version and phase."""
    from rollout.usecases import list_usecases

    require_schema()
    rows = list_usecases()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print("No use cases yet: `sparsepilot usecase add examples/usecases/docs-qa.yaml`")
        return
    print_table(
        "Use cases",
        rows,
        ["name", "owner", "criticality", "phase", "version", "versions", "model", "task", "requests"],
    )


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="use-case name")],
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, max=2**31 - 1, help="a spec version (default: current)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """One use case: its spec (current or a given version), all versions, recent audit entries."""
    from rollout.usecases import show_usecase

    require_schema()
    info = show_usecase(name, version=version)
    if json_out:
        emit_json(info)
        return
    _print_usecase(info)


def _print_usecase(info: dict[str, Any]) -> None:
    from rollout.spec import dump_spec

    say(
        f"{info['name']}  owner {info['owner']}  criticality {info['criticality']}  "
        f"phase {info['phase']}  spec v{info['version']} (current v{info['current_version']})"
    )
    console.print(f"dataset: {info['dataset_rows']} requests, sha256 {str(info['dataset_sha256'])[:12]}")
    if info["working_now"]:
        console.print(f"working now: {info['working_now']}", highlight=False, markup=False)
    if info.get("waits_for") not in (None, "-"):  # the portfolio's words (rollout.queries.waits_for)
        console.print(f"waits for: {info['waits_for']}", highlight=False, markup=False)
    console.print(dump_spec(info["spec"]).rstrip(), highlight=False, markup=False)
    _print_plan(info["pilot_plan"])
    if info.get("running_pilot"):  # planned as itself, under its own spec version (as the use-case page)
        say(info["running_pilot"]["note"])
    _print_pilots(info)
    if info.get("monitor"):
        say(info["monitor"])
    print_table("Versions", info["versions"], ["version", "current", "spec_hash", "created_by", "created_at"])
    print_table("Recent audit entries", info["audit"], ["ts", "actor", "action"])


def _print_pilots(info: dict[str, Any]) -> None:
    """The use case's pilots, each step's void requests, and the share of its false-GO alpha they spent
    (rollout.gate.spending)."""
    from rollout.gate.spending import describe

    if info["pilots"]:
        levels = info["alpha_budget"]["levels"]  # a pilot without a stored level runs at alpha
        rows = [{**p, "go_alpha": a} for p, a in zip(info["pilots"], levels, strict=True)]
        columns = [
            "pilot_number",
            "mlflow_version",
            "status",
            "go_alpha",
            "looks",
            "last_outcome",
            "started_at",
        ]
        print_table("Pilots", rows, columns)
    for v in info.get("void_requests") or []:  # per step (rollout.queries.step_voids)
        step = f"step {v['step_index']} ({v['kind']} {v['traffic_pct']:g}%)"
        say(f"pilot {v['pilot_number']} {step}: {v['note']}")
    say(describe(info["alpha_budget"]))


def _print_plan(plan: dict[str, Any] | None) -> None:
    """What the pilot of this version takes before its approval (rollout.pilot_plan)."""
    from rollout.pilot_plan import describe_monitor, describe_monitor_cadence, traffic_time

    if plan is None:
        say("no pilot plan: the stored spec no longer validates")
        return
    rows = [
        {
            "step": f"{s['label']} ({s['where']})",
            f"GO by ({plan['power']:.0%})": "-" if s["requests"] is None else f"{s['requests']:,}",
            "mean": f"{s['expected']:,.0f}",
            "looks": s["looks"],
            "at its traffic": traffic_time(s["days"]),
        }
        for s in plan["steps"]
    ]
    which = "a pilot" if plan["pilot_number"] is None else f"pilot {plan['pilot_number']}"
    print_table(
        f"What a decision takes (requests; shadow: pairs; at a true difference of "
        f"{plan['planned_effect']:+g}, margin {plan['margin']:g}; one batch per look; {which}, its GO "
        f"held to alpha {plan['go_alpha']:.3g})",
        rows,
    )
    for w in plan["warnings"]:
        say(f"  warning: {w}")
    if plan.get("monitor"):
        say(
            f"After promotion, the monitor ({describe_monitor_cadence(plan['monitor'][0])}; its change "
            "detector keeps each check's false alarm within alpha however long it runs) on a champion that "
            "breaches from its first look:"
        )
        for reach in plan["monitor"]:
            say(f"  {describe_monitor(reach)}")
