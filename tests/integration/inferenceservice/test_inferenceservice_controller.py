"""The InferenceService controller against the real local control plane and its kwok fleet.

kwok's pods run nothing: an InferenceService's pods stand in for `kubeforge-serve` through their environment
(hack/kwok-pod-stages.yaml): KWOK_COMPILE_SUMMARY makes a pod ready with that compile summary as its init
container's termination message, KWOK_COMPILE_ERROR leaves it crash-looping in its compile step. The
Deployment, ReplicaSet, HorizontalPodAutoscaler and garbage-collector controllers are the real ones.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.usefixtures("operator")
V1, V2 = "models:/digits/1", "models:/digits/2"
SUMMARY = json.dumps({"backend": "cuda", "mode": "jit", "fallbacks": [], "cache_hit": True})


def isvc(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"uri": V1})
    spec.setdefault("env", {"KWOK_COMPILE_SUMMARY": SUMMARY})
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "ghcr.io/kubeforge/runtime:test", **spec},
    }


def get(cluster: Cluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def status(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    return (get(cluster, "inferenceservice", name, namespace) or {}).get("status") or {}


def wait_status(cluster: Cluster, name: str, namespace: str, what: str, ok: Any, timeout: float = 60) -> Any:
    return cluster.wait_until(
        f"{name}: {what}", lambda: (s := status(cluster, name, namespace)) and ok(s) and s, timeout=timeout
    )


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def pods(cluster: Cluster, name: str, namespace: str, role: str) -> list[dict[str, Any]]:
    sel = f"kubeforge.io/inference-service={name},kubeforge.io/role={role}"
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", sel, "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def events(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, str, str]]:
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.kind=InferenceService,involvedObject.name={name}", "-o", "json",
    ).stdout  # fmt: skip
    return [(e["type"], e["reason"], e["message"]) for e in json.loads(out)["items"]]


def test_rolls_out_on_gpu_nodes_scales_and_rolls_a_new_model_out(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        isvc(
            "digits",
            namespace,
            replicas=2,
            accelerator={"vendor": "nvidia", "product": "NVIDIA-H200", "count": 1},
        )
    )
    st = wait_status(cluster, "digits", namespace, "Ready", lambda s: s.get("phase") == "Ready")
    assert (st["readyReplicas"], st["replicas"], st["modelUri"]) == (2, 2, V1)
    assert st["url"] == f"http://digits.{namespace}.svc:8080"
    assert st["grpcAddress"] == f"digits.{namespace}.svc:8081"
    assert st["backend"] == "cuda/jit"  # from the compile step's termination message
    assert st["trafficSummary"] == "stable 100%" and st["observedGeneration"] == 1
    assert condition(st, "PredictorReady")["status"] == "True"
    running = pods(cluster, "digits", namespace, "predictor")
    assert len(running) == 2
    for p in running:
        assert p["spec"]["nodeName"].startswith("kwok-h200-")
        init = p["spec"]["initContainers"][0]
        assert init["name"] == "compile" and init["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert init["args"][init["args"].index("--model-uri") + 1] == V1
    svc = get(cluster, "service", "digits", namespace)
    assert svc is not None and svc["spec"]["selector"]["kubeforge.io/role"] == "predictor"
    assert ("Normal", "Ready") in [e[:2] for e in events(cluster, namespace, "digits")]

    # the scale subresource: `kubectl scale` reaches the Deployment, and status counts the pods
    cluster.kubectl("scale", "inferenceservice", "digits", "-n", namespace, "--replicas=3")
    wait_status(cluster, "digits", namespace, "3 ready", lambda s: s.get("readyReplicas") == 3)
    dep = get(cluster, "deployment", "digits-predictor", namespace)
    assert dep is not None and dep["spec"]["replicas"] == 3

    # a new model: every pod replaced by one that compiled it, none taken away before
    cluster.merge_patch("inferenceservice", "digits", namespace, {"spec": {"model": {"uri": V2}}})
    st = wait_status(
        cluster,
        "digits",
        namespace,
        "Ready on v2",
        lambda s: s.get("phase") == "Ready" and s.get("modelUri") == V2 and s.get("observedGeneration") == 3,
    )
    assert st["readyReplicas"] == 3
    cluster.wait_until(
        "only v2 pods",
        lambda: (
            [
                p["metadata"]["annotations"]["kubeforge.io/model-uri"]
                for p in pods(cluster, "digits", namespace, "predictor")
            ]
            == [V2] * 3
        ),
    )


def test_canary_splits_by_pods_and_goes_away_with_its_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply(isvc("cnn", namespace, replicas=3, canary={"model": {"uri": V2}, "trafficPercent": 25}))
    st = wait_status(cluster, "cnn", namespace, "Ready", lambda s: s.get("phase") == "Ready")
    assert st["trafficSummary"] == "stable 75% / canary 25%"
    assert [(t["modelUri"], t["percent"], t["readyReplicas"]) for t in st["traffic"]] == [
        (V1, 75, 3),
        (V2, 25, 1),
    ]
    assert condition(st, "CanaryReady")["status"] == "True"
    [canary] = pods(cluster, "cnn", namespace, "canary")
    args = canary["spec"]["containers"][0]["args"]
    assert args[args.index("--model-uri") + 1] == V2 and args[args.index("--model-name") + 1] == "cnn"
    svc = get(cluster, "service", "cnn", namespace)
    assert svc is not None and "kubeforge.io/role" not in svc["spec"]["selector"]  # both models behind it
    assert get(cluster, "service", "cnn-canary", namespace) is not None

    # all traffic to the canary: the stable pods leave the Service
    cluster.merge_patch("inferenceservice", "cnn", namespace, {"spec": {"canary": {"trafficPercent": 100}}})
    wait_status(
        cluster,
        "cnn",
        namespace,
        "canary 100%",
        lambda s: s.get("trafficSummary") == "stable 0% / canary 100%",
    )
    svc = get(cluster, "service", "cnn", namespace)
    assert svc is not None and svc["spec"]["selector"]["kubeforge.io/role"] == "canary"

    # the canary removed: its Deployment, Service and condition go
    cluster.kubectl(
        "patch", "inferenceservice", "cnn", "-n", namespace, "--type=json", "-p",
        '[{"op": "remove", "path": "/spec/canary"}]',
    )  # fmt: skip
    st = wait_status(
        cluster, "cnn", namespace, "no canary", lambda s: s.get("trafficSummary") == "stable 100%"
    )
    assert condition(st, "CanaryReady") == {} and st["phase"] == "Ready"
    cluster.wait_until(
        "canary children deleted",
        lambda: (
            get(cluster, "deployment", "cnn-canary", namespace) is None
            and get(cluster, "service", "cnn-canary", namespace) is None
        ),
    )


def test_autoscaling_hands_replicas_to_an_hpa_and_takes_it_back(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        isvc("auto", namespace, autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetConcurrency": 4})
    )
    wait_status(cluster, "auto", namespace, "Ready", lambda s: s.get("phase") == "Ready")
    hpa = get(cluster, "hpa", "auto-predictor", namespace)
    assert hpa is not None
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "auto-predictor"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kubeforge_inflight"
    # the real HPA controller raises the Deployment to its minimum; the operator does not fight it
    wait_status(cluster, "auto", namespace, "2 ready", lambda s: s.get("readyReplicas") == 2, timeout=90)
    out = cluster.kubectl(
        "get", "deployment", "auto-predictor", "-n", namespace, "-o", "json", "--show-managed-fields"
    )
    dep = json.loads(out.stdout)
    managers = {
        f["manager"]
        for f in dep["metadata"]["managedFields"]
        if "f:replicas" in json.dumps(f.get("fieldsV1"))
    }
    assert "kubeforge" not in managers
    cluster.kubectl(
        "patch", "inferenceservice", "auto", "-n", namespace, "--type=json", "-p",
        '[{"op": "remove", "path": "/spec/autoscaling"}]',
    )  # fmt: skip
    cluster.wait_until("HPA deleted", lambda: get(cluster, "hpa", "auto-predictor", namespace) is None)
    cluster.wait_until(
        "back to spec.replicas",
        lambda: (d := get(cluster, "deployment", "auto-predictor", namespace)) and d["spec"]["replicas"] == 1,
    )


def test_a_failed_compile_is_reported_with_its_cause(cluster: Cluster, namespace: str) -> None:
    said = (
        "kubeforge-serve: backend 'tensorrt' was asked for but is not available here: the Python package"
        " torch_tensorrt is not installed"
    )
    cluster.apply(isvc("trt", namespace, env={"KWOK_COMPILE_ERROR": said}))
    st = wait_status(cluster, "trt", namespace, "Failed", lambda s: s.get("phase") == "Failed")
    ready = condition(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "CompileFailed"
    assert said in st["message"] and st["message"].startswith("predictor: pod trt-predictor-")
    cluster.wait_until(
        "a CompileFailed event",
        lambda: any(r == "CompileFailed" and said in m for _, r, m in events(cluster, namespace, "trt")),
    )


def test_a_model_version_reference_waits_for_the_version(cluster: Cluster, namespace: str) -> None:
    cluster.apply(isvc("ref", namespace, model={"modelVersion": "digits-v3"}))
    st = wait_status(cluster, "ref", namespace, "Pending", lambda s: s.get("phase") == "Pending")
    assert condition(st, "Ready")["reason"] == "ModelVersionNotFound"
    assert "ModelVersion digits-v3 does not exist" in st["message"]
    assert get(cluster, "deployment", "ref-predictor", namespace) is None  # nothing runs without a model
    # the version appears (this operator has no MLflow: the ModelVersion stays unregistered, and says why)
    cluster.apply(
        {
            "apiVersion": "kubeforge.io/v1alpha1",
            "kind": "ModelVersion",
            "metadata": {"name": "digits-v3", "namespace": namespace},
            "spec": {"modelName": "digits", "source": {"uri": "runs:/0123456789abcdef/model"}},
        }
    )
    st = wait_status(
        cluster,
        "ref",
        namespace,
        "not ready",
        lambda s: condition(s, "Ready").get("reason") == "ModelVersionNotReady",
    )
    assert st["phase"] == "Pending" and "ModelVersion digits-v3 is Pending" in st["message"]
