"""Use-case task scoring on a JSONL dataset of prompts with references.

Each row: {"prompt": str, "reference": str, "task"?: str, "id"?: str}. The task (how a response is
scored) is chosen per dataset, and a row may override it:

- ``exact_match``: normalised greedy output equals the normalised reference;
- ``contains``: the normalised reference occurs in the normalised output;
- ``rouge_l``: ROUGE-L F1 between output and reference tokens (words);
- ``loglik``: the geometric-mean per-token probability of the reference given the prompt (no
  generation; the most sensitive and cheapest signal, and the right one for long-context datasets).

Every score is in [0, 1]. `score_request` scores one request (the pilot calls it per request and
records latency); `score_dataset` scores a file.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sparse_core.errors import SparsePilotError

TASKS = ("exact_match", "contains", "rouge_l", "loglik")


class DatasetError(SparsePilotError, ValueError):
    """A malformed dataset file or row; the message names the file, row and field."""


@dataclass(frozen=True)
class TaskRow:
    prompt: str
    reference: str
    task: str | None = None
    id: str | None = None


class ScoreError(SparsePilotError, ValueError):
    """A reference model's score that is no score: the model or the task is broken, not a plan."""


@dataclass
class RequestScore:
    quality: float  # in [0, 1]
    task: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    total_seconds: float
    output: str = ""
    failed: bool = False  # the model gave no score (see `checked`): quality is a failed answer's

    @property
    def tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskScores:
    task: str
    n: int
    mean_quality: float
    per_row: list[RequestScore] = field(default_factory=list)

    def to_dict(self, *, rows: bool = False) -> dict:
        d = {"task": self.task, "n": self.n, "mean_quality": self.mean_quality}
        if rows:
            d["rows"] = [r.to_dict() for r in self.per_row]
        return d


