"""Data contracts, checked with Great Expectations 1.x: a use case's dataset before it is stored or
used, and every batch of pilot observations before the gate sees it (a failed batch makes a decision
INVALID, never GO). Failures come back as readable messages that name rows and fields.

Problems a DataFrame cannot hold (invalid UTF-8, a line that is not JSON, a wrong type) are caught
while reading, with the file's line number; everything else is a GX expectation. GX is imported
lazily (it costs seconds), once per process.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout.input_files import HEAD_BYTES, compressed
from rollout.json_lines import LineError, parse_object, split_lines
from sparse_core.errors import SparsePilotError

if TYPE_CHECKING:
    import pandas as pd

    from rollout.spec import UseCaseSpec

# When the model's own tokenizer is not at hand, a prompt's token count is bounded by
# ceil(chars / 3.0). SmolLM2's tokenizer gives 4.0-4.3 characters per token on English prose and
# Python docs (3.3 at worst on a single short prompt), so 3.0 over-counts: a prompt that passes
# this bound fits.
CONSERVATIVE_CHARS_PER_TOKEN = 3.0
MAX_ROWS_LISTED = 8
DATASET_FIELDS = ("id", "prompt", "reference", "tags")
MAX_LATENCY_MS = 86_400_000.0  # one day: anything above is a unit error, not a latency
MAX_TOKENS = 10**9  # an observation's tokens: anything above is a server's error, not a count
ARMS = ("control", "treatment")  # an observation's arm: the dense model (control) or the sparse one


class DataValidationError(SparsePilotError, ValueError):
    """Raised by `ValidationResult.raise_for_failures`; the message lists every failure."""

    def __init__(self, result: ValidationResult) -> None:
        self.result = result
        super().__init__("\n".join(result.messages()))


@dataclass(frozen=True)
class Failure:
    field: str
    message: str
    rows: tuple[int, ...] = ()  # 1-based: line numbers in the file, or row numbers in the batch
    ids: tuple[str, ...] = ()
    expectation: str = ""  # the GX expectation type, or "read" for problems found while reading
    unit: str = "row"  # "line": `rows` are the file's physical lines, shown as path:LINE like a parse error

    def describe(self, source: str = "") -> str:
        where = ""
        if self.unit == "line" and len(self.rows) == 1:  # one line: path:LINE, as the parse errors say
            ident = f" (id {self.ids[0]!r})" if self.ids and self.ids[0] else ""
            return f"{source}:{self.rows[0]}{ident}: {self.field}: {self.message}"
        if self.rows:
            shown = list(zip(self.rows, self.ids or ("",) * len(self.rows), strict=False))
            parts = [f"{r} (id {i!r})" if i else str(r) for r, i in shown[:MAX_ROWS_LISTED]]
            more = f" and {len(self.rows) - MAX_ROWS_LISTED} more" if len(self.rows) > MAX_ROWS_LISTED else ""
            where = f"{self.unit}{'s' if len(self.rows) > 1 else ''} {', '.join(parts)}{more}: "
        prefix = f"{source}: " if source else ""
        return f"{prefix}{where}{self.field}: {self.message}"


@dataclass
class ValidationResult:
    suite: str
    source: str
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def messages(self) -> list[str]:
        return [f.describe(self.source) for f in self.failures]

    def summary(self) -> str:
        if self.ok:
            return f"{self.source}: {self.suite} passed ({self.stats.get('rows', 0)} rows)"
        return "\n".join([f"{self.source}: {self.suite} failed:", *("  " + m for m in self.messages())])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stored as decision evidence and shown on the dashboard."""
        return {
            "suite": self.suite,
            "source": self.source,
            "ok": self.ok,
            "failures": [asdict(f) | {"text": f.describe()} for f in self.failures],
            "warnings": list(self.warnings),
            "stats": dict(self.stats),
        }

    def raise_for_failures(self) -> ValidationResult:
        if self.failures:
            raise DataValidationError(self)
        return self


