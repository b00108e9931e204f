"""People deciding: approve or reject a pending decision, or roll a use case back.

Rules enforced here, below every UI, for the CLI and the dashboard alike (the dashboard checks in its
server process; the CLI in the caller's, see rollout.auth):
- an Identity with the approver role and a non-empty reason are required;
- acting against the gate's recommendation (promoting on EXTEND/NO-GO/INVALID, promoting on an
  intermediate step's GO, which skips the remaining ramp steps, or keeping a model whose monitor asked
  for a rollback) needs a second, *different* approver before it takes effect: a different person
  (`rollout.auth.same_person`), so one person signed in once locally and once by OIDC counts once;
- a GO that waits for approval before the plan's last step (a short pilot's, `promote_after_step`) has a
  third answer besides promoting (two approvers) and rejecting: *continue the ramp* (`continue_ramp`),
  one approver, which moves the pilot to the plan's next step as a GO there would have without
  `promote_after_step` (`continue_in`); it promotes nothing and goes against nothing. Its effect moves no
  alias, so it is carried out in the signing transaction (the decision is resolved "continued" with the
  pilot already running at the next step, never one without the other); a paused approval run is then
  resumed only to end (`apply_continue` finds it done);
- a GO judged under a gate looser (any setting that makes a GO easier: a larger non-inferiority margin
  or alpha, alpha spent per pilot, more looks or days, higher guardrail ceilings, fewer ramp steps or
  rows: `GATE_SETTINGS_LOOSER_WHEN`) than the last accepted one (`accepted_baseline`: the spec version
  of the use case's last promoted or approved pilot, else 1) is not approved by anyone who loosened it
  in a version since (`gate_loosened`); another approver signs;
- signing is atomic: the decision is read and signed under a write lock (SQLite ``BEGIN IMMEDIATE``,
  PostgreSQL ``SELECT ... FOR UPDATE``), so of two approvers acting at once exactly one signs and the
  other is told who already did;
- every signature writes an Approval row and an audit entry in the same transaction;
- when a Prefect flow run is paused waiting for this decision, it is resumed with the approval as its
  run input (`resume_flow_run`) once the signature has committed (Prefect is never called under the
  write lock); a recorded run that is no longer paused is a clear error and nothing is written, and one
  that stops waiting between that check and the resume gets the effect applied here instead. A run whose
  waiting process (this host) is gone does not count as waiting (`waiter`); a resumed run that does not
  take the decision up in time (another host's dead waiter) is carried out here, once. When no
  flow run waits (e.g. the main job finished), the effect is applied here directly, via the same
  functions the promote/rollback flows call.

One idea per module: `base` (errors, the run input, a signature's result), `recommendation` (what the gate
recommends, the ramp steps a promotion skips), `checks` (whether a person may act on a decision now, and
its lock), `in_words` (what a signature does, in its message's words), `standing` (where an approved
decision's champion move stands: in effect, or superseded by what), `signatures` (written, counting,
lapsed, withdrawn), `loosening` (the loosened gate and who loosened it), `signing` (`approve`), `resume`
(the paused Prefect run: the one module that imports Prefect), `waiter` (who waits in it, and whether
a resumed run took its decision up), `effects` (`apply_*`), `rollback_requests`
(a person's rollback). Every name is imported from the package: `from rollout.approvals import approve`.
"""

from __future__ import annotations

from rollout.approvals.base import (
    ApprovalError,
    ApprovalPayload,
    ApprovalResult,
    ClaimRefused,
    FlowNotWaiting,
    PromotionHeld,
)
from rollout.approvals.checks import (
    check_approvable,
    check_continuable,
    check_decision_of,
    continue_held,
    lock_decision,
    promotion_held_words,
    promotion_not_calibrated,
    promotion_over_changed_champion,
    promotion_refused_waits,
    refuse_promotion_over_changed_champion,
    refuse_promotion_while_rollback_waits,
    refuse_rejecting_unasked,
    refuse_uncalibrated_promotion,
    rollback_before_promotion,
)
from rollout.approvals.effects import (
    apply_continue,
    apply_decision,
    apply_keep,
    apply_promotion,
    apply_rejection,
    apply_rollback,
    approval_identity,
    baseline_version_id,
    continue_in,
    promotion_held,
    rollback_about,
    unfinished_promotion,
    unfinished_promotion_in,
    unfinished_rejection,
)
from rollout.approvals.in_words import effect_in_words
from rollout.approvals.loosening import (
    GATE_SETTINGS_LOOSER_WHEN,
    GateLoosening,
    LooserWhen,
    accepted_baseline,
    gate_loosened,
    loosenings,
    looser_when,
)
from rollout.approvals.recommendation import (
    explanation_shown,
    ramp_steps_skipped,
    recommendation_in_words,
    recommended_action,
    skip_note,
    skipped_in_words,
)
from rollout.approvals.resume import cancel_abandoned, flow_is_waiting
from rollout.approvals.rollback_requests import request_rollback
from rollout.approvals.signatures import (
    WITHDRAW,
    _sign,
    checked_reason,
    counting_signatures,
    override_signatures,
    signer_subject,
    signer_subjects,
    withdraw,
    withdrawals,
    withdrawn_among,
    withdrawn_signatures,
)
from rollout.approvals.signing import approve
from rollout.approvals.standing import Standing, promotion_in_effect, standing

__all__ = [
    "ApprovalError",
    "ClaimRefused",
    "ApprovalPayload",
    "ApprovalResult",
    "FlowNotWaiting",
    "PromotionHeld",
    "GATE_SETTINGS_LOOSER_WHEN",
    "GateLoosening",
    "LooserWhen",
    "Standing",
    "WITHDRAW",
    "checked_reason",
    "_sign",
    "accepted_baseline",
    "apply_continue",
    "apply_decision",
    "apply_keep",
    "apply_promotion",
    "apply_rejection",
    "apply_rollback",
    "approval_identity",
    "approve",
    "baseline_version_id",
    "cancel_abandoned",
    "check_approvable",
    "check_continuable",
    "check_decision_of",
    "continue_held",
    "continue_in",
    "counting_signatures",
    "effect_in_words",
    "explanation_shown",
    "flow_is_waiting",
    "gate_loosened",
    "lock_decision",
    "loosenings",
    "looser_when",
    "override_signatures",
    "promotion_held",
    "promotion_held_words",
    "promotion_refused_waits",
    "promotion_not_calibrated",
    "promotion_over_changed_champion",
    "promotion_in_effect",
    "ramp_steps_skipped",
    "recommendation_in_words",
    "recommended_action",
    "refuse_promotion_over_changed_champion",
    "refuse_promotion_while_rollback_waits",
    "refuse_rejecting_unasked",
    "refuse_uncalibrated_promotion",
    "request_rollback",
    "rollback_about",
    "rollback_before_promotion",
    "signer_subject",
    "signer_subjects",
    "standing",
    "skip_note",
    "skipped_in_words",
    "unfinished_promotion",
    "unfinished_promotion_in",
    "unfinished_rejection",
    "withdraw",
    "withdrawals",
    "withdrawn_among",
    "withdrawn_signatures",
]
