"""The champion move an approved promotion makes, and the one rule for a champion that changed between the
GO's signature and the move: a rollback (the monitor's alarm about the serving champion, decided while the
promotion was held: `effects.PromotionHeld`) or another move committed meanwhile.

The rule: the promotion is carried out over the champion serving now, whether it had recorded no move yet
or a move that failed and went stale (`registry.stale_move`: its `from_version` is no longer the
champion). The pilot's control arm is by default the dense model in the pilot's own process, not the
champion, so the GO stands on its evidence whichever champion serves. A pilot whose spec version points
its control arm at a served endpoint (`pilot.arms.control`: docs/serving.md, "the model that serves
today", e.g. `sparsepilot serve-model NAME --alias champion`) measured its GO against what that endpoint
served, the champion of its time: once that champion changed, the GO is not carried out
(`ChampionChange.control`, `effects.apply_promotion`: superseded, its pilot stopped for `pilot --again`).
A stale move is never retried (retried, MLflow moved from the champion serving now while its row said
from the one before, and the lineage, read in row order, named a champion MLflow did not serve): it is
marked superseded (`registry.supersede`) and the move is
recorded again, from the champion now serving, under a key of its own (`key_now`). The alias history, the
audit log (`promotion.champion_changed`) and what the portfolio says of it (`rollout.unfinished`) say that
the champion changed since the GO was signed. Before, a promotion with no move yet was finished over the
new champion while one with a stale failed move was superseded, its pilot stopped for `pilot --again`:
two rules for one situation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select

from rollout.db.models import AliasMove, Approval, AuditEntry, GateDecision, as_utc


def moves_of(session: Any, decision_id: int) -> list[AliasMove]:
    """The champion moves recorded for decision `decision_id`'s promotion, oldest first: `promote:<id>`,
    then, where it went stale, each move recorded again after it (`promote:<id>:<superseded row's id>`)."""
    key = f"promote:{decision_id}"
    return list(
        session.scalars(
            select(AliasMove)
            .where(or_(AliasMove.idempotency_key == key, AliasMove.idempotency_key.like(f"{key}:%")))
            .order_by(AliasMove.id)
        )
    )


def current_move(session: Any, decision_id: int) -> AliasMove | None:
    """The promotion's newest recorded move, or None (none recorded yet)."""
    moves = moves_of(session, decision_id)
    return moves[-1] if moves else None


def keys_of(session: Any, decision_id: int) -> list[str]:
    """The idempotency keys of the promotion's moves, newest first (`promote:<id>` where none is recorded)."""
    return [m.idempotency_key for m in reversed(moves_of(session, decision_id))] or [f"promote:{decision_id}"]


def key_now(session: Any, decision_id: int) -> str:
    """The key the promotion's move is made (or retried) under now: its newest row's; after a superseded
    row, a new one named by that row's id, so every finisher of the same state converges on one move."""
    from rollout import registry

    move = current_move(session, decision_id)
    if move is None:
        return f"promote:{decision_id}"
    if move.status == registry.SUPERSEDED:
        return f"promote:{decision_id}:{move.id}"
    return move.idempotency_key


def decision_of_key(key: str) -> str:
    """The decision id a champion move's key names (`promote:12`, `promote:12:40`, `rollback:7`: '12',
    '12', '7'), or the text after the first ':' where it names none."""
    rest = key.partition(":")[2]
    head = rest.split(":", 1)[0]
    return head if head.isdigit() else rest


@dataclass(frozen=True)
class ChampionChange:
    """The champion serving when the GO was signed, and now (None: no champion of ours); `control`: the
    pilot's control arm where it was a served endpoint (`control_endpoint`), whose answers the GO was
    measured against, else None (the dense model in the pilot's process)."""

    signed_over: str | None
    serving: str | None
    control: str | None = None

    def words(self) -> str:
        v = version_words
        changed = (
            f"the champion changed since the GO was signed ({v(self.signed_over)} served then, "
            f"{v(self.serving)} serves now)"
        )
        if self.control is None:
            return f"{changed}: it is promoted over {v(self.serving)} as signed"
        return (
            f"{changed}, and the pilot's control arm was {self.control}, not the dense model: the GO was "
            f"measured against what it served then ({v(self.signed_over)}, the champion of its time), so it "
            "is not promoted"
        )


def version_words(version: str | None) -> str:
    """A champion's MLflow version in words: "v2", or "no champion of ours" (None)."""
    return f"v{version}" if version else "no champion of ours"


