"""What approvals hand out and raise: their errors, the run input a paused approval flow receives
(`ApprovalPayload`) and what a signature did (`ApprovalResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sparse_core.errors import SparsePilotError


class ApprovalError(SparsePilotError, ValueError):
    """The request cannot be accepted (missing reason, wrong decision state, same approver twice)."""


class ClaimRefused(ApprovalError):
    """A decision's effect refused to a caller that does not hold its claim (`waiter.effect_refusal`):
    another finisher claimed it, or the caller finishes it without having claimed it."""


class PromotionHeld(ApprovalError):
    """An approved promotion not carried out while a rollback of the serving champion waits
    (`effects.apply_promotion`): nothing moved, the approval stands and is finished once the rollback is
    decided. Unlike its parent, something was recorded: the signature."""


class FlowNotWaiting(SparsePilotError, RuntimeError):
    """The decision names a Prefect flow run that is no longer paused: it cannot be resumed."""


class ApprovalPayload(BaseModel):
    """What a paused approval flow receives (its `wait_for_input` model is a RunInput with these fields)."""

    approve: bool
    actor: str
    role: str
    reason: str
    approval_id: int
    decision_id: int
    continue_ramp: bool = False  # the ramp was continued (`approve` False): nothing to promote or stop


@dataclass(frozen=True)
class ApprovalResult:
    decision_id: int
    action: str  # approve / reject / continue / withdraw
    approval_id: int
    message: str
    took_effect: bool = False
    needs_second_approver: bool = False
    against_recommendation: bool = False
    resumed_flow_run_id: str | None = None
    applied_directly: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
