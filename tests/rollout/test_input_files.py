"""A person's input files (dataset, request log, observations) before a line is parsed: a compressed file
said in one line naming it (each reader), a directory said as one, text that starts like a magic number
still read, and the line endings a dataset and a request log both read."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path

import pytest

from rollout.input_files import compression
from rollout.observations_io import ObservationImportError, read_observations
from rollout.traffic import RequestLogSource, TrafficError
from rollout.validation import read_dataset

ROWS = "".join(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n" for i in range(14)).encode()


def _zip(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("rows.jsonl", data)
    return out.getvalue()


COMPRESSED = {  # zstd's frame by its magic number and header alone: the stdlib writes none
    "gzip": gzip.compress,
    "zip": _zip,
    "zstd": lambda data: b"\x28\xb5\x2f\xfd\x24\x00\x01\x00\x00" + data,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


def _refusal(reader: str, path: Path) -> str:
    """What `reader` says of the file, as one string (the dataset's failures one per line)."""
    if reader == "dataset":
        rows, failures, _ = read_dataset(path)
        assert not rows.line
        return "\n".join(f.describe(str(path)) for f in failures)
    if reader == "request log":
        with pytest.raises(TrafficError) as info:
            RequestLogSource(path, "s").check()
        return str(info.value)
    with pytest.raises(ObservationImportError) as info:
        read_observations(path)
    return str(info.value)


@pytest.mark.parametrize("kind", list(COMPRESSED))
@pytest.mark.parametrize("reader", ["dataset", "request log", "observations"])
def test_a_compressed_file_is_refused_in_one_line_naming_it(tmp_path: Path, reader: str, kind: str) -> None:
    """A gzip export read as text was "not valid UTF-8 (byte 1 ...)" (observations), one "invalid UTF-8"
    line per row (a dataset: 14 for the sample), or per line up to eight (a request log); each reader says
    in one line, naming the file, that it is compressed."""
    path = tmp_path / "export.jsonl"
    path.write_bytes(COMPRESSED[kind](ROWS))
    said = _refusal(reader, path)
    where = f"{path}: dataset: " if reader == "dataset" else f"{path}: "
    assert said == f"{where}the file is compressed ({kind}): decompress it first"


@pytest.mark.parametrize(
    ("reader", "hint"),
    [
        ("request log", "a request log is one .jsonl or .csv file"),
        ("observations", "name each file of observations itself"),
    ],
)
def test_a_directory_is_said_to_be_one(tmp_path: Path, reader: str, hint: str) -> None:
    """An export's folder given as a request log was "request log not found", untrue of a path that is
    there; it is said as the observations' reader says it (`rollout.input_files.not_a_file`)."""
    folder = tmp_path / "export.jsonl"
    folder.mkdir()
    assert _refusal(reader, folder) == f"{folder}: is a directory, not a file ({hint})"


@pytest.mark.parametrize(
    "head", [b"PK,prompt\n", b"PKid,prompt\n", b"BZh9,prompt\n", b"\x1f", b"", b'{"id": "x"}']
)
def test_text_that_starts_like_a_magic_number_is_not_compressed(head: bytes) -> None:
    assert compression(head) is None


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_dataset_reads_the_line_endings_a_request_log_reads(tmp_path: Path, ending: bytes) -> None:
    """A dataset whose lines end in a lone CR (the old Mac ending some spreadsheets still write) was one
    line, "row 1: line: not valid JSON (Extra data ...)", while the request-log reader read the same file
    line by line; both read every ending alike, a bad line named by the same number."""
    lines = [b'{"id": "a", "prompt": "one"}', b"{oops", b'{"id": "b", "prompt": "two"}']
    path = tmp_path / "rows.jsonl"
    path.write_bytes(ending.join(lines) + ending)
    rows, failures, _ = read_dataset(path)
    assert (rows.id, rows.line) == (["a", "b"], [1, 3])
    assert [f.describe(str(path)) for f in failures] == [
        f"{path}: row 2: line: not valid JSON (Expecting property name enclosed in double quotes, column 2)"
    ]
    found = RequestLogSource(path, "s").check()
    assert (found.requests, found.problems) == (
        2,
        (f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes, column 2)",),
    )
