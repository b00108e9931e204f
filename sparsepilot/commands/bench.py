"""`sparsepilot bench ...`: each benchmark prints a table and writes JSON (+ a PNG where useful).
Speed targets live here, never as timed assertions in tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from sparse_core.decode.plan import DECODE_ESTIMATORS, TRAINED_BY_DECODE_CALIBRATION
from sparse_core.estimators import available_estimators
from sparsepilot.options import DeviceOpt, SharpenOpt, device_or_fail, number_list_option, sharpen_option
from sparsepilot.quiet import for_command

# Options several benchmarks share (each command gives its own default)
ModelRef = Annotated[str, typer.Option("--model", help="Model ref.")]
Kernels = Annotated[str, typer.Option("--kernels", help="Comma-separated: gather, flex.")]
JsonOut = Annotated[str, typer.Option("--out", help="Where to write the JSON.")]
JsonPngOut = Annotated[str, typer.Option("--out", help="JSON path; the PNG goes next to it.")]
Threads = Annotated[
    str,
    typer.Option(
        "--threads",
        help="torch threads: auto (the CPUs this process may use minus what other processes keep busy, "
        "measured at the start: 1 on a two-core host with a busy neighbour) or a number.",
    ),
]


def _untrained() -> list[str]:
    """Estimators that score without a plan's weights (training-free, and the exact ceiling)."""
    return available_estimators(("training-free", "exact-ceiling"))


def _quick(help: str) -> Any:
    return typer.Option("--quick", help=help)


def _json_flag(help: str) -> Any:
    return typer.Option("--json", help=help)


app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")


def _at_least(*checks: tuple[str, int, int]) -> None:
    """Each (option, value, least): `error: OPTION must be >= LEAST, got VALUE` and exit 2 for the first
    count below its least, before any work (a count of 0 or less fails deep inside otherwise)."""
    from sparsepilot.console import fail

    for option, value, least in checks:
        if value < least:
            fail(f"{option} must be >= {least}, got {value}")


BENCH_DATABASE_ENV = "SPARSEPILOT_BENCH_DATABASE_URL"


