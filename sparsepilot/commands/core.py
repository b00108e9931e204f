"""`sparsepilot calibrate` and `sparsepilot evaluate`, one command each with two forms: with a use-case
NAME they run the pipeline's flow (sparsepilot/commands/pipeline.py: validate, calibrate or evaluate,
register in MLflow); with `--model ...` and no NAME they are sparse_core's standalone commands, outside
any use case (plan directory and report files only).

Heavy imports (torch, transformers) happen inside the commands so `sparsepilot --help` stays fast."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from sparse_core.estimators import available_estimators
from sparsepilot.console import console, emit_json, err_console, fail, print_table
from sparsepilot.options import DeviceOpt, SharpenOpt, device_or_fail, sharpen_option

app = typer.Typer()

UseCaseName = Annotated[str | None, typer.Argument(help="use case NAME (omit for the --model form)")]
ModelRef = Annotated[str | None, typer.Option("--model", help="smollm2-135m, a local HF dir or a .gguf file")]
TaskName = Annotated[str | None, typer.Option("--task", help="exact_match|contains|rouge_l|loglik")]
ReportJson = Annotated[bool, typer.Option("--json", help="print the report as JSON")]


def _use_case_form(use_case: str | None, standalone: dict[str, Any]) -> bool:
    """True for the use-case form (a NAME); False for the standalone form, whose required options
    (``standalone``: option name -> value) must then all be given. Mixing the two forms fails."""
    if use_case is not None:
        given = [opt for opt, value in standalone.items() if value is not None]
        if given:
            fail(f"give either a use case NAME or {given[0]}, not both")
        return True
    missing = [opt for opt, value in standalone.items() if value is None]
    if missing:
        fail(f"give a use case NAME, or {' '.join(missing)} for the standalone form")
    return False


def _given(**options: Any) -> dict[str, Any]:
    """The keyword arguments whose value was given (not None)."""
    return {k: v for k, v in options.items() if v is not None}


def _refuse_standalone_only(options: dict[str, tuple[bool, str]]) -> None:
    """The use-case form: an option only the standalone form reads (``options``: option -> (given a
    value other than its default, what the use case uses instead)) is refused by name, never silently
    ignored (a `--device cuda` that calibrated on the CPU, a `--budget` the spec's budget replaced)."""
    for opt, (given, instead) in options.items():
        if given:
            fail(f"{opt} applies to the standalone form only; {instead}")


_FROM_SPEC = "the use case's {} is its spec's {} (`sparsepilot usecase show NAME`)"
_DEVICE_ENV = (
    "the use case's flows load the model where SPARSEPILOT_DEVICE says (auto|cpu|cuda; auto by default)"
)


def read_texts(path: str) -> list[str]:
    """Calibration texts: `stdlib` (the bundled corpus), a .jsonl file (field text, or prompt [+
    reference]) or a plain text file (paragraphs, grouped into texts of ~4000 characters)."""
    if path == "stdlib":
        from sparse_core.corpus import corpus_texts

        return corpus_texts("all")
    p = Path(path)
    if not p.is_file():
        fail(f"texts file not found: {p}")
    texts: list[str] = []
    if p.suffix == ".jsonl":
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                fail(f"{p}:{lineno}: not valid JSON ({exc.msg})")
            if not isinstance(obj, dict):
                fail(f"{p}:{lineno}: expected a JSON object")
            text = obj.get("text")
            if text is None and isinstance(obj.get("prompt"), str):
                text = obj["prompt"] + (
                    " " + obj["reference"] if isinstance(obj.get("reference"), str) else ""
                )
            if not isinstance(text, str) or not text.strip():
                fail(f"{p}:{lineno}: needs a non-empty string field 'text' (or 'prompt')")
            texts.append(text)
    else:
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            fail(f"{p}: not UTF-8 text")
        cur = ""
        for para in raw.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= 4000:
                texts.append(cur)
                cur = ""
        if cur.strip():
            texts.append(cur)
    if len(texts) < 2:
        fail(f"{p}: at least 2 texts are needed (one part is held out), found {len(texts)}")
    return texts


class ProgressLines:
    """Which progress steps of a standalone command get a line (`stage: done/total at N s`): a stage's
    first step, each further tenth of it and its end (`... done at N s`), so a stage of minutes shows
    where it is in a pipe and in the log file without a line per step. A stage that starts again (its
    count goes back) is a new run of it."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.t0 = self._clock()
        self._seen: dict[str, tuple[int, int]] = {}  # stage -> (last done, last tenth shown)

    def __call__(self, stage: str, done: int, total: int) -> str | None:
        tenth = 10 if total <= 0 or done >= total else done * 10 // total
        last = self._seen.get(stage)
        if last is not None and done >= last[0] and tenth <= last[1]:
            self._seen[stage] = (done, last[1])
            return None
        self._seen[stage] = (done, tenth)
        end = " done" if done >= total else ""
        return f"{stage}: {done}/{total}{end} at {self._clock() - self.t0:.0f} s"


@contextmanager
def _progress():
    """The standalone calibrate / evaluate progress: a live bar per stage in a terminal, else a line on
    stderr for each step `ProgressLines` picks; those lines go to the command's log file either way
    (`sparsepilot.quiet.progress_logger`), so `tail -f` on it follows a long run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sparsepilot.quiet import progress_logger

    log, lines = progress_logger(), ProgressLines()
    tasks: dict[str, Any] = {}
    if not err_console.is_terminal:  # logs/CI: a line a tenth of a stage instead of a live bar

        def line(stage: str, done: int, total: int) -> None:
            text = lines(stage, done, total)
            if text is not None:
                err_console.print(text, highlight=False, soft_wrap=True)
                log.info(text)

        yield line
        return
    with Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=max(total, done))
            text = lines(stage, done, total)
            if text is not None:
                log.info(text)

        yield update


