"""Counted nouns in the sentences people read (decision explanations, the dashboard's captions): "1 pilot",
"3 pilots", never "pilot(s)"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 pilot', '2 pilots', '1,200 requests'; `plural` where adding an s is wrong."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