def _bench_database_url(option: str, environ: Any) -> str:
    """The database `bench dashboard` seeds: ``--database-url``, refused when it holds a password (the
    command line is visible to every local user in `ps`, and kept in shell history and CI logs), else
    $SPARSEPILOT_BENCH_DATABASE_URL, else "" (SQLite in the scratch home)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from sparsepilot.console import fail

    if not option:
        return environ.get(BENCH_DATABASE_ENV, "")
    try:
        password = make_url(option).password
    except ArgumentError:
        fail(f"--database-url is not a database URL (e.g. postgresql+psycopg://user@host/db): {option}")
    if password is not None:
        fail(
            f"--database-url holds a password, which every local user can read on the command line: "
            f"set {BENCH_DATABASE_ENV} to the URL instead and leave --database-url out"
        )
    return option


@app.command("dashboard")
def bench_dashboard(
    use_cases: int = typer.Option(200, "--use-cases", help="Use cases to seed."),
    observations: int = typer.Option(200_000, "--observations", help="Pilot observations to seed, in all."),
    repeats: int = typer.Option(3, "--repeats", help="Warm renders per page after the cold one."),
    home: str = typer.Option("", "--home", help="Scratch SPARSEPILOT_HOME (default: a new temp dir)."),
    database_url: str = typer.Option(
        "",
        "--database-url",
        help=f"An EMPTY database to seed instead (e.g. PostgreSQL), without a password (one with a password: "
        f"{BENCH_DATABASE_ENV}); default SQLite.",
    ),
    out: JsonOut = "bench-results/dashboard.json",
    json_out: Annotated[bool, _json_flag("Print the JSON instead of a table.")] = False,
) -> None:
    """Seed a portfolio into a scratch state DB and time every dashboard page (AppTest renders)."""
    # library output, Streamlit's bare-mode warnings with it, to a log file (the path said unless --json)
    for_command("bench-dashboard", say_where=not json_out, flows=False, streamlit=True)
    import os
    import tempfile

    from rich.progress import Progress
    from sqlalchemy.exc import SQLAlchemyError

    from dashboard.bench import run_bench
    from rollout.redact import mask_db_url, redact
    from rollout.words import counted
    from sparse_core.host import HostLoadMeter, loadavg
    from sparsepilot.console import fail, print_table

    _at_least(("--use-cases", use_cases, 1), ("--observations", observations, 0), ("--repeats", repeats, 1))
    database_url = _bench_database_url(database_url, os.environ)
    check_out(out)
    scratch = Path(home) if home else Path(tempfile.mkdtemp(prefix="sparsepilot-bench-dashboard-"))
    if not database_url and (scratch / "state.db").exists():
        fail(f"{scratch / 'state.db'} exists: the benchmark needs an empty scratch home")
    load_before = loadavg()
    # the seeding and the renders run in this process; a PostgreSQL server's work counts among the others;
    # each step a line of the .log next to the JSON (`tail -f`), the console's bar showing it
    with _progress_log(out, say_where=not json_out) as log:
        log(f"dashboard benchmark: started ({use_cases} use cases, {observations:,} observations, "
            f"{counted(repeats, 'warm render')} a page, scratch home {scratch})")  # fmt: skip
        with Progress(transient=True) as bar, HostLoadMeter(threads=1) as meter:
            task = bar.add_task(f"seeding {use_cases} use cases", total=use_cases)
            done = 0

            def seeding(n: int) -> None:
                nonlocal done
                done += n
                bar.advance(task, n)
                if done % max(use_cases // 10, 1) == 0 or done == use_cases:  # about ten lines
                    log(f"seeded {done}/{use_cases} use cases")

            def say(line: str) -> None:
                bar.update(task, description=line)
                log(line)

            try:
                result = run_bench(
                    scratch,
                    use_cases=use_cases,
                    observations=observations,
                    repeats=repeats,
                    progress=seeding,
                    database_url=database_url or None,
                    say=say,
                )
            except ValueError as exc:
                log(f"error: {redact(str(exc))}")
                fail(str(exc))
            except SQLAlchemyError as exc:  # unreachable, refused, wrong database: said in one line
                first = (str(exc).splitlines() or [""])[0][:300]
                where = mask_db_url(database_url) if database_url else str(scratch / "state.db")
                said = f"the benchmark's database {where} cannot be used: {type(exc).__name__}: {first}"
                log(f"error: {redact(said)}")
                fail(said)
        log(f"host during the run: {_others_line(meter.load.to_dict())}")
        log("dashboard benchmark: done")
    result["environment"] = {
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu_count": os.cpu_count(),
        "host_load": meter.load.to_dict(),
    }
    if json_out:  # stdout is the JSON: the warning goes to stderr
        _overload_warning(
            result["environment"], result["pages"][1:], what=TIMES, threads_option=False, to_stderr=True
        )
    if _saved_and_emitted(result, out, json_out):
        return
    seeded = result["seeded"]
    print_table(
        f"dashboard render times: {seeded['use_cases']} use cases, {seeded['observations']:,} observations "
        f"(seeded in {result['seed_s']} s; portfolio SQL {result['portfolio_sql_s']} s; "
        f"{_others_line(meter.load.to_dict())}; JSON: {out})",
        _verdicts(result["pages"]),
        columns=[
            "page",
            "cold_s",
            "warm_median_s",
            "target_s",
            "within_target",
            "others_busy_cores",
            "wait_share",
            "overloaded",
        ],
    )
    _overload_warning(result["environment"], result["pages"][1:], what=TIMES, threads_option=False)
    _write_json(result, out)


@app.command("import")
def bench_import(
    rows: list[int] = typer.Option([100_000, 1_000_000], "--rows", help="File sizes to import (repeatable)."),
    chunk_rows: int = typer.Option(
        50_000, "--chunk-rows", min=1000, help="Rows parsed and checked at a time."
    ),
    out: JsonOut = "bench-results/import.json",
    json_out: Annotated[bool, _json_flag("Print the JSON instead of a table.")] = False,
) -> None:
    """Import generated observation files (shadow step, JSONL) through the streaming import; rows/s and
    peak RSS per size, each in a fresh process (targets: 1M rows in <= 60 s, <= 1 GiB)."""
    from flows.import_bench import run_import_bench
    from sparsepilot.console import fail

    if any(r < 2 for r in rows):
        fail("--rows: each size must be at least 2")
    check_out(out)
    with _spinner("import benchmark", out) as progress:
        result = run_import_bench(rows, chunk_rows=chunk_rows, progress=progress)
    if json_out:  # stdout is the JSON: the warning goes to stderr
        _state_db_warning(result, to_stderr=True)
    if _saved_and_emitted(result, out, json_out):
        return
    _state_db_table(
        "observation import",
        result,
        out,
        [
            "rows",
            "inserted",
            "file_mib",
            "import_s",
            "rows_per_s",
            "peak_rss_mib",
            "chunk_rows",
            "others_busy_cores",
            "overloaded",
        ],
    )


@app.command("monitor")
def bench_monitor(
    rows: list[int] = typer.Option(
        [10_000, 100_000, 1_000_000],
        "--rows",
        help="Rows the monitor step holds before the timed looks (repeatable).",
    ),
    batch: int = typer.Option(
        100, "--batch", min=1, help="Requests a look samples (each answered by both arms)."
    ),
    looks: int = typer.Option(3, "--looks", min=1, help="Timed looks per size (medians kept)."),
    out: JsonOut = "bench-results/monitor.json",
    json_out: Annotated[bool, _json_flag("Print the JSON instead of a table.")] = False,
) -> None:
    """Time one monitor look once the champion's monitor holds N rows (SQLite, each size in a fresh process
    with a scratch home): the promoted pilot's used request ids (and its step without them, as a look that
    imports its rows asks), storing the batch, reading every row since promotion, the change detector's
    judgement, and the whole recorded look; peak RSS per size."""
    from rollout.monitor_bench import run_monitor_bench
    from sparsepilot.console import fail

    if any(r < 2 * batch for r in rows):
        fail(f"--rows: each size must hold at least one look of --batch {batch} requests ({2 * batch} rows)")
    check_out(out)
    with _spinner("monitor benchmark", out) as progress:
        result = run_monitor_bench(rows, batch=batch, looks=looks, progress=progress)
    if json_out:  # stdout is the JSON: the warning goes to stderr
        _state_db_warning(result, to_stderr=True)
    if _saved_and_emitted(result, out, json_out):
        return
    _state_db_table(
        f"one monitor look, medians of {looks}",
        result,
        out,
        [
            "rows",
            "target_s",
            "target_import_s",
            "store_s",
            "read_s",
            "judge_s",
            "look_s",
            "looks_judged",
            "outcome",
            "peak_rss_mib",
            "others_busy_cores",
            "overloaded",
        ],
    )


@app.command("quality")
def bench_quality(
    quick: Annotated[
        bool, _quick("2k and 4k tokens, 4 windows, 120 gate steps, docs-qa's prompts (4 rows).")
    ] = False,
    model: ModelRef = "smollm2-135m",
    budget: str = typer.Option(
        "kl=0.01,agree=0.98", "--budget", help="The one budget every estimator meets."
    ),
    estimators: str = typer.Option(
        "",
        "--estimators",
        help=f"Comma-separated, of {', '.join(available_estimators())}; a+b = per-layer choice between a "
        "and b. Default: every registered estimator by kind, and the newest learned one + the first "
        "training-free one.",
    ),
    lengths: str = typer.Option(
        "", "--lengths", help="Context lengths, e.g. 2048,4096 (default by mode); 'none' = use cases only."
    ),
    usecases: str = typer.Option(
        "",
        "--usecases",
        help="Sample use cases (names in examples/usecases or spec paths), comma-separated; 'none' to skip.",
    ),
    max_texts: int = typer.Option(0, "--max-texts", help="Calibration windows per length (0 = by mode)."),
    gate_steps: int = typer.Option(0, "--gate-steps", help="Gate training steps (0 = by mode)."),
    max_checks: int = typer.Option(0, "--max-checks", help="eps search steps per estimator (0 = 7)."),
    confidence: float = typer.Option(
        0.0,
        "--confidence",
        help="Judge the budget on one-sided bounds at this confidence (e.g. 0.95: agreement's lower, "
        "KL's upper bound) instead of the held-out means (0 = the means).",
    ),
    bound_unit: str = typer.Option(
        "block",
        "--bound-unit",
        help="With --confidence, the bound's unit: block (256 scored positions) | window (a held-out "
        "window; needs more of them, e.g. 11 at 0.95).",
    ),
    gate_target: str = typer.Option(
        "", "--gate-target", help="gate_v2 distillation target: maxpool | mass | output."
    ),
    drop_measure: str = typer.Option(
        "mass",
        "--drop-measure",
        help="What the allocation's error level bounds per head: mass (dense attention mass dropped) | "
        "output (relative attention output error).",
    ),
    sensitivity_windows: int = typer.Option(
        0,
        "--sensitivity-windows",
        min=0,
        help="With a learned estimator: the last N calibration windows are kept apart from its training "
        "and every estimator's sensitivities come from them (0 = all calibration windows).",
    ),
    sharpen: SharpenOpt = None,
    taus: str = typer.Option(
        "",
        "--taus",
        help="The tau grid every estimator's allocation picks from, e.g. 0.5,0.8,0.9,0.95,0.98,0.99,"
        "0.995,0.998,0.999 (default: calibration's, up to 0.995).",
    ),
    layer_weights: str = typer.Option(
        "none",
        "--layer-weights",
        help="none | kl: scale each layer's errors by the next-token KL its error causes alone (measured "
        "on a sensitivity window), so one eps bounds every layer's share of the output error.",
    ),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the prefill timing per plan."),
    seed: int = typer.Option(
        0,
        "--seed",
        min=0,
        help="Seeds the corpus's calibration/held-out split, the windows and gate training: the same "
        "run with another seed is an independent repeat.",
    ),
    out: JsonOut = "bench-results/quality.json",
    json_out: Annotated[bool, _json_flag("Print the JSON instead of tables.")] = False,
    plans: str = typer.Option("", "--plans", help="Save every calibrated plan under DIR/<length>/<spec>."),
    device: DeviceOpt = "auto",
    threads: Threads = "auto",
) -> None:
    """Every block estimator at the same budget: density reached, held-out KL / agreement, prefill
    speed-up, ratio vs the best training-free estimator; per use case the task-score delta."""
    for_command("bench-quality", flows=False)  # model benchmarks: library output to a log file
    from rich.progress import Progress

    from sparse_core import PlanError
    from sparse_core.bench.quality import QualityBenchSettings, default_specs, plot, run_quality_bench
    from sparse_core.calibration import DROP_MEASURES, tau_grid
    from sparse_core.estimators import parse_estimator_spec
    from sparse_core.estimators.learned_gate_v2 import TARGETS as GATE_V2_TARGETS
    from sparse_core.layer_weights import MODES as LAYER_WEIGHTS
    from sparse_core.prefill_bound import BOUND_UNITS
    from sparsepilot.console import emit_json, fail, print_table

    _at_least(("--gate-steps", gate_steps, 0), ("--max-checks", max_checks, 0))
    if max_texts != 0 and max_texts < 2:
        fail(f"--max-texts must be 0 (by mode) or >= 2 (one window is held out), got {max_texts}")
    names = tuple(e.strip() for e in estimators.split(",") if e.strip()) or default_specs()
    try:
        for spec in names:
            parse_estimator_spec(spec)
    except PlanError as exc:
        fail(f"--estimators: {exc}")
    n_threads = _threads_or_fail(threads)
    if gate_target and gate_target not in GATE_V2_TARGETS:
        fail(f"--gate-target: {gate_target!r}; choose {', '.join(GATE_V2_TARGETS)}")
    if drop_measure not in DROP_MEASURES:
        fail(f"--drop-measure: {drop_measure!r}; choose {' or '.join(DROP_MEASURES)}")
    if layer_weights not in LAYER_WEIGHTS:
        fail(f"--layer-weights: {layer_weights!r}; choose {' or '.join(LAYER_WEIGHTS)}")
    kw: dict = dict(
        model=model,
        budget=budget,
        estimators=names,
        speed=not no_speed,
        drop_measure=drop_measure,
        device=str(device_or_fail(device)),
        seed=seed,
        layer_weights=layer_weights,
    )
    try:
        if lengths:  # 'none': only the use cases
            parts = [] if lengths == "none" else lengths.split(",")
            kw["lengths"] = tuple(int(x) for x in parts if x.strip())
    except ValueError:
        fail(f"--lengths: {lengths!r} is not a comma-separated list of integers")
    if max_texts:
        kw["max_texts"] = max_texts
    if gate_steps:
        kw["gate_steps"] = gate_steps
    if max_checks:
        kw["max_joint_checks"] = max_checks
    kw["sensitivity_windows"] = sensitivity_windows
    if sharpen is not None:
        kw["sharpen"] = sharpen_option(sharpen)
    if taus:
        kw["taus"] = number_list_option("--taus", taus, tau_grid)
    if bound_unit not in BOUND_UNITS:
        fail(f"--bound-unit: {bound_unit!r}; choose {' or '.join(BOUND_UNITS)}")
    if confidence:
        if not 0 < confidence < 1:
            fail(f"--confidence: {confidence} is not in (0, 1)")
        kw.update(confidence=confidence, bound_unit=bound_unit)
    elif bound_unit != "block":
        fail("--bound-unit: needs --confidence (the bound it is the unit of)")
    if gate_target:
        kw["gate_target"] = gate_target
    if plans:
        kw["plans_dir"] = plans
    default_ucs = "docs-qa" if quick else "docs-qa,support-chat,longdoc-summaries"
    uc_names = (
        [] if usecases == "none" else [u.strip() for u in (usecases or default_ucs).split(",") if u.strip()]
    )
    kw["usecases"] = tuple(_usecase_data(u) for u in uc_names)
    settings = QualityBenchSettings.quick(**kw) if quick else QualityBenchSettings(**kw)
    # the model's positions from its config (no weights): a window longer than them is refused now
    context = _model_context(model)
    over = [x for x in settings.lengths if context and x > context]
    if over:
        fail(
            f"{'--lengths' if lengths else '--quick' if quick else 'the default lengths'}: "
            f"{', '.join(f'{x:,}' for x in over)} tokens; the model has {context:,} positions "
            f"(max_position_embeddings): give --lengths <= {context:,}"
        )
    if settings.usecases and context and settings.usecase_length > context:
        fail(
            f"--usecases: their plans are calibrated on {settings.usecase_length:,}-token windows; the model "
            f"has {context:,} positions (max_position_embeddings): give --usecases none"
        )
    check_out(out)
    with Progress(transient=True) as bar, _progress_log(out) as log:
        policy = _apply_threads(n_threads, log)
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)
            log(f"{stage} {done}/{total}")

        result = run_quality_bench(settings, progress=progress)
        _record_host(result, policy, log)
    result["plot"] = str(side_file(out, ".png"))
    if json_out:  # the JSON printed, then the files written: a write that fails loses no result
        emit_json(result)
        _write_with_plot(result, out, plot, printed=True)
        return
    cols = [
        "estimator",
        "met_budget",
        "density",
        "measured_density",
        "kl",
        "agree",
        "ratio_vs_best_training_free",
        "measured_ratio_vs_best_training_free",
        "speedup",
        "dense_layers",
        "layer_estimators",
        "overloaded",
    ]
    for block in result["by_length"]:
        print_table(
            f"{block['seq_len']} tokens, budget {budget}: {heldout_label(block)} "
            f"({_host_line(result['environment'])})",
            block["rows"],
            columns=cols,
        )
    for block in result["usecases"]:
        print_table(
            f"{block['usecase']}: same budget, task delta on held-out rows",
            block["rows"],
            columns=[
                "estimator",
                "met_budget",
                "density",
                "ratio_vs_best_training_free",
                "task",
                "task_delta",
            ],
        )
    print(f"JSON: {out}")
    _overload_warning(result["environment"], [r for block in result["by_length"] for r in block["rows"]])
    _write_with_plot(result, out, plot)


def heldout_label(block: dict) -> str:
    """What a length's quality rows were measured on, with the true window lengths where the held-out
    text ran out before the labelled length (SmolLM2's held-out corpus holds ~7k tokens)."""
    held = block["heldout_window_tokens"]
    if min(held) >= block["seq_len"]:
        return "held-out natural text"
    return f"held-out natural text, {len(held)} window(s) of {'/'.join(map(str, held))} tokens"


def _usecase_data(ref: str):
    """A sample use case by name (examples/usecases/<name>.yaml) or a spec path -> UseCaseData."""

    from rollout.spec import SpecError, load_spec
    from sparse_core.bench.quality import UseCaseData
    from sparse_core.tasks import DatasetError, read_dataset
    from sparsepilot.console import fail

    path = Path(ref)
    if not path.suffix:
        path = Path(__file__).resolve().parents[2] / "examples" / "usecases" / f"{ref}.yaml"
    if not path.is_file():
        fail(f"--usecases: no spec at {path}")
    try:
        spec = load_spec(path)
        rows = read_dataset(spec.dataset_path(path.parent), default_task=spec.dataset.task)
    except (SpecError, DatasetError) as exc:
        fail(f"--usecases: {exc}")
    return UseCaseData(spec.name, tuple(rows), spec.dataset.task)


@app.command("attention")
def bench_attention(
    quick: Annotated[bool, _quick("4k and 16k tokens only (full: 4k/8k/16k/32k).")] = False,
    kernels: Kernels = "gather,flex",
    dtypes: str = typer.Option("fp32,bf16", "--dtypes", help="Comma-separated: fp32, bf16."),
    block_size: int = typer.Option(64, "--block-size", help="Block size (power of two)."),
    repeats: int = typer.Option(2, "--repeats", help="Timed runs per point after a warm-up (best kept)."),
    estimator: str = typer.Option(
        "pooled",
        "--estimator",
        help=f"The scorer timed with each kernel: {', '.join(_untrained())} (learned ones need a plan).",
    ),
    out: JsonPngOut = "bench-results/attention.json",
    json_out: Annotated[bool, _json_flag("Print the JSON after the table.")] = False,
    device: DeviceOpt = "auto",
    selection: str = typer.Option(
        "auto",
        "--selection",
        help="How the estimator and selection run, comma-separated for side-by-side rows: eager, compiled "
        "(torch.compile), auto (compiled on CUDA for training-free estimators, else eager).",
    ),
    lengths: str = typer.Option("", "--lengths", help="Sequence lengths, e.g. 8192,32768 (default by mode)."),
    threads: Threads = "auto",
) -> None:
    """One SmolLM2-shaped attention layer: dense SDPA vs sparse kernels at ~5/10/25/50% density."""
    for_command("bench-attention", flows=False)  # model benchmarks: library output to a log file
    from sparse_core.bench import attention as bench
    from sparsepilot.console import fail, print_table, say

    _at_least(("--repeats", repeats, 1))
    ks = _kernels_or_fail(kernels)
    ds = tuple(x.strip() for x in dtypes.split(",") if x.strip())
    if not ds or any(d not in bench.DTYPES for d in ds):
        fail(f"--dtypes: {dtypes!r}; choose from {', '.join(bench.DTYPES)}")
    if block_size < 16 or block_size & (block_size - 1):
        fail(f"--block-size must be a power of two >= 16, got {block_size}")
    if estimator not in _untrained():
        fail(f"--estimator: {estimator!r}; choose from {', '.join(_untrained())}")
    hows = tuple(x.strip() for x in selection.split(",") if x.strip())
    if not hows or any(h not in ("auto", "eager", "compiled") for h in hows) or len(set(hows)) != len(hows):
        fail(f"--selection: {selection!r}; choose distinct ones of auto, eager, compiled")
    length_list = _int_list("--lengths", lengths) if lengths else None
    if length_list and min(length_list) <= block_size:
        fail(f"--lengths: each must exceed --block-size {block_size} (one block is dense), got {lengths!r}")
    dev = device_or_fail(device)
    check_out(out)
    result = _with_spinner(
        "attention benchmark",
        bench.run,
        out,
        _threads_or_fail(threads),
        quick=quick,
        kernels=ks,
        dtypes=ds,
        block_size=block_size,
        repeats=repeats,
        estimator=estimator,
        selections=hows,
        lengths=length_list,
        device=dev,
    )
    path, png = _plot_path(result, out)
    env = result["environment"]
    print_table(
        f"Attention layer (9 q / 3 kv heads, d=64) on {_where(env, dev)}, {estimator} estimator included; "
        f"{_host_line(env)}; JSON: {path}, plot: {png}",
        _unknown_shares(result["rows"]),
        bench.TABLE_COLUMNS,
    )
    for note in result["notes"]:  # targets under the density a length's blocks allow
        say(f"note: {note}")
    _warned_and_written(result, out, json_out, bench.plot, result["rows"])


def _unknown_shares(rows: list[dict]) -> list[dict]:
    """Attention rows for a table: an overloaded row's estimator share and fraction of the ideal
    (None: `sparse_core.bench.attention.estimator_figures`) read UNKNOWN_OVERLOADED, not a blank."""
    unknown = {"estimator_share": UNKNOWN_OVERLOADED, "fraction_of_ideal": UNKNOWN_OVERLOADED}
    return [r | unknown if r.get("overloaded") and r.get("estimator_share") is None else r for r in rows]


@app.command("prefill")
def bench_prefill(
    quick: Annotated[bool, _quick("Fewer lengths and plans (see docs/sparse_core.md).")] = False,
    model: ModelRef = "smollm2-135m",
    taus: str = typer.Option("", "--taus", help="Comma-separated tau values (default per mode)."),
    kernels: Kernels = "gather,flex",
    out: JsonPngOut = "bench-results/prefill.json",
    json_out: Annotated[bool, _json_flag("Print the JSON after the table.")] = False,
    device: DeviceOpt = "auto",
    repeats: int = typer.Option(
        0, "--repeats", help="Timed prefills per point, the best kept (0 = 1 on the CPU, 5 on CUDA)."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="The model's dtype: fp32 | bf16."),
    lengths: str = typer.Option(
        "",
        "--lengths",
        help="Prompt lengths, e.g. 2048,4096 (default by mode; at most the model's positions).",
    ),
    threads: Threads = "auto",
) -> None:
    """End-to-end prefill of a real model on natural English: dense SDPA vs sparse (pooled) at a
    few tau, speed-up in the same table as next-token KL, top-1 agreement and delta NLL."""
    for_command("bench-prefill", flows=False)  # model benchmarks: library output to a log file
    from sparse_core.bench import prefill as bench
    from sparse_core.evaluation import within_context
    from sparse_core.plan import SparsePlan
    from sparsepilot.console import fail, print_table

    try:
        tau_list = tuple(float(t) for t in taus.split(",") if t.strip()) or None
    except ValueError:
        fail(f"--taus: {taus!r} is not a comma-separated list of numbers")
    if tau_list and any(not 0 < t <= 1 for t in tau_list):
        fail(f"--taus: every tau must be in (0, 1], got {taus!r}")
    ks = _kernels_or_fail(kernels)
    if repeats < 0:
        fail(f"--repeats must be >= 0, got {repeats}")
    if dtype not in bench.DTYPES:
        fail(f"--dtype: {dtype!r}; choose from {', '.join(bench.DTYPES)}")
    length_list = _int_list("--lengths", lengths) if lengths else None
    block = SparsePlan().block_size  # the pooled plan every sparse row runs
    if length_list and min(length_list) <= block:
        fail(
            f"--lengths: each must exceed the plan's block size {block} (a prompt of one block is all "
            f"dense: nothing sparse to time), got {lengths!r}"
        )
    dev = device_or_fail(device)
    n_threads = _threads_or_fail(threads)
    # the model's positions from its config (no weights): lengths none of which fit are refused now
    context = _model_context(model)
    try:
        _, over = within_context(
            length_list or (bench.QUICK_LENGTHS if quick else bench.FULL_LENGTHS), context, "lengths"
        )
    except ValueError as exc:
        fail(f"{'--lengths' if lengths else '--quick' if quick else 'the default lengths'}: {exc}")
    if length_list and over:  # asked for by name: refused, as decode's are (the defaults' are noted)
        fail(
            f"--lengths: {', '.join(f'{x:,}' for x in over)} tokens exceed the model's {context:,} positions "
            f"(max_position_embeddings): give lengths <= {context:,}"
        )
    check_out(out)
    from sparse_core import ModelRefError

    try:
        result = _with_spinner(
            "prefill benchmark",
            bench.run,
            out,
            n_threads,
            model_ref=model,
            quick=quick,
            taus=tau_list,
            kernels=ks,
            device=dev,
            dtype=dtype,
            repeats=repeats or None,
            lengths=length_list,
        )
    except ModelRefError as exc:
        fail(str(exc))
    except ValueError as exc:  # no length fits the model's positions
        fail(f"{'--lengths' if lengths else '--quick' if quick else 'the default lengths'}: {exc}")
    path, png = _plot_path(result, out)
    env = result["environment"]
    over = result["lengths_over_context"]
    skipped = (
        f"; not timed: {', '.join(f'{x:,}' for x in over)} tokens (over the model's {result['context']:,} "
        "positions)"
        if over
        else ""
    )
    print_table(
        f"Prefill {result['model']} {dtype} ({result['text_source']}) on {_where(env, dev)}, best of "
        f"{result['repeats']}; {_host_line(env)}{skipped}; JSON: {path}, plot: {png}",
        result["rows"],
        bench.TABLE_COLUMNS,
    )
    _warned_and_written(result, out, json_out, bench.plot, result["rows"])


def _where(env: dict, dev: Any) -> str:
    return f"{env['gpu']} (CUDA {env['cuda_version']})" if dev.type == "cuda" else "the CPU"


def _state_db_table(title: str, result: dict, out: str, columns: list[str]) -> None:
    """A state-DB bench's rows (`bench import`, `bench monitor`: one per size, each with the host's load
    while it ran and whether that was an overload) under its title, the load average and where the JSON
    goes; the overload warning the other benchmarks print; then the JSON is written."""
    from sparsepilot.console import print_table

    load = " ".join(f"{x:g}" for x in result["loadavg"]) if result["loadavg"] else "not measured"
    print_table(f"{title} (SQLite, load {load}; JSON: {out})", result["results"], columns=columns)
    _state_db_warning(result)
    _write_json(result, out)


def _state_db_warning(result: dict, to_stderr: bool = False) -> None:
    """`bench import` / `bench monitor`: each size ran in its own process, so each row has its own flag;
    `to_stderr` with --json."""
    _overload_warning({}, result["results"], what=TIMES, to_stderr=to_stderr)


def side_file(out: str, suffix: str) -> Path:
    """Where a benchmark's progress log (`.log`) or plot (`.png`) goes: beside --out, named as --out with
    `suffix`, where --out is a regular file or none yet (a link is not followed); else in the home's logs
    folder, named after --out (`--out /dev/full`: logs/full.log), so that a device, a pipe or a link such
    as /dev/stdout never gets a file made beside it (/dev/full.log)."""
    import stat

    path = Path(out)
    try:
        beside = stat.S_ISREG(path.lstat().st_mode)
    except OSError:  # none yet: the benchmark makes it (a path it cannot make, check_out refuses)
        beside = True
    if beside:
        return path.with_suffix(suffix)
    from rollout.settings import get_settings

    return get_settings().home / "logs" / path.with_suffix(suffix).name


def check_out(out: str) -> None:
    """--out, checked before any work (a benchmark can run for hours): a file path whose directory
    exists or can be made and is writable, and whose PNG and .log (`side_file`) are not directories; else
    a one-line error and exit 2."""
    import os

    from sparsepilot.console import fail

    path = Path(out).absolute()
    for p in (path, side_file(out, ".png").absolute(), side_file(out, ".log").absolute()):
        if p.is_dir():
            fail(f"--out {out}: {p} is a directory; give a file path for the JSON")
        if p.exists() and not os.access(p, os.W_OK):
            fail(f"--out {out}: {p} is not writable")
    parent = path.parent
    while not parent.exists():  # the nearest existing folder: where the missing ones would be made
        parent = parent.parent
    if not parent.is_dir():
        fail(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {out}: cannot write in {parent}")


def _saved_and_emitted(result: dict, out: str, json_out: bool) -> bool:
    """With --json print the result JSON, then write it to ``out`` (the caller prints no table); True
    then. Without --json nothing yet: the caller prints its tables and then `_write_json`."""
    from sparsepilot.console import emit_json

    if json_out:
        emit_json(result)
        _write_json(result, out, printed=True)
    return json_out


def printed_to(out: str) -> Any:
    """sys.stdout or sys.stderr where --out is the very file it writes to (`--out /dev/stdout`, a link
    to this process's standard output, redirected to a file, a pipe or a terminal; or `--out r.json >
    r.json`), else None. Opened anew with truncation, such an --out wiped the tables printed there."""
    import os
    import sys

    try:
        target = os.stat(out)
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            if os.path.samestat(target, os.fstat(stream.fileno())):
                return stream
        except (OSError, ValueError, AttributeError):  # a stream with no file (captured, closed, None)
            continue
    return None


def _write_json(result: dict, out: str, printed: bool = False) -> Path:
    """Write the result JSON to ``out``; a write that fails (the disk full, the folder gone since the
    start) is a one-line error and exit 2, after the tables or the JSON were printed. Where ``out`` is
    what this command prints to (`printed_to`: `--out /dev/stdout`), the JSON follows the tables on
    that stream, truncating nothing, and with --json (``printed``: the JSON already printed to stdout)
    it is not printed twice."""
    import json
    import sys

    from sparsepilot.console import fail

    path = Path(out)
    stream = printed_to(out)
    try:
        if stream is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
        elif not (printed and stream is sys.stdout):
            stream.write(json.dumps(result, indent=2) + "\n")
            stream.flush()
    except OSError as exc:
        fail(f"--out {out}: the JSON could not be written ({exc.strerror or exc}); its results are above")
    return path


def _plot_path(result: dict, out: str) -> tuple[Path, Path]:
    """The JSON and PNG paths of a model benchmark, recorded in the result (``plot``) before the tables
    are printed, and the console widened for them; `_write_with_plot` writes both afterwards."""
    png = side_file(out, ".png")
    result["plot"] = str(png)
    _wide_console()
    return Path(out), png


def _write_with_plot(
    result: dict, out: str, plot: Callable[[dict, Path], Path], printed: bool = False
) -> None:
    """Draw the PNG next to ``out``, then write the result JSON (which names the PNG) to ``out``: after
    the tables are printed, so a write that fails loses no result (``printed``: `_write_json`'s)."""
    from sparsepilot.console import fail

    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        plot(result, Path(result["plot"]))
    except OSError as exc:
        fail(f"--out {out}: the plot could not be written ({exc.strerror or exc}); its results are above")
    _write_json(result, out, printed)


@app.command("decode")
def bench_decode(
    quick: Annotated[bool, _quick("Layer at 16k and SmolLM2 at 8k only (full: 16k/32k, 1k-8k).")] = False,
    model: ModelRef = "smollm2-135m",
    plan_dir: str = typer.Option(
        "",
        "--plan",
        help="A plan directory: its decode section is timed; without one, the --budgets rows score pages "
        "with the plan's learned weights (--estimator gate / gate_v2). Default: quest budgets.",
    ),
    estimator: str = typer.Option(
        "quest",
        "--estimator",
        help=f"{' or '.join(DECODE_ESTIMATORS)}, or several comma-separated (their budget rows side by "
        "side in one run; gate / gate_v2 read a --plan's weights; page_gate is trained here on text "
        "after the benchmark's window unless the --plan carries its weights).",
    ),
    page_size: int = typer.Option(16, "--page-size", help="Tokens per KV-cache page."),
    budgets: str = typer.Option("1024,2048", "--budgets", help="Comma-separated token budgets per KV head."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Generated tokens per run (>= 2)."),
    runs: int = typer.Option(
        3,
        "--runs",
        help="Paired dense/sparse runs per model row (>= 2): the speed-up interval is Student t over their "
        "log ratios with runs - 1 degrees of freedom.",
    ),
    lengths: str = typer.Option(
        "",
        "--lengths",
        help="Cache lengths of the model rows (prompt tokens before the --new-tokens), e.g. 2048,4096; "
        "each + --new-tokens must fit the model's positions (refused otherwise). Default by mode "
        "(quick 8192, full 1024-8192), those over the model's positions shortened to fit and said "
        "(SmolLM2's 8,192 positions: 8,128 + 64 new tokens).",
    ),
    threads: Threads = "auto",
    out: JsonPngOut = "bench-results/decode.json",
    json_out: Annotated[bool, _json_flag("Print the JSON after the tables.")] = False,
) -> None:
    """Sparse decode: one attention layer at 16k/32k cached tokens, and SmolLM2 end to end, dense vs
    sparse ms per generated token side by side, with density, estimator share and the fidelity of the
    generated tokens."""
    for_command("bench-decode", flows=False)  # model benchmarks: library output to a log file
    from sparse_core import ModelRefError, PlanError
    from sparse_core.bench import decode as bench
    from sparse_core.bench.common import fit_cache_lengths
    from sparsepilot.console import fail, print_table

    budget_list = _int_list("--budgets", budgets)
    names = tuple(dict.fromkeys(e.strip() for e in estimator.split(",") if e.strip()))
    if not names or any(e not in DECODE_ESTIMATORS for e in names):
        fail(f"--estimator: {estimator!r}; choose {' or '.join(DECODE_ESTIMATORS)} (comma-separated)")
    reads_plan = [e for e in names if DECODE_ESTIMATORS[e] is not None]
    if reads_plan and not plan_dir:
        fail(
            f"--estimator {','.join(reads_plan)} needs --plan: a calibrated plan directory that "
            "carries its weights"
        )
    if page_size < 1:
        fail(f"--page-size must be >= 1, got {page_size}")
    if new_tokens < 2:
        fail(f"--new-tokens must be >= 2, got {new_tokens}")
    if runs < 2:
        fail(f"--runs must be >= 2 (a speed-up interval needs two paired runs), got {runs}")
    length_list = _int_list("--lengths", lengths) if lengths else None
    n_threads = _threads_or_fail(threads)
    # the model's positions from its config (no weights): a cache + --new-tokens over them is refused now
    context = _model_context(model)
    try:
        fit_cache_lengths(
            length_list or (bench.QUICK_MODEL_LENGTHS if quick else bench.FULL_MODEL_LENGTHS),
            context,
            new_tokens,
            asked=bool(length_list),
            what="--lengths",
        )
    except ValueError as exc:
        fail(str(exc) if context and new_tokens < context else f"--new-tokens {new_tokens}: {exc}")
    check_out(out)
    plan = _plan_or_fail(plan_dir)
    _plan_fits_or_fail(plan, plan_dir, model)
    if plan is not None:
        learned = bool(reads_plan) or any(e in TRAINED_BY_DECODE_CALIBRATION for e in names)
        if plan.decode is None and not learned:  # a training-free scorer reads nothing of the plan
            fail(f"--plan {plan_dir}: the plan has no decode section (or give a learned --estimator)")
        if plan.decode is None and reads_plan and page_size != plan.block_size:
            fail(
                f"--page-size {page_size}: --estimator {','.join(reads_plan)} pools pages like the plan's "
                f"blocks; pass --page-size {plan.block_size}"
            )
    try:
        result = _with_spinner(
            "decode benchmark",
            bench.run,
            out,
            n_threads,
            quick=quick,
            model_ref=model,
            page_size=page_size,
            budgets=budget_list,
            estimator=names[0] if len(names) == 1 else names,
            plan=plan,
            new_tokens=new_tokens,
            runs=runs,
            lengths=length_list,
        )
    except (ModelRefError, PlanError, ValueError) as exc:
        fail(str(exc))
    path, png = _plot_path(result, out)
    env = result["environment"]
    print_table(
        f"Decode, one attention layer (9 q / 3 kv heads, d=64), {result['layer_estimator']} scoring "
        f"included; {_host_line(env)}",
        result["layer_rows"],
        bench.LAYER_COLUMNS,
    )
    print_table(
        f"Decode end to end, {result['model']}: ms per generated token (geometric mean of the runs' mean "
        f"step: dense_ms_per_token / ms_per_token is the speed-up), fidelity of {new_tokens} generated "
        f"tokens{_shortened_line(result['model_lengths'])}; speed-up: geometric mean of {runs} paired runs, "
        f'90% interval; dense arm: stock decode (DynamicCache), PagedCache in the "vs dense paged" rows; '
        f"JSON: {path}, plot: {png}",
        result["model_rows"],
        bench.MODEL_COLUMNS,
    )
    _warned_and_written(result, out, json_out, bench.plot, [*result["layer_rows"], *result["model_rows"]])


def _model_context(model: str) -> int | None:
    """The model's positions (max_position_embeddings) from its ref alone, a config file or a GGUF
    header, never its weights (`sparse_core.resolve_model_ref`); None where the ref does not say. A bad
    ref is an error line and exit 2 here, before any work."""
    from sparse_core import ModelRefError, resolve_model_ref
    from sparsepilot.console import fail

    try:
        return resolve_model_ref(model).context_length
    except ModelRefError as exc:
        fail(str(exc))


def _plan_fits_or_fail(plan: Any, plan_dir: str, model: str) -> None:
    """`--plan` checked against the model's config (its layers and heads, the model shape it was
    calibrated on) before the weights are loaded: transformers' AutoConfig reads config.json only.
    Nothing is checked here for a GGUF file or a built-in model not unpacked yet (the load checks it)."""
    from sparse_core import PlanError, resolve_model_ref
    from sparsepilot.console import fail

    if plan is None:
        return
    info = resolve_model_ref(model)  # resolved (and a bad ref refused) by `_model_context` already
    if info.kind == "gguf" or info.path is None or not (info.path / "config.json").is_file():
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(info.path)
    except (OSError, ValueError):  # the load says what is wrong with it
        return
    try:
        plan.validate_for(config)
    except PlanError as exc:
        fail(f"--plan {plan_dir}: {exc}")


def _shortened_line(lengths: dict) -> str:
    """`bench decode`'s words for default cache lengths shortened to fit the model's positions."""
    shortened = lengths.get("shortened") or {}
    if not shortened:
        return ""
    pairs = ", ".join(f"{int(k):,} -> {v:,}" for k, v in shortened.items())
    return (
        f"; default cache lengths shortened to fit the model's {lengths['context']:,} positions with "
        f"{lengths['new_tokens']} new tokens: {pairs}"
    )


def _plan_or_fail(plan_dir: str) -> Any:
    """The plan saved in `plan_dir` (None when no --plan was given), or exit 2 naming it."""
    if not plan_dir:
        return None
    from sparse_core import PlanError, plan_io
    from sparsepilot.console import fail

    try:
        return plan_io.load(plan_dir)
    except (PlanError, OSError) as exc:
        fail(f"--plan {plan_dir}: {exc}")


def _kernels_or_fail(kernels: str) -> tuple[str, ...]:
    """--kernels: comma-separated names of gather and flex, or exit 2 naming the option."""
    from sparsepilot.console import fail

    ks = tuple(x.strip() for x in kernels.split(",") if x.strip())
    if not ks or any(k not in ("gather", "flex") for k in ks):
        fail(f"--kernels: {kernels!r}; choose from gather, flex")
    return ks


def _int_list(option: str, text: str, *, least: int = 1) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1 with at least `least` entries, or exit 2 naming `option`."""
    from sparsepilot.console import fail

    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        fail(f"{option}: {text!r} is not a comma-separated list of integers")
    if len(values) < least or any(b < 1 for b in values):
        fail(f"{option}: give at least {least} integer(s), each >= 1, got {text!r}")
    return values


@app.command("decode-scorers")
def bench_decode_scorers(
    model: ModelRef = "smollm2-135m",
    scorers: str = typer.Option(
        "quest,page_gate",
        "--scorers",
        help=f"Comma-separated, of {', '.join(DECODE_ESTIMATORS)}; the first is the reference the others "
        "are paired against (page_gate is trained here on text after the prompts unless --plan carries it; "
        "gate / gate_v2 read --plan's weights).",
    ),
    budgets: str = typer.Option(
        "512,1024,2048", "--budgets", help="Comma-separated token budgets per KV head and layer (>= 2)."
    ),
    prompts: int = typer.Option(12, "--prompts", help="Prompts (the unit of every interval; >= 2)."),
    prompt_tokens: int | None = typer.Option(
        None,
        "--prompt-tokens",
        help="Tokens per prompt; + --new-tokens must fit the model's positions (refused otherwise). "
        "Default 8192, shortened to fit and said (SmolLM2's 8,192 positions: 8,160 + 32 new tokens).",
    ),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Generated tokens per prompt."),
    page_size: int = typer.Option(16, "--page-size", help="Tokens per KV-cache page."),
    plan_dir: str = typer.Option(
        "", "--plan", help="A plan directory whose learned weights the scorers read."
    ),
    threads: Threads = "auto",
    texts: str = typer.Option(
        "stdlib",
        "--texts",
        help="Where the prompts are cut from: 'stdlib' (the bundled corpus) or a FILE (.jsonl with text, "
        "or prompt [+ reference], e.g. a use case's dataset; or .txt).",
    ),
    out: JsonPngOut = "bench-results/decode_scorers.json",
    json_out: Annotated[bool, _json_flag("Print the JSON after the tables.")] = False,
) -> None:
    """Decode page scorers side by side at equal pages read, on many prompts: KL and agreement per
    scorer and budget with intervals over prompts, each scorer's KL paired against the first's (ratio,
    sign test), and the pages it needs for the first's KL. Fidelity only: nothing is timed."""
    for_command("bench-decode-scorers", flows=False)  # model benchmarks: library output to a log file
    from sparse_core import ModelRefError, PlanError
    from sparse_core.bench import decode_scorers as bench
    from sparse_core.bench.common import fit_cache_lengths
    from sparsepilot.console import fail, print_table

    names = [s.strip() for s in scorers.split(",") if s.strip()]
    unknown = [s for s in names if s not in DECODE_ESTIMATORS]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        fail(f"--scorers: give two or more distinct names of {', '.join(DECODE_ESTIMATORS)}, got {scorers!r}")
    budget_list = _int_list("--budgets", budgets, least=2)
    asked_tokens = 2 if prompt_tokens is None else prompt_tokens  # None: the default, fitted below
    _at_least(("--prompts", prompts, 2), ("--prompt-tokens", asked_tokens, 2))
    _at_least(("--new-tokens", new_tokens, 1), ("--page-size", page_size, 1))
    n_threads = _threads_or_fail(threads)
    # the model's positions from its config (no weights): a prompt + --new-tokens over them is refused now
    context = _model_context(model)
    try:
        fit_cache_lengths(
            (bench.DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens,),
            context,
            new_tokens,
            asked=prompt_tokens is not None,
            what="--prompt-tokens",
        )
    except ValueError as exc:
        fail(str(exc) if context and new_tokens < context else f"--new-tokens {new_tokens}: {exc}")
    check_out(out)
    needs_plan = [s for s in names if DECODE_ESTIMATORS[s] is not None]
    if needs_plan and not plan_dir:
        fail(f"--scorers {','.join(needs_plan)}: these read a plan's learned weights; give --plan")
    plan = _plan_or_fail(plan_dir)
    _plan_fits_or_fail(plan, plan_dir, model)
    if plan is not None:
        if needs_plan and page_size != plan.block_size:
            fail(
                f"--page-size {page_size}: --scorers {','.join(needs_plan)} pool pages like the plan's "
                f"blocks; pass --page-size {plan.block_size}"
            )
    from sparsepilot.commands.core import read_texts

    corpus = None if texts == "stdlib" else read_texts(texts)
    try:
        result = _with_spinner(
            "decode scorers benchmark",
            bench.run,
            out,
            n_threads,
            model_ref=model,
            scorers=names,
            budgets=budget_list,
            prompts=prompts,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            page_size=page_size,
            plan=plan,
            texts=corpus,
            texts_source="the bundled corpus" if corpus is None else texts,
        )
    except (ModelRefError, PlanError, ValueError) as exc:
        fail(str(exc))
    path, png = _plot_path(result, out)
    env = result["environment"]
    shortened = result["prompt_tokens_shortened"]
    print_table(
        f"{result['model']}: {result['prompts']} prompts of {result['prompt_tokens']} tokens"
        + (
            f" (the default {', '.join(shortened)} shortened to fit the model's positions with "
            f"{new_tokens} new tokens)"
            if shortened
            else ""
        )
        + f" from {result['texts']}, "
        f"{new_tokens} generated tokens each, pages of {page_size}; mean over prompts with 95% t intervals; "
        f"{_host_line(env)}",
        result["plan_rows"],
        bench.PLAN_COLUMNS,
    )
    print_table(
        f"against {result['reference']} at the same budget: KL ratio (geometric mean, t interval over "
        "prompts), prompts with lower / higher KL and the sign test's p, agreement difference, and "
        f"pages at equal KL (budget / the budget needed, bootstrap interval); JSON: {path}, plot: {png}",
        result["pair_rows"],
        bench.PAIR_COLUMNS,
    )
    _warned_and_written(result, out, json_out, bench.plot, what=TIMES)  # KL, agreement: only its times move


@contextmanager
def _progress_log(out: str, say_where: bool = False) -> Iterator[Callable[[str], None]]:
    """A writer of timestamped progress lines to the .log next to the JSON (`side_file`): the console's
    bar is transient and shows nothing when the output is piped, the log keeps every step of a long run.
    Its path is said on stderr with `say_where`, and always where it is not beside --out."""
    import time

    from sparsepilot.console import err_console

    path = side_file(out, ".log")
    if path != Path(out).with_suffix(".log"):
        where = f"{path} (--out {out} is not a regular file: nothing is written beside it)"
        err_console.print(f"progress log: {where}", highlight=False, soft_wrap=True)
    elif say_where:
        err_console.print(f"progress log: {path}", highlight=False, soft_wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:

        def write(msg: str) -> None:
            log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            log.flush()

        yield write


def _with_spinner(label: str, run: Callable[..., dict], out: str, threads: int | None, **kwargs: Any) -> dict:
    """``run(**kwargs, progress=...)`` with torch's threads set from `threads` (None: the CPUs the other
    processes leave free) under a transient spinner that shows its latest progress message, each message
    also a line of the progress log next to `out`. The result's environment records the thread choice."""
    with _spinner(label, out) as progress:
        policy = _apply_threads(threads, progress)
        result = run(**kwargs, progress=progress)
        _record_host(result, policy, progress)
        return result


@contextmanager
def _spinner(label: str, out: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner showing the latest progress message, each message also a timestamped line of
    the progress log next to `out`, between `label: started` and `label: done`."""
    from rich.progress import Progress

    with Progress(transient=True) as bar, _progress_log(out) as log:
        task = bar.add_task(label, total=None)
        log(f"{label}: started")

        def progress(msg: str) -> None:
            bar.update(task, description=msg)
            log(msg)

        yield progress
        log(f"{label}: done")


def _threads_or_fail(text: str) -> int | None:
    """--threads: None for auto, else a whole number >= 1; exit 2 naming the option otherwise."""
    from sparsepilot.console import fail

    if text.strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        fail(f"--threads: {text!r}; give auto or a whole number >= 1")
    return n


def _apply_threads(threads: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Set torch's threads (sparse_core.host.set_threads) and log what the host was doing then."""
    from sparse_core.host import set_threads

    policy = set_threads(threads)
    others = policy["others_busy_cores"]
    busy = "" if others is None else f", other processes using {others:.2f} cores"
    log(f"threads: {policy['threads']} ({_how_chosen(policy)}; {policy['cpus']:g} CPUs{busy})")
    return policy


def _how_chosen(policy: dict[str, Any]) -> str:
    """Why a run has its threads, from `set_threads`'s record: `auto`, `auto, capped by OMP_NUM_THREADS=1`
    (an explicit OMP_NUM_THREADS below what the free CPUs allowed), or the number asked for."""
    cap = policy.get("capped_by")
    return f"{policy.get('requested')}, capped by {cap}" if cap else str(policy.get("requested"))


def _record_host(result: dict, policy: dict[str, Any], log: Callable[[str], None]) -> None:
    """The thread choice into the result's environment, and the run's host load into the log."""
    env = result["environment"]
    env["thread_policy"] = policy
    log(f"host during the run: {_host_line(env)}")


def _host_line(env: dict) -> str:
    """Threads, why that many, and what the other processes did while the benchmark ran: the load part
    of every timing table's title."""
    policy, load = env.get("thread_policy") or {}, env.get("host_load") or {}
    threads, cpus = policy.get("threads", env["threads"]), load.get("cpus", env["cpu_count"])
    how = "auto" if policy.get("requested") == "auto" else "--threads"
    if policy.get("capped_by"):  # auto would have taken more: the user's OMP_NUM_THREADS is why not
        how += f", capped by {policy['capped_by']}"
    return (
        f"{threads} thread(s) ({how}) on {cpus:g} CPUs, {_others_line(load)}, "
        f"load {env['loadavg_before']} -> {env['loadavg_after']}"
    )


def _others_line(load: dict) -> str:
    """What the other processes did during a timing, from its HostLoad record."""
    if load.get("others_busy_cores") is None:
        return "other processes not measured"
    pressure = load.get("cpu_pressure")
    waited = "" if pressure is None else f", CPU pressure {pressure:.2f}"
    return f"other processes kept {load['others_busy_cores']:.2f} cores busy{waited}"


SPEED_UPS, TIMES = "speed-ups", "times"  # what a bench's figures are (`_overload_warning`'s `what`)


def _overload_warning(
    env: dict,
    rows: Sequence[dict] = (),
    *,
    what: str = SPEED_UPS,
    threads_option: bool = True,
    to_stderr: bool = False,
) -> None:
    """A warning line after the tables when the run's threads outnumbered the CPUs the others left, and
    one when only some of its `rows` (each with its own `overloaded`) were timed under overload. `what`
    the bench's figures are: SPEED_UPS (dense against sparse: a busy spell during either arm moves the
    ratio, so they are off in either direction, never a floor: keep-all plans read 1.44x and 1.20x, a 2.0x
    plan 2.8x) or TIMES (wall times, rows/s: only ever slower than the code). `threads_option`: the bench
    has --threads to advise. `to_stderr`: with --json, where stdout is the JSON."""
    from sparsepilot.console import err_console, say

    def warn(text: str) -> None:
        if to_stderr:
            err_console.print(text, style="yellow", highlight=False, markup=False, soft_wrap=True)
        else:
            say(text)

    load = env.get("host_load") or {}
    if load.get("overloaded"):
        others = load.get("others_busy_cores")
        busy = (
            f"kept {others:.2f} of {load['cpus']:g} CPUs busy on average"
            if others is not None
            else (f"held the load average at {(load.get('loadavg') or ['?'])[0]} on {load['cpus']:g} CPUs")
        )
        waited = load.get("wait_share")
        waiting = (
            "" if waited is None else f"; its threads waited {waited:.0%} of their runnable time for a CPU"
        )
        pinned = pinned_cpus(env)
        advice = (
            _pinned_advice(pinned, load["threads"], threads_option)
            if pinned
            else "rerun on a quieter host (it already ran one thread)"
            if load["threads"] <= 1
            else "rerun on a quieter host, or with --threads auto or 1 pinned to a free core (taskset)"
            if threads_option
            else "rerun on a quieter host"
        )
        effect = (
            "its times measure the host as much as the code, and its speed-ups may be off in either "
            "direction (a busy spell during a dense timing inflates a speed-up, one during a sparse timing "
            "deflates it)"
            if what == SPEED_UPS
            else "its times measure the host as much as the code, and come out longer than on a quiet host"
        )
        warn(
            f"warning: the host was overloaded during this run (other processes {busy} while it ran "
            f"{load['threads']} thread(s){waiting}): {effect}; {advice}."
        )
        return
    over = [r for r in rows if r.get("overloaded")]
    if over:
        warn(
            f"warning: {len(over)} of {len(rows)} rows were timed while the host was overloaded (their "
            f"`overloaded` column): their {what} measure the host as much as the code, so do not rank "
            "them against the others; rerun on a quieter host."
        )


def pinned_cpus(env: dict) -> list[int] | None:
    """The CPUs a run was pinned to (its environment's `affinity`, where fewer than the host's `cpu_count`:
    taskset, a cpuset); None where it could run on every CPU, or where the record does not say."""
    mask, total = env.get("affinity"), env.get("cpu_count")
    return list(mask) if mask and total and len(mask) < total else None


def _pinned_advice(cpus: list[int], threads: int, threads_option: bool) -> str:
    """The overload warning's advice to a run already pinned (`pinned_cpus`): pinning it "to a free core"
    is what it did; the core it had was busy, so another core, or the other process stopped."""
    one = len(cpus) == 1
    where = f"CPU {cpus[0]}" if one else f"CPUs {', '.join(map(str, cpus))}"
    it = "it" if one else "them"
    advice = (
        f"it was already pinned to {where} (taskset or a cpuset) and other processes kept {it} busy: pin "
        f"it to {'another core' if one else 'other cores'} they leave free (taskset -c), or stop the "
        f"process running on {it}"
    )
    if threads <= 1:
        return f"{advice} (it already ran one thread)"
    return f"{advice}; and rerun with --threads auto or 1 (it ran {threads})" if threads_option else advice


def _warned_and_written(
    result: dict,
    out: str,
    json_out: bool,
    plot: Callable[[dict, Path], Path],
    rows: Sequence[dict] = (),
    *,
    what: str = SPEED_UPS,
) -> None:
    """A model benchmark's end, after its tables: the overload warning (`_overload_warning` over the
    run's environment and its timed `rows`), the JSON printed with --json, then the PNG and the JSON
    written (`_write_with_plot`)."""
    from sparsepilot.console import emit_json

    _overload_warning(result["environment"], rows, what=what)
    if json_out:
        emit_json(result)
    _write_with_plot(result, out, plot, printed=json_out)


UNKNOWN_OVERLOADED = "unknown (host overloaded)"


def _verdicts(rows: list[dict]) -> list[dict]:
    """Timing rows for a table: a row with a target whose `within_target` is None (timed under overload
    and over the target: `rollout.bench_verdict.within_target`) reads UNKNOWN_OVERLOADED, not a blank."""
    return [
        r | {"within_target": UNKNOWN_OVERLOADED}
        if r.get("target_s") is not None and r.get("within_target") is None
        else r
        for r in rows
    ]


def _wide_console() -> None:
    """Benchmark tables have many numeric columns: do not squeeze them into 80 columns when the
    output is piped to a file."""
    from sparsepilot.console import console

    console.width = max(console.width, 160)


@app.command("gate")
def bench_gate(
    simulate: bool = typer.Option(
        False, "--simulate", help="Also simulate false GO, power and requests to GO over the scenario grid."
    ),
    replications: int = typer.Option(
        1000, "--replications", help="Simulated pilots per scenario (--simulate)."
    ),
    nogo: bool = typer.Option(
        False,
        "--nogo",
        help="Also simulate false NO-GO (the futility test, a crossing included) at -margin and at 0.",
    ),
    nogo_replications: int = typer.Option(
        4000, "--nogo-replications", help="Simulated pilots per scenario (--nogo)."
    ),
    excess: bool = typer.Option(
        False,
        "--excess",
        help="Also simulate the excess guardrail's false stop and power (full grid, ~5 min on one core).",
    ),
    repeats: int = typer.Option(
        3, "--repeats", min=1, help="Timed decide() calls per size (best and median kept)."
    ),
    rows: str = typer.Option(
        "10000,100000,1000000", "--rows", help="Comma-separated step sizes (rows) to time."
    ),
    out: JsonOut = "bench-results/gate.json",
    json_out: Annotated[bool, _json_flag("Print the JSON after the tables.")] = False,
) -> None:
    """Time the gate's decide() at 10k / 100k / 1M rows (target: 1M rows <= 1 s), print the guardrails'
    exact power and false-stop table and, with --simulate, measure the quality test's error rates by
    simulation, with --nogo its false NO-GO, with --excess the excess-over-control guardrail's (the tables
    in docs/gate.md)."""
    # library warnings to a log file (its path said unless --json), as the other benchmarks
    for_command("bench-gate", say_where=not json_out, flows=False)
    from rollout.gate.bench import excess_table, guardrail_table, nogo_table, simulation_table, time_decide
    from sparsepilot.console import fail, print_table

    _wide_console()
    _at_least(("--replications", replications, 1), ("--nogo-replications", nogo_replications, 1))
    check_out(out)
    try:
        sizes = tuple(int(x) for x in rows.split(",") if x.strip())
    except ValueError:
        fail(f"--rows: {rows!r} is not a comma-separated list of integers")
    if not sizes or min(sizes) < 4:
        fail("--rows: give at least one size of 4 rows or more")
    # each step a line of the .log next to the JSON (`tail -f`), the console's spinner or bar showing it
    with _progress_log(out, say_where=not json_out) as log:
        log("gate benchmark: started")
        with _spinner_in(log, "timing decide()") as progress:
            result: dict = {"decide": time_decide(sizes, repeats=repeats, progress=progress)}
        env = result["decide"]["environment"]
        log(f"host during the decide() timing: {_others_line(env['host_load'])}, {_load_line(env)}")
        print_table(
            f"decide() time; {_others_line(env['host_load'])}, {_load_line(env)} on {env['cpu_count']} CPUs",
            _verdicts(result["decide"]["rows"]),
            columns=[
                "mode",
                "rows",
                "best_s",
                "best_cpu_s",
                "median_s",
                "target_s",
                "within_target",
                "outcome",
                "others_busy_cores",
                "wait_share",
                "overloaded",
            ],
        )
        _overload_warning(env, result["decide"]["rows"], what=TIMES, threads_option=False)
        log("guardrail rate checks (exact)")
        result["guardrails"] = guardrail_table()
        print_table(
            "guardrail rate checks, exact (alpha 0.05): power by 200 rows at 1.5 / 2.5 / 4 x the ceiling c, "
            "false stop within 1,000 rows at c / 2 and c, rows for 95% at 2.5 c (this test; fewest for any "
            "test)",
            result["guardrails"],
        )
        if simulate:
            with _bar_in(log, "simulating pilots") as progress:
                result["simulation"] = simulation_table(replications=replications, progress=progress)
            sim = result["simulation"]
            log(f"simulated pilots: {_load_line(sim['environment'])}")
            print_table(
                f"simulated pilots ({replications} per scenario, 10 looks, alpha 0.05, margin 0.03); "
                f"{_load_line(sim['environment'])}",
                sim["rows"],
                columns=[c for c in sim["rows"][0] if c not in ("looks", "replications")],
            )
        if nogo:
            with _bar_in(log, "simulating false NO-GO") as progress:
                result["nogo"] = nogo_table(replications=nogo_replications, progress=progress)
            ng = result["nogo"]
            log(f"false NO-GO: {_load_line(ng['environment'])}")
            print_table(
                f"false NO-GO (futility, a crossing included; {nogo_replications} steps per scenario, 10 "
                f"looks, alpha 0.05, margin 0.03): NO-GO by look 1 / 5 / 10, upper 95% end by look 10; "
                f"{_load_line(ng['environment'])}",
                ng["rows"],
                columns=[c for c in ng["rows"][0] if c != "replications"],
            )
        if excess:
            with _bar_in(log, "simulating the excess guardrail") as progress:
                result["excess"] = excess_table(progress=progress)
            ex = result["excess"]
            log(f"excess guardrail: {_load_line(ex['environment'])}")
            print_table(
                f"error_rate_increase (ceiling 0.01), simulated: false stop by look 1 / 5 / 10; "
                f"{_load_line(ex['environment'])}",
                ex["false_stop"],
                columns=list(ex["false_stop"][0]),
            )
            print_table(
                "error_rate_increase: stopped by 200 / 1,000 treatment rows at 2.5x and 4x the ceiling",
                ex["power"],
                columns=list(ex["power"][0]),
            )
        log("gate benchmark: done")
    _saved_and_emitted(result, out, json_out)
    if not json_out:
        _write_json(result, out)


def _load_line(env: dict) -> str:
    return f"load {env['loadavg_before']} -> {env['loadavg_after']}"


@contextmanager
def _spinner_in(log: Callable[[str], None], label: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner under `label` showing the latest progress message, each message also a line
    of `log`: `_spinner` for a command that keeps its progress log open across several steps."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=None)

        def progress(msg: str) -> None:
            bar.update(task, description=msg)
            log(msg)

        yield progress


@contextmanager
def _bar_in(log: Callable[[str], None], label: str) -> Iterator[Callable[[int, int], None]]:
    """A `(done, total)` progress callback: a transient bar under `label` on the console and a line of
    `log` per step (a simulation's scenarios take seconds to minutes each)."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            log(f"{label} {done}/{total}")

        yield progress