def _load(model_ref: str, device: Any = None):
    from sparse_core import ModelRefError, load_model

    try:
        return load_model(model_ref, device=device)
    except ModelRefError as exc:
        fail(str(exc))


_REPORT_FILE = "calibration_report.json"


def _check_plan_out(out: Path) -> Path:
    """`calibrate --out`, checked before any work and again just before the plan replaces it: a new
    or empty directory, or a plan directory an earlier calibrate wrote (only the files one holds:
    `sparse_core.plan.PLAN_DIR_FILES` and calibration_report.json), since the old one is deleted
    when the new plan takes its place. Anything else (a project folder, `.`, a home directory) is
    refused by name, never emptied; so are the current directory and the directories above it."""
    from sparse_core.plan import PLAN_DIR_FILES

    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        fail(f"--out {out}: is the current directory or one above it; name a new plan directory")
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        fail(f"--out {out}: exists and is not a directory")
    foreign = sorted(p.name for p in resolved.iterdir() if p.name not in {*PLAN_DIR_FILES, _REPORT_FILE})
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        fail(
            f"--out {out}: exists and is not a plan directory (it holds {', '.join(foreign[:3])}{more}); "
            "name a new or empty directory, or one an earlier calibrate wrote (it is replaced)"
        )
    return resolved


