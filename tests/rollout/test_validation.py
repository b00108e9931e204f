"""Great Expectations suites: use-case datasets and pilot observation batches (real GX)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from rollout.spec import load_spec
from rollout.validation import (
    DataValidationError,
    conservative_token_count,
    token_counter_for,
    validate_dataset,
    validate_observations,
)

from .usecase_helpers import EXAMPLES, write_tiny_model

KNOWN = ["q1", "q2", "q3"]


def _batch(**overrides) -> pd.DataFrame:  # noqa: ANN003
    data = {
        "request_id": ["q1", "q1", "q2", "q2"],
        "arm": ["control", "treatment", "control", "treatment"],
        "quality": [0.9, 0.85, 0.7, 0.72],
        "latency_ms": [120.0, 80.0, 130.0, 90.0],
        "tokens": [40, 40, 38, 38],
        "error": [False, False, False, False],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_valid_batch_passes() -> None:
    res = validate_observations(_batch(), KNOWN)
    assert res.ok, res.messages()
    assert res.stats["arms"] == {"control": 2, "treatment": 2}
    assert res.to_dict()["ok"] is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"quality": [0.9, math.nan, 0.7, 0.72]}, "row 2 (id 'q1/treatment'): quality: is NaN or missing"),
        (
            {"latency_ms": [120.0, 80.0, math.nan, 90.0]},
            "row 3 (id 'q2/control'): latency_ms: is NaN or missing",
        ),
        (
            {"quality": [0.9, math.inf, 0.7, 0.72]},
            "row 2 (id 'q1/treatment'): quality: outside the declared range [0, 1] (infinite values present)",
        ),
        (
            {"latency_ms": [120.0, 0.0, 130.0, -5.0]},
            "rows 2 (id 'q1/treatment'), 4 (id 'q2/treatment'): latency_ms: must be > 0",
        ),
        (
            {"latency_ms": [120.0, 80.0, math.inf, 90.0]},
            "row 3 (id 'q2/control'): latency_ms: must be > 0 and below",
        ),
        (
            {"quality": [1.2, 0.85, 0.7, 0.72]},
            "row 1 (id 'q1/control'): quality: outside the declared range [0, 1]; got 1.2",
        ),
        (
            {"arm": ["control", "treatment", "control", "canary"]},
            "row 4 (id 'q2/canary'): arm: unknown arm ['canary']",
        ),
        (
            {"request_id": ["q1", "q1", "zz", "q2"]},
            "row 3 (id 'zz/control'): request_id: not a request of this use case's dataset",
        ),
        (
            {"request_id": ["q1", "q1", "q1", "q2"]},
            "request_id: the same (request, arm) appears more than once",
        ),
        (
            {"arm": ["control"] * 4, "request_id": ["q1", "q2", "q3", "q1"]},
            "arm: both arms must be present; missing ['treatment']",
        ),
        (
            {"error": [False, "maybe", False, False]},
            "row 2 (id 'q1/treatment'): error: must be true or false",
        ),
        ({"tokens": [40, -1, 38, 38]}, "row 2 (id 'q1/treatment'): tokens: must be a non-negative count"),
    ],
)
def test_bad_batches_name_rows_and_fields(overrides: dict, expected: str) -> None:
    res = validate_observations(_batch(**overrides), KNOWN, source="pilot 3 step 1 batch b7")
    assert not res.ok
    assert any(m.startswith("pilot 3 step 1 batch b7: ") and expected in m for m in res.messages()), (
        res.messages()
    )
    with pytest.raises(DataValidationError, match="batch b7"):
        res.raise_for_failures()


def test_declared_quality_range_and_single_arm_steps() -> None:
    loglik = _batch(quality=[-3.2, -2.9, -10.0, -9.5])
    assert not validate_observations(loglik, KNOWN).ok
    assert validate_observations(loglik, KNOWN, quality_range=(-math.inf, 0.0)).ok
    control_only = _batch().iloc[[0, 2]]
    assert validate_observations(control_only, KNOWN, require_both_arms=False).ok
    assert not validate_observations(control_only, KNOWN).ok


def test_missing_columns_and_empty_batch() -> None:
    res = validate_observations(_batch().drop(columns=["latency_ms"]), KNOWN)
    assert res.messages() == ["observation batch: latency_ms: column is missing"]
    res = validate_observations(_batch().iloc[0:0], KNOWN)
    assert res.messages() == ["observation batch: batch: has no rows"]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dataset_suite_reports_every_problem_with_rows(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLES / "docs-qa.yaml")  # loglik: references required; output reserve 64
    rows = [
        {"id": "a", "prompt": "What is x?", "reference": "x"},
        {"id": "b", "prompt": "", "reference": "y"},
        {"id": "a", "prompt": "again", "reference": "z"},
        {"id": "c", "prompt": "no reference"},
        {"id": "d", "prompt": "w" * 25_000, "reference": "r"},
        "{not json",
        {"id": "e", "prompt": 42, "reference": "r"},
        ["a", "list"],
        {"id": "f", "prompt": "ok", "reference": "r", "source": "crm"},
        {"id": "g", "prompt": "lone \udc80 surrogate", "reference": "r"},
    ]
    path = _write(tmp_path / "d.jsonl", rows)
    res = validate_dataset(path, spec, context_length=8192)
    msgs = [m.removeprefix(f"{path}: ") for m in res.messages()]
    assert "rows 1, 3: id: duplicate id 'a'" in msgs
    assert "row 2 (id 'b'): prompt: is empty" in msgs
    assert "row 4 (id 'c'): reference: missing, but the task (loglik) needs references" in msgs
    assert any(
        m.startswith("row 5 (id 'd'): prompt: longer than the model's context: up to 8334 tokens")
        for m in msgs
    )
    assert "row 6: line: not valid JSON (Expecting property name enclosed in double quotes, column 2)" in msgs
    assert "row 7 (id 'e'): prompt: missing, or not a string" in msgs
    assert "row 8: line: must be a JSON object, got list" in msgs
    assert "row 10 (id 'g'): prompt: contains a lone surrogate escape (not valid UTF-8)" in msgs
    assert len(msgs) == 8
    assert res.warnings == ["field 'source' is not used by SparsePilot (rows 9)"]


def test_a_key_given_twice_or_a_blank_id_is_refused_naming_row_and_field(tmp_path: Path) -> None:
    """JSON keeps a repeated key's last value silently: `"prompt": "visible", "prompt": ""` read as an
    empty prompt, and the other way round as a prompt nobody saw. Refused as the spec's YAML is."""
    rows = [
        '{"id": "d1", "prompt": "visible", "prompt": "", "reference": "x"}',
        '{"id": "d2", "prompt": "", "prompt": "unseen", "reference": "x"}',
        '{"id": "d3", "id": "d4", "prompt": "p", "reference": "x"}',
        {"id": "  ", "prompt": "an id of spaces", "reference": "x"},
        {"id": "\u200b", "prompt": "an invisible id", "reference": "x"},
        {"id": "ok", "prompt": "fine", "reference": "x"},
    ]
    path = _write(tmp_path / "d.jsonl", rows)
    res = validate_dataset(path, references_required=True, context_length=1000)
    assert [m.removeprefix(f"{path}: ") for m in res.messages()] == [
        "row 1: prompt: given twice in one object (JSON would silently keep the last)",
        "row 2: prompt: given twice in one object (JSON would silently keep the last)",
        "row 3: id: given twice in one object (JSON would silently keep the last)",
        "row 4: id: is blank (spaces or invisible characters only)",
        "row 5: id: is blank (spaces or invisible characters only)",
    ]


