"""Fixtures of the ModelVersion integration tests: the operator as a real subprocess (so a test can kill it),
watching only its own namespace prefix, against a real MLflow server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from mv_support import Operator, make_namespace, operator_env

from tests.fixtures.cluster import Cluster
from tests.fixtures.mlflow import MlflowServer


@pytest.fixture(scope="session")
def mv_operators(cluster: Cluster) -> Iterator[Callable[..., Operator]]:
    """Factory of operators by key; each started once per session and stopped at its end."""
    made: dict[str, Operator] = {}

    def get(key: str, tracking_uri: str, *, start: bool = True) -> Operator:
        if key not in made:
            op = Operator(key, f"mv{key}", operator_env(cluster, tracking_uri))
            if start:
                op.start()
            made[key] = op
        return made[key]

    yield get
    for op in made.values():
        op.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def registry(
    request: pytest.FixtureRequest, mv_operators: Callable[..., Operator]
) -> tuple[MlflowServer, str]:
    """(MLflow server, namespace prefix of the operator watching it), per backend."""
    server: MlflowServer = request.getfixturevalue(
        "mlflow_server" if request.param == "sqlite" else "mlflow_postgres_server"
    )
    key = "s" if request.param == "sqlite" else "p"
    op = mv_operators(key, server.uri)
    return server, op.prefix


@pytest.fixture
def sqlite_registry(
    mlflow_server: MlflowServer, mv_operators: Callable[..., Operator]
) -> tuple[MlflowServer, str]:
    return mlflow_server, mv_operators("s", mlflow_server.uri).prefix


@pytest.fixture
def new_namespace(cluster: Cluster) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(make_namespace(cluster, prefix))
        return made[-1]

    yield make
    for ns in made:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