def _write_plan_dir(plan, out: Path, config, report: dict) -> str:
    """Everything goes to a temporary sibling first; `out` is replaced only when all is written, and
    only when it still is a plan directory (`_check_plan_out`)."""
    from sparse_core import plan_io

    out = _check_plan_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _, digest = plan_io.save(plan, tmp, config=config)
        report["plan_hash"] = digest
        (tmp / _REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        if out.exists():  # a plan directory (checked above): moved aside, never deleted before the swap
            old = tmp.with_name(f"{tmp.name}.old")  # beside tmp's unique name: nobody else's path
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


_DEFAULT_BUDGET = "kl=0.01,agree=0.99"
_DEFAULT_ESTIMATOR = "gate"


@app.command("calibrate")
def calibrate_cmd(
    use_case: UseCaseName = None,
    model: ModelRef = None,
    texts: Annotated[
        str | None,
        typer.Option(
            "--texts", help="texts FILE (.jsonl/.txt), 'stdlib', or 'dataset' (--dataset's prompts)"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="plan directory to write")] = None,
    budget: Annotated[
        str, typer.Option("--budget", help="kl=0.01[,agree=0.99][,nll=0.01][,task=0.02 (needs --dataset)]")
    ] = _DEFAULT_BUDGET,
    estimator: Annotated[
        str,
        typer.Option("--estimator", help=f"{' | '.join(available_estimators())}; a+b: per-layer choice"),
    ] = _DEFAULT_ESTIMATOR,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_texts: Annotated[int | None, typer.Option("--max-texts", help="token windows in total")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="tokens per window")] = None,
    gate_steps: Annotated[int | None, typer.Option("--gate-steps")] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option("--checkpoint-dir", help="resumable gate-training checkpoints")
    ] = None,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", help="soft cap on the search")] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            "--confidence",
            help="judge the budget on one-sided bounds at this confidence (e.g. 0.95), not the means",
        ),
    ] = None,
    bound_unit: Annotated[
        str | None,
        typer.Option(
            "--bound-unit",
            help="with --confidence, the bound's unit: block (256 scored positions, default) | window "
            "(a held-out window: needs more of them, e.g. 11 at 0.95)",
        ),
    ] = None,
    drop_measure: Annotated[
        str | None,
        typer.Option(
            "--drop-measure",
            help="what the allocation bounds per head: mass (default) | output (attention output error)",
        ),
    ] = None,
    sensitivity_windows: Annotated[
        int | None,
        typer.Option(
            "--sensitivity-windows",
            min=0,
            help="with a learned estimator: the last N calibration windows are kept apart from its "
            "training and every candidate's sensitivities come from them (default 0: all windows)",
        ),
    ] = None,
    sharpen: SharpenOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="cheap settings (few short windows)")] = False,
    device: DeviceOpt = "auto",
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="JSONL prompt/reference rows for the task bound")
    ] = None,
    task: TaskName = None,
    json_out: ReportJson = False,
) -> None:
    """Use-case form (NAME): validate the dataset, calibrate to the spec's budget, register @challenger.

    Standalone form (--model --texts --out, no NAME): calibrate a sparse plan to a quality budget on
    your texts; writes PLAN/ (plan.json, gate weights, plan.sha256, calibration_report.json). With
    --dataset the budget may bound the task score (task=...): measured on the calibration split of
    the rows, then reported on the held-out split."""
    from sparsepilot.quiet import for_command

    for_command("calibrate", say_where=not json_out)
    if _use_case_form(use_case, {"--model": model, "--texts": texts, "--out": out}):
        settings = _FROM_SPEC.format("calibration settings", "quality_budget.calibration")
        _refuse_standalone_only({
            "--budget": (budget != _DEFAULT_BUDGET, _FROM_SPEC.format("budget", "quality_budget")),
            "--estimator": (
                estimator != _DEFAULT_ESTIMATOR, _FROM_SPEC.format("estimator", "quality_budget.estimator")
            ),
            "--seed": (seed != 0, _FROM_SPEC.format("seed", "quality_budget.calibration.seed")),
            **{opt: (value is not None, settings) for opt, value in (
                ("--max-texts", max_texts), ("--seq-len", seq_len), ("--gate-steps", gate_steps),
                ("--checkpoint-dir", checkpoint_dir), ("--max-seconds", max_seconds),
                ("--confidence", confidence), ("--bound-unit", bound_unit), ("--drop-measure", drop_measure),
                ("--sensitivity-windows", sensitivity_windows), ("--sharpen", sharpen))},
            "--dataset": (dataset is not None, _FROM_SPEC.format("dataset", "dataset.path")),
            "--task": (task is not None, _FROM_SPEC.format("task", "dataset.task")),
            "--device": (device != "auto", _DEVICE_ENV),
        })  # fmt: skip
        from sparsepilot.commands.pipeline import run_use_case_form

        run_use_case_form("calibrate", use_case, quick, json_out)
        return
    from sparse_core import PlanError
    from sparse_core.calibration import Budget, BudgetError, CalibrationLimits

    try:
        b = Budget.parse(budget)
    except BudgetError as exc:
        fail(f"--budget: {exc}")
    from sparse_core.estimators import parse_estimator_spec

    try:
        parse_estimator_spec(estimator)
    except PlanError as exc:
        fail(f"--estimator: {exc}")
    kw = _given(
        max_texts=max_texts,
        max_seq_len=seq_len,
        gate_steps=gate_steps,
        gate_checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
        max_seconds=max_seconds,
        confidence=confidence,
        drop_measure=drop_measure,
        bound_unit=bound_unit,
        sensitivity_windows=sensitivity_windows,
        sharpen=None if sharpen is None else sharpen_option(sharpen),
    )
    if bound_unit is not None and confidence is None:
        fail("--bound-unit: needs --confidence (the bound it is the unit of)")
    try:
        limits = CalibrationLimits.quick(**kw) if quick else CalibrationLimits(**kw)
    except ValueError as exc:
        flag = next((f for f in ("drop_measure", "bound_unit") if f in str(exc)), None)
        fail(f"--{flag.replace('_', '-')}: {exc}" if flag else str(exc))
    _check_plan_out(out)  # before minutes of work, as the options above
    rows: list = []
    if dataset is not None:
        from sparse_core.tasks import TASKS, DatasetError, read_dataset

        if task is not None and task not in TASKS:
            fail(f"--task: {task!r}; choose one of {', '.join(TASKS)}")
        try:
            rows = read_dataset(dataset, default_task=task)
        except DatasetError as exc:
            fail(str(exc))
    elif b.task_delta is not None or texts == "dataset":
        fail("--budget task=... and --texts dataset need --dataset FILE")
    corpus = [r.prompt for r in rows] if texts == "dataset" else read_texts(texts)
    cal_rows, held_rows = _split_rows(rows, limits.holdout_fraction, seed) if rows else ([], [])
    m, tok = _load(model, device_or_fail(device))
    if limits.max_seq_len > int(getattr(m.config, "max_position_embeddings", limits.max_seq_len)):
        fail(
            f"--seq-len {limits.max_seq_len} exceeds the model's context ({m.config.max_position_embeddings})"
        )
    from sparse_core.calibration import calibrate

    try:
        with _progress() as progress:
            plan, report = calibrate(
                m,
                tok,
                corpus,
                b,
                estimator=estimator,
                seed=seed,
                limits=limits,
                progress=progress,
                task_rows=cal_rows or None,
                task=task,
            )
            if report.task is not None and held_rows:
                report.task.update(
                    _heldout_task_delta(m, tok, plan, held_rows[: limits.max_task_rows], task, limits)
                )
                plan.metadata["task"] = report.task
    except (PlanError, ValueError) as exc:
        fail(str(exc))
    rep = report.to_dict()
    rep["model_ref"] = model
    rep["device"] = str(next(m.parameters()).device)
    digest = _write_plan_dir(plan, out, m.config, rep)
    if json_out:
        emit_json(rep)
        return
    fid = report.fidelity
    print_table(
        "Calibration",
        [
            {
                "estimator": estimator,
                "budget": budget,
                "met": report.met_budget,
                "density": report.density,
                "held-out density": report.measured_density,
                "kl": fid["kl"],
                "agree": fid["agree"],
                "nll_delta": fid["nll_delta"],
                "dense layers": len(report.dense_layers),
                "seconds": report.seconds.get("total"),
            }
        ],
    )
    if "agree_lower" in fid:  # --confidence: what the budget was judged on, beside the means above
        console.print(
            f"judged on {100 * fid['confidence']:g}% bounds over {fid['bound_units']} "
            f"{fid.get('bound_unit', 'block')}s (each step at {fid['step_confidence']:.4g}): "
            f"agree >= {fid['agree_lower']:.4f}, kl <= {fid['kl_upper']:.4g}, "
            f"nll_delta <= {fid['nll_delta_upper']:.4g}"
        )
    t = report.task or {}
    if t and not t.get("certifiable", True):
        need = t.get("rows_needed")
        console.print(
            f"task bound {t['bound']} cannot be certified from {t['n_rows']} task rows (a valid 95% bound "
            f"needs {need or 'more than 100,000'} even when no row drops): the plan stays dense"
        )
    console.print(f"plan written to [bold]{out}[/] (hash {digest[:12]})")


