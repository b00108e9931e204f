"""One JSON object a line, as the dataset and request-log readers take them. A key given twice in an
object is refused (json keeps the last silently, as YAML would: `{"prompt": "visible", "prompt": ""}`
would be read as an empty prompt, or the other way round as a prompt nobody reviewed), and what json
cannot read (a 5000-digit integer, nesting past the recursion limit) is a `LineError` with the reason,
never a raw exception. Lines end at CRLF, LF or a lone CR (the old Mac ending some spreadsheets still
write), for both readers alike (`LINE_END`, `split_lines`): no JSON line holds a raw CR. Pure: text in,
value or `LineError` out; the readers name the file and line."""

from __future__ import annotations

import json
import re
from typing import Any

LINE_END = re.compile(rb"\r\n?|\n")


def split_lines(data: bytes) -> list[bytes]:
    """A file's lines without their endings, as `LINE_END` ends them: the n-th is the file's line n."""
    return LINE_END.split(data)


class LineError(ValueError):
    """Why a line cannot be read; `field` is the key at fault, or "line" for the line as a whole."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class _RepeatedKey(Exception):  # not a ValueError: json.loads must not mistake it for its own
    def __init__(self, key: str) -> None:
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def parse_object(text: str) -> dict[str, Any]:
    """The JSON object on one line; LineError when it is not valid JSON, cannot be read, repeats a key or
    is not an object."""
    try:
        value = json.loads(text, object_pairs_hook=_unique)
    except _RepeatedKey as rep:
        raise LineError(rep.key, "given twice in one object (JSON would silently keep the last)") from None
    except json.JSONDecodeError as exc:
        raise LineError("line", f"not valid JSON ({exc.msg}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # 5000-digit integers, very deep nesting
        raise LineError("line", f"JSON value cannot be read ({str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise LineError("line", f"must be a JSON object, got {type(value).__name__}")
    return value
