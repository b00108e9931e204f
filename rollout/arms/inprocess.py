"""The in-process arm: the model runs in the pilot's own process (the default, and what the embedded main
job uses). Control is the dense model, treatment the same weights with the challenger's sparse plan applied
for the duration of the call (`arm_context`, the flows' `model_arm`: never left sparse afterwards).

Latency is the model's own time for the request (prefill + greedy decoding, or one forward for `loglik`),
measured by sparse_core.tasks.score_request: no network, no queue."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from rollout.arms.base import ArmAnswer, ArmRequest


def score_in_process(
    model: Any, tok: Any, prompt: str, reference: str, task_name: str, **kw: Any
) -> dict[str, Any]:
    """One request on the model: quality, latency_ms, tokens, error, output. An exception of the model is
    an error observation (error=True, quality 0), never dropped."""
    from sparse_core.tasks import score_request

    t0 = time.perf_counter()
    try:
        s = score_request(model, tok, prompt, reference, task_name, **kw)
    except Exception as exc:  # noqa: BLE001 - a failed answer is an observation (error=True), never dropped
        return {
            "quality": 0.0,
            "latency_ms": (time.perf_counter() - t0) * 1000.0,
            "tokens": 0,
            "error": True,
            "output": f"{type(exc).__name__}: {exc}",
        }
    return {
        "quality": float(s.quality),
        "latency_ms": s.total_seconds * 1000.0,
        "tokens": int(s.prompt_tokens + s.new_tokens),
        "error": False,
        "output": s.output,
    }


class InProcessArm:
    """`plan=None`: the dense model (control); a SparsePlan: the challenger (treatment)."""

    max_concurrency = 1  # one model in one process: requests run one after another

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        plan: Any | None,
        arm_context: Callable[[Any, Any | None], AbstractContextManager[Any]],
    ) -> None:
        self.model, self.tokenizer, self.plan, self._context = model, tokenizer, plan, arm_context
        self.label = "in-process " + ("dense" if plan is None else "sparse")

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer:
        with self._context(self.model, self.plan):
            res = score_in_process(
                self.model,
                self.tokenizer,
                request.prompt,
                request.reference,
                task,
                max_new_tokens=max_new_tokens,
                max_prompt_tokens=max_prompt_tokens,
            )
        return ArmAnswer(res["quality"], res["latency_ms"], res["tokens"], res["error"], res["output"])

    def close(self) -> None:
        return None
