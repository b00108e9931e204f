"""Natural English text that is always on the machine: the Python standard library's documentation
topics (`pydoc_data.topics`). No hub download, identical on every machine with the same Python.

Documents are split into a calibration part and a held-out part *by topic*, so fidelity measured on
held-out text is never measured on text the calibration saw.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sparse_core.errors import SparsePilotError
from sparse_core.prefill_bound import heldout_texts


class CorpusError(SparsePilotError, ValueError):
    """The corpus cannot give what was asked of it (the CLI shows the message, exit 2)."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def natural_documents() -> list[Document]:
    """All stdlib documentation topics, sorted by name (deterministic)."""
    from pydoc_data.topics import topics

    docs = [Document(name=k, text=_clean(v)) for k, v in sorted(topics.items())]
    return [d for d in docs if len(d.text) > 200]


def _clean(text: str) -> str:
    # Drop reST underline rows ("*****", "=====") that carry no language.
    lines = [ln for ln in text.splitlines() if not (ln.strip() and set(ln.strip()) <= set("*=-~^"))]
    return "\n".join(lines).strip()


def split_documents(
    docs: Sequence[Document], *, heldout_fraction: float = 0.25, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic calibration/held-out split by a hash of (seed, name)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    calib, held = [], []
    for d in docs:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{d.name}".encode()).digest()[:8], "big") / 2**64
        (held if h < heldout_fraction else calib).append(d)
    if not calib or not held:  # tiny inputs: fall back to an alternating split
        calib = [d for i, d in enumerate(docs) if i % 4 != 3]
        held = [d for i, d in enumerate(docs) if i % 4 == 3] or list(docs[-1:])
    return calib, held


def corpus_texts(part: str = "heldout", *, seed: int = 0) -> list[str]:
    """Texts of the stdlib corpus: part is 'calibration', 'heldout' or 'all'."""
    docs = natural_documents()
    if part == "all":
        return [d.text for d in docs]
    calib, held = split_documents(docs, seed=seed)
    if part == "calibration":
        return [d.text for d in calib]
    if part == "heldout":
        return [d.text for d in held]
    raise ValueError(f"unknown corpus part {part!r} (calibration, heldout, all)")


def pack_token_windows(
    tokenizer, texts: Sequence[str], length: int, n: int, *, seed: int = 0, min_length: int = 16
) -> list[list[int]]:
    """Cut `n` windows of `length` tokens from the texts joined end to end (order shuffled by seed).

    Texts shorter than a window are packed together (separated by the EOS token), which is how a
    use case's short prompts become long enough sequences to calibrate long-context attention on.
    Returns fewer windows (possibly shorter than `length`, never shorter than `min_length`) when the
    texts run out.
    """
    if length < 1 or n < 1:
        raise ValueError("length and n must be positive")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    windows: list[list[int]] = []
    for i in order:
        stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        stream.extend(sep)
        while len(stream) >= length and len(windows) < n:
            windows.append(stream[:length])
            stream = stream[length:]
        if len(windows) >= n:
            break
    if len(windows) < n and len(stream) >= min_length:
        windows.append(stream[:length])
    return windows


def timing_window(tokenizer, length: int, *, seed: int = 7) -> list[int]:
    """Exactly `length` tokens of the whole corpus (both parts) to time a prefill or a decode on.

    A timing needs text of the length it is labelled with, not text no calibration saw (what a plan
    keeps there is recorded beside the timing); the held-out part alone holds ~7k SmolLM2 tokens, so
    an "8k" window packed from it is ~7k tokens long. Raises ValueError when the corpus cannot fill
    `length` tokens (`CorpusError`), rather than timing a shorter window under the longer label."""
    (win,) = pack_token_windows(tokenizer, corpus_texts("all"), length, 1, seed=seed) or [[]]
    if len(win) < length:
        raise CorpusError(
            f"the stdlib corpus holds {len(win)} tokens with this tokenizer, fewer than the {length} "
            "asked for a timing window"
        )
    return win


def text_fingerprint(texts: Sequence[str]) -> str:
    """Order-sensitive SHA-256 of the texts (recorded in a plan's metadata)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def text_key(text: str) -> str:
    """What makes two texts one for the split: the same after Unicode NFC normalisation, every run of
    whitespace one space and the ends stripped (the rule rollout.traffic.prompt_key judges requests by)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


# The name of `split_texts`'s rule, in a calibration's idempotency key (flows.calibrate): a calibration
# recorded under the earlier rule (by position, so a repeated prompt could land on both sides) held out
# other texts, and is calibrated again rather than reused. Rename it whenever the split changes.
SPLIT_RULE = "distinct-text"


def split_texts(texts: Sequence[str], holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of the distinct texts (`text_key`) by a hash of (seed, index of the text's first
    copy, text), each part in the texts' order: every copy of a text lands on one side, so the held-out
    part never holds text calibration read (review W5: a dataset of one prompt repeated was "held out"
    on its own calibration text). Both parts non-empty; ValueError below 2 distinct texts."""
    first: dict[str, int] = {}
    keys = [text_key(t) for t in texts]
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < 2:
        raise ValueError(
            f"calibration needs at least 2 distinct texts (one is held out); it has {len(first)}"
        )
    scored = []
    for k, i in first.items():
        h = hashlib.sha256(f"{seed}:{i}:".encode() + texts[i].encode("utf-8", "replace")).digest()
        scored.append((int.from_bytes(h[:8], "big"), i, k))
    scored.sort()
    held = {k for _, _, k in scored[: heldout_texts(len(first), holdout_fraction)]}
    sides = [k in held for k in keys]
    return [t for t, h in zip(texts, sides, strict=True) if not h], [
        t for t, h in zip(texts, sides, strict=True) if h
    ]


def texts_shortfall(
    texts: Sequence[str],
    count_tokens: Callable[[str], int],
    holdout_fraction: float,
    seed: int,
    *,
    block_size: int = 64,
    max_seq_len: int = 2048,
    separator_tokens: int = 1,
) -> str | None:
    """Why `calibrate` could not cut one calibration and one held-out window from these texts, or None
    when it can: it needs 2 distinct non-blank texts (one is held out, `split_texts`), and each part must pack
    into at least `min(2 * block_size, max_seq_len)` tokens (`pack_token_windows`: the texts joined, one
    separator token after each). `count_tokens` counts a text's tokens (no special tokens); an upper
    bound on them makes the check lenient, never wrong the other way."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    distinct = len({text_key(t) for t in texts})
    if distinct < 2:
        return (
            "calibration needs at least 2 distinct non-blank prompts (one is held out, and a copy of a "
            f"calibration prompt is no held-out text); it has {distinct}"
        )
    need = min(2 * block_size, max_seq_len)
    parts = split_texts(texts, holdout_fraction, seed)
    got = [sum(count_tokens(t) + separator_tokens for t in part) for part in parts]
    if min(got) >= need:
        return None
    return (
        f"prompts too short to calibrate on: calibration needs at least {need} tokens in both its "
        f"calibration and held-out parts, and they hold {got[0]} tokens ({len(parts[0])} prompts) and "
        f"{got[1]} tokens ({len(parts[1])} prompts); add rows or use longer prompts"
    )
