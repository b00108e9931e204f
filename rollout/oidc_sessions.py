"""How long an OIDC sign-in lasts. Streamlit keeps a sign-in as a signed cookie holding the ID token's
claims, valid for 30 days and unknown to the server: "Sign out" deletes it from that browser only, and a
copy of it would go on signing in. So a sign-in ends here when its ID token expires (the ``exp`` claim;
a token without one never counts), and a sign-out is recorded in the state DB (an ``auth.oidc_signed_out``
audit row keyed by the sign-in: issuer, subject, ``iat`` and the sign-in's ``nonce``), after which any copy
of that cookie is refused. A sign-in whose subject reads as a secret never counts
(`rollout.auth.oidc_refusal`), recorded once as an ``auth.oidc_refused`` row that does not hold it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping

from rollout.auth import Identity, oidc_refusal

OIDC_SIGNED_OUT = "auth.oidc_signed_out"
OIDC_REFUSED = "auth.oidc_refused"
_SESSION_ENTITY = "oidc_session"

EXPIRED = "its ID token has expired"
NO_EXPIRY = "its ID token has no expiry time"
SIGNED_OUT = "it was signed out"


def _claim_time(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def expiry_refusal(claims: Mapping[str, object], now: float) -> str | None:
    """Why a sign-in with these ID-token claims no longer counts at ``now`` (seconds since the epoch):
    EXPIRED once ``exp`` has passed, NO_EXPIRY without one; None while it holds (pure)."""
    exp = _claim_time(claims, "exp")
    if exp is None:
        return NO_EXPIRY
    return EXPIRED if now >= exp else None


def session_key(claims: Mapping[str, object]) -> str:
    """The sign-in these claims come from, as a digest (an audit row's entity id): issuer, subject (or
    email), issued-at and nonce; every copy of one cookie has the same, the next sign-in another."""
    parts = [str(claims.get(k) or "") for k in ("iss", "sub", "email", "iat", "nonce")]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def record_sign_out(identity: Identity, claims: Mapping[str, object], *, db_url: str | None = None) -> None:
    """An ``auth.oidc_signed_out`` audit row for this sign-in (committed at once): `signed_out` is true
    for it from now on, in every browser and process reading this state DB."""
    from rollout import audit
    from rollout.db.session import session_scope

    details: dict[str, object] = {"iat": claims.get("iat"), "exp": claims.get("exp"), "via": "dashboard"}
    if identity.subject:
        details["subject"] = identity.subject
    with session_scope(db_url) as s:
        audit.record(
            s,
            identity.name,
            OIDC_SIGNED_OUT,
            entity=_SESSION_ENTITY,
            entity_id=session_key(claims),
            details=details,
        )


def signed_out(claims: Mapping[str, object], *, db_url: str | None = None) -> bool:
    """Has the sign-in these claims come from been signed out (`record_sign_out`)?"""
    from sqlalchemy import select

    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    query = (
        select(AuditEntry.id)
        .where(
            AuditEntry.action == OIDC_SIGNED_OUT,
            AuditEntry.entity == _SESSION_ENTITY,
            AuditEntry.entity_id == session_key(claims),
        )
        .limit(1)
    )
    with session_scope(db_url) as s:
        return s.scalar(query) is not None


def record_refused(claims: Mapping[str, object], why: str, *, db_url: str | None = None) -> None:
    """An ``auth.oidc_refused`` audit row for this sign-in (`session_key`, a digest), once: the page
    runs after the first write nothing. Actor ``anonymous`` (the person has no name the log may keep);
    details: the reason, which shows the subject redacted, and the issuer; never the secret."""
    from sqlalchemy import select

    from rollout import audit
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    key = session_key(claims)
    seen = select(AuditEntry.id).where(
        AuditEntry.action == OIDC_REFUSED, AuditEntry.entity == _SESSION_ENTITY, AuditEntry.entity_id == key
    )
    with session_scope(db_url) as s:
        if s.scalar(seen.limit(1)) is None:
            details = {"why": why, "issuer": str(claims.get("iss") or ""), "via": "dashboard"}
            audit.record(
                s, audit.ANONYMOUS_ACTOR, OIDC_REFUSED, entity=_SESSION_ENTITY, entity_id=key, details=details
            )


def refusal(
    claims: Mapping[str, object], *, now: float | None = None, db_url: str | None = None
) -> str | None:
    """Why an OIDC sign-in does not count (`rollout.auth.oidc_refusal`, recorded once: `record_refused`;
    then `expiry_refusal`, then SIGNED_OUT), or None."""
    refused = oidc_refusal(claims)
    if refused is not None:
        record_refused(claims, refused, db_url=db_url)
        return refused
    why = expiry_refusal(claims, time.time() if now is None else now)
    if why is None and signed_out(claims, db_url=db_url):
        why = SIGNED_OUT
    return why
