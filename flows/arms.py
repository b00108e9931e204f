"""The pilot's two arms for a batch, as the use case's spec says (`pilot.arms`, docs/serving.md): the model
in this process (default: control dense, treatment with the challenger's plan) or served endpoints
(`mlflow`, `openai`). The batch itself runs in rollout.arms.step; this module only wires the flows' model
cache into the in-process arms, measures the arms on this host for its load per answer (their rows'
`overloaded`, rollout.arms.host_load) and turns a misconfigured arm into a PilotError naming it."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from flows.common import UseCaseContext, get_model, model_arm, version_plan
from rollout.redact import redact

log = logging.getLogger("sparsepilot.pilot")


def pilot_arms(ctx: UseCaseContext, info: dict[str, Any]) -> tuple[Any, Any]:
    """(control, treatment) for the pilot step in `info` (ensure_pilot's or the monitor's)."""
    from rollout.arms import build_arm
    from rollout.arms.inprocess import InProcessArm

    arms = ctx.spec.pilot.arms

    def dense() -> Any:
        model, tok = get_model(info["base_model_ref"])
        return InProcessArm(model, tok, None, model_arm)

    def sparse() -> Any:
        model, tok = get_model(info["base_model_ref"])
        plan = version_plan(info["plan"], info.get("mlflow_model"), info.get("mlflow_version"))
        return InProcessArm(model, tok, plan, model_arm)

    control = build_arm(arms.control, "control", in_process=dense)
    try:
        treatment = build_arm(arms.treatment, "treatment", in_process=sparse)
    except BaseException:
        control.close()
        raise
    return control, treatment


def answer_with_arms(
    ctx: UseCaseContext,
    info: dict[str, Any],
    requests: list[tuple[str, dict]],
    max_new_tokens: int,
    max_prompt_tokens: int | None,
) -> tuple[list[dict[str, Any]], dict[str, str], str | None]:
    """The batch's observation rows, its void requests (request id -> why: the control arm gave no
    reference to score against; no row in either arm, rollout.arms.step), each logged as a warning, and
    the arms' notes on their load (an endpoint's server process not visible: `host_load.endpoint_notes`,
    None without any), for the batch's load record."""
    from flows.pilot import PilotError
    from rollout.arms import ArmConfigError, run_batch
    from rollout.arms.host_load import endpoint_notes, flag_overloaded, metered

    errors: Counter[str] = Counter()
    first: dict[str, str] = {}
    void: dict[str, str] = {}

    def on_error(request_id: str, arm: str, detail: str) -> None:
        errors[arm] += 1
        first.setdefault(arm, f"{request_id}: {detail}")

    def on_void(request_id: str, detail: str) -> None:
        void[request_id] = detail

    try:
        control, treatment = pilot_arms(ctx, info)
        # the arms on this host, measured for its load per answer (rollout.arms.host_load)
        control = metered(control, ctx.spec.pilot.arms.control)
        treatment = metered(treatment, ctx.spec.pilot.arms.treatment)
        try:
            log.info("%s: control = %s, treatment = %s", ctx.name, control.label, treatment.label)
            rows = run_batch(
                control,
                treatment,
                requests,
                kind=info["kind"],
                salt=info["salt"],
                traffic_pct=info["traffic_pct"],
                task=ctx.task,
                max_new_tokens=max_new_tokens,
                max_prompt_tokens=max_prompt_tokens,
                on_error=on_error,
                on_void=on_void,
            )
            measured = {"control": control, "treatment": treatment}
            flag_overloaded(rows, measured)
            notes = endpoint_notes(measured)
        finally:
            control.close()
            treatment.close()
    except ArmConfigError as exc:
        raise PilotError(f"{ctx.name}: {exc}") from None
    for arm, n in sorted(errors.items()):
        log.warning(
            "%s: %d error answer(s) from the %s arm, e.g. %s", ctx.name, n, arm, redact(first[arm])[:300]
        )
    if void:
        rid = min(void)
        log.warning(
            "%s: %d request(s) void, in both arms: no reference to score against, e.g. %s: %s",
            ctx.name,
            len(void),
            rid,
            redact(void[rid])[:300],
        )
    return rows, void, notes
