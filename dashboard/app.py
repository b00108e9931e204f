"""Entry point for `streamlit run dashboard/app.py` (what `sparsepilot dashboard` runs)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from dashboard.data import example_specs, schema_ready
from dashboard.identity import approver_list_known, current_identity, sign_out
from rollout.settings import configure_environment

VIEWS = Path(__file__).resolve().parent / "views"


# A person waits on the page while an action moves an MLflow alias. With MLflow down, its HTTP client
# (MLflow 3 reads these per request) retried a refused connection 7 times with backoff, over 4 minutes,
# before the page said anything. The dashboard process asks for a short budget instead (what an operator
# set wins); a failed move then shows at once as decided but not in effect, with the command that
# finishes it (rollout.unfinished).
MLFLOW_SHORT_BUDGET = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

# what dashboard.data.schema_ready says of a state DB without a schema, and of one it cannot open
NO_SCHEMA = "has no SparsePilot schema yet"
UNREACHABLE = "cannot be reached"


def not_ready_advice(why: str) -> None:
    """What to do about a state DB that is not ready, by what is wrong with it: only an empty one is
    created and given the sample use cases (told to `init` a production database that is merely down,
    its owner would have added the demo use cases to it); one that cannot be reached is checked."""
    if why == NO_SCHEMA:
        cmds = ["sparsepilot init"] + [f"sparsepilot usecase add {p}" for p in example_specs()]
        st.markdown("Create it and add the sample use cases:")
        st.code("\n".join(cmds), language="bash")
    elif why == UNREACHABLE:
        st.markdown(
            "The database server is down, or this URL is not where it runs. Nothing needs creating: ask "
            "whoever runs it to check the server and `SPARSEPILOT_DATABASE_URL`, then reload this page."
        )
    else:  # a schema one migration behind: `init` upgrades it, and adds nothing
        st.markdown("Upgrade its schema (existing data is kept):")
        st.code("sparsepilot init", language="bash")


def main() -> None:
    st.set_page_config(page_title="SparsePilot", page_icon=":material/speed:", layout="wide")
    configure_environment()
    for key, value in MLFLOW_SHORT_BUDGET.items():
        os.environ.setdefault(key, value)
    ready, url, why = schema_ready()
    if not ready:
        st.title("SparsePilot")
        st.error(f"The state database at `{url}` {why}.")
        not_ready_advice(why)
        st.stop()

    ident = current_identity()
    with st.sidebar:
        if ident is None:
            st.caption("Not signed in: read-only.")
        else:
            st.markdown(f"**{ident.name}** · {ident.role}")
            if st.button("Sign out", key="sign_out"):
                sign_out()
                st.rerun()

    pages = [
        st.Page(str(VIEWS / "portfolio.py"), title="Portfolio", icon=":material/dashboard:", default=True),
        st.Page(
            str(VIEWS / "use_case.py"), title="Use case", icon=":material/insights:", url_path="use-case"
        ),
        st.Page(str(VIEWS / "approvals.py"), title="Approvals", icon=":material/gavel:"),
        st.Page(str(VIEWS / "audit.py"), title="Audit", icon=":material/history:"),
        st.Page(str(VIEWS / "login.py"), title="Sign out" if ident else "Sign in", icon=":material/login:"),
    ]
    with approver_list_known():  # an OIDC signer taken off the list no longer counts on any page
        st.navigation(pages).run()


main()