# ---------------------------------------------------------------------------------------------------
# Great Expectations plumbing


@lru_cache(maxsize=1)
def _gx_context() -> Any:
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


_counter = iter(range(1, 1 << 62))
# One shared ephemeral context; Prefect runs tasks in threads, so suites run one at a time.
_gx_lock = threading.Lock()


@cache
def _batch_definition(suite_name: str) -> Any:
    """The context's pandas data source for one suite, its dataframe asset and whole-dataframe batch
    definition, made once per process (under `_gx_lock`): the dataframe itself is each validation's batch
    parameter. Adding a data source and deleting it again for every validation saved the context's
    configuration four times (~20 ms of YAML each)."""
    source = _gx_context().data_sources.add_pandas(f"sp-{suite_name}")
    return source.add_dataframe_asset(name="rows").add_batch_definition_whole_dataframe("all")


def _run_suite(suite_name: str, df: pd.DataFrame, expectations: Iterable[Any]) -> list[Any]:
    """Validate ``df`` against the expectations and return GX's per-expectation results."""
    import great_expectations as gx

    with _gx_lock:
        batch = _batch_definition(suite_name).get_batch(batch_parameters={"dataframe": df})
        suite = gx.ExpectationSuite(name=f"{suite_name}-{next(_counter)}")
        for e in expectations:
            suite.add_expectation(e)
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        return list(result.results)


def _failed(results: list[Any]) -> Iterable[tuple[Any, dict[str, Any], list[int]]]:
    for r in results:
        if r.success:
            continue
        info = r.exception_info or {}
        if isinstance(info, dict) and info.get("raised_exception"):
            raise RuntimeError(
                f"GX expectation {r.expectation_config.type} crashed: {info.get('exception_message')}"
            )
        res = r.result or {}
        yield r.expectation_config, res, list(res.get("unexpected_index_list") or [])


# ---------------------------------------------------------------------------------------------------
# Use-case datasets


@dataclass
class _Rows:
    line: list[int] = field(default_factory=list)
    id: list[str] = field(default_factory=list)
    prompt: list[str] = field(default_factory=list)
    reference: list[str | None] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)


