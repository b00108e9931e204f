"""Who is using this browser session. Local accounts sign in with a password (rollout.auth); OIDC
users come from `st.user` when an [auth] section is configured, while their sign-in holds
(rollout.oidc_sessions: until the ID token expires or the sign-in is signed out). A local Identity lives
only in the server-side session state; every action re-checks the role in rollout, never trusting this
module."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import streamlit as st

from rollout import auth, oidc_sessions
from rollout.auth import Identity

IDENTITY_KEY = "sp_identity"


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all means no OIDC
        return False


def oidc_approvers() -> list[str]:
    listed: list[str] = [a for a in os.environ.get(auth.OIDC_APPROVERS_ENV, "").split(",") if a.strip()]
    try:
        listed += list(st.secrets.get("sparsepilot", {}).get("approvers", []))
    except Exception:  # noqa: BLE001
        pass
    return listed


@contextmanager
def approver_list_known() -> Iterator[None]:
    """Where OIDC is configured, this dashboard's approver list (`oidc_approvers`: its secrets' and the
    environment's) is the list rollout checks an OIDC signer against (`auth.oidc_approvers_known`), so
    the signature of someone taken off it lapses on every page and action, as a demoted local
    account's does; without OIDC here, rollout reads the environment's alone."""
    if not oidc_configured():
        yield
        return
    with auth.oidc_approvers_known(oidc_approvers()):
        yield


def local_accounts_configured() -> bool:
    """Is there any local account to sign in with: the installation's (SPARSEPILOT_ACCOUNTS / _FILE) or,
    on embedded defaults, the first-run `admin` that `make run` prints? A configuration that cannot be
    read counts as configured: the form then says what is wrong with it."""
    if auth.accounts_configured():
        return True
    try:
        return bool(auth.load_accounts())
    except auth.AccountsConfigError:
        return True


def current_identity() -> Identity | None:
    ident = st.session_state.get(IDENTITY_KEY)
    if isinstance(ident, Identity):
        # re-read the accounts on every run: a removed account, a changed role or a reset password
        # takes effect at once, not when the browser session ends (no password work here, a lookup)
        try:
            account = auth.load_accounts().get(ident.name)
        except auth.AccountsConfigError:
            account = None
        if account is None or ident.credential != auth.password_fingerprint(account):
            st.session_state.pop(IDENTITY_KEY, None)
            return None
        if account.role != ident.role:
            ident = replace(ident, role=account.role)
            st.session_state[IDENTITY_KEY] = ident
        return ident
    if oidc_configured() and st.user.get("is_logged_in") and oidc_sign_in_ended() is None:
        return auth.identity_from_oidc(st.user.to_dict(), oidc_approvers())
    return None


def oidc_sign_in_ended() -> str | None:
    """Why this browser's OIDC sign-in (`st.user`) no longer counts (rollout.oidc_sessions.refusal: its
    ID token expired, or it was signed out, in this browser or any other holding a copy of its cookie),
    or None. Checked on every run, so a sign-out ends the copies' sessions at their next click. A state
    DB that cannot say counts as signed out."""
    from sqlalchemy.exc import SQLAlchemyError

    from rollout.db.session import StateDBBusy

    try:
        return oidc_sessions.refusal(st.user.to_dict())
    except (SQLAlchemyError, StateDBBusy):
        return "the state database could not be read to check it"


def sign_in_local(name: str, password: str) -> Identity | None:
    """Check the password behind two limits (auth.TooManyAttempts, before any password work): this
    session's, auth.MAX_FAILURES wrong ones in auth.LOCKOUT_S whatever the names; and the account's,
    shared with every other session and the CLI through the state DB (rollout.auth.sign_in)."""
    failures: list[float] = st.session_state.setdefault("sp_login_failures", [])
    now = time.monotonic()
    failures[:] = [t for t in failures if now - t < auth.LOCKOUT_S]
    until = auth.locked_until(failures, now)
    if until is not None:
        raise auth.TooManyAttempts(until - now)
    ident = auth.sign_in(name, password, via="dashboard")
    if ident is None:
        failures.append(now)
    else:
        failures.clear()
        st.session_state[IDENTITY_KEY] = ident
    return ident


def sign_out() -> None:
    """End this session's sign-in. An OIDC one is also recorded as signed out in the state DB
    (rollout.oidc_sessions.record_sign_out) before Streamlit deletes this browser's cookie, so no copy
    of that cookie signs in again."""
    ident = current_identity()
    st.session_state.pop(IDENTITY_KEY, None)
    if ident is not None and ident.source == "oidc":
        try:
            oidc_sessions.record_sign_out(ident, st.user.to_dict())
        finally:
            st.logout()
