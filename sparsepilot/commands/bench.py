"""`sparsepilot bench ...`: each benchmark prints a table and writes JSON (+ a PNG where useful).
Speed targets live here, never as timed assertions in tests."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("dashboard")
def bench_dashboard(
    use_cases: int = typer.Option(200, "--use-cases", help="Use cases to seed."),
    observations: int = typer.Option(200_000, "--observations", help="Pilot observations to seed, in all."),
    repeats: int = typer.Option(3, "--repeats", help="Warm renders per page after the cold one."),
    home: str = typer.Option("", "--home", help="Scratch SPARSEPILOT_HOME (default: a new temp dir)."),
    out: str = typer.Option("bench-results/dashboard.json", "--out", help="Where to write the JSON."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON instead of a table."),
) -> None:
    """Seed a portfolio into a scratch state DB and time every dashboard page (AppTest renders)."""
    import tempfile
    from pathlib import Path

    from rich.progress import Progress

    from dashboard.bench import run_bench, write_json
    from sparsepilot.console import emit_json, print_table

    scratch = Path(home) if home else Path(tempfile.mkdtemp(prefix="sparsepilot-bench-dashboard-"))
    if (scratch / "state.db").exists():
        from sparsepilot.console import fail

        fail(f"{scratch / 'state.db'} exists: the benchmark needs an empty scratch home")
    with Progress(transient=True) as bar:
        task = bar.add_task(f"seeding {use_cases} use cases", total=use_cases)
        result = run_bench(
            scratch,
            use_cases=use_cases,
            observations=observations,
            repeats=repeats,
            progress=lambda n: bar.advance(task, n),
        )
    write_json(result, Path(out))
    if json_out:
        emit_json(result)
        return
    seeded = result["seeded"]
    print_table(
        f"dashboard render times: {seeded['use_cases']} use cases, {seeded['observations']:,} observations "
        f"(seeded in {result['seed_s']} s; portfolio SQL {result['portfolio_sql_s']} s; JSON: {out})",
        result["pages"],
    )
