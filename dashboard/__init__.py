"""The Streamlit ROI and go/no-go dashboard. Reads and writes only through `rollout`; run it with
`sparsepilot dashboard` (entry point: dashboard/app.py)."""
