"""Rendering is pure: table-driven cases checked against golden YAML (UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controllers.trainingjob import render
from crds.trainingjob import TrainingJobSpec

GOLDEN = Path(__file__).parent / "golden"
OWNER = render.Owner(name="llama", namespace="team-a", uid="0b7f6c1e-0000-4000-8000-000000000001")
CFG = render.RenderConfig(
    default_image="ghcr.io/kubeforge/runtime:test", mlflow_tracking_uri="http://mlflow.kubeforge:5000"
)

CASES: dict[str, dict[str, Any]] = {
    "h200-3d": {
        "model": {"builtin": "llama", "preset": "1b"},
        "nodes": {"count": 2},
        "processesPerNode": 8,
        "parallelism": {"data": 4, "tensor": 2, "pipeline": 2, "microBatches": 4},
        "accelerator": {"vendor": "nvidia", "product": "NVIDIA-H200", "count": 8},
        "resources": {"requests": {"cpu": "64", "memory": "512Gi"}},
        "checkpoint": {"intervalSteps": 200, "claimName": "ckpt", "path": "/ckpt"},
        "shmSize": "64Gi",
    },
    "ascend-elastic-queued": {
        "model": {"builtin": "llama"},
        "nodes": {"count": 2, "min": 1, "max": 4},
        "processesPerNode": 8,
        "accelerator": {"vendor": "ascend", "product": "Ascend910B", "count": 8},
        "scheduling": {"queueName": "research", "gang": True},
        "failurePolicy": {"maxRestarts": 5, "retryableExitCodes": [137, 143, 75]},
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": 3600,
        "env": {"HCCL_CONNECT_TIMEOUT": "600"},
    },
    "cpu-digits": {"model": {"builtin": "cnn"}, "data": {"builtin": "digits"}, "suspend": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case: str) -> None:
    spec = TrainingJobSpec.model_validate(CASES[case])
    children = render.render(OWNER, spec, CFG, spec.nodes.count, creating=True)
    text = yaml.safe_dump_all(children, sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


def _job(case: str, nodes: int | None = None, creating: bool = True) -> dict[str, Any]:
    spec = TrainingJobSpec.model_validate(CASES[case])
    return render.job(OWNER, spec, CFG, nodes or spec.nodes.count, creating=creating)


def _env(job: dict[str, Any]) -> dict[str, Any]:
    c = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_torchrun_environment_names_rendezvous_on_the_first_pod() -> None:
    env = _env(_job("ascend-elastic-queued"))
    assert env["PET_NNODES"] == "1:4"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_RDZV_ENDPOINT"] == "llama-0.kubeforge-trainers.team-a.svc:29400"
    assert env["PET_RDZV_ID"] == OWNER.uid
    assert env["PET_MAX_RESTARTS"] == "5"
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": render.COMPLETION_INDEX}}
    assert env["HCCL_CONNECT_TIMEOUT"] == "600"
    assert _env(_job("h200-3d"))["PET_NNODES"] == "2"


def test_accelerator_becomes_resources_tolerations_and_product_selector() -> None:
    pod = _job("h200-3d")["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    assert res["requests"]["cpu"] == "64"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    ascend = _job("ascend-elastic-queued")["spec"]["template"]["spec"]
    assert ascend["nodeSelector"] == {"huawei.com/npu.product": "Ascend910B"}
    assert "nodeSelector" not in _job("cpu-digits")["spec"]["template"]["spec"]


def test_failure_policy_fails_fast_on_codes_that_are_not_retryable() -> None:
    job = _job("ascend-elastic-queued")["spec"]
    assert job["backoffLimit"] == 5
    fail = next(r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
    assert fail["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "NotIn",
        "values": [0, 75, 137, 143],
    }
    assert job["activeDeadlineSeconds"] == 86400 and job["ttlSecondsAfterFinished"] == 3600


def test_kueue_owns_suspend_after_creation() -> None:
    created = _job("ascend-elastic-queued", creating=True)
    assert created["spec"]["suspend"] is True
    assert created["metadata"]["labels"][render.LABEL_QUEUE] == "research"
    later = _job("ascend-elastic-queued", creating=False)
    assert "suspend" not in later["spec"], "after creation Kueue decides; re-applying must not re-suspend"
    assert _job("cpu-digits")["spec"]["suspend"] is True
    assert _job("h200-3d")["spec"]["suspend"] is False


def test_scale_renders_completions_and_parallelism_together() -> None:
    job = _job("ascend-elastic-queued", nodes=3)["spec"]
    assert job["completions"] == job["parallelism"] == 3
    assert job["completionMode"] == "Indexed"


def test_gang_scheduling_adds_a_pod_group_for_the_minimum() -> None:
    spec = TrainingJobSpec.model_validate(CASES["ascend-elastic-queued"])
    kinds = [c["kind"] for c in render.render(OWNER, spec, CFG, 2, creating=False)]
    assert kinds == ["ConfigMap", "PodGroup", "Job"]
    pg = render.pod_group(OWNER, spec)
    assert pg["spec"]["minMember"] == 1
    pod = _job("ascend-elastic-queued")["spec"]["template"]
    assert pod["metadata"]["labels"][render.LABEL_POD_GROUP] == "llama"
    assert pod["spec"]["schedulerName"] == CFG.gang_scheduler_name


def test_every_child_is_owned_and_labelled() -> None:
    spec = TrainingJobSpec.model_validate(CASES["ascend-elastic-queued"])
    for child in render.render(OWNER, spec, CFG, 2, creating=True):
        ref = child["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("TrainingJob", OWNER.uid, True)
        assert child["metadata"]["labels"]["kubeforge.io/training-job"] == "llama"


def test_spec_config_map_round_trips_to_the_same_spec() -> None:
    spec = TrainingJobSpec.model_validate(CASES["h200-3d"])
    cm = render.spec_config_map(OWNER, spec)
    doc = yaml.safe_load(cm["data"]["trainingjob.yaml"])
    assert TrainingJobSpec.model_validate(doc["spec"]) == spec
    assert doc["metadata"]["uid"] == OWNER.uid


def test_pods_are_named_in_dns_by_the_namespace_service() -> None:
    """One headless Service per namespace selects every training pod; a pod's DNS name is
    <hostname>.<subdomain>, and the Indexed Job's hostnames <job>-<index> are unique in the namespace."""
    service = next(o for o in render.namespace_objects("team-a") if o["kind"] == "Service")
    assert service["metadata"] == {
        "name": render.TRAINERS_SERVICE,
        "namespace": "team-a",
        "labels": {
            "app.kubernetes.io/part-of": "kubeforge",
            "app.kubernetes.io/managed-by": "kubeforge-operator",
        },
    }
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = _job("h200-3d")["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items(), "the Service must select the training pods"
    assert "ownerReferences" not in service["metadata"], "shared by every job: no one job may own it"
