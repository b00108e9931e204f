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
