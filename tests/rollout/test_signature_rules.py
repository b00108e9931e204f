"""Which override signatures count, on every page and for every action (rollout.approvals'
`counting_signatures` / `withdrawn_signatures` rules, read by rollout.queries):
- a first signature whose signer was demoted lapses; the Approvals page knew, but the portfolio row (and
  the use-case page's "Waits for", which reads it) still said "a second approver" (review s46 T2-2);
- an OIDC approver whose email changed is one person by subject when signing again (`approve`), but
  `withdraw` matched by name only: they could neither withdraw nor sign again (T2-4).
Real state DB, a use case added through `add_usecase`, real accounts (SPARSEPILOT_ACCOUNTS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_not_piloted import PAYS, _challenger

SUBJECT = "https://idp.example#user-42"


def _running_extend(tmp_path: Path, name: str) -> int:
    """A running pilot of `name` whose latest look is an EXTEND that asks nobody (an override may
    promote it: two approvers). Returns the decision's id."""
    from rollout import pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    _challenger(tmp_path, name, **PAYS)
    info = pilot_batches.ensure_pilot(name)
    with session_scope() as s:
        pilot = s.get(Pilot, info["pilot_id"])
        d, _ = pilots.record_decision(
            s,
            idempotency_key=f"t:extend:{name}",
            use_case=pilots.get_use_case(s, name),
            pilot=pilot,
            step=pilots.current_step(s, pilot),
            outcome="EXTEND",
            evidence={"reasons": ["not yet"]},
            explanation="EXTEND",
            data_fingerprint="e" * 64,
            awaiting="none",
        )
        return d.id


def test_a_demoted_signers_first_signature_waits_for_no_second_approver_in_the_portfolio(
    trust_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    from rollout import approvals, queries
    from rollout.auth import Identity
    from tests.fixtures.accounts import cheap_hash
    from tests.fixtures.trust import TRUST_ROLES, password_of

    did = _running_extend(tmp_path, "pays")
    first = approvals.approve(did, Identity("alice", "approver", "cli-env"), "promote it")
    assert first.needs_second_approver
    assert queries.read(queries.portfolio)[0]["waits_for"] == "a second approver"
    roles = {**TRUST_ROLES, "alice": "viewer"}  # alice demoted: her signature lapses
    accounts = ";".join(f"{n}:{r}:{cheap_hash(password_of(n))}" for n, r in roles.items())
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", accounts)
    row = queries.read(queries.portfolio)[0]
    assert row["signatures"] == 0
    assert row["waits_for"] != "a second approver", row["waits_for"]
    assert [r["id"] for r in queries.read(queries.overridable_decisions)] == [did]  # the Approvals page
    assert queries.read(queries.portfolio_totals)["pending_approvals"] == 0


def test_an_oidc_approver_whose_email_changed_withdraws_their_signature(trust_env, tmp_path: Path) -> None:  # noqa: ANN001
    from rollout import approvals, queries
    from rollout.auth import Identity

    did = _running_extend(tmp_path, "pays")
    old = Identity("oidc:dana@old.example", "approver", "oidc", subject=SUBJECT)
    new = Identity("oidc:dana@new.example", "approver", "oidc", subject=SUBJECT)
    assert approvals.approve(did, old, "promote on extend").needs_second_approver
    out = approvals.withdraw(did, new, "signed by mistake")
    assert out.message.startswith(f"signature withdrawn: oidc:dana@new.example's approve of decision {did}")
    row = queries.read(queries.portfolio)[0]
    assert row["signatures"] == 0 and row["waits_for"] != "a second approver"
    # taken back, it counts nothing: the same person may sign again, as the first signature
    again = approvals.approve(did, new, "promote after all")
    assert again.needs_second_approver and not again.took_effect
    # and another person's signature is still not theirs to withdraw
    with pytest.raises(approvals.ApprovalError, match="has no unconfirmed signature"):
        approvals.withdraw(did, Identity("oidc:erin@new.example", "approver", "oidc", subject="x#9"), "no")