def _split_rows(rows: list, holdout_fraction: float, seed: int) -> tuple[list, list]:
    """The dataset's calibration / held-out rows, by the same split calibration applies to prompts."""
    from sparse_core.calibration import split_texts

    _, held = split_texts([r.prompt for r in rows], holdout_fraction, seed)
    held_set = set(held)
    return [r for r in rows if r.prompt not in held_set], [r for r in rows if r.prompt in held_set]


def _heldout_task_delta(model, tok, plan, rows: list, task: str | None, limits) -> dict[str, Any]:
    """The plan's task-score drop (dense - sparse mean) on held-out rows calibration never saw."""
    from sparse_core import sparsified
    from sparse_core.calibration import task_scores

    dense, _ = task_scores(model, tok, rows, task, limits, dense=True)
    with sparsified(model, plan):
        sparse, failed = task_scores(model, tok, rows, task, limits, dense=False)
    return {
        "heldout_rows": len(rows),
        "heldout_dense_score": sum(dense) / len(rows),
        "heldout_task_delta": (sum(dense) - sum(sparse)) / len(rows),
        "heldout_failed_rows": failed,
    }


@app.command("evaluate")
def evaluate_cmd(
    use_case: UseCaseName = None,
    model: ModelRef = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="plan directory (or plan.json)")] = None,
    dataset: Annotated[Path | None, typer.Option("--dataset", help="JSONL with prompt/reference")] = None,
    task: TaskName = None,
    probe_lengths: Annotated[str | None, typer.Option("--probe-lengths", help="e.g. 2048,4096,8192")] = None,
    probe_kinds: Annotated[
        str | None, typer.Option("--probe-kinds", help="passkey,multikey,kv,vartrack (default: all)")
    ] = None,
    probe_depths: Annotated[str | None, typer.Option("--probe-depths", help="e.g. 0.1,0.5,0.9")] = None,
    speed_lengths: Annotated[
        str | None, typer.Option("--speed-lengths", help="e.g. 4096,8192; 0 = off")
    ] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", help="timing repeats per length")] = None,
    pictures: Annotated[Path | None, typer.Option("--pictures", help="directory for PNG pictures")] = None,
    report_out: Annotated[Path | None, typer.Option("--out", help="write the report JSON here")] = None,
    quick: Annotated[bool, typer.Option("--quick")] = False,
    thorough: Annotated[bool, typer.Option("--thorough")] = False,
    device: DeviceOpt = "auto",
    json_out: ReportJson = False,
) -> None:
    """Use-case form (NAME): quality and speed vs dense on the use case's data, ROI with its interval.

    Standalone form (--model --plan, no NAME): evaluate a plan against the dense model: fidelity,
    probes, task scores, speed."""
    from sparsepilot.quiet import for_command

    for_command("evaluate", say_where=not json_out)
    if quick and thorough:  # in both forms: the use-case form's evaluation is --quick or the spec's
        fail("--quick and --thorough exclude each other")
    if _use_case_form(use_case, {"--model": model, "--plan": plan}):
        suite = "the use case evaluates on its spec's dataset and traffic (--quick: the cheap settings)"
        _refuse_standalone_only({
            **{opt: (value is not None, suite) for opt, value in (
                ("--dataset", dataset), ("--task", task), ("--probe-lengths", probe_lengths),
                ("--probe-kinds", probe_kinds), ("--probe-depths", probe_depths),
                ("--speed-lengths", speed_lengths), ("--repeats", repeats), ("--pictures", pictures),
                ("--out", report_out))},
            "--thorough": (thorough, suite),
            "--device": (device != "auto", _DEVICE_ENV),
        })  # fmt: skip
        from sparsepilot.commands.pipeline import run_use_case_form

        run_use_case_form("evaluate", use_case, quick, json_out)
        return
    from sparse_core import PlanError, plan_io
    from sparse_core.evaluation import EvalSuite, evaluate, suite_probes
    from sparse_core.tasks import TASKS, DatasetError, read_dataset

    if task is not None and task not in TASKS:
        fail(f"--task: {task!r} is not one of {list(TASKS)}")
    kw: dict[str, Any] = _given(
        speed_repeats=repeats, pictures_dir=str(pictures) if pictures is not None else None
    )
    try:
        if probe_lengths is not None:
            kw["probe_lengths"] = tuple(int(x) for x in probe_lengths.split(",") if x.strip() and int(x) > 0)
        if speed_lengths is not None:
            kw["speed_lengths"] = tuple(int(x) for x in speed_lengths.split(",") if x.strip() and int(x) > 0)
        if probe_depths is not None:
            kw["probe_depths"] = tuple(float(x) for x in probe_depths.split(",") if x.strip())
    except ValueError:
        fail("--probe-lengths, --speed-lengths and --probe-depths take comma-separated numbers")
    if probe_kinds is not None:
        from sparse_core.probes import PROBE_KINDS

        kinds = tuple(x.strip() for x in probe_kinds.split(",") if x.strip())
        bad = [k for k in kinds if k not in PROBE_KINDS]
        if bad:
            fail(f"--probe-kinds: unknown {bad}; choose from {list(PROBE_KINDS)}")
        kw["probe_kinds"] = kinds
    if dataset is not None:
        try:
            kw["dataset_rows"] = read_dataset(dataset, default_task=task)
        except DatasetError as exc:
            fail(str(exc))
        kw["dataset"] = str(dataset)
    kw["task"] = task
    suite = EvalSuite.quick(**kw) if quick else EvalSuite.thorough(**kw) if thorough else EvalSuite(**kw)
    if report_out is not None:
        _check_report_out(report_out)
    m, tok = _load(model, device_or_fail(device))
    try:
        p = plan_io.load(plan, config=m.config)
    except PlanError as exc:
        fail(str(exc))
    try:  # the probes need the tokenizer: built once here, before minutes of fidelity work
        suite_probes(m, tok, suite)
    except ValueError as exc:
        fail(f"--probe-lengths: {exc}; give longer lengths, or leave that kind out with --probe-kinds")
    try:
        with _progress() as progress:
            report = evaluate(m, tok, p, suite, progress=progress)
    except (PlanError, ValueError) as exc:
        fail(str(exc))
    d = report.to_dict()
    if report_out is not None:
        _write_report(report_out, d)
    if json_out:
        emit_json(d)
        return
    _print_report(report)


