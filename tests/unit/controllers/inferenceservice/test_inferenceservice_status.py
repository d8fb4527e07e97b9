"""InferenceService status from its Deployments, pods and models: phase, conditions, traffic, backend,
events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controllers.conditions import get_condition
from controllers.inferenceservice.render import CANARY, PREDICTOR, Owner
from controllers.inferenceservice.status import (
    DeploymentView,
    ModelRef,
    PodView,
    deployment_view,
    derive,
    pod_view,
)
from crds.inferenceservice import InferenceServiceSpec

OWNER = Owner(name="bert", namespace="serving", uid="u-1")
NOW = "2026-12-06T23:00:00Z"
V3, V4 = "models:/bert/3", "models:/bert/4"
SUMMARY = json.dumps({"backend": "cuda", "mode": "jit", "fallbacks": [], "cache_hit": True})


def spec(**kw: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"uri": V3}, **kw})


def dep(role: str = PREDICTOR, replicas: int = 2, ready: int = 2, uri: str = V3, **kw: Any) -> DeploymentView:
    base: dict[str, Any] = dict(
        role=role,
        generation=1,
        observed_generation=1,
        replicas=replicas,
        status_replicas=replicas,
        updated=replicas,
        ready=ready,
        available=ready,
        model_uri=uri,
        deadline_exceeded=None,
    )
    return DeploymentView(**{**base, **kw})


def pod(name: str, role: str = PREDICTOR, **kw: Any) -> PodView:
    return PodView(name=name, role=role, model_uri=kw.pop("model_uri", V3), **kw)


def run(
    s: InferenceServiceSpec,
    deps: list[DeploymentView],
    pods: list[PodView],
    previous: Any = None,
    refs: dict[str, ModelRef] | None = None,
) -> Any:
    refs = refs or {PREDICTOR: ModelRef(V3), CANARY: ModelRef(V4)}
    return derive(s, OWNER, 1, previous or {}, refs, {d.role: d for d in deps}, pods, NOW)


def test_a_rolled_out_predictor_is_ready_with_its_endpoints_and_backend() -> None:
    out = run(
        spec(replicas=2), [dep()], [pod("a", ready=True, compile_summary=SUMMARY), pod("b", ready=True)]
    )
    st = out.status
    assert st["phase"] == "Ready"
    assert (st["url"], st["grpcAddress"]) == ("http://bert.serving.svc:8080", "bert.serving.svc:8081")
    assert (st["replicas"], st["readyReplicas"], st["modelUri"]) == (2, 2, V3)
    assert st["selector"] == "kubeforge.io/inference-service=bert,kubeforge.io/role=predictor"
    assert st["backend"] == "cuda/jit" and st["trafficSummary"] == "stable 100%"
    assert get_condition(st["conditions"], "PredictorReady")["status"] == "True"
    assert get_condition(st["conditions"], "CanaryReady") is None
    assert out.events == [("Normal", "Ready", "2 pod(s) serving models:/bert/3; traffic stable 100%")]
    assert run(spec(replicas=2), [dep()], [pod("a", ready=True)], previous=st).events == []  # no repeat


@pytest.mark.parametrize(
    ("name", "deps", "pods", "phase", "reason"),
    [
        ("nothing yet", [], [], "Pending", "Creating"),
        ("compiling", [dep(ready=0)], [pod("a", compiling=True)], "Compiling", "Compiling"),
        (
            "unschedulable",
            [dep(ready=0)],
            [pod("a", unschedulable="0/5 nodes: Insufficient nvidia.com/gpu")],
            "Pending",
            "Unschedulable",
        ),
        (
            "image",
            [dep(ready=0)],
            [pod("a", pull_error="compile: ErrImagePull: not found")],
            "Pending",
            "ImagePullBackOff",
        ),
        (
            "compile failed",
            [dep(ready=0)],
            [pod("a", compile_failed="kubeforge-serve: backend cuda: no GPU")],
            "Failed",
            "CompileFailed",
        ),
        (
            "crash loop",
            [dep(ready=0)],
            [pod("a", crash_loop="exit code 137 (OOMKilled)")],
            "Failed",
            "ServerCrashLoop",
        ),
        (
            "deadline",
            [dep(ready=0, deadline_exceeded="ReplicaSet has timed out progressing.")],
            [],
            "Failed",
            "ProgressDeadlineExceeded",
        ),
        (
            "new model compiling beside the old pods",
            [dep(uri=V4, updated=1, status_replicas=3, ready=2)],
            [pod("new", compiling=True)],
            "RollingOut",
            "Compiling",
        ),
        ("scaled to zero", [dep(replicas=0, ready=0)], [], "Pending", "NoReplicas"),
    ],
)
def test_phase_and_reason(
    name: str, deps: list[DeploymentView], pods: list[PodView], phase: str, reason: str
) -> None:
    st = run(spec(), deps, pods).status
    assert (st["phase"], get_condition(st["conditions"], "Ready")["reason"]) == (phase, reason), name
    assert get_condition(st["conditions"], "Ready")["status"] == "False"


def test_a_failed_compile_names_the_cause_in_an_event_once() -> None:
    pods = [pod("a", compile_failed="kubeforge-serve: backend 'tensorrt' is not available: torch_tensorrt")]
    out = run(spec(), [dep(ready=0)], pods)
    assert out.status["message"] == "predictor: pod a: " + pods[0].compile_failed  # type: ignore[operator]
    assert out.events == [("Warning", "CompileFailed", out.status["message"])]
    assert run(spec(), [dep(ready=0)], pods, previous=out.status).events == []


def test_model_version_problems_are_pending_or_failed() -> None:
    s = InferenceServiceSpec.model_validate({"model": {"modelVersion": "bert-v3"}})
    waiting = ModelRef(None, "ModelVersionNotReady", "ModelVersion bert-v3 is Registering")
    st = run(s, [], [], refs={PREDICTOR: waiting}).status
    assert (st["phase"], st["message"]) == ("Pending", "predictor: ModelVersion bert-v3 is Registering")
    assert "modelUri" not in st
    failed = ModelRef(None, "ModelVersionFailed", "ModelVersion bert-v3 failed", failed=True)
    assert run(s, [], [], refs={PREDICTOR: failed}).status["phase"] == "Failed"


def test_canary_traffic_is_the_share_of_ready_pods() -> None:
    s = spec(replicas=3, canary={"model": {"uri": V4}, "trafficPercent": 25})
    st = run(s, [dep(replicas=3, ready=3), dep(CANARY, 1, 1, V4)], []).status
    assert st["phase"] == "Ready" and st["trafficSummary"] == "stable 75% / canary 25%"
    assert st["traffic"] == [
        {"modelUri": V3, "percent": 75, "readyReplicas": 3},
        {"modelUri": V4, "percent": 25, "readyReplicas": 1},
    ]
    s = spec(replicas=1, canary={"model": {"uri": V4}, "trafficPercent": 10})
    st = run(s, [dep(replicas=1, ready=1), dep(CANARY, 1, 1, V4)], []).status
    assert st["trafficSummary"] == "stable 50% / canary 50% (asked 10%)"


def test_a_failed_canary_fails_the_service_but_says_the_stable_model_serves() -> None:
    s = spec(replicas=2, canary={"model": {"uri": V4}})
    pods = [pod("c", CANARY, model_uri=V4, compile_failed="check against eager failed")]
    st = run(s, [dep(), dep(CANARY, 1, 0, V4)], pods).status
    assert st["phase"] == "Failed"
    assert get_condition(st["conditions"], "PredictorReady")["status"] == "True"
    assert get_condition(st["conditions"], "CanaryReady")["reason"] == "CompileFailed"
    assert st["message"].endswith("the stable model still serves on 2 pod(s)")
    assert st["trafficSummary"] == "stable 100% / canary 0% (asked 10%)"
    # the canary goes away: so does its condition
    st2 = run(spec(replicas=2), [dep()], [], previous=st).status
    assert get_condition(st2["conditions"], "CanaryReady") is None and st2["phase"] == "Ready"


def test_a_fallback_is_reported_in_status_and_an_event() -> None:
    summary = json.dumps({"backend": "cpu", "mode": "jit", "fallbacks": ["aot -> jit: no compile cache"]})
    out = run(spec(replicas=1), [dep(replicas=1, ready=1)], [pod("a", ready=True, compile_summary=summary)])
    assert out.status["backend"] == "cpu/jit (fallbacks: aot -> jit: no compile cache)"
    assert ("Warning", "CompileFallback", "cpu/jit: aot -> jit: no compile cache") in out.events


def k8s_pod(init: dict[str, Any] | None = None, server: dict[str, Any] | None = None, **status: Any) -> Any:
    st: dict[str, Any] = {"conditions": status.pop("conditions", []), **status}
    if init is not None:
        st["initContainerStatuses"] = [{"name": "compile", **init}]
    if server is not None:
        st["containerStatuses"] = [{"name": "server", **server}]
    meta = {
        "name": "p",
        "labels": {"kubeforge.io/role": "canary"},
        "annotations": {"kubeforge.io/model-uri": V4},
    }
    return {"metadata": meta, "status": st}


def test_pod_view_reads_what_the_kubelet_reports() -> None:
    v = pod_view(k8s_pod(init={"state": {"running": {}}}))
    assert (v.role, v.model_uri, v.compiling, v.ready) == (CANARY, V4, True, False)
    failed = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 3, "message": "backend 'npu' unavailable: torch_npu"}},
    }
    assert pod_view(k8s_pod(init=failed)).compile_failed == "backend 'npu' unavailable: torch_npu"
    silent = {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    assert pod_view(k8s_pod(init=silent)).compile_failed == "exit code 137 (OOMKilled)"
    done = {"state": {"terminated": {"exitCode": 0, "message": SUMMARY}}}
    crash = {
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "model cannot be loaded"}},
    }
    v = pod_view(k8s_pod(init=done, server=crash))
    assert (v.compile_summary, v.compile_failed, v.crash_loop) == (SUMMARY, None, "model cannot be loaded")
    pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
    assert pod_view(k8s_pod(init=pull)).pull_error == "compile: ImagePullBackOff: not found"
    unsched = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}]
    assert pod_view(k8s_pod(conditions=unsched)).unschedulable == "0/3 nodes"
    ready = [{"type": "Ready", "status": "True"}]
    assert pod_view(k8s_pod(init=done, server={"state": {"running": {}}}, conditions=ready)).ready


def test_deployment_view_reads_the_rollout() -> None:
    body = {
        "metadata": {"generation": 4, "labels": {"kubeforge.io/role": "predictor"}},
        "spec": {"replicas": 3, "template": {"metadata": {"annotations": {"kubeforge.io/model-uri": V3}}}},
        "status": {
            "observedGeneration": 4,
            "replicas": 4,
            "updatedReplicas": 1,
            "readyReplicas": 3,
            "availableReplicas": 3,
            "conditions": [
                {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
            ],
        },
    }
    v = deployment_view(body)
    assert (v.role, v.generation, v.replicas, v.status_replicas, v.updated, v.ready) == (
        PREDICTOR,
        4,
        3,
        4,
        1,
        3,
    )
    assert (v.model_uri, v.deadline_exceeded) == (V3, "timed out")
