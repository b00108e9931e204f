"""Traffic sources: every request at most once per pilot, finite datasets end, request logs stream."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from rollout.traffic import RequestLogSource, TrafficError, exhaustion_note, traffic_order_key


def _log(path: Path, n: int, *, start: int = 0, words: int = 20) -> Path:
    with path.open("w") as fh:
        for i in range(start, start + n):
            row = {"id": f"req-{i}", "prompt": f"question {i} " * words, "reference": "x"}
            fh.write(json.dumps(row) + "\n")
    return path


def _handed_out(src: RequestLogSource, batch: int) -> list[str]:
    used: set[str] = set()
    got: list[str] = []
    while out := src.take(batch, used):
        assert len(out) <= batch and src.take(batch, used) == out  # a retried batch gets the same requests
        used.update(r.id for r in out)
        got += [r.id for r in out]
    assert src.remaining(used) == 0
    return got


def test_request_log_hands_each_request_out_once_in_the_pilots_order(tmp_path: Path) -> None:
    """Batch after batch, the log's requests in the order of their salted keys, not the file's: the gate's
    sequences may reject at any row, and a file's order may carry the outcomes (a log sorted by prompt
    length). Another pilot (salt) gets another order."""
    path = _log(tmp_path / "log.jsonl", 30)
    ids = [f"req-{i}" for i in range(30)]
    got = _handed_out(RequestLogSource(path, "pilot-1"), 8)
    assert got == sorted(ids, key=lambda i: traffic_order_key(i, "pilot-1")) != ids
    assert _handed_out(RequestLogSource(path, "pilot-1"), 7) == got  # the batch size does not matter
    other = _handed_out(RequestLogSource(path, "pilot-2"), 8)
    assert sorted(other) == sorted(ids) and other != got


def test_request_log_of_100k_rows_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = _log(tmp_path / "big.jsonl", 100_000, words=40)
    assert path.stat().st_size > 50_000_000
    src = RequestLogSource(path, "s")
    tracemalloc.start()
    try:
        batch = src.take(50, set(f"req-{i}" for i in range(99_000)))  # passes over most of the file
        left = src.remaining({r.id for r in batch})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    unused = [f"req-{i}" for i in range(99_000, 100_000)]
    assert [r.id for r in batch] == sorted(unused, key=lambda i: traffic_order_key(i, "s"))[:50]
    assert left == 100_000 - 50
    # the 99k used ids are the caller's; what the source holds is the n requests it keeps, one row, the
    # set of ids it has seen and a 16-byte key per distinct prompt (rollout.traffic.prompt_key): well
    # under the file
    assert peak < 35_000_000, peak


def test_a_request_log_hands_out_each_prompt_once(tmp_path: Path) -> None:
    """Production logs repeat popular prompts; greedy answers repeat with them, so only a prompt's first
    line is evidence: later copies (up to whitespace and Unicode normalisation) are passed over."""
    prompts = [
        "reset password",
        "invoice?",
        "reset  password\n",
        "caf\u00e9",
        "cafe\u0301",
        "invoice?",
        "new",
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    src = RequestLogSource(path, "s")
    assert sorted(r.id for r in src.take(10, set())) == ["r0", "r1", "r3", "r6"]
    assert src.remaining(set()) == 4 and src.remaining({"r0", "r1"}) == 2
    assert sorted(r.id for r in src.take(10, {"r0"})) == ["r1", "r3", "r6"]  # a used prompt's copies stay out
    # calibration's prompts are matched the same way
    src = RequestLogSource(path, "s", exclude_prompts=["reset password ", "new"])
    assert sorted(r.id for r in src.take(10, set())) == ["r1", "r3"]


def test_request_log_csv_with_excel_bom(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes("\ufeffrequest_id,prompt,reference\nA1,hello there,hi\nA2,second,\n".encode())
    reqs = RequestLogSource(path, "s").take(5, set())
    assert sorted((r.id, r.prompt, r.reference) for r in reqs) == [
        ("A1", "hello there", "hi"),
        ("A2", "second", None),
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"id": "a", "prompt": "p"}\n{"id": "a", "prompt": "q"}\n', "log.jsonl:2: field 'id'"),
        ('{"id": "a", "prompt": ""}\n', "log.jsonl:1: field 'prompt'"),
        ('{"prompt": "p"}\n', "log.jsonl:1: field 'id'"),
        ('{"id": "a", "prompt": "p", "reference": 3}\n', "log.jsonl:1: field 'reference'"),
        ("not json\n", "log.jsonl:1: not valid JSON"),
        ("[1, 2]\n", "log.jsonl:1: must be a JSON object, got list"),
        # what escaped raw (UnicodeDecodeError, ValueError, UnicodeEncodeError later) or was taken as a prompt
        (
            '{"id": "a", "prompt": "p"}\n{"id": ' + "1" * 5000 + ', "prompt": "x"}\n',
            "log.jsonl:2: JSON value cannot",
        ),
        (
            '{"id": "a", "prompt": "bad \\ud800 here"}\n',
            "log.jsonl:1: field 'prompt': contains a lone surrogate",
        ),
        ('{"id": "a", "prompt": "\u200b\u200b"}\n', "log.jsonl:1: field 'prompt': a non-empty string"),
        ('{"id": "\u200b", "prompt": "p"}\n', "log.jsonl:1: field 'id': a non-empty string"),
        ('{"id": "a", "prompt": "seen", "prompt": ""}\n', "log.jsonl:1: field 'prompt': given twice"),
    ],
)
def test_bad_request_log_rows_name_the_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    with pytest.raises(TrafficError, match=where.replace(".", r"\.")):
        RequestLogSource(path, "s").take(10, set())


@pytest.mark.parametrize("name", ["log.csv", "log.jsonl"])
def test_a_request_log_with_both_id_and_request_id_is_refused_unless_they_agree(
    tmp_path: Path, name: str
) -> None:
    """A row naming its request twice, as `id` and as `request_id`, took `id` silently: where the two
    disagree the log is refused, naming the line and both fields; where they agree on every row it reads."""
    rows = [("A", "A", "hello"), ("B", "B2", "world")]
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("id,request_id,prompt\n" + "".join(f"{a},{b},{p}\n" for a, b, p in rows))
    else:
        path.write_text(
            "".join(json.dumps({"id": a, "request_id": b, "prompt": p}) + "\n" for a, b, p in rows)
        )
    with pytest.raises(TrafficError, match=rf"{name}:(3|2): fields 'id' and 'request_id' .* \('B', 'B2'\)"):
        RequestLogSource(path, "s").take(10, set())
    assert RequestLogSource(path, "s").check().problems[0].startswith(f"{path}:")
    agree = tmp_path / f"agree{path.suffix}"
    agree.write_text(path.read_text().replace("B2", "B"))
    assert sorted(r.id for r in RequestLogSource(agree, "s").take(10, set())) == ["A", "B"]


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [  # a spreadsheet's usual exports, and a JSONL line of Latin-1 among UTF-8 ones
        (
            "log.csv",
            "id,prompt\nr1,caf\xe9 au lait\nr2,hello\n".encode("latin-1"),
            "log.csv:2: not valid UTF-8",
        ),
        ("log.csv", "id,prompt\nr1,hello\n".encode("utf-16"), "log.csv:1: not valid UTF-8 at byte 0"),
        (
            "log.jsonl",
            b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n',
            "log.jsonl:2: not valid",
        ),
    ],
)
def test_a_request_log_that_is_not_utf8_names_the_line(
    tmp_path: Path, name: str, data: bytes, where: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TrafficError, match=where.replace(".", r"\.")):
        RequestLogSource(path, "s").take(10, set())


def test_a_request_logs_check_lists_every_bad_line_and_counts_the_rest(tmp_path: Path) -> None:
    """`usecase add` reads the whole log once: every bad line named (up to 8, then counted), the lines
    after a bad one still read."""
    lines = [b'{"id": "r1", "prompt": "hello"}', b'{"id": "r2", "prompt": "caf\xe9"}', b"not json"]
    lines += [b'{"id": "r3", "prompt": "hello "}', b'{"id": "r1", "prompt": "again"}']
    lines += [b'{"id": "x%d"}' % i for i in range(10)]
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    found = RequestLogSource(path, "s").check()
    assert (found.requests, found.distinct_prompts, found.bad_lines) == (2, 1, 13)
    assert [p.removeprefix(f"{path}:") for p in found.problems[:3]] == [
        "2: not valid UTF-8 at byte 27 of the line (a request log is UTF-8: save a spreadsheet's Latin-1 or "
        "UTF-16 export as UTF-8)",
        "3: not valid JSON (Expecting value, column 1)",
        "5: field 'id': 'r1' appears twice in the log",
    ]
    assert len(found.problems) == 8 and found.problems[3].startswith(f"{path}:6: field 'prompt'")


def test_a_line_past_the_bound_ends_the_read_without_holding_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout.traffic import request_log

    monkeypatch.setattr(request_log, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a", "prompt": "ok"}\n' + "x" * 5000 + '\n{"id": "b", "prompt": "p"}\n')
    found = RequestLogSource(path, "s").check()
    assert found.requests == 1 and found.problems == (f"{path}:2: line longer than 1,000 bytes",)


def test_request_log_must_exist_and_be_jsonl_or_csv(tmp_path: Path) -> None:
    with pytest.raises(TrafficError, match="not found"):
        RequestLogSource(tmp_path / "missing.jsonl", "s")
    (tmp_path / "log.txt").write_text("x")
    with pytest.raises(TrafficError, match=r"\.jsonl or \.csv"):
        RequestLogSource(tmp_path / "log.txt", "s")


def test_exhaustion_note_only_for_an_extend_with_nothing_left() -> None:
    status = {"source": "dataset", "distinct_used": 72, "remaining": 0}
    note = exhaustion_note("EXTEND", status, 110)
    assert note and "all 72 distinct requests" in note and "~110" in note
    assert exhaustion_note("EXTEND", {**status, "remaining": 3}, 110) is None
    assert exhaustion_note("GO", status, None) is None
    assert exhaustion_note("EXTEND", None, 110) is None


def test_spec_traffic_source_needs_a_path_only_for_a_log() -> None:
    from rollout.spec import SpecError, parse_spec

    from .usecase_helpers import example_spec

    data = example_spec("docs-qa")
    data["rollout"]["traffic_source"] = {"kind": "request-log"}
    with pytest.raises(SpecError, match="rollout.traffic_source.path"):
        parse_spec(data, "x.yaml")
    data["rollout"]["traffic_source"] = {"kind": "request-log", "path": "logs/prod.jsonl"}
    assert parse_spec(data, "x.yaml").rollout.traffic_source.path == "logs/prod.jsonl"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            b"id;prompt\r\nr1;hello\r\nr2;world\r\nr3;again\r\n",  # a spreadsheet's export in many locales
            "the header has no 'id' (or 'request_id') and no 'prompt' column (found 'id;prompt'); the file "
            "must be comma-separated (its header holds ';')",
        ),
        (
            b"request,prompt\nr1,hello\nr2,world\nr3,again\n",
            "no 'id' (or 'request_id') column (found 'request', 'prompt')",
        ),
    ],
)
def test_a_csv_request_log_without_the_columns_is_refused_once_by_its_header(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    """Review R4: such a log was refused row by row ("field 'id': a non-empty string is required" for
    each), never naming the header."""
    path = tmp_path / "log.csv"
    path.write_bytes(data)
    found = RequestLogSource(path, "s").check()
    assert (found.requests, found.bad_lines) == (0, 1), found.problems
    assert found.problems[0].startswith(f"{path}:1: ") and problem in found.problems[0]


def test_a_csv_request_logs_rows_are_named_by_the_line_they_start_on(tmp_path: Path) -> None:
    """Prompts span lines in a quoted cell; a bad row was named by its last line (the reader's line count
    after it), a prompt of 3 lines two below where it starts, as review R1 found for the imports."""
    path = tmp_path / "log.csv"
    path.write_bytes(b'id,prompt\n,"line one\nline two\nline three"\n\nr1,"a\nb"\nr2,"c\n"\n\nr1,dup\n')
    found = RequestLogSource(path, "s").check()
    assert (found.requests, found.bad_lines) == (2, 2)
    assert [p.removeprefix(f"{path}:") for p in found.problems] == [
        "2: field 'id': a non-empty string is required",
        "11: field 'id': 'r1' appears twice in the log",
    ]


@pytest.mark.parametrize(
    ("data", "requests", "problems"),
    [
        (  # an unquoted comma in a prompt: its second half was dropped silently, the row taken
            b"id,prompt\nr1,hello, world\nr2,fine\n",
            1,
            ["2: more values than header columns (3 values, 2 columns; a value holding a comma is quoted)"],
        ),
        (b"id, prompt , reference\nr1,hello,hi\nr2,world,\n", 2, []),  # `id, prompt` was refused
        (b"id,prompt,,\nr1,hello,,\n", 1, []),  # a spreadsheet's trailing empty columns name no column
        (  # the last 'prompt' won silently
            b"id,prompt,prompt\nr1,hello,\n",
            0,
            ["1: the header names column(s) 'prompt' more than once"],
        ),
    ],
)
def test_a_csv_request_logs_header_and_rows_are_read_as_the_observation_imports(
    tmp_path: Path, data: bytes, requests: int, problems: list[str]
) -> None:
    """Review R3: header names stripped, a column named twice refused, a row with more values than the
    header has columns refused (naming its line, the rows after it still read), as rollout.observations_io
    reads an observation CSV."""
    path = tmp_path / "log.csv"
    path.write_bytes(data)
    found = RequestLogSource(path, "s").check()
    assert [p.removeprefix(f"{path}:") for p in found.problems] == problems
    assert (found.requests, found.bad_lines) == (requests, len(problems))


def test_a_csv_field_over_the_csv_limit_names_the_line(tmp_path: Path) -> None:
    import csv

    limit = csv.field_size_limit()
    path = tmp_path / "log.csv"
    path.write_text("id,prompt\nA1,short\nA2," + "x" * (limit + 10) + "\n")
    with pytest.raises(TrafficError, match=r"log\.csv:3: not valid CSV"):
        RequestLogSource(path, "s").take(5, set())
    assert csv.field_size_limit() == limit  # reading a log never widens the process-wide limit


def _spec_with_source(kind: str, path: str | None = None):
    from rollout.spec import parse_spec

    from .usecase_helpers import example_spec

    data = example_spec("docs-qa")
    data["rollout"]["traffic_source"] = {"kind": kind, **({"path": path} if path else {})}
    return parse_spec(data, "x.yaml")


def test_dataset_traffic_is_the_rows_calibration_never_reads(tmp_path: Path) -> None:
    from rollout.dataset_split import split_rows
    from rollout.traffic import source_for

    rows = [{"id": f"row-{i}", "prompt": f"question {i}", "reference": "x"} for i in range(40)]
    calibration, held_apart = split_rows(rows)
    src = source_for(_spec_with_source("dataset"), rows=rows, salt="pilot-1", spec_dir=tmp_path)
    got = src.take(100, set())
    assert sorted(r.id for r in got) == sorted(r["id"] for r in held_apart) and len(got) == 10
    assert not {r.id for r in got} & {r["id"] for r in calibration}
    assert src.remaining({r.id for r in got}) == 0


def test_a_request_log_passes_over_the_prompts_calibration_read(tmp_path: Path) -> None:
    from rollout.dataset_split import split_rows
    from rollout.traffic import source_for

    rows = [{"id": f"row-{i}", "prompt": f"question {i} " * 20, "reference": "x"} for i in range(40)]
    calibration, _ = split_rows(rows)
    seen_by_calibration = {r["prompt"] for r in calibration}
    log = _log(tmp_path / "log.jsonl", 40)  # the same 40 prompts, under the log's own ids
    src = source_for(_spec_with_source("request-log", str(log)), rows=rows, salt="s", spec_dir=tmp_path)
    got = src.take(100, set())
    assert len(got) == 10 and not {r.prompt for r in got} & seen_by_calibration
    assert [r.id for r in got] == sorted((r.id for r in got), key=lambda i: traffic_order_key(i, "s"))
    assert src.remaining(set()) == 10 and src.remaining({r.id for r in got}) == 0


def test_an_import_may_carry_only_what_the_pilots_traffic_would_be(tmp_path: Path) -> None:
    from rollout.dataset_split import split_rows
    from rollout.traffic import importable, source_for

    rows = [{"id": f"row-{i}", "prompt": f"question {i}", "reference": "x"} for i in range(40)]
    # rows that repeat another's prompt (up to whitespace), later in the file: twin-a's id lands on the
    # calibration side, twin-b's and twin-c0's apart (ids hash to fixed sides); row-0 and row-1
    # calibrate, row-6 is kept apart
    rows += [
        {"id": "twin-a", "prompt": "question 0 ", "reference": "x"},
        {"id": "twin-b", "prompt": " question 6", "reference": "x"},
        {"id": "twin-c0", "prompt": "question  1", "reference": "x"},
    ]
    calibration, kept_apart = split_rows(rows)
    assert {"twin-a", "row-0", "row-1"} <= {r["id"] for r in calibration}
    src = source_for(_spec_with_source("dataset"), rows=rows, salt="s", spec_dir=tmp_path)
    allowed, why = importable(src, rows)
    assert (
        allowed == {r["id"] for r in kept_apart} == {f"row-{i}" for i in (6, 9, 15, 20, 21, 22, 36, 37, 38)}
    )
    assert {k for k, v in why.items() if v.startswith("a request calibration read")} == {
        r["id"] for r in calibration
    }
    assert why["twin-b"].endswith("another kept-apart request has: a prompt is evidence once")
    assert why["twin-c0"] == "a request whose prompt calibration read: the plan was fitted to it"
    assert set(why) | allowed == {r["id"] for r in rows} and not set(why) & allowed
    # a request log: its own first-seen prompts, none calibration read; dataset ids are not its requests
    log = _log(tmp_path / "log.jsonl", 40)
    src = source_for(_spec_with_source("request-log", str(log)), rows=rows, salt="s", spec_dir=tmp_path)
    allowed, why = importable(src, rows)
    assert allowed == {r.id for r in src.take(100, set())} and len(allowed) == 40
    assert why[kept_apart[0]["id"]].endswith("the pilot's traffic is the log")


def test_a_request_log_with_cr_only_line_endings_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines ending in a lone CR (some spreadsheets' CSV export) were read in text mode, then refused by
    the byte-wise reader with Python's "universal-newline mode" advice. Every ending reads the same, a CR
    split from its LF by a read boundary included."""
    import io

    from rollout.traffic import request_log
    from rollout.traffic.request_log import RequestLogSource, raw_lines

    for name, data in {
        "cr.csv": b"id,prompt\r1,hello\r2,world\r",
        "crlf.csv": b"id,prompt\r\n1,hello\r\n2,world",
        "cr.jsonl": b'{"id": "1", "prompt": "hello"}\r{"id": "2", "prompt": "world"}\r',
    }.items():
        (tmp_path / name).write_bytes(data)
        got = [(r.id, r.prompt) for r in RequestLogSource(tmp_path / name, salt="s").requests()]
        assert got == [("1", "hello"), ("2", "world")], name
    monkeypatch.setattr(request_log, "CHUNK", 3)  # "ab\r" | "\ncd" | "\ref" ...
    assert list(raw_lines(io.BytesIO(b"ab\r\ncd\ref\ngh"), 100)) == [b"ab\r\n", b"cd\r", b"ef\n", b"gh"]
    assert list(raw_lines(io.BytesIO(b"abcdefgh\nx"), 4)) == [b"abcde"]  # too long: cut, and the end