def dataset_bytes(path: Path | str) -> bytes:
    """The dataset file's bytes, read once: what `usecase add` validates (`validate_dataset`'s `data`),
    hashes and stores, so that a file another writer changes meanwhile never stores rows nobody validated.
    A file that exists but cannot be read (no permission, an I/O error) is the DataValidationError
    `validate_dataset` gives it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        result = ValidationResult("usecase-dataset", str(path), [_unreadable(exc)])
    raise DataValidationError(result)


def _unreadable(exc: OSError) -> Failure:
    return Failure("dataset", f"cannot read the file ({exc.strerror or exc})", expectation="read")


def read_dataset(path: Path | str, data: bytes | None = None) -> tuple[_Rows, list[Failure], list[str]]:
    """Read a JSONL dataset (`data`, the file's bytes where the caller read them already), catching what a
    DataFrame cannot hold: a file that cannot be read (no permission) or is compressed (one failure, not
    one per line), invalid UTF-8, bad JSON, wrong types. Lines end as the request log's do (CRLF, LF or a
    lone CR: `rollout.json_lines.split_lines`). Returns the readable rows, the read failures (with line
    numbers) and warnings."""
    from rollout.spec import has_visible_text

    rows, failures, warnings = _Rows(), [], []
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:  # no read permission, an I/O error: the file exists but cannot be read
            return rows, [_unreadable(exc)], warnings
    if why := compressed(data[:HEAD_BYTES]):  # read as text, each of its lines was "invalid UTF-8"
        return rows, [Failure("dataset", why, expectation="read")], warnings
    unknown: dict[str, list[int]] = {}
    for lineno, raw in enumerate(split_lines(data), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            failures.append(
                Failure("line", f"invalid UTF-8 at byte offset {exc.start}", (lineno,), (), "read")
            )
            continue
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark is not content
        try:
            obj = parse_object(text)
        except LineError as exc:
            failures.append(Failure(exc.field, exc.message, (lineno,), (), "read"))
            continue
        rid = obj.get("id")
        rid_s = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else ""
        ids = (rid_s,) if rid_s and has_visible_text(rid_s) else ()
        bad = False
        if not rid_s:
            failures.append(Failure("id", "missing, or not a string/integer", (lineno,), (), "read"))
            bad = True
        elif not has_visible_text(rid_s):
            failures.append(
                Failure("id", "is blank (spaces or invisible characters only)", (lineno,), (), "read")
            )
            bad = True
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            failures.append(Failure("prompt", "missing, or not a string", (lineno,), ids, "read"))
            bad = True
        reference = obj.get("reference")
        if reference is not None and not isinstance(reference, str):
            failures.append(Failure("reference", "must be a string when present", (lineno,), ids, "read"))
            bad = True
        tags = obj.get("tags", [])
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            failures.append(Failure("tags", "must be a list of strings when present", (lineno,), ids, "read"))
            bad = True
        for key in ("id", "prompt", "reference"):
            value = obj.get(key)
            if isinstance(value, str) and not is_valid_unicode(value):
                failures.append(
                    Failure(key, "contains a lone surrogate escape (not valid UTF-8)", (lineno,), ids, "read")
                )
                bad = True
        for key in obj:
            if key not in DATASET_FIELDS:
                unknown.setdefault(key, []).append(lineno)
        if bad:
            continue
        rows.line.append(lineno)
        rows.id.append(rid_s)
        rows.prompt.append(prompt)
        rows.reference.append(reference)
        rows.tags.append(list(tags))
    for key, lines in unknown.items():
        warnings.append(f"field {key!r} is not used by SparsePilot (rows {_fmt_rows(lines)})")
    return rows, failures, warnings


def is_valid_unicode(s: str) -> bool:
    """False for a string holding a lone surrogate (JSON's "\\ud800"): it cannot be written as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fmt_rows(rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_LISTED])
    return shown + (f" and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else "")


TokenCounter = Callable[[str], int]


def conservative_token_count(text: str) -> int:
    return math.ceil(len(text) / CONSERVATIVE_CHARS_PER_TOKEN)


def token_counter_for(model_path: Path | str | None) -> tuple[TokenCounter, str]:
    """The model's own tokenizer when a ``tokenizer.json`` sits next to its weights (loads in
    milliseconds), else the conservative characters-per-token bound. Returns (counter, description)."""
    if model_path is not None:
        tok_file = Path(model_path) / "tokenizer.json"
        if tok_file.is_file():
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(tok_file))
            except Exception:  # noqa: BLE001 - an unreadable tokenizer falls back to the bound
                pass
            else:
                return (lambda text: len(tok.encode(text).ids)), f"tokenizer ({tok_file})"
    return conservative_token_count, f"bound: ceil(chars / {CONSERVATIVE_CHARS_PER_TOKEN:g})"


def validate_dataset(
    path: Path | str,
    spec: UseCaseSpec | None = None,
    *,
    context_length: int | None = None,
    count_tokens: TokenCounter | None = None,
    token_source: str | None = None,
    references_required: bool | None = None,
    output_reserve: int | None = None,
    data: bytes | None = None,
) -> ValidationResult:
    """Check a use case's JSONL dataset: readable rows (UTF-8, JSON, types), unique ids, non-empty
    prompts, references present when the task needs them, and prompt + output within the model's
    context (the prompt may use ``context_length - output_reserve`` tokens; the reserve defaults to
    the spec's largest output length). ``data``: the file's bytes, where the caller read them
    (`dataset_bytes`) to store exactly what passed; else the file is read here."""
    import pandas as pd

    from rollout.spec import has_visible_text

    path = Path(path)
    source = str(path)
    result = ValidationResult(suite="usecase-dataset", source=source)
    if data is None and not path.is_file():
        result.failures.append(Failure("dataset", "file not found", expectation="read"))
        return result
    if references_required is None:
        references_required = spec.dataset.references_required if spec is not None else False
    if output_reserve is None:
        output_reserve = spec.traffic.output_tokens.max() if spec is not None else 0
    if count_tokens is None:
        count_tokens, token_source = (
            conservative_token_count,
            (f"bound: ceil(chars / {CONSERVATIVE_CHARS_PER_TOKEN:g})"),
        )

    rows, read_failures, warnings = read_dataset(path, data)
    result.failures.extend(read_failures)
    result.warnings.extend(warnings)
    if not rows.line and not read_failures:
        result.failures.append(Failure("dataset", "has no rows", expectation="read"))
        return result

    tokens = [count_tokens(p) for p in rows.prompt]
    df = pd.DataFrame(
        {
            "line": rows.line,
            "id": rows.id,
            # zero-width and other invisible characters alone are an empty prompt
            "prompt_stripped": [p.strip() if has_visible_text(p) else "" for p in rows.prompt],
            "reference_stripped": [r.strip() if isinstance(r, str) else None for r in rows.reference],
            "prompt_tokens": tokens,
        }
    )
    limit = None if context_length is None else int(context_length) - int(output_reserve)
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_stripped", min_value=1),
    ]
    if limit is not None:
        expectations.append(gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=limit))
    else:
        result.warnings.append("the model's context length is unknown: prompt lengths were not checked")
    if references_required:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column="reference_stripped"))
        expectations.append(gxe.ExpectColumnValueLengthsToBeBetween(column="reference_stripped", min_value=1))

    if len(df):
        for cfg, _res, idx in _failed(_run_suite("usecase-dataset", df, expectations)):
            column = cfg.kwargs.get("column")
            lines = tuple(int(df.at[i, "line"]) for i in idx)
            ids = tuple(str(df.at[i, "id"]) for i in idx)
            if cfg.type == "expect_column_values_to_be_unique":
                for rid in dict.fromkeys(ids):
                    dup_lines = tuple(ln for ln, i in zip(lines, ids, strict=True) if i == rid)
                    result.failures.append(
                        Failure(
                            "id",
                            f"duplicate id {rid!r}",
                            dup_lines,
                            (),
                            cfg.type,
                        )
                    )
            elif column == "prompt_stripped":
                result.failures.append(Failure("prompt", "is empty", lines, ids, cfg.type))
            elif column == "prompt_tokens":
                worst = max(int(df.at[i, "prompt_tokens"]) for i in idx)
                result.failures.append(
                    Failure(
                        "prompt",
                        f"longer than the model's context: up to {worst} tokens, the limit is {limit} "
                        f"(context {context_length} - {output_reserve} output tokens; "
                        f"counted by {token_source})",
                        lines,
                        ids,
                        cfg.type,
                    )
                )
            elif column == "reference_stripped":
                task = spec.dataset.task if spec is not None else "this task"
                what = "missing" if cfg.type == "expect_column_values_to_not_be_null" else "empty"
                msg = f"{what}, but the task ({task}) needs references"
                result.failures.append(Failure("reference", msg, lines, ids, cfg.type))
            else:  # pragma: no cover - every expectation above is mapped
                result.failures.append(Failure(str(column), f"failed {cfg.type}", lines, ids, cfg.type))

    repeats = repeated_prompts(rows.line, rows.prompt)
    if repeats:
        shown = ", ".join(f"line {ln} repeats line {first}" for ln, first in repeats[:5])
        more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
        result.warnings.append(
            f"prompt: {len(repeats)} row(s) repeat an earlier row's prompt ({shown}{more}): the evaluation "
            "and the pilot judge each prompt once (a repeat adds a copy of the same answers, not evidence), "
            "so fewer rows are kept apart for them"
        )

    from rollout.dataset_split import split_rows

    calibration, apart = split_rows(
        [
            {"id": i, "prompt": p, "ref": r}
            for i, p, r in zip(rows.id, rows.prompt, rows.reference, strict=True)
        ]
    )
    if spec is not None and not result.failures:
        counted = dict(zip(rows.prompt, tokens, strict=True))
        why = calibration_shortfall(spec, [r["prompt"] for r in calibration], counted)
        if why:
            result.failures.append(
                Failure("dataset", f"{why} (tokens counted by {token_source})", (), (), "calibration")
            )
    task_rows_counted = {}
    if spec is not None:  # the rows its task bound scores (rollout.task_budget), by calibration's own split
        from rollout.task_budget import task_rows

        c = spec.quality_budget.calibration
        scored = task_rows(
            [{"prompt": r["prompt"], "reference": r["ref"]} for r in calibration], c.holdout_fraction, c.seed
        )
        task_rows_counted = {"calibration_task_rows": len(scored)}
    result.stats = {
        "rows": len(df),
        "distinct_prompts": len(df) - len(repeats),
        # the distinct requests a pilot on the dataset may draw: its rows kept apart, each prompt once
        "kept_apart": len(apart),
        # the rows the calibrate flow reads, and those a task bound can score (rollout.task_budget)
        "calibration_rows": len(calibration),
        "calibration_with_reference": sum(
            isinstance(r["ref"], str) and bool(r["ref"].strip()) for r in calibration
        ),
        **task_rows_counted,
        "prompt_tokens_min": int(min(tokens)) if tokens else 0,
        "prompt_tokens_max": int(max(tokens)) if tokens else 0,
        "prompt_tokens_mean": float(sum(tokens) / len(tokens)) if tokens else 0.0,
        "token_count": token_source,
        "context_length": context_length,
        "prompt_token_limit": limit,
        "with_reference": int(sum(r is not None for r in rows.reference)),
    }
    return result


