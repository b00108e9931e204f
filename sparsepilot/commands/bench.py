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


@app.command("quality")
def bench_quality(
    quick: bool = typer.Option(False, "--quick", help="1k tokens, few windows, probes at 1k only."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model ref."),
    budget: str = typer.Option(
        "kl=0.01,agree=0.98", "--budget", help="Quality budget for the same-budget run."
    ),
    estimators: str = typer.Option("pooled,antidiagonal,gate", "--estimators", help="Comma-separated."),
    out: str = typer.Option("bench-results/quality.json", "--out", help="Where to write the JSON."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON instead of tables."),
) -> None:
    """pooled vs antidiagonal vs gate on the same held-out texts: density at the same budget; KL,
    agreement and probe accuracy at the same density."""
    import json
    from pathlib import Path

    from rich.progress import Progress

    from sparse_core.bench.quality import QualityBenchSettings, run_quality_bench
    from sparsepilot.console import emit_json, fail, print_table

    names = tuple(e.strip() for e in estimators.split(",") if e.strip())
    bad = [e for e in names if e not in ("pooled", "antidiagonal", "gate")]
    if bad or not names:
        fail(f"--estimators: unknown {bad or estimators!r}; choose from pooled, antidiagonal, gate")
    kw = dict(model=model, budget=budget, estimators=names)
    settings = QualityBenchSettings.quick(**kw) if quick else QualityBenchSettings(**kw)
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = run_quality_bench(settings, progress=progress)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if json_out:
        emit_json(result)
        return
    print_table(f"Same budget ({budget}): density reached, held-out fidelity, probes", result["same_budget"])
    print_table("Same density: fidelity and probes", result["same_density"])
    ratio = result["pooled_over_gate_density"]
    if ratio is not None:
        print(f"pooled density / gate density at the same budget: {ratio:.3f}  (JSON: {out})")
