"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py, loaded here."""

pytest_plugins = [
    "tests.fixtures.env",
    "tests.fixtures.postgres",
    "tests.fixtures.dashboard",
    "tests.fixtures.sparse_quality",
    "tests.fixtures.mlflow",
    "tests.fixtures.flows",
    "tests.fixtures.stack",
    "tests.fixtures.models",
    "tests.fixtures.trust",
]
