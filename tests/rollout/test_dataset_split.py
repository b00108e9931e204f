"""rollout.dataset_split: the rows the evaluation judges on, kept apart from calibration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rollout.dataset_split import EVALUATION_SHARE, split_rows

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "usecases"


def _rows(n: int) -> list[dict]:
    return [{"id": f"row-{i}", "prompt": f"prompt {i}"} for i in range(n)]


@pytest.mark.parametrize("n", [3, 4, 10, 72, 1000])
def test_the_sides_are_disjoint_cover_every_row_and_keep_a_quarter_apart(n):
    rows = _rows(n)
    cal, held = split_rows(rows)
    assert {r["id"] for r in cal}.isdisjoint(r["id"] for r in held)
    assert sorted(r["id"] for r in cal + held) == sorted(r["id"] for r in rows)
    assert len(held) == min(max(round(EVALUATION_SHARE * n), 1), n - 2) and len(cal) >= 2
    assert [r["id"] for r in cal] == [r["id"] for r in rows if r in cal]  # each side in the file's order


def test_the_sides_depend_on_the_ids_not_on_the_order_or_the_run():
    rows = _rows(200)
    shuffled = random.Random(3).sample(rows, len(rows))
    ids = lambda part: sorted(r["id"] for r in part)  # noqa: E731
    assert ids(split_rows(rows)[1]) == ids(split_rows(shuffled)[1])
    assert ids(split_rows(rows)[1]) == ids(split_rows([dict(r) for r in rows])[1])


def test_tiny_datasets_keep_nothing_apart_and_bad_shares_are_refused():
    assert split_rows(_rows(2)) == (_rows(2), [])
    assert split_rows([]) == ([], [])
    with pytest.raises(ValueError, match="share"):
        split_rows(_rows(10), share=1.0)


def test_the_samples_evaluate_on_rows_with_references():
    for name in ("docs_qa", "longdoc_summaries", "support_chat"):
        rows = [json.loads(line) for line in (SAMPLES / f"{name}.jsonl").read_text().splitlines() if line]
        cal, held = split_rows(rows)
        assert len(held) == round(EVALUATION_SHARE * len(rows)) and all(r.get("reference") for r in held)


def test_a_repeated_prompt_is_judged_once_and_never_when_calibration_reads_it():
    rows = _rows(40)
    cal, held = split_rows(rows)
    # copies of a calibration prompt and of a held-apart prompt, under new ids that land apart
    extra = [
        {"id": f"copy-{i}", "prompt": p} for i, p in enumerate([cal[0]["prompt"], held[0]["prompt"]] * 40)
    ]
    cal2, held2 = split_rows(rows + extra)
    judged = [r["prompt"] for r in held2]
    assert len(judged) == len(set(judged))  # each prompt once
    assert not set(judged) & {r["prompt"] for r in cal2}  # never one calibration reads
    dropped = [r for r in extra if r not in cal2 and r not in held2]
    assert dropped and all(r["prompt"] in {cal[0]["prompt"], held[0]["prompt"]} for r in dropped)
