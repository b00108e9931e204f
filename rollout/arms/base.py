"""The arm protocol: one pilot request in, one `ArmAnswer` out.

An arm answers a request the way its model would serve it and scores the answer with the use case's task
(sparse_core.tasks): a generated text against the reference (`exact_match`, `contains`, `rouge_l`), or the
probability the model gives the reference after the prompt (`loglik`, no generation). Latency is what the
arm's caller waited for the answer (for an endpoint: measured at the client, network and queueing
included). A failure of the model or the endpoint (HTTP status >= 400, timeout, refused connection,
malformed response, a score that is not a number in [0, 1]) is an answer with ``error=True`` whose quality
is that of an empty answer: the gate's error guardrails see it; it never raises. Only a misconfigured arm
raises (`ArmConfigError`), before any request is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sparse_core.errors import SparsePilotError


class ArmConfigError(SparsePilotError, ValueError):
    """An arm that cannot be used as configured (missing credential variable, unsupported task...)."""


@dataclass(frozen=True)
class ArmRequest:
    request_id: str
    prompt: str
    reference: str = ""  # "" = no reference: generate only (the control's answer becomes the reference)


@dataclass(frozen=True)
class ArmAnswer:
    quality: float  # in [0, 1]
    latency_ms: float  # > 0
    tokens: int  # prompt + generated tokens where the arm knows them, else 0
    error: bool
    output: str = ""  # the generated text; for an error, what went wrong (kept out of the observation)

    def observation(self, request_id: str, arm: str) -> dict[str, object]:
        return {
            "request_id": request_id,
            "arm": arm,
            "quality": self.quality,
            "latency_ms": self.latency_ms,
            "tokens": self.tokens,
            "error": self.error,
        }


@runtime_checkable
class Arm(Protocol):
    """What the pilot needs from an arm. `answer` must be safe to call from `max_concurrency` threads."""

    label: str  # e.g. "openai http://10.0.0.5:8000/v1 (model sparse-7b)"; logged with each batch
    max_concurrency: int

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer: ...

    def close(self) -> None: ...


def score_output(task: str, output: str, reference: str) -> float:
    """Quality of a generated text against the reference, by the use case's text task."""
    from sparse_core.tasks import score_text

    try:
        return score_text(task, output, reference)
    except ValueError as exc:
        raise ArmConfigError(str(exc)) from None


def loglik_quality(logprobs: list[float]) -> float:
    """`loglik` quality: the geometric-mean per-token probability of the reference (as sparse_core.tasks)."""
    if not logprobs:
        raise ValueError("no reference token log-probabilities")
    return math.exp(sum(logprobs) / len(logprobs))


def failed(task: str, reference: str, latency_ms: float, detail: str) -> ArmAnswer:
    """An error observation: the quality of an empty answer (`sparse_core.tasks.failed_quality`, as
    calibration and the evaluation score a plan's failed row), the client's latency (> 0, as the gate
    needs)."""
    from sparse_core.tasks import failed_quality

    return ArmAnswer(failed_quality(task, reference), max(latency_ms, 0.001), 0, True, detail)


def usable(answer: ArmAnswer, task: str, reference: str) -> ArmAnswer:
    """The answer, or, when its score is not a number in [0, 1], a failed answer (`failed`): a model's
    numerical failure (NaN logits give a NaN `loglik`; a server may send NaN log-probabilities) is the arm
    failing that request, as an HTTP error is. Kept as NaN it failed the batch's data check, and the pilot
    dropped the whole batch, the evidence against the arm with it: selection on the outcome, which let a
    plan that broke on a few % of requests reach GO on the batches it had not broken
    (docs/gate.md, "What is checked")."""
    from sparse_core.tasks import is_score

    if is_score(answer.quality):
        return answer
    return failed(task, reference, answer.latency_ms, f"score is not a number in [0, 1]: {answer.quality!r}")