def _check_report_out(out: Path) -> None:
    """`evaluate --out`, checked before any work: a file (new or replaced) whose folder exists or can
    be made, never a directory (the report would be written after the whole evaluation, then fail)."""
    if out.is_dir():
        fail(f"--out {out}: is a directory; name the report's JSON file")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"--out {out}: {parent} is not a directory")


def _write_report(out: Path, report: dict) -> None:
    """The report JSON, all or nothing: written to a temporary file beside ``out``, renamed into place,
    the temporary file removed when that fails."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        fail(f"--out {out}: cannot write it ({exc.strerror or exc})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _time_split_cells(split: dict | None) -> dict:
    """The speed table's columns from a row's time split (sparse_core.time_split); none for a report
    written before it was measured, a blank where the timings' noise left a part unknown."""
    if not split:
        return {}
    return {
        "attn_share": split["attention_share"],
        "attn_x": split["attention_speedup"],
        "ideal_x": split["ideal_speedup"],
    }


def pairs_overloaded(host: dict | None) -> str | None:
    """A prefill speed row's `overloaded` cell from its pairs' host record (`SpeedRow.host`): "2 of 3
    pairs" kept under overload, "no" where none was; None (shown "-") in a report written without it."""
    if not host:
        return None
    kept = int(host.get("pairs_kept_under_overload") or 0)
    return f"{kept} of {host.get('pairs_timed')} pairs" if kept else "no"


