"""An OIDC sign-in lasts until its ID token expires or it is signed out (rollout.oidc_sessions), on a
real state DB."""

from __future__ import annotations

import pytest

from rollout import oidc_sessions
from rollout.auth import identity_from_oidc
from rollout.settings import Settings

CLAIMS = {"iss": "https://idp.example", "sub": "ann-1", "email": "ann@example.com", "email_verified": True}


@pytest.mark.parametrize(
    ("claims", "now", "why"),
    [
        ({"exp": 1000}, 999.5, None),
        ({"exp": 1000}, 1000, oidc_sessions.EXPIRED),
        ({"exp": "1000"}, 10, oidc_sessions.NO_EXPIRY),  # a claim that is no time never counts
        ({}, 10, oidc_sessions.NO_EXPIRY),
    ],
)
def test_a_sign_in_ends_when_its_id_token_expires(claims: dict, now: float, why: str | None) -> None:
    assert oidc_sessions.expiry_refusal(claims, now) == why


def test_a_signed_out_sign_in_is_refused_and_the_next_one_is_not(sp_home: Settings) -> None:
    first = {**CLAIMS, "iat": 100, "exp": 4_000_000_000, "nonce": "n1"}
    again = {**first, "nonce": "n2"}  # the next sign-in of the same person, even within the same second
    ann = identity_from_oidc(first, ["ann@example.com"])
    assert ann is not None and oidc_sessions.refusal(first) is None
    oidc_sessions.record_sign_out(ann, first)
    assert oidc_sessions.refusal(dict(first)) == oidc_sessions.SIGNED_OUT  # any copy of its cookie
    assert oidc_sessions.refusal(again) is None


_HF = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize("email_verified", [True, False])
def test_a_subject_that_reads_as_a_secret_is_refused_at_sign_in_and_recorded_without_it(
    email_verified: bool, sp_home: Settings
) -> None:
    """Review s48: a provider whose subject is a token (by the audit log's rule, `checked_names`) signed
    the person in, and then every action they signed failed with AuditRefused (the subject goes with
    each signature, even under a verified email). Now the sign-in is refused, saying why with the
    subject redacted, and recorded once per sign-in (an ``auth.oidc_refused`` row) without the token."""
    from sqlalchemy import select

    from rollout import audit
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    claims = {**CLAIMS, "sub": _HF, "email_verified": email_verified, "iat": 100, "exp": 4_000_000_000}
    assert identity_from_oidc(claims, ["ann@example.com", f"https://idp.example#{_HF}"]) is None
    why = oidc_sessions.refusal(claims)
    assert why is not None and "'https://idp.example#hf_***' read as a secret" in why and _HF not in why
    assert oidc_sessions.refusal(dict(claims)) == why  # the next page run of this sign-in: no second row
    with session_scope() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.action == oidc_sessions.OIDC_REFUSED)).all()
        assert [(r.actor, r.entity) for r in rows] == [("anonymous", "oidc_session")]
        assert _HF not in f"{rows[0].entity_id} {rows[0].details}" and "hf_***" in rows[0].details["why"]
        assert audit.verify_chain(s).ok
    plain = {**CLAIMS, "iat": 100, "exp": 4_000_000_000}
    assert oidc_sessions.refusal(plain) is None and identity_from_oidc(plain) is not None
