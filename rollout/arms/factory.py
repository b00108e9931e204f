"""`build_arm`: the arm a use-case spec's `pilot.arms.<role>` describes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollout.arms.base import Arm


def uses_endpoints(spec: Any) -> bool:
    """True when either arm of the spec is served over HTTP (not the flow's own process)."""
    pilot = getattr(spec, "pilot", None)
    if pilot is None:
        return False
    return any(a.kind != "in-process" for a in (pilot.arms.control, pilot.arms.treatment))


def build_arm(arm_spec: Any, role: str, *, in_process: Callable[[], Arm]) -> Arm:
    """`arm_spec` is a rollout.spec.ArmSpec; `in_process` makes the in-process arm (the flows own the model).
    An endpoint arm is checked (reachable, serving the named model) before it is returned."""
    common = {
        "timeout_s": arm_spec.timeout_s,
        "connect_timeout_s": arm_spec.connect_timeout_s,
        "max_concurrency": arm_spec.max_concurrency,
        "api_key_env": arm_spec.api_key_env,
        "role": role,
    }
    if arm_spec.kind == "in-process":
        return in_process()
    if arm_spec.kind == "mlflow":
        from rollout.arms.mlflow_server import MlflowServerArm

        arm: Any = MlflowServerArm(arm_spec.url, **common)
    elif arm_spec.kind == "openai":
        from rollout.arms.openai import OpenAIArm

        arm = OpenAIArm(arm_spec.url, arm_spec.model, **common)
    else:  # the spec's Literal makes this unreachable for a validated spec
        raise ValueError(f"unknown arm kind {arm_spec.kind!r}")
    try:
        arm.check()
    except BaseException:
        arm.close()
        raise
    return arm
