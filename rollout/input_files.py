"""What every reader of a person's input file (a dataset, a request log, a file of observations) says
before it parses a line: a path that is not a file (missing, a directory, one that cannot be stat'ed) and
a file that is compressed. A gzip export read as text was "not valid UTF-8" once (observations) or once
per row (a dataset: every line of it); its magic number says what it is, in one line. `compression` and
`compressed` are pure (a file's first bytes in, a name or the words out: the dataset reader has its
bytes already); `compressed_file` reads them for the readers that stream a file (observations, a request
log); `not_a_file` only asks the file system what the path is."""

from __future__ import annotations

import re
from pathlib import Path

HEAD_BYTES = 10  # the most a magic number below needs (bzip2's header and its first block's magic)

# A magic number none of which starts a text file that could be read: gzip's, zstd's and xz's hold bytes
# that cannot open UTF-8; zip's and bzip2's are followed by control bytes (a CSV whose first column is
# named "PK..." or "BZh9..." is text, and stays readable).
_MAGIC = (
    ("gzip", re.compile(rb"\x1f\x8b")),
    ("zip", re.compile(rb"PK(\x03\x04|\x05\x06|\x07\x08)")),
    ("zstd", re.compile(rb"\x28\xb5\x2f\xfd")),
    ("bzip2", re.compile(rb"BZh[1-9](\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)")),
    ("xz", re.compile(rb"\xfd7zXZ\x00")),
)


def compression(head: bytes) -> str | None:
    """The compression whose magic number a file's first bytes (`head`, HEAD_BYTES of them) start with:
    "gzip", "zip", "zstd", "bzip2" or "xz"; None for anything else."""
    return next((name for name, magic in _MAGIC if magic.match(head)), None)


def compressed(head: bytes) -> str | None:
    """Why a file starting with `head` cannot be read as text, in the readers' words, or None."""
    name = compression(head)
    return None if name is None else f"the file is compressed ({name}): decompress it first"


def compressed_file(path: str | Path) -> str | None:
    """`compressed` of the file at `path`, its first HEAD_BYTES read (an OSError reading it is the
    caller's: each reader says in its own words why a file cannot be read)."""
    with Path(path).open("rb") as head:
        return compressed(head.read(HEAD_BYTES))


def not_a_file(path: str | Path, *, what: str = "file", hint: str = "") -> str | None:
    """Why `path` cannot be read as a file, naming it, or None where it is a file: a directory (an
    export's folder of pages) is said as one, never "not found"; `what` names a missing one ("PATH: request
    log not found"), `hint` what to give instead of a directory."""
    p = Path(path)
    try:
        if p.is_file():
            return None
        if p.is_dir():
            return f"{p}: is a directory, not a file" + (f" ({hint})" if hint else "")
    except OSError as exc:
        return f"{p}: cannot read the file ({exc.strerror or exc})"
    return f"{p}: {what} not found"