def test_invalid_utf8_is_caught_at_read_time(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "\xff\xfe bad"}\n')
    res = validate_dataset(path, references_required=False)
    assert res.messages() == [f"{path}: row 2: line: invalid UTF-8 at byte offset 23"]


def test_references_optional_when_the_task_does_not_need_them(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"id": 1, "prompt": "p"}, {"id": 2, "prompt": "q", "tags": ["x"]}])
    res = validate_dataset(path, references_required=False, context_length=100)
    assert res.ok and res.stats["rows"] == 2 and res.stats["with_reference"] == 0
    res = validate_dataset(path, references_required=True, context_length=100)
    assert [f.rows for f in res.failures] == [(1, 2)]


def test_repeated_prompts_are_a_warning_naming_the_lines(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "How do I reset my password?"},
        {"id": "b", "prompt": "Where is the invoice?"},
        {"id": "c", "prompt": "How do I reset  my password?\n"},  # the same prompt up to whitespace
        {"id": "d", "prompt": "Where is the invoice?"},
        {"id": "e", "prompt": "how do I reset my password?"},  # another prompt: case is text
    ]
    res = validate_dataset(_write(tmp_path / "d.jsonl", rows), references_required=False, context_length=100)
    assert res.ok and res.stats["rows"] == 5 and res.stats["distinct_prompts"] == 3
    assert res.stats["kept_apart"] <= 1  # one of five rows kept apart, none if its prompt repeats
    (warning,) = [w for w in res.warnings if w.startswith("prompt:")]
    assert warning.startswith(
        "prompt: 2 row(s) repeat an earlier row's prompt (line 3 repeats line 1, line 4 "
    )
    assert "judge each prompt once" in warning


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert validate_dataset(tmp_path / "empty.jsonl").messages() == [
        f"{tmp_path / 'empty.jsonl'}: dataset: has no rows"
    ]
    assert validate_dataset(tmp_path / "nope.jsonl").messages() == [
        f"{tmp_path / 'nope.jsonl'}: dataset: file not found"
    ]