def _timing_overload(r) -> str | None:
    """The warning the report's speed figures carry when pairs were kept under overload: the prefill
    pairs' and the decode runs' host records, judged as the use-case form's ROI is
    (`rollout.roi.timing_overload`)."""
    from rollout.roi import timing_overload

    dec = (r.decode or {}).get("summary") or {}
    host = {"prefill": (r.speed_summary or {}).get("host"), "decode": dec.get("host")}
    return timing_overload(
        host | {"break_even": dec.get("break_even_host"), "decode_context": dec.get("context_tokens")}
    )


def _decode_note(row: dict) -> str:
    """A decode row's note: why it ran dense, and how many of its pairs a busy host timed."""
    extra = row.get("extra") or {}
    notes = []
    if extra.get("below_break_even"):
        notes.append(f"below break-even ({extra.get('break_even_tokens'):,} tokens): dense")
    elif extra.get("identical") and extra.get("decode_section"):
        notes.append("every layer dense")
    host = extra.get("host") or {}
    if host.get("pairs_kept_under_overload"):
        notes.append(f"{host['pairs_kept_under_overload']} of {host.get('pairs_timed')} pairs under overload")
    return "; ".join(notes)


def _print_decode(decode: dict, generated: dict | None) -> None:
    """The report's decode section: per context length ms per generated token dense vs sparse, the
    speed-up with its interval, the share of the cache the sparse steps read, KL and agreement of the
    generated tokens; then the length-mix figures and the probes answered by generation. A plan without
    a decode section was timed dense in both arms (what output tokens cost): said in one line."""
    s = decode.get("summary") or {}
    rows = decode.get("rows") or []
    if not s.get("sparse_decode"):
        each = ", ".join(f"{r['dense_ms_per_token']:.4g} at {r['seq_len']:,} tokens" for r in rows)
        console.print(
            f"decode: dense in both arms (no decode section in the plan); ms per generated token: {each}"
        )
        return
    print_table(
        "Decode speed (ms per generated token, medians; speed-up: geometric mean of the runs, "
        "90% t interval)",
        [
            {
                "seq_len": r["seq_len"],
                "weight": r["weight"],
                "dense_ms": r["dense_ms_per_token"],
                "sparse_ms": r["sparse_ms_per_token"],
                "speedup": r["speedup"],
                "interval": f"{r['speedup_interval'][0]:.2f}-{r['speedup_interval'][1]:.2f}",
                "cache_read": r["density"],
                "kl": r["kl"],
                "top1_agree": r["agree"],
                "note": _decode_note(r),
            }
            for r in rows
        ],
    )
    line = (
        f"decode length-mix weighted speed-up: {s['weighted_speedup']:.3f} "
        f"[{s['weighted_speedup_low']:.3f}, {s['weighted_speedup_high']:.3f}] at {s['density']:.1%} of the "
        f"cache read; kl {s['kl']:.4g}, top1_agree {s['agree']:.4f} over {s['new_tokens']} generated tokens"
    )
    if s.get("rows_below_break_even"):
        line += (
            f"; {s['rows_below_break_even']} of {len(rows)} lengths below the break-even "
            f"({s['break_even_tokens']:,} tokens) ran dense"
        )
    console.print(line)
    if s["weighted_speedup_high"] < 1.0:
        console.print(
            "decode is slower than dense at this length mix: output tokens cost more", style="yellow"
        )
    if generated:
        console.print(
            f"probes answered by generation: dense {generated['dense_accuracy']:.4f}, sparse "
            f"{generated['sparse_accuracy']:.4f} ({generated['n']} probes)"
        )