# what the quick calibration (`calibrate NAME --quick`, the main job's) changes of a spec's calibration
# settings when it bounds nothing (no confidence, no windows kept apart): windows of at most 2k tokens,
# a third of them held out (flows/calibrate.py reads these)
QUICK_MAX_SEQ_LEN = 2048
QUICK_HOLDOUT_FRACTION = 0.34


def quick_windows_apply(c: Any) -> bool:
    """Does the quick calibration use its own windows (`QUICK_*`) for these calibration settings?"""
    return c.confidence is None and not c.sensitivity_windows


def calibration_shortfall(spec: UseCaseSpec, prompts: list[str], tokens: dict[str, int]) -> str | None:
    """Why the calibrate flow could not cut a calibration and a held-out window from the calibration
    split's prompts (`sparse_core.corpus.texts_shortfall`), at the spec's calibration settings and at the
    quick calibration's (the main job's: `QUICK_*`, another split), or None. `tokens` maps a prompt to
    its token count (an upper bound: the check is then lenient)."""
    from sparse_core import texts_shortfall
    from sparse_core.plan import DEFAULT_BLOCK_SIZE

    c = spec.quality_budget.calibration
    forms = [("", c.holdout_fraction, c.max_seq_len)]
    if quick_windows_apply(c):
        quick = max(c.holdout_fraction, QUICK_HOLDOUT_FRACTION), min(c.max_seq_len, QUICK_MAX_SEQ_LEN)
        forms.append(("the quick calibration (`sparsepilot run`'s), holding out a third: ", *quick))
    for form, holdout, seq_len in forms:
        short = texts_shortfall(
            prompts, tokens.__getitem__, holdout, c.seed, block_size=DEFAULT_BLOCK_SIZE, max_seq_len=seq_len
        )
        if short:
            return form + short
    return None


