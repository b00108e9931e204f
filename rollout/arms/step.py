"""One pilot batch through two arms -> observation rows (request_id, arm, quality, latency_ms, tokens, error).

Shadow step: both arms answer every request. Split step (and the monitor): sha256(salt:request_id) assigns
each request to one arm at the step's traffic % (`rollout.pilots.assign_arm`). Per request the two arms run
one after the other, alternating which goes first, so drifting load and warm caches favour neither. Without
a reference the control's answer is the reference: the control generates first, then both are scored
against it (for `loglik` the control's completion becomes the text whose probability both arms give).
A request whose reference the control could not make is void: no row in either arm, whichever the split
assigned it to (it says nothing of the treatment, which was never asked, and a control-assigned one kept
would bias the comparison); `on_void` hears it, and the caller records it as used (a request is evidence
once: a deterministic failure must not be drawn again and again).

Requests run `min(control, treatment).max_concurrency` at a time (in-process arms: one at a time, in order;
endpoints: concurrently, each bounded by its own limit). Rows come back in request order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from typing import Any

from rollout.arms.base import Arm, ArmAnswer, ArmRequest, usable

NO_REFERENCE = "the control arm gave no usable answer to score against"


def run_batch(
    control: Arm,
    treatment: Arm,
    requests: Sequence[tuple[str, dict[str, Any]]],
    *,
    kind: str,
    salt: str,
    traffic_pct: float,
    task: str,
    max_new_tokens: int,
    max_prompt_tokens: int | None,
    on_error: Callable[[str, str, str], None] | None = None,
    on_void: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Observation rows of the batch, in request order. `on_error(request_id, arm, detail)` hears what went
    wrong with each error answer (the detail is not part of the observation). `on_void(request_id, detail)`
    hears each request left out because the control arm gave no reference for it (`NO_REFERENCE`). A run
    that lost its use case's lease stops before its next request (`leases.check_held`: LeaseLost): its
    answers could not be stored, and the requests would load the arms for nothing."""
    from rollout import leases, pilots

    kw = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens}
    shadow = kind == "shadow"

    def one(i: int, rid: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        leases.check_held()
        arm = "both" if shadow else pilots.assign_arm(rid, salt, traffic_pct)
        prompt = row["prompt"]
        ref = (row.get("reference") or "").strip()
        order = ("control", "treatment") if (i % 2 == 0 or not ref) else ("treatment", "control")
        obs: list[dict[str, Any]] = []

        def keep(res: ArmAnswer, which: str) -> None:
            res = usable(res, task, ref)  # a NaN score is this arm failing the request, never a lost batch
            obs.append(res.observation(rid, which))
            if res.error and on_error is not None:
                on_error(rid, which, res.output)

        for which in order:
            if which == "control" and not ref:
                # generated greedily; the text scorer's value against "" is discarded
                gen_task = "rouge_l" if task == "loglik" else task
                gen = control.answer(ArmRequest(rid, prompt, ""), gen_task, **kw)
                ref = "" if gen.error else gen.output.strip()
                if not ref:  # void in both arms: no evidence about either
                    if on_void is not None:
                        on_void(rid, f"{NO_REFERENCE}: {gen.output}" if gen.error else NO_REFERENCE)
                    return []
                if arm in ("both", "control"):
                    keep(control.answer(ArmRequest(rid, prompt, ref), task, **kw), "control")
            elif which == "control" and arm in ("both", "control"):
                keep(control.answer(ArmRequest(rid, prompt, ref), task, **kw), "control")
            elif which == "treatment" and arm in ("both", "treatment"):
                keep(treatment.answer(ArmRequest(rid, prompt, ref), task, **kw), "treatment")
        return obs

    workers = max(1, min(control.max_concurrency, treatment.max_concurrency, len(requests)))
    if workers == 1:
        per_request = [one(i, rid, row) for i, (rid, row) in enumerate(requests)]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pilot-arm") as pool:
            # each request in a copy of this context: it carries the leases the run holds
            futures = [
                pool.submit(copy_context().run, one, i, rid, row) for i, (rid, row) in enumerate(requests)
            ]
            try:
                per_request = [f.result() for f in futures]
            except BaseException:
                for f in futures:  # the requests not yet started are not sent
                    f.cancel()
                raise
    return [o for rows in per_request for o in rows]
