"""Benchmarks behind `sparsepilot bench attention|prefill`: side-by-side timings, tables, JSON, PNG."""