def repeated_prompts(lines: list[int], prompts: list[str]) -> list[tuple[int, int]]:
    """(line, line of the prompt's first row) for every row whose prompt an earlier row has, by
    `rollout.traffic.prompt_key` (the same text up to whitespace and Unicode normalisation)."""
    from rollout.traffic.base import prompt_key

    first: dict[bytes, int] = {}
    out = []
    for line, prompt in zip(lines, prompts, strict=True):
        key = prompt_key(prompt)
        if key in first:
            out.append((line, first[key]))
        else:
            first[key] = line
    return out


# ---------------------------------------------------------------------------------------------------
# Pilot observation batches

OBSERVATION_COLUMNS = ("request_id", "arm", "quality", "latency_ms")


def validate_observations(
    df: pd.DataFrame,
    known_request_ids: Iterable[str],
    *,
    quality_range: tuple[float, float] = (0.0, 1.0),
    arms: Sequence[str] = ARMS,
    require_both_arms: bool = True,
    source: str = "observation batch",
    first_row: int = 1,
    refused_request_ids: Mapping[str, str] | None = None,
    lines: Sequence[int] | None = None,
) -> ValidationResult:
    """Check one batch of pilot observations before it is stored or shown to the gate: no NaN/inf,
    latency > 0, quality within ``quality_range``, arm values valid, both arms present (when the
    step runs both), request ids among ``known_request_ids`` (a request id outside them is named with
    its reason from ``refused_request_ids`` where it has one), one row per (request, arm). Row numbers
    in failures start at ``first_row`` (a chunk of a streamed file); with ``lines`` (each row's physical
    line in the file it was read from) failures name those lines instead, as `path:LINE`."""
    import numpy as np
    import pandas as pd

    result = ValidationResult(suite="observation-batch", source=source)
    missing = [c for c in OBSERVATION_COLUMNS if c not in df.columns]
    if missing:
        for c in missing:
            result.failures.append(Failure(c, "column is missing", expectation="read"))
        return result
    if len(df) == 0:
        result.failures.append(Failure("batch", "has no rows", expectation="read"))
        return result

    work = pd.DataFrame(
        {
            "request_id": df["request_id"].astype(str).to_numpy(),
            "arm": df["arm"].astype(str).to_numpy(),
            "quality": pd.to_numeric(df["quality"], errors="coerce").astype(float).to_numpy(),
            "latency_ms": pd.to_numeric(df["latency_ms"], errors="coerce").astype(float).to_numpy(),
        }
    )
    numeric = ["quality", "latency_ms"]
    if "tokens" in df.columns:
        work["tokens"] = pd.to_numeric(df["tokens"], errors="coerce").astype(float).to_numpy()
        numeric.append("tokens")
    if "error" in df.columns:
        work["error"] = df["error"].map(lambda v: v if isinstance(v, bool | np.bool_) else str(v)).to_numpy()

    lo, hi = quality_range
    # membership is hashed here, not handed to GX as a value set: a request log's millions of ids would
    # make its set check slower than the import itself (44 s a 50,000-row chunk at 500,000 known ids)
    known = known_request_ids if isinstance(known_request_ids, Set) else {str(r) for r in known_request_ids}
    work["request_known"] = [rid in known for rid in work["request_id"]]  # no per-chunk hash table of `known`
    import great_expectations.expectations as gxe

    expectations = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in numeric]
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(column="quality", min_value=lo, max_value=hi),
        gxe.ExpectColumnValuesToBeBetween(
            column="latency_ms", min_value=0, max_value=MAX_LATENCY_MS, strict_min=True
        ),
        gxe.ExpectColumnValuesToBeInSet(column="arm", value_set=list(arms)),
        gxe.ExpectColumnValuesToBeInSet(column="request_known", value_set=[True]),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["request_id", "arm"]),
    ]
    if "tokens" in work.columns:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=0, max_value=MAX_TOKENS)
        )
    if "error" in work.columns:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="error", value_set=[True, False]))
    if require_both_arms:
        expectations.append(gxe.ExpectColumnDistinctValuesToContainSet(column="arm", value_set=list(arms)))

    def number(i: Any) -> int:  # 1-based: the file's line where known, else the row in the batch
        return int(lines[int(i)]) if lines is not None else int(i) + first_row

    unit = "row" if lines is None else "line"
    for cfg, res, idx in _failed(_run_suite("observation-batch", work, expectations)):
        column = cfg.kwargs.get("column")
        rows = tuple(number(i) for i in idx)
        ids = tuple(f"{work.at[i, 'request_id']}/{work.at[i, 'arm']}" for i in idx)
        if cfg.type == "expect_column_values_to_not_be_null":
            raw = df[column].iloc[list(idx)].tolist()
            what = "NaN or missing" if all(_is_nan_like(v) for v in raw) else "NaN, missing or not a number"
            result.failures.append(Failure(column, f"is {what}", rows, ids, cfg.type, unit))
        elif cfg.type == "expect_column_values_to_be_between":
            values = [work.at[i, column] for i in idx]
            infinite = [v for v in values if isinstance(v, float) and math.isinf(v)]
            if column == "quality":
                msg = f"outside the declared range [{lo:g}, {hi:g}]"
            elif column == "latency_ms":
                msg = f"must be > 0 and below {MAX_LATENCY_MS:g} ms"
            else:
                msg = "must be a non-negative count"
            if infinite:
                msg += " (infinite values present)"
            shown = ", ".join(f"{v:g}" for v in values[:MAX_ROWS_LISTED])
            result.failures.append(Failure(column, f"{msg}; got {shown}", rows, ids, cfg.type, unit))
        elif cfg.type == "expect_column_values_to_be_in_set" and column == "arm":
            bad = sorted({str(work.at[i, "arm"]) for i in idx})
            result.failures.append(
                Failure("arm", f"unknown arm {bad}; valid: {list(arms)}", rows, ids, cfg.type, unit)
            )
        elif cfg.type == "expect_column_values_to_be_in_set" and column == "request_known":
            refused = refused_request_ids or {}
            reasons: dict[str, list[int]] = {}
            for i in idx:
                reason = refused.get(
                    str(work.at[i, "request_id"]), "not a request of this use case's dataset"
                )
                reasons.setdefault(reason, []).append(i)
            for reason, where in reasons.items():
                result.failures.append(
                    Failure(
                        "request_id",
                        reason,
                        tuple(number(i) for i in where),
                        tuple(f"{work.at[i, 'request_id']}/{work.at[i, 'arm']}" for i in where),
                        cfg.type,
                        unit,
                    )
                )
        elif cfg.type == "expect_column_values_to_be_in_set" and column == "error":
            result.failures.append(Failure("error", "must be true or false", rows, ids, cfg.type, unit))
        elif cfg.type == "expect_compound_columns_to_be_unique":
            result.failures.append(
                Failure(
                    "request_id", "the same (request, arm) appears more than once", rows, ids, cfg.type, unit
                )
            )
        elif cfg.type == "expect_column_distinct_values_to_contain_set":
            absent = res.get("partial_missing_list") or sorted(set(arms) - set(work["arm"]))
            result.failures.append(
                Failure("arm", f"both arms must be present; missing {list(absent)}", (), (), cfg.type)
            )
        else:  # pragma: no cover
            result.failures.append(Failure(str(column), f"failed {cfg.type}", rows, ids, cfg.type, unit))

    finite_q = work["quality"][np.isfinite(work["quality"])]
    result.stats = {
        "rows": len(work),
        "arms": {a: int((work["arm"] == a).sum()) for a in arms},
        "quality_mean": float(finite_q.mean()) if len(finite_q) else None,
    }
    return result


def _is_nan_like(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
