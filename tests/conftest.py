"""Test plumbing shared by every tier.

Tiers are folders: tests/unit (pure logic, no cluster), tests/integration (the real local control plane,
MLflow, browsers), tests/e2e (the whole flow). Each test is marked after its folder, so
`pytest -m unit` or `-m "not e2e"` select tiers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The kubernetes client fixes its default kubeconfig path when it is imported (at collection, long before the
# cluster fixture runs): point it at the cluster the fixture starts (hack/cluster.sh's state folder) first.
if not os.environ.get("KUBECONFIG"):
    os.environ["KUBECONFIG"] = os.path.join(
        os.environ.get("KUBEFORGE_CLUSTER_DIR")
        or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".state", "cluster"),
        "kubeconfig",
    )


_PLUGINS = [
    "tests.fixtures.cluster",
    "tests.fixtures.mlflow",
    "tests.fixtures.operator",
    "tests.fixtures.browser",
]
pytest_plugins = [p for p in _PLUGINS if importlib.util.find_spec(p) is not None]

_TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.path)).relative_to(root)
        tier = rel.parts[0] if rel.parts else ""
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))