class _Twice(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _once(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, a key given twice refused (`json` keeps the last silently: a
    `{"reference": "a", ..., "reference": "b"}` row would be scored against a reference nobody read)."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _Twice(key)
        obj[key] = value
    return obj


def read_dataset(path: str | Path, *, default_task: str | None = None) -> list[TaskRow]:
    """Parse and check a JSONL dataset; a bad row raises DatasetError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    rows: list[TaskRow] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_once)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except _Twice as twice:
                raise DatasetError(
                    f"{path}:{lineno}: field {twice.key!r}: given twice in one object (JSON would silently "
                    "keep the last)"
                ) from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object")
            for fld in ("prompt", "reference"):
                v = obj.get(fld)
                if not isinstance(v, str) or not v.strip():
                    raise DatasetError(f"{path}:{lineno}: field {fld!r} must be a non-empty string")
            task = obj.get("task", default_task)
            if task is not None and task not in TASKS:
                raise DatasetError(
                    f"{path}:{lineno}: field 'task' is {task!r}; expected one of {list(TASKS)}"
                )
            rid = obj.get("id")
            rows.append(TaskRow(obj["prompt"], obj["reference"], task, None if rid is None else str(rid)))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------------
# Pure scoring functions


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    return float(normalise(output) == normalise(reference))


def contains(output: str, reference: str) -> float:
    ref = normalise(reference)
    return float(bool(ref) and ref in normalise(output))


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 on normalised words (longest common subsequence)."""
    a, b = normalise(output).split(), normalise(reference).split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


_TEXT_SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "rouge_l": rouge_l,
}
TEXT_TASKS = tuple(_TEXT_SCORERS)  # the tasks that score a generated text; `loglik` scores no text


def score_text(task: str, output: str, reference: str) -> float:
    """Quality of a generated text against the reference by a text task (ValueError for any other task)."""
    if task not in _TEXT_SCORERS:
        raise ValueError(f"task {task!r} is not a text task; expected one of {list(TEXT_TASKS)}")
    return float(_TEXT_SCORERS[task](output, reference))


# ----------------------------------------------------------------------------------------------------
# Model-facing scoring


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def score_request(
    model,
    tokenizer,
    prompt: str,
    reference: str,
    task: str,
    *,
    max_new_tokens: int = 32,
    max_prompt_tokens: int | None = None,
) -> RequestScore:
    """Score one request. Generation tasks run a timed prefill then greedy decoding on its KV cache;
    `loglik` runs one forward over prompt + reference. Quality is in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    dev = _device(model)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None and len(p_ids) > max_prompt_tokens:
        p_ids = p_ids[-max_prompt_tokens:]  # keep the end: that is where the question is
    if not p_ids:
        raise ValueError("empty prompt after tokenisation")
    if task == "loglik":
        r_ids = tokenizer(" " + reference.strip(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids], device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, logits_to_keep=len(r_ids) + 1).logits[0, :-1].float()
        _sync(dev)
        dt = time.perf_counter() - t0
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r_ids, device=dev)[:, None])
        quality = math.exp(float(lp.mean()))
        return RequestScore(quality, task, len(p_ids), 0, dt, dt, "")

    from sparse_core.decode.cache import paged_cache_kwargs

    ids = torch.tensor([p_ids], device=dev)
    eos = tokenizer.eos_token_id
    _sync(dev)
    t0 = time.perf_counter()
    # PagedCache: appends without re-copying the cache every step (dense or sparse alike)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **paged_cache_kwargs(model))
    _sync(dev)
    t_prefill = time.perf_counter() - t0
    cache = out.cache
    nxt = int(out.logits[0, -1].argmax())
    gen: list[int] = []
    for _ in range(max_new_tokens):
        if eos is not None and nxt == eos:
            break
        gen.append(nxt)
        if len(gen) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=dev), cache=cache, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
    _sync(dev)
    total = time.perf_counter() - t0
    text = tokenizer.decode(gen, skip_special_tokens=True)
    quality = _TEXT_SCORERS[task](text, reference)
    return RequestScore(quality, task, len(p_ids), len(gen), t_prefill, total, text)


def score_dataset(
    model,
    tokenizer,
    rows: Sequence[TaskRow],
    *,
    task: str = "loglik",
    max_new_tokens: int = 32,
    max_prompt_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    reference_model: bool | None = None,
) -> TaskScores:
    """Score every row (row.task overrides `task`). With `reference_model` set, a quality that is not a
    score is the tested model failing the row, or an error for the reference model (`checked`)."""
    scores: list[RequestScore] = []
    for i, r in enumerate(rows):
        sc = score_request(
            model,
            tokenizer,
            r.prompt,
            r.reference,
            r.task or task,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
        )
        if reference_model is not None:
            sc = checked(sc, r.reference, row=_row_label(i, r), reference_model=reference_model)
        scores.append(sc)
        if progress:
            progress(1)
    tasks = {s.task for s in scores}
    mean = sum(s.quality for s in scores) / len(scores) if scores else float("nan")
    return TaskScores(
        task=tasks.pop() if len(tasks) == 1 else "mixed", n=len(scores), mean_quality=mean, per_row=scores
    )


def _row_label(i: int, row: TaskRow) -> str:
    """How an error names a task row: its place (from 1) and its id."""
    return f"task row {i + 1}" + (f" (id {row.id!r})" if row.id else "")


def is_score(q: object) -> bool:
    """A task score is a number in [0, 1]. Anything else (NaN from NaN logits, inf) is no answer."""
    return isinstance(q, int | float) and not isinstance(q, bool) and math.isfinite(q) and 0.0 <= q <= 1.0


def failed_quality(task: str, reference: str) -> float:
    """What an answer the model failed to give scores: an empty answer's quality (0 for `loglik`)."""
    if task == "loglik" or not reference:
        return 0.0
    return float(_TEXT_SCORERS[task]("", reference))


def checked(score: RequestScore, reference: str, *, row: str, reference_model: bool) -> RequestScore:
    """`score` when its quality is a score. Otherwise, for the model under test (a sparse plan), the
    model failing that request: a failed answer's quality, `failed` set (a plan that breaks numerically
    on a row is evidence against the plan, as the pilot counts it: rollout.arms.base.usable); for the
    reference (dense) model, a ScoreError naming the row: a broken reference judges nothing."""
    if is_score(score.quality):
        return score
    if reference_model:
        raise ScoreError(
            f"{row}: the dense model's {score.task} score is {score.quality!r}, not a number in [0, 1]; "
            "the model or the task is broken, and no plan can be judged against it"
        )
    return replace(score, quality=failed_quality(score.task, reference), output="", failed=True)
