"""Dashboard pages, each a script that st.navigation runs (see dashboard/app.py)."""