@pytest.mark.parametrize("kind", ["no-permission", "io-error"])
def test_a_dataset_that_cannot_be_read_is_a_failure_naming_it(tmp_path: Path, kind: str) -> None:
    """A dataset file that exists but cannot be read (no read permission; an I/O error) was a raw
    traceback out of `usecase add` (exit 1); it is a read failure naming the file (exit 2)."""
    if kind == "no-permission":
        if os.geteuid() == 0:
            pytest.skip("root reads a file without read permission")
        path = tmp_path / "locked.jsonl"
        path.write_text('{"id": "a", "prompt": "p", "reference": "r"}\n')
        path.chmod(0)
        reason = "Permission denied"
    else:
        path = Path("/proc/self/mem")  # a regular file whose read fails (EIO) on Linux
        if not path.is_file():
            pytest.skip("no /proc/self/mem here")
        reason = "Input/output error"
    res = validate_dataset(path)
    assert res.messages() == [f"{path}: dataset: cannot read the file ({reason})"]
    with pytest.raises(DataValidationError, match="cannot read the file"):
        res.raise_for_failures()


def test_token_counting_prefers_the_models_tokenizer(tmp_path: Path) -> None:
    counter, source = token_counter_for(write_tiny_model(tmp_path / "m"))
    assert counter("one two three") == 3 and source.startswith("tokenizer")
    counter, source = token_counter_for(tmp_path / "no-model-here")
    assert counter is conservative_token_count and source == "bound: ceil(chars / 3)"
    assert conservative_token_count("x" * 10) == 4


@pytest.mark.parametrize("name", ["longdoc-summaries", "docs-qa", "support-chat"])
def test_sample_datasets_pass_by_the_conservative_bound(name: str) -> None:
    spec = load_spec(EXAMPLES / f"{name}.yaml")
    res = validate_dataset(spec.dataset_path(EXAMPLES), spec, context_length=8192)
    assert res.ok, res.messages()
    assert res.stats["rows"] >= 60
    # no sample repeats a prompt: a quarter of its rows is kept apart, each a distinct request
    assert res.stats["distinct_prompts"] == res.stats["rows"]
    assert res.stats["kept_apart"] == round(0.25 * res.stats["rows"])


def test_suites_can_run_from_threads() -> None:
    """Prefect runs tasks in threads; the shared GX context must not mix batches up."""
    from concurrent.futures import ThreadPoolExecutor

    good, bad = _batch(), _batch(quality=[0.9, math.nan, 0.7, 0.72])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda df: validate_observations(df, KNOWN).ok, [good, bad] * 4))
    assert results == [True, False] * 4
