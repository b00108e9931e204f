"""A GO judged under a gate looser than the last accepted one is not approved by whoever loosened it
(review s46 A13, T3-1): the baseline (`accepted_baseline`), the settings that make a GO easier and which
way (`GATE_SETTINGS_LOOSER_WHEN`, `loosenings`: pure), and the refusal (`_refuse_the_loosener`).

A GO is easier when its test is weaker (margin, alpha, alpha spent per pilot rather than across the use
case's pilots), when it gets more chances (looks, days), when a guardrail stops less (higher ceilings,
a slower latency SLO, a guardrail judged on fewer rows) or when there is less to pass (fewer ramp steps,
fewer rows before a step's test may decide). Not compared: the planning values (`planned_effect`,
`planned_sd`, `score_type`), which tune the bets but keep the GO's level, and the steps' traffic shares,
which change who is served, not the evidence a GO needs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rollout.approvals.base import ApprovalError
from rollout.auth import Identity, same_person
from rollout.db.models import GateDecision, Pilot, SpecVersion
from rollout.spec import GateSpec, Guardrails


@dataclass(frozen=True)
class GateLoosening:
    """How the gate of the spec version a pilot ran under (`version`) is looser than the last accepted
    one (`baseline`, for the reason `basis`): `net`, the settings looser than the baseline's, and
    `steps`, [(version, its author, [changes])] for each version since the baseline that loosened one
    of those settings against the version before it."""

    version: int
    baseline: int
    basis: str
    net: list[str]
    steps: list[tuple[int, str, list[str]]]


_GATE_DEFAULTS = {name: f.default for name, f in GateSpec.model_fields.items() if not f.is_required()}


_GUARD_DEFAULTS = Guardrails().model_dump()


_SPENDING_LOOSENESS = {"use_case": 0, "pilot": 1}  # each pilot's GO at the whole alpha is looser


def _section(spec: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    node: Any = spec
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _gate(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda spec: (_section(spec, "gate") or {}).get(key, _GATE_DEFAULTS.get(key))


def _guard(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda spec: (_section(spec, "gate", "guardrails") or {}).get(key, _GUARD_DEFAULTS[key])


def _latency_slo(spec: Mapping[str, Any]) -> Any:
    """The latency guardrail's SLO, as `GateSettings.from_spec` takes it: the gate's own, else the spec's
    p95 SLO; None where the spec says neither."""
    own = (_section(spec, "gate", "guardrails") or {}).get("p95_latency_ms")
    if own is not None:
        return own
    slo = spec.get("latency_slo_ms")
    return slo.get("p95") if isinstance(slo, Mapping) else slo


def _ramp(spec: Mapping[str, Any]) -> list[Any] | None:
    steps = (_section(spec, "rollout") or {}).get("steps")
    return steps if isinstance(steps, list) else None


def _step_min_samples(n: int) -> Callable[[Mapping[str, Any]], Any]:
    def read(spec: Mapping[str, Any]) -> Any:
        steps = _ramp(spec) or []
        return (
            steps[n - 1].get("min_samples") if n <= len(steps) and isinstance(steps[n - 1], Mapping) else None
        )

    return read


def _larger(old: Any, new: Any) -> bool:
    return float(new) > float(old)


def _smaller(old: Any, new: Any) -> bool:
    return float(new) < float(old)


def _more_spent_per_pilot(old: Any, new: Any) -> bool:
    return _SPENDING_LOOSENESS.get(new, -1) > _SPENDING_LOOSENESS.get(old, 2)


@dataclass(frozen=True)
class LooserWhen:
    """One gate-relevant setting: its label in messages, how to read it from a stored spec (None: the spec
    cannot say), and whether a change from ``old`` to ``new`` makes a GO easier."""

    label: str
    read: Callable[[Mapping[str, Any]], Any]
    looser: Callable[[Any, Any], bool]

    def change(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
        """'margin 0.2 -> 0.5' where ``after`` is looser than ``before`` on this setting, else None."""
        old, new = self.read(before), self.read(after)
        if old is None or new is None or not self.looser(old, new):
            return None
        show = (lambda v: f"{v:g}") if isinstance(old, int | float) and isinstance(new, int | float) else str
        return f"{self.label} {show(old)} -> {show(new)}"


GATE_SETTINGS_LOOSER_WHEN = (
    LooserWhen("margin", _gate("non_inferiority_margin"), _larger),
    LooserWhen("alpha", _gate("alpha"), _larger),
    LooserWhen("alpha spending", _gate("alpha_spending"), _more_spent_per_pilot),
    LooserWhen("max looks", _gate("max_looks"), _larger),
    LooserWhen("max duration days", _gate("max_duration_days"), _larger),
    LooserWhen("error-rate ceiling", _guard("max_error_rate"), _larger),
    LooserWhen("error-rate increase ceiling", _guard("max_error_rate_increase"), _larger),
    LooserWhen("latency SLO ms", _latency_slo, _larger),
    LooserWhen("latency exceedance", _guard("max_latency_exceedance"), _larger),
    LooserWhen("guardrail min samples", _guard("min_samples"), _smaller),
    LooserWhen(
        "shadow min samples",
        lambda spec: (_section(spec, "rollout", "shadow") or {}).get("min_samples"),
        _smaller,
    ),
    LooserWhen("ramp steps", lambda spec: None if _ramp(spec) is None else len(_ramp(spec) or []), _smaller),
)


def looser_when(versions: list[Mapping[str, Any]]) -> tuple[LooserWhen, ...]:
    """The settings compared across these specs: `GATE_SETTINGS_LOOSER_WHEN`, and each ramp step's
    ``min_samples`` (step N against step N; a step gone is counted by "ramp steps")."""
    most = max((len(_ramp(spec) or []) for spec in versions), default=0)
    steps = tuple(
        LooserWhen(f"step {n} min samples", _step_min_samples(n), _smaller) for n in range(1, most + 1)
    )
    return GATE_SETTINGS_LOOSER_WHEN + steps


def loosenings(
    versions: list[tuple[int, str, dict[str, Any]]],
) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """Of spec versions [(version, author, spec)] from the baseline (first) to the one a pilot ran under
    (last), in order: the gate-relevant settings (`looser_when`) on which the last is looser than the
    baseline (["margin 0.2 -> 0.5", "ramp steps 3 -> 1"]), and each later version that loosened one of
    those against the version before it, with its author and changes. A setting brought back to (or
    tighter than) the baseline's is no loosening, nor is its history: the GO is judged under a gate no
    looser than the one last accepted."""
    if len(versions) < 2:
        return [], []
    first, last = versions[0][2], versions[-1][2]
    net, settings = [], []
    for setting in looser_when([spec for _, _, spec in versions]):
        change = setting.change(first, last)
        if change is not None:
            net.append(change)
            settings.append(setting)
    steps = []
    for (_, _, before), (version, author, now) in zip(versions, versions[1:], strict=False):
        changes = [c for c in (setting.change(before, now) for setting in settings) if c is not None]
        if changes:
            steps.append((version, author, changes))
    return net, steps


def accepted_baseline(session: Any, pilot: Pilot) -> tuple[int, str]:
    """The spec version of the gate last accepted for ``pilot``'s use case, and why: that of its latest
    earlier pilot that was promoted (or later replaced or rolled back) or whose GO an approver approved;
    else 1."""
    approved_go = (
        select(GateDecision.pilot_id)
        .where(GateDecision.outcome == "GO", GateDecision.resolution == "approved")
        .where(GateDecision.pilot_id.is_not(None))
    )
    earlier = session.scalars(
        select(Pilot)
        .where(Pilot.use_case_id == pilot.use_case_id, Pilot.id < pilot.id, Pilot.spec_version.is_not(None))
        .where(Pilot.status.in_(("promoted", "replaced", "rolled_back")) | Pilot.id.in_(approved_go))
        .order_by(Pilot.id.desc())
        .limit(1)
    ).first()
    if earlier is None:
        return 1, "the first spec version: no earlier pilot of the use case was promoted or approved"
    return int(earlier.spec_version), f"the version pilot {earlier.id} ran under, the last accepted"


def gate_loosened(session: Any, d: GateDecision) -> GateLoosening | None:
    """How the gate ``d``'s pilot ran under is looser (a GO comes easier: `looser_when`) than the gate
    last accepted for the use case (`accepted_baseline`), and who loosened
    it in which version since (`loosenings`), else None. Comparing with the version just before the
    pilot's was not enough: loosen in v2, add a reworded v3, and v3 against v2 changed nothing (review
    s46 T3-1)."""
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    if pilot is None or not pilot.spec_version:
        return None
    baseline, basis = accepted_baseline(session, pilot)
    if pilot.spec_version <= baseline:
        return None
    rows = session.scalars(
        select(SpecVersion)
        .where(
            SpecVersion.use_case_id == d.use_case_id,
            SpecVersion.version >= baseline,
            SpecVersion.version <= pilot.spec_version,
        )
        .order_by(SpecVersion.version)
    ).all()
    if not rows or rows[0].version != baseline or rows[-1].version != pilot.spec_version:
        return None
    net, steps = loosenings([(sv.version, sv.created_by, sv.spec) for sv in rows])
    if not net:
        return None
    return GateLoosening(pilot.spec_version, baseline, basis, net, steps)


def _refuse_the_loosener(session: Any, d: GateDecision, who: Identity) -> None:
    """A GO judged under a gate looser than the one last accepted is not approved by anyone who loosened
    it since (in any version between): another approver looks at it (one signature, as for any GO).
    Otherwise one approver could move the gate and then approve what passed it alone (review s46 A13),
    also across versions: loosen in one, reword in the next (T3-1)."""
    loosened = gate_loosened(session, d)
    if loosened is None:
        return
    mine = [
        (version, changes)
        for version, author, changes in loosened.steps
        if same_person(author, who.name, subjects=("", who.subject))
    ]
    if not mine:
        return
    by = "; ".join(f"{author} in version {v} ({', '.join(ch)})" for v, author, ch in loosened.steps)
    raise ApprovalError(
        f"decision {d.id} was judged under spec version {loosened.version}, whose gate is looser than "
        f"spec version {loosened.baseline}'s ({loosened.basis}): {', '.join(loosened.net)}; loosened by "
        f"{by}; its GO needs an approver other than {who.name}, who loosened it in version "
        f"{', '.join(str(v) for v, _ in mine)}; nothing was recorded"
    )
