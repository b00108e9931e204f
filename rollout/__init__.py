"""The domain: use cases, state DB, gate statistics, ROI, registry, validation."""
