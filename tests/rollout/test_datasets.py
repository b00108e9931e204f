"""The sample datasets are built offline and deterministically from text that ships with CPython."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys

import pytest

from .usecase_helpers import EXAMPLES


def _builder():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("build_datasets", EXAMPLES / "build_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_is_deterministic_and_matches_the_committed_files() -> None:
    b = _builder()
    for build in (b.build_qa, b.build_chat):  # the summaries take seconds: checked below, fresh process
        assert b.render(build) == b.render(build), build.__name__
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the committed files were made from CPython 3.11's own docs")
    # a fresh process, as a user would run it
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "build_datasets.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("up to date") == 3


@pytest.mark.parametrize(
    ("filename", "lo", "hi"),
    [
        ("longdoc_summaries.jsonl", 16_000, 24_000),
        ("docs_qa.jsonl", 8_000, 16_000),
        ("support_chat.jsonl", 100, 2_000),
    ],
)
def test_shapes(filename: str, lo: int, hi: int) -> None:
    rows = [json.loads(x) for x in (EXAMPLES / filename).read_text().splitlines()]
    assert len(rows) >= 60
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(lo <= len(r["prompt"]) <= hi for r in rows)  # ~4 chars per token
    assert all(r["reference"].strip() for r in rows)


def test_qa_answers_are_spans_of_the_retrieved_passages() -> None:
    rows = [json.loads(x) for x in (EXAMPLES / "docs_qa.jsonl").read_text().splitlines()]
    for r in rows:
        context = r["prompt"].split("\n\nQuestion:")[0]
        assert r["reference"] in context, r["id"]


def test_builder_output_depends_only_on_the_seed() -> None:
    b = _builder()
    assert b.build_chat(random.Random(1)) != b.build_chat(random.Random(2))
