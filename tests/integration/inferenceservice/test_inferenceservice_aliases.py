"""An InferenceService naming models:/<model>@<alias>, with the operator on a real MLflow registry: the pods
get the version the alias points at, and an alias moved in MLflow rolls them to the new version."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster
from tests.fixtures.mlflow import MlflowServer
from tests.integration.inferenceservice.test_inferenceservice_controller import (
    events,
    isvc,
    pods,
    status,
    wait_status,
)

pytestmark = pytest.mark.usefixtures("operator_with_mlflow")


def uri_of(pod: dict[str, Any]) -> str:
    args = pod["spec"]["containers"][0]["args"]
    return str(args[args.index("--model-uri") + 1])


def test_an_alias_is_pinned_to_its_version_and_a_move_rolls_the_pods(
    cluster: Cluster, namespace: str, mlflow_server: MlflowServer
) -> None:
    client = mlflow_server.client()
    model = f"alias-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(model)
    for i in (1, 2):  # the pods run nothing here: any source will do
        client.create_model_version(model, f"s3://bucket/models/{model}/{i}", await_creation_for=0)
    client.set_registered_model_alias(model, "champion", "1")

    cluster.apply(isvc("chat", namespace, replicas=2, model={"uri": f"models:/{model}@champion"}))
    st = wait_status(cluster, "chat", namespace, "Ready", lambda s: s.get("phase") == "Ready")
    assert st["modelUri"] == f"models:/{model}/1"
    assert [uri_of(p) for p in pods(cluster, "chat", namespace, "predictor")] == [f"models:/{model}/1"] * 2

    client.set_registered_model_alias(model, "champion", "2")
    st = wait_status(
        cluster,
        "chat",
        namespace,
        "rolled to version 2",
        lambda s: s.get("modelUri") == f"models:/{model}/2" and s.get("phase") == "Ready",
        timeout=60,
    )
    cluster.wait_until(
        "only version-2 pods",
        lambda: (
            [uri_of(p) for p in pods(cluster, "chat", namespace, "predictor")] == [f"models:/{model}/2"] * 2
        ),
    )
    moved = [m for _, r, m in events(cluster, namespace, "chat") if r == "ModelChanged"]
    assert moved == [f"predictor: rolling out models:/{model}/2 in place of models:/{model}/1"]


def test_an_alias_that_does_not_exist_is_named(
    cluster: Cluster, namespace: str, mlflow_server: MlflowServer
) -> None:
    model = f"alias-{uuid.uuid4().hex[:6]}"
    mlflow_server.client().create_registered_model(model)
    cluster.apply(isvc("none", namespace, model={"uri": f"models:/{model}@champion"}))
    st = wait_status(cluster, "none", namespace, "Pending", lambda s: s.get("phase") == "Pending")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ModelAliasNotFound"
    assert f"registered model {model} has no alias champion" in st["message"]
    assert "modelUri" not in status(cluster, "none", namespace)
    out = cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout
    assert json.loads(out)["items"] == []  # nothing runs an alias that points nowhere
