"""Who is using this browser session. Local accounts sign in with a password (rollout.auth); OIDC
users come from `st.user` when an [auth] section is configured. The Identity lives only in the
server-side session state; every action re-checks the role in rollout, never trusting this module."""

from __future__ import annotations

import os

import streamlit as st

from rollout import auth
from rollout.auth import Identity

IDENTITY_KEY = "sp_identity"
OIDC_APPROVERS_ENV = "SPARSEPILOT_OIDC_APPROVERS"


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all means no OIDC
        return False


def oidc_approvers() -> list[str]:
    listed: list[str] = [a for a in os.environ.get(OIDC_APPROVERS_ENV, "").split(",") if a.strip()]
    try:
        listed += list(st.secrets.get("sparsepilot", {}).get("approvers", []))
    except Exception:  # noqa: BLE001
        pass
    return listed


def local_accounts_configured() -> bool:
    return bool(os.environ.get(auth.ACCOUNTS_ENV) or os.environ.get(auth.ACCOUNTS_FILE_ENV))


def current_identity() -> Identity | None:
    ident = st.session_state.get(IDENTITY_KEY)
    if isinstance(ident, Identity):
        return ident
    if oidc_configured() and st.user.get("is_logged_in"):
        return auth.identity_from_oidc(st.user.to_dict(), oidc_approvers())
    return None


def sign_in_local(name: str, password: str) -> Identity | None:
    ident = auth.authenticate(name, password)
    if ident is not None:
        st.session_state[IDENTITY_KEY] = ident
    return ident


def sign_out() -> None:
    ident = current_identity()
    st.session_state.pop(IDENTITY_KEY, None)
    if ident is not None and ident.source == "oidc":
        st.logout()
