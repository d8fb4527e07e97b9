"""ModelVersion against a real MLflow registry and the real local control plane.

What MLflow holds is always checked with MLflow's own MlflowClient. The operator runs as a subprocess
(conftest.Operator) watching only its namespace prefix."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from mv_support import (
    Operator,
    Proxy,
    condition,
    get_mv,
    make_run,
    modelversion,
    operator_env,
    unique_model,
    versions_with_uid,
    wait_condition,
    wait_event,
    wait_for,
)

from tests.fixtures.cluster import Cluster
from tests.fixtures.mlflow import MlflowServer

pytestmark = pytest.mark.integration


def aliases_of(client: Any, model: str) -> dict[str, str]:
    return {a: str(v) for a, v in (client.get_registered_model(model).aliases or {}).items()}


def test_create_alias_move_tag_and_delete_policies(
    cluster: Cluster, registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    server, prefix = registry
    client = server.client()
    ns = new_namespace(prefix)
    model = unique_model()
    run_id = make_run(server)
    cluster.apply(
        [
            modelversion(
                "keep",
                ns,
                model,
                {"runId": run_id},
                aliases=["champion"],
                tags={"team": "a"},
                description="first",
                deletionPolicy="Keep",
            ),
            modelversion(
                "archive",
                ns,
                model,
                {"uri": f"runs:/{run_id}/model"},
                aliases=["staging"],
                deletionPolicy="Archive",
            ),
            modelversion("delete", ns, model, {"uri": "s3://bucket/models/x"}, deletionPolicy="Delete"),
        ]
    )
    objs = {n: wait_condition(cluster, ns, n, "Ready") for n in ("keep", "archive", "delete")}

    keep = objs["keep"]
    st = keep["status"]
    assert st["phase"] == "Ready" and st["registryStatus"] == "READY"
    assert st["modelUri"] == f"models:/{model}/{st['registryVersion']}"
    assert st["sourceUri"] == f"runs:/{run_id}/model" and st["runId"] == run_id
    assert st["runUrl"].endswith(f"/runs/{run_id}") and st["aliases"] == ["champion"]
    assert st["observedGeneration"] == keep["metadata"]["generation"]
    mv = versions_with_uid(client, model, keep["metadata"]["uid"])
    assert len(mv) == 1 and mv[0].version == st["registryVersion"]
    assert mv[0].tags["team"] == "a" and mv[0].description == "first" and mv[0].run_id == run_id
    versions = {n: o["status"]["registryVersion"] for n, o in objs.items()}
    assert aliases_of(client, model) == {"champion": versions["keep"], "staging": versions["archive"]}

    # move: champion goes from "keep" to "delete"; tags and description change
    cluster.merge_patch(
        "modelversion",
        "keep",
        ns,
        {"spec": {"aliases": [], "tags": {"team": "b", "stage": "x"}, "description": "second"}},
    )
    wait_for("champion released", lambda: "champion" not in aliases_of(client, model))
    cluster.merge_patch("modelversion", "delete", ns, {"spec": {"aliases": ["champion"]}})
    wait_for("champion moved", lambda: aliases_of(client, model).get("champion") == versions["delete"])
    wait_for(
        "status of keep", lambda: (get_mv(cluster, ns, "keep") or {}).get("status", {}).get("aliases") == []
    )
    v = client.get_model_version(model, versions["keep"])
    assert v.tags["team"] == "b" and v.tags["stage"] == "x" and v.description == "second"
    cluster.merge_patch("modelversion", "keep", ns, {"spec": {"tags": {"team": "b", "stage": None}}})
    wait_for("tag removed", lambda: "stage" not in client.get_model_version(model, versions["keep"]).tags)
    wait_for(
        "status of delete",
        lambda: condition(get_mv(cluster, ns, "delete"), "AliasesReady").get("message") == "champion",
    )

    # deletion policies
    cluster.kubectl("delete", "modelversion", "keep", "archive", "delete", "-n", ns, "--timeout=60s")
    kept = client.get_model_version(model, versions["keep"])
    assert "kubeforge.io/archived" not in kept.tags
    archived = client.get_model_version(model, versions["archive"])
    assert archived.tags["kubeforge.io/archived"] == "true" and not archived.aliases
    remaining = {m.version for m in client.search_model_versions(f"name = '{model}'")}
    assert versions["delete"] not in remaining and versions["keep"] in remaining
    assert aliases_of(client, model) == {}


def test_alias_conflict_oldest_wins_reported_on_both_and_stable(
    cluster: Cluster, sqlite_registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    server, prefix = sqlite_registry
    client = server.client()
    ns = new_namespace(prefix)
    model = unique_model()
    cluster.apply(modelversion("first", ns, model, {"uri": "s3://b/first"}, aliases=["champion"]))
    first = wait_condition(cluster, ns, "first", "Ready")
    time.sleep(1.1)  # creationTimestamp has a 1 s resolution: make "second" strictly newer
    cluster.apply(modelversion("second", ns, model, {"uri": "s3://b/second"}, aliases=["champion", "canary"]))
    second = wait_condition(cluster, ns, "second", "AliasesReady", "False", "AliasConflict")
    assert (
        condition(second, "Ready")["status"] == "False"
        and condition(second, "Ready")["reason"] == "AliasConflict"
    )
    assert f"{ns}/first" in condition(second, "AliasesReady")["message"]
    wait_event(cluster, ns, "second", "AliasConflict")
    wait_event(cluster, ns, "first", "AliasConflict")
    # the winner keeps the alias and stays Ready, and says so
    first = wait_condition(cluster, ns, "first", "AliasesReady", "True", "AliasConflict")
    assert condition(first, "Ready")["status"] == "True"
    v_first = first["status"]["registryVersion"]
    v_second = (get_mv(cluster, ns, "second") or {})["status"]["registryVersion"]
    # never flapping: several drift periods later the alias has not moved
    seen = set()
    for _ in range(10):
        seen.add(aliases_of(client, model).get("champion"))
        time.sleep(0.5)
    assert seen == {v_first}
    assert aliases_of(client, model)["canary"] == v_second
    # the winner goes away: the other gets the alias
    cluster.kubectl("delete", "modelversion", "first", "-n", ns, "--timeout=60s")
    wait_condition(cluster, ns, "second", "Ready", timeout=30)
    assert aliases_of(client, model)["champion"] == v_second


def test_drift_in_mlflow_is_corrected_with_an_event(
    cluster: Cluster, sqlite_registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    server, prefix = sqlite_registry
    client = server.client()
    ns = new_namespace(prefix)
    model = unique_model()
    cluster.apply(
        modelversion("mv", ns, model, {"uri": "s3://b/k"}, aliases=["champion"], tags={"team": "a"})
    )
    obj = wait_condition(cluster, ns, "mv", "Ready")
    ours = obj["status"]["registryVersion"]
    other = client.create_model_version(model, "s3://b/other", await_creation_for=0).version
    # someone moves the alias in MLflow's UI and edits a managed tag
    client.set_registered_model_alias(model, "champion", other)
    client.set_model_version_tag(model, ours, "team", "hacked")
    wait_for("alias moved back", lambda: aliases_of(client, model).get("champion") == ours, timeout=20)
    wait_for("tag set back", lambda: client.get_model_version(model, ours).tags["team"] == "a", timeout=20)
    wait_event(cluster, ns, "mv", "AliasDriftCorrected")
    wait_event(cluster, ns, "mv", "TagDriftCorrected")
    # the timer also filled in the signature summary... of an s3 source MLflow cannot read
    assert wait_for("signature", lambda: (get_mv(cluster, ns, "mv") or {})["status"].get("signature"), 20)


def test_signature_summary_of_a_logged_model(
    cluster: Cluster, sqlite_registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    server, prefix = sqlite_registry
    ns = new_namespace(prefix)
    run_id = make_run(server)
    cluster.apply(modelversion("mv", ns, unique_model(), {"runId": run_id}))
    wait_condition(cluster, ns, "mv", "Ready")
    sig = wait_for("signature", lambda: (get_mv(cluster, ns, "mv") or {})["status"].get("signature"), 20)
    assert sig == "inputs: [float32 (-1, 4)]; outputs: [float32 (-1,)]"


def test_rejected_source_is_reported_with_the_field(
    cluster: Cluster, sqlite_registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    _, prefix = sqlite_registry
    ns = new_namespace(prefix)
    cluster.apply(modelversion("bad", ns, unique_model(), {"uri": "file:///etc/passwd"}))
    obj = wait_condition(cluster, ns, "bad", "Ready", "False", "InvalidSpec")
    assert obj["status"]["phase"] == "Failed"
    assert "spec.source.uri" in condition(obj, "Ready")["message"]
    wait_event(cluster, ns, "bad", "InvalidSpec")
    cluster.apply(modelversion("norun", ns, unique_model(), {"runId": "0" * 32}))
    obj = wait_condition(cluster, ns, "norun", "Ready", "False", "InvalidSpec")
    assert "spec.source.runId" in condition(obj, "Ready")["message"]


def test_served_version_is_not_deleted_until_unserved(
    cluster: Cluster, sqlite_registry: tuple[MlflowServer, str], new_namespace: Callable[[str], str]
) -> None:
    server, prefix = sqlite_registry
    client = server.client()
    ns = new_namespace(prefix)
    model = unique_model()
    cluster.apply(
        modelversion("mv", ns, model, {"uri": "s3://b/k"}, aliases=["prod"], deletionPolicy="Delete")
    )
    obj = wait_condition(cluster, ns, "mv", "Ready")
    version = obj["status"]["registryVersion"]
    cluster.apply(
        {
            "apiVersion": "kubeforge.io/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "svc", "namespace": ns},
            "spec": {"model": {"uri": f"models:/{model}@prod"}},
        }
    )
    cluster.kubectl("delete", "modelversion", "mv", "-n", ns, "--wait=false")
    obj = wait_condition(cluster, ns, "mv", "DeletionBlocked", "True", "ServedByInferenceService")
    assert obj["status"]["phase"] == "Deleting" and "svc" in condition(obj, "DeletionBlocked")["message"]
    wait_event(cluster, ns, "mv", "DeletionBlocked")
    assert client.get_model_version(model, version).version == version
    cluster.kubectl("delete", "inferenceservice", "svc", "-n", ns, "--timeout=60s")
    wait_for("ModelVersion gone", lambda: get_mv(cluster, ns, "mv") is None, timeout=30)
    assert not list(client.search_model_versions(f"name = '{model}'"))


def test_registry_outage_visible_then_recovered(
    cluster: Cluster,
    mlflow_server: MlflowServer,
    mv_operators: Callable[..., Operator],
    new_namespace: Callable[[str], str],
) -> None:
    """MLflow unreachable (its port closed, as when the server is stopped): the condition shows it, the
    operator retries with backoff, and everything converges once MLflow answers again."""
    proxy = Proxy(mlflow_server.uri)
    op = mv_operators("o", proxy.uri)
    client = mlflow_server.client()
    ns = new_namespace(op.prefix)
    model = unique_model()
    cluster.apply(modelversion("up", ns, model, {"uri": "s3://b/up"}, aliases=["champion"]))
    wait_condition(cluster, ns, "up", "Ready")
    proxy.cut()
    try:
        cluster.apply(modelversion("down", ns, model, {"uri": "s3://b/down"}, aliases=["canary"]))
        obj = wait_condition(
            cluster, ns, "down", "RegistryAvailable", "False", "RegistryUnavailable", timeout=30
        )
        assert obj["status"]["phase"] == "Pending" and condition(obj, "Ready")["status"] == "False"
        wait_event(cluster, ns, "down", "RegistryUnavailable")
        # the registered one keeps its last known state and reports the outage at its next drift check
        up = wait_condition(cluster, ns, "up", "RegistryAvailable", "False", timeout=30)
        assert condition(up, "Ready")["status"] == "True"
        time.sleep(3)  # "a while": several retries happen meanwhile
    finally:
        proxy.restore()
    obj = wait_condition(cluster, ns, "down", "Ready", timeout=30)
    assert condition(obj, "RegistryAvailable")["status"] == "True"
    wait_condition(cluster, ns, "up", "RegistryAvailable", "True", timeout=30)
    assert len(versions_with_uid(client, model, obj["metadata"]["uid"])) == 1
    assert aliases_of(client, model)["canary"] == obj["status"]["registryVersion"]


def test_operator_killed_after_create_leaves_exactly_one_version(
    cluster: Cluster, mlflow_server: MlflowServer, new_namespace: Callable[[str], str]
) -> None:
    """The operator process dies right after MLflow created the version, before the status is patched; the
    restarted operator finds the version by its uid tag instead of creating a second one."""
    op = Operator("crash", "mvc", operator_env(cluster, mlflow_server.uri))
    client = mlflow_server.client()
    ns = new_namespace(op.prefix)
    model = unique_model()
    op.start(KUBEFORGE_FAULT="modelversion.after-create")
    try:
        cluster.apply(modelversion("mv", ns, model, {"uri": "s3://b/k"}, aliases=["champion"]))
        assert op.wait_exit(timeout=60) == 137
        obj = get_mv(cluster, ns, "mv")
        assert obj is not None and "registryVersion" not in (obj.get("status") or {})
        uid = obj["metadata"]["uid"]
        assert len(versions_with_uid(client, model, uid)) == 1
        op.start()
        obj = wait_condition(cluster, ns, "mv", "Ready", timeout=60)
        found = versions_with_uid(client, model, uid)
        assert [v.version for v in found] == [obj["status"]["registryVersion"]]
        assert len(list(client.search_model_versions(f"name = '{model}'"))) == 1
        assert aliases_of(client, model) == {"champion": obj["status"]["registryVersion"]}
    finally:
        op.stop()
        # let the next operator (if any) release the finalizer: this namespace is only watched here
        cluster.kubectl("delete", "modelversion", "--all", "-n", ns, "--wait=false", check=False)
