"""Use-case task scoring: pure scorers, dataset parsing with errors that name file/line/field, and
per-request scoring on a tiny model."""

from __future__ import annotations

import json

import pytest

from sparse_core.tasks import (
    DatasetError,
    contains,
    exact_match,
    read_dataset,
    rouge_l,
    score_dataset,
    score_request,
)


def test_scorers():
    assert exact_match("  The Answer. ", "the answer") == 1.0
    assert exact_match("the answers", "the answer") == 0.0
    assert contains("I think it is Paris, France.", "paris") == 1.0
    assert contains("London", "paris") == 0.0
    assert rouge_l("a b c d", "a b c d") == pytest.approx(1.0)
    assert rouge_l("a x c", "a b c") == pytest.approx(2 / 3)
    assert rouge_l("", "a") == 0.0


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_dataset_errors_name_file_line_and_field(tmp_path):
    good = {"prompt": "p", "reference": "r"}
    f = _write(tmp_path / "d.jsonl", [good, "{not json"])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not valid JSON"):
        read_dataset(f)
    f = _write(tmp_path / "d.jsonl", [good, {"prompt": "p"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: field 'reference'"):
        read_dataset(f)
    f = _write(tmp_path / "d.jsonl", [{"prompt": "p", "reference": "r", "task": "bleu"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: field 'task'"):
        read_dataset(f)
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "missing.jsonl")
    # a key given twice: json keeps the last silently (a reference nobody read would be scored against)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"prompt": "p", "reference": "a", "reference": "b"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"twice\.jsonl:1: field 'reference': given twice in one object"):
        read_dataset(twice)
    rows = read_dataset(
        _write(tmp_path / "ok.jsonl", [good, {**good, "task": "contains", "id": 3}]), default_task="loglik"
    )
    assert [r.task for r in rows] == ["loglik", "contains"] and rows[1].id == "3"


def test_score_request_and_dataset(quality_tiny, tmp_path):
    model, tok = quality_tiny
    r = score_request(model, tok, "Python is a programming language. Python is", "a language", "loglik")
    assert 0.0 < r.quality <= 1.0 and r.new_tokens == 0 and r.prompt_tokens > 0
    g = score_request(model, tok, "The pass key is 123. The pass key is", "123", "contains", max_new_tokens=4)
    assert g.quality in (0.0, 1.0) and 0 < g.new_tokens <= 4 and g.total_seconds >= g.prefill_seconds
    f = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "One two three", "reference": "four"},
            {"prompt": "a b", "reference": "c", "task": "rouge_l"},
        ],
    )
    s = score_dataset(model, tok, read_dataset(f), task="loglik", max_new_tokens=3)
    assert s.n == 2 and s.task == "mixed" and 0.0 <= s.mean_quality <= 1.0