def control_endpoint(spec: dict[str, Any]) -> str | None:
    """The control arm of a stored spec version (`SpecVersion.spec`) where it is a served endpoint, in
    words ("the mlflow endpoint http://..."), else None: in-process, the dense model (pure)."""
    from rollout.redact import redact

    control = ((spec.get("pilot") or {}).get("arms") or {}).get("control") or {}
    kind = control.get("kind") or "in-process"
    if kind == "in-process":
        return None
    return f"the {kind} endpoint {redact(str(control.get('url') or ''))}"


def pilot_control(session: Any, d: GateDecision) -> str | None:
    """`control_endpoint` of the spec version decision `d`'s pilot ran under (a pilot started before
    versions were recorded on pilots: the use case's current version)."""
    from rollout.db.models import Pilot, SpecVersion, UseCase

    pilot = session.get(Pilot, d.pilot_id)
    version = pilot.spec_version if pilot is not None else None
    if version is None:
        version = session.get(UseCase, d.use_case_id).current_spec_version
    spec = session.scalar(
        select(SpecVersion.spec).where(
            SpecVersion.use_case_id == d.use_case_id, SpecVersion.version == version
        )
    )
    return control_endpoint(spec or {})


def champion_change(session: Any, d: GateDecision) -> ChampionChange | None:
    """The one rule (module docstring): where the champion serving now is not the one that served when
    the GO's last signature was recorded, the change (what the promotion is carried out over, or, its
    control arm an endpoint, that it is not carried out; and the words that say so), else None. The
    champion then: the lineage of the champion moves committed (their `alias.*.committed` audit entries)
    by the signature's time."""
    signed = session.scalar(
        select(Approval.created_at)
        .where(Approval.decision_id == d.id, Approval.action == "approve")
        .order_by(Approval.id.desc())
        .limit(1)
    )
    return None if signed is None else champion_change_since(session, d, signed)


def champion_change_since(session: Any, d: GateDecision, since: Any) -> ChampionChange | None:
    """`champion_change`'s comparison from any time `since` (the GO's last signature; the start of the
    step whose observations the GO judged: `checks.promotion_over_changed_champion`): the champion of
    ours serving then (the lineage of the champion moves committed by then, decision `d`'s own moves left
    out) and now, where they differ, with `d`'s pilot's endpoint control, else None."""
    from rollout import registry

    own = (f"promote:{d.id}", f"baseline:{d.id}")  # its own moves (the baseline a first promotion records)
    moves = [
        m
        for m in registry.committed_moves(session, d.use_case_id, "champion")
        if m.idempotency_key not in own and not m.idempotency_key.startswith(f"promote:{d.id}:")
    ]
    if not moves:
        return None
    committed_at = dict(
        session.execute(
            select(AuditEntry.entity_id, AuditEntry.ts).where(
                AuditEntry.entity == "alias_move",
                AuditEntry.entity_id.in_([str(m.id) for m in moves]),
                AuditEntry.action.like("alias.%.committed"),
            )
        ).all()
    )
    before = [
        m for m in moves if str(m.id) in committed_at and as_utc(committed_at[str(m.id)]) <= as_utc(since)
    ]
    then, now = registry.champion_lineage(before)[-1:], registry.champion_lineage(moves)[-1:]
    if then == now:
        return None
    return ChampionChange(then[0] if then else None, now[0] if now else None, pilot_control(session, d))


def spec_changed_since(session: Any, d: GateDecision, signed_at: Any) -> str | None:
    """Where a spec version that changed what calibration reads arrived after the GO's signature at
    `signed_at` (the plan not calibrated under the current version: `runs.plan_not_calibrated`), the fact
    in words for the finisher's audit entry: "spec changed since approval: v1 -> v2 (quality_budget.kl):
    the plan was not calibrated under v2; carried out as signed". The promotion is carried out all the same
    (the signature stands; the rule refuses signing, not finishing); None where nothing such changed."""
    from rollout import runs
    from rollout.db.models import Pilot, SpecVersion, UseCase

    uc = session.get(UseCase, d.use_case_id)
    pilot = session.get(Pilot, d.pilot_id)
    stale = None if pilot is None else runs.plan_not_calibrated(session, uc, pilot.model_version_id)
    if stale is None:
        return None
    versions = session.execute(
        select(SpecVersion.version, SpecVersion.created_at).where(SpecVersion.use_case_id == uc.id)
    ).all()
    then = max((v for v, at in versions if as_utc(at) <= as_utc(signed_at)), default=stale.calibrated_under)
    if then == stale.version:
        return None
    return (
        f"spec changed since approval: v{then} -> v{stale.version} ({', '.join(stale.fields)}): the plan was "
        f"not calibrated under v{stale.version}; carried out as signed"
    )
