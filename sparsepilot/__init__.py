"""The `sparsepilot` command line: the composition root that wires sparse_core, rollout, flows and
the dashboard together. Library code never imports this package."""
