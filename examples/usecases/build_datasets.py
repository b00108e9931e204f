"""Build the three sample datasets offline from text that ships with CPython (the pydoc topic
pages in ``pydoc_data.topics``, the standard library's own help text, the built-ins' docstrings).

Deterministic: a fixed seed, sorted inputs, no network, no clock. The help text is CPython's, so
the output is byte-identical for the same Python minor version (3.11 made the committed files).

    python examples/usecases/build_datasets.py            # rewrite the JSONL files
    python examples/usecases/build_datasets.py --check    # fail if the committed files differ

Length targets use ~4 characters per token (SmolLM2's tokenizer measured 4.1 on this text), and
every prompt stays under 3 characters per token x (8192 context - output reserve), the conservative
bound that rollout.validation applies when the model's tokenizer is not at hand.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import pydoc
import random
import re
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261129
MIN_REQUESTS = 60
CONSERVATIVE_CHARS_PER_TOKEN = 3.0
CONTEXT = 8192

# --- long-document summarisation -------------------------------------------------------------------
# Standard-library modules (pure Python or always built) whose help text is long enough for a
# 4k-6k token document and whose docstring opens with a real one-sentence summary.
SUMMARY_MODULES = [
    "argparse", "array", "asyncio.base_events", "asyncio.events", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "datetime", "decimal", "difflib", "doctest",
    "email.headerregistry", "email.message", "email.policy", "ftplib", "http.client", "http.cookiejar",
    "http.server", "imaplib", "importlib.abc", "importlib.resources", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "logging.handlers", "lzma", "mailbox", "numbers", "optparse", "pickle",
    "pstats", "queue", "random", "re", "selectors", "shelve", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "subprocess", "tarfile", "threading", "traceback",
    "types", "typing", "unittest.case", "urllib.parse", "urllib.request", "weakref", "wsgiref.handlers",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "xmlrpc.server", "zipfile",
]  # fmt: skip
SUMMARY_OUTPUT_TOKENS = 128
# Sections whose content depends on the machine (paths, environment, versions) never enter a prompt.
_DROP_SECTIONS = {
    "NAME",
    "FILE",
    "DATA",
    "VERSION",
    "AUTHOR",
    "CREDITS",
    "MODULE REFERENCE",
    "PACKAGE CONTENTS",
}

# --- document QA over retrieved passages ------------------------------------------------------------
QA_OUTPUT_TOKENS = 64

# --- support chat ------------------------------------------------------------------------------------
CHAT_OUTPUT_TOKENS = 96


def _max_prompt_chars(output_tokens: int) -> int:
    return int((CONTEXT - output_tokens - 64) * CONSERVATIVE_CHARS_PER_TOKEN)


def _scrub(text: str) -> str:
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return text.replace("\r\n", "\n")


def _help_text(module_name: str) -> tuple[str, str]:
    """(synopsis, help text without the machine-dependent sections)."""
    module = importlib.import_module(module_name)
    doc = (module.__doc__ or "").strip()
    synopsis = _first_sentence(doc)
    # Rendering touches lazily created class attributes (e.g. ``__annotations__``), so the first
    # rendering in a process can differ from later ones; render once to settle them, keep the second.
    pydoc.plaintext.document(module)
    rendered = pydoc.plaintext.document(module)
    rendered = re.sub(r".\x08", "", rendered)  # pydoc's overstrike bold
    out: list[str] = []
    keep = True
    for line in rendered.splitlines():
        if line and not line.startswith(" ") and line.strip() == line and line.isupper():
            keep = line.strip() not in _DROP_SECTIONS
        if keep:
            out.append(line.rstrip())
    body = "\n".join(out)
    # The first paragraph of the description is the module's own summary: leave it for the reference.
    first_para = doc.split("\n\n", 1)[0].strip()
    if first_para:
        body = body.replace(textwrap.indent(first_para, "    "), "", 1)
    return synopsis, _scrub(body)


def _first_sentence(text: str) -> str:
    para = " ".join(text.split("\n\n", 1)[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return (m.group(1) if m else para).strip()


def _cut_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def build_summaries(rng: random.Random) -> list[dict]:
    rows = []
    limit = _max_prompt_chars(SUMMARY_OUTPUT_TOKENS)
    header = (
        "You are a technical writer. Summarise the following reference document in one sentence "
        "that says what the module is for.\n\n--- DOCUMENT ---\n"
    )
    footer = "\n--- END OF DOCUMENT ---\n\nOne-sentence summary:"
    for name in SUMMARY_MODULES:
        synopsis, body = _help_text(name)
        if len(synopsis) < 12:
            continue
        target = rng.randint(16_000, limit - len(header) - len(footer))  # ~4k-5.9k tokens
        if len(body) < 16_000:
            continue
        doc = _cut_at_line(body, target)
        rows.append(
            {
                "id": f"sum-{name.replace('.', '-')}",
                "prompt": header + doc + footer,
                "reference": synopsis,
                "tags": ["summarisation", name.split(".")[0]],
            }
        )
    return rows


def _topic_passages() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    passages = []
    for key in sorted(topics):
        text = _scrub(topics[key]).strip()
        # Retrieval returns chunks: split long pages into ~1.5k character passages at blank lines.
        chunk: list[str] = []
        size = 0
        for para in text.split("\n\n"):
            chunk.append(para)
            size += len(para)
            if size >= 1500:
                passages.append((key, "\n\n".join(chunk)))
                chunk, size = [], 0
        if chunk:
            passages.append((key, "\n\n".join(chunk)))
    return passages


def build_qa(rng: random.Random) -> list[dict]:
    passages = _topic_passages()
    rule_re = re.compile(r"^\s{3,}([a-z_]+)\s+::=\s+(\S.*)$", re.M)
    candidates = []
    seen: set[str] = set()
    for idx, (_, text) in enumerate(passages):
        for m in rule_re.finditer(text):
            rule, rhs = m.group(1), m.group(2).strip()
            if rule in seen or len(rhs) < 12:
                continue
            seen.add(rule)
            candidates.append((idx, rule, rhs))
    rng.shuffle(candidates)
    limit = _max_prompt_chars(QA_OUTPUT_TOKENS)
    rows = []
    for idx, rule, rhs in candidates[:72]:
        target = rng.randint(8_000, min(16_000, limit))  # ~2k-4k tokens of retrieved context
        chosen = [idx]
        size = len(passages[idx][1])
        for j in rng.sample(range(len(passages)), len(passages)):
            if j == idx or passages[j][1] in {passages[k][1] for k in chosen}:
                continue
            if size + len(passages[j][1]) > target:
                continue
            chosen.append(j)
            size += len(passages[j][1])
            if size > target - 800:
                break
        rng.shuffle(chosen)
        context = "\n\n".join(
            f"[Passage {n + 1} | source: {passages[j][0]}]\n{passages[j][1]}" for n, j in enumerate(chosen)
        )
        prompt = (
            "Answer the question using only the retrieved passages below.\n\n"
            f"{context}\n\n"
            f"Question: In the grammar quoted in the passages, what is the right-hand side of the rule "
            f"`{rule}`?\nAnswer: {rule} ::="
        )
        rows.append(
            {
                "id": f"qa-{rule.replace('_', '-')}",
                "prompt": prompt,
                "reference": rhs,
                "tags": ["qa", passages[idx][0]],
            }
        )
    return rows


def build_chat(rng: random.Random) -> list[dict]:
    import builtins

    openers = [
        "Hi, quick question about Python.",
        "Hello! I'm stuck on something small.",
        "Good morning, I hope you can help.",
        "Hey there, our team has a Python question.",
        "Hi support, I'm new to Python.",
    ]
    rows = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        if not callable(obj) or not obj.__doc__:
            continue
        sentence = _first_sentence(
            obj.__doc__.split("\n\n", 1)[-1] if "(" in obj.__doc__.split("\n")[0] else obj.__doc__
        )
        sentence = sentence.replace(name, "it")
        if len(sentence) < 15 or len(sentence) > 300:
            continue
        need = sentence[0].lower() + sentence[1:]
        prompt = (
            "You are a friendly support agent for a Python training company. Answer briefly and name the "
            "built-in the customer needs.\n\n"
            f"Customer: {rng.choice(openers)} I need something in the standard built-ins that does this: "
            f'"{need}" What is it called?\nAgent: The built-in you need is'
        )
        rows.append({"id": f"chat-{name}", "prompt": prompt, "reference": name, "tags": ["chat", "builtins"]})
    return rows


DATASETS = {
    "longdoc_summaries.jsonl": build_summaries,
    "docs_qa.jsonl": build_qa,
    "support_chat.jsonl": build_chat,
}


def render(builder) -> str:  # noqa: ANN001
    rows = builder(random.Random(SEED))
    if len(rows) < MIN_REQUESTS:
        raise SystemExit(f"{builder.__name__}: only {len(rows)} rows, need {MIN_REQUESTS}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{builder.__name__}: duplicate ids")
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    text = buf.getvalue()
    for leak in ("/root", "/home/", "/work", "/tmp/", sys.prefix):
        if leak in text:
            raise SystemExit(f"{builder.__name__}: a machine path ({leak}) leaked into the data")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    bad = 0
    for filename, builder in DATASETS.items():
        text = render(builder)
        path = args.out / filename
        n = text.count("\n")
        lengths = sorted(len(json.loads(line)["prompt"]) for line in text.splitlines())
        stats = f"{n} rows, prompt chars {lengths[0]}-{lengths[-1]} (median {lengths[n // 2]})"
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            bad += not same
            print(f"{filename}: {'up to date' if same else 'DIFFERS'} ({stats})")
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.name}: {stats}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