def _print_report(r) -> None:
    from dashboard.fmt import quality_interval as quality_bounds  # the dashboard's wording of them

    console.print(f"plan {r.plan_hash[:12]}  estimator {r.estimator}  device {r.device}")
    if r.fidelity:
        f = r.fidelity
        print_table(
            "Fidelity vs dense (held-out natural text)",
            [
                {
                    "kl": f["kl"],
                    "top1_agree": f["agree"],
                    "nll_dense": f["nll_dense"],
                    "nll_delta": f["nll_delta"],
                    "density": r.density,
                    "max layer err": max(r.layer_errors) if r.layer_errors else None,
                }
            ],
        )
        windows = f.get("windows") or []
        text = f"{len(windows)} window(s) of {', '.join(map(str, windows))} tokens" if windows else ""
        bounds = [f.get("agree_lower"), f.get("kl_upper")]
        if all(b is not None and math.isfinite(b) for b in bounds):  # too few blocks bound nothing: +-inf
            console.print(
                f"{text}; one-sided 95% bounds over {f['bound_units']} blocks: top1_agree >= "
                f"{f['agree_lower']:.4f}, kl <= {f['kl_upper']:.4g}"
            )
        elif text:
            units = f" ({f['bound_units']})" if f.get("bound_units") is not None else ""
            console.print(f"{text}: too few blocks of scored positions{units} for a 95% bound on the means")
    if r.probes:
        rows = []
        for key, acc in r.probes["dense"]["by_kind_length"].items():
            rows.append({"probe": key, "dense": acc, "sparse": r.probes["sparse"]["by_kind_length"].get(key)})
        rows.append(
            {"probe": "all", "dense": r.probes["dense"]["accuracy"], "sparse": r.probes["sparse"]["accuracy"]}
        )
        print_table("Long-context probes (accuracy, log-likelihood rank)", rows)
    if r.tasks:
        print_table(
            "Use-case task",
            [
                {
                    "task": r.tasks["dense"]["task"],
                    "rows": r.tasks["n_rows"],
                    "dense": r.tasks["dense"]["mean_quality"],
                    "sparse": r.tasks["sparse"]["mean_quality"],
                    "delta": r.tasks["quality_delta"],
                    "95% bounds": quality_bounds(r.tasks.get("quality_low"), r.tasks.get("quality_high")),
                }
            ],
        )
    if r.speed:
        print_table(
            "Prefill speed (medians of the repeats; speed-up: geometric mean of the pairs, 90% t interval)",
            [
                {
                    "seq_len": s.seq_len,
                    "weight": s.weight,
                    "dense_s": statistics.median(s.dense_seconds),
                    "sparse_s": statistics.median(s.sparse_seconds),
                    "speedup": s.speedup,
                    "interval": f"{s.speedup_interval[0]:.2f}-{s.speedup_interval[1]:.2f}",
                    "min-based": s.speedup_min_based,
                    "density": s.density,
                    "est_share": s.estimator_share,
                    **_time_split_cells(s.time_split),
                    "overloaded": pairs_overloaded(s.host),
                }
                for s in r.speed
            ],
        )
        if any(s.time_split for s in r.speed):
            console.print(
                "attn_share: attention's share of the dense prefill (dense less the sparse run's "
                "non-attention time); attn_x: attention's own speed-up, scoring included; ideal_x: the "
                "speed-up of a perfect kernel at this density, scoring free"
            )
        if r.speed_summary and r.speed_summary.get("weighted_speedup"):
            console.print(f"length-mix weighted speed-up: {r.speed_summary['weighted_speedup']:.3f}")
        over = (r.speed_summary or {}).get("lengths_over_context")
        if over:  # evaluation.within_context: not timed, said beside the figures
            lengths = ", ".join(f"{x:,}" for x in over["lengths"])
            console.print(f"not timed: {lengths} tokens, over the model's {over['positions']:,} positions")
    if r.decode:
        _print_decode(r.decode, (r.probes or {}).get("generated"))
    overload = _timing_overload(r)
    if overload:  # the speed figures above are a busy host's: said beside them, as the benches do
        console.print(f"warning: {overload}", style="yellow", soft_wrap=True, markup=False)
    for name, path in r.artifacts.items():
        console.print(f"{name}: {path}")
