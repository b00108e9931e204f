"""Sign in with a local account (password checked against its scrypt hash) or with OIDC."""

from __future__ import annotations

import streamlit as st

from dashboard.identity import (
    current_identity,
    local_accounts_configured,
    oidc_configured,
    oidc_sign_in_ended,
    sign_in_local,
    sign_out,
)
from rollout.auth import AccountsConfigError, PermissionDenied, oidc_refusal


def main() -> None:
    ident = current_identity()
    if ident is not None:
        st.title("Signed in")
        st.markdown(f"You are **{ident.name}**, role **{ident.role}** (via {ident.source}).")
        if st.button("Sign out", key="login_sign_out"):
            sign_out()
            st.rerun()
        return
    st.title("Sign in")
    if oidc_configured():
        signed_in = bool(st.user.get("is_logged_in"))
        refused = oidc_refusal(st.user.to_dict()) if signed_in else None  # recorded by current_identity
        ended = oidc_sign_in_ended() if signed_in and refused is None else None
        if refused:
            st.error(f"Single sign-on did not sign you in: {refused}.")
        elif ended:
            st.info(f"Your single sign-on sign-in no longer counts: {ended}. Sign in again.")
        st.button("Sign in with single sign-on", key="oidc_login", on_click=st.login)
    if not local_accounts_configured():
        if not oidc_configured():
            st.warning(
                "No accounts are configured, so everyone is a read-only visitor. Create a password hash "
                "with `sparsepilot hash-password` and set SPARSEPILOT_ACCOUNTS (see docs/operations.md)."
            )
        return
    with st.form("login_form"):
        name = st.text_input("User name", key="login_name")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        try:
            ok = sign_in_local(name, password)
        except AccountsConfigError as exc:
            st.error(f"The accounts configuration is invalid: {exc}")
            return
        except PermissionDenied as exc:  # too many failed sign-ins (this session or the account), no DB
            st.error(f"Not checked: {exc}.")
            return
        if ok is None:
            st.error("Unknown user name or wrong password.")
        else:
            st.rerun()


main()
