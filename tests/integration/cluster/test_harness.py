"""The local control plane is a real Kubernetes: API server, admission with CEL, scheduler, kwok nodes, GC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cluster import Cluster

ROOT = Path(__file__).resolve().parents[3]


def _versions() -> dict[str, str]:
    lines = (ROOT / "hack" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_server_and_client_report_the_pinned_version(cluster: Cluster) -> None:
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    want = "v" + _versions()["K8S_VERSION"]
    assert out["serverVersion"]["gitVersion"] == want
    assert out["clientVersion"]["gitVersion"] == want


def test_fleet_nodes_are_ready_with_accelerator_capacity_and_taints(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", "type=kwok", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    fleet = [d for d in yaml.safe_load_all((ROOT / "hack" / "fleet.yaml").read_text()) if d]
    assert set(by_name) == {d["metadata"]["name"] for d in fleet}
    for node in nodes:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["metadata"]["name"]
    h200 = by_name["kwok-h200-0"]
    assert h200["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert h200["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert h200["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    for name, resource in (
        ("kwok-mi300x-0", "amd.com/gpu"),
        ("kwok-ascend910b-0", "huawei.com/Ascend910"),
        ("kwok-mlu370-0", "cambricon.com/mlu"),
    ):
        assert by_name[name]["status"]["allocatable"][resource] == "8"
        assert by_name[name]["spec"]["taints"][0]["key"] == resource
    assert "taints" not in by_name["kwok-cpu-0"]["spec"]


CEL_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.harness.kubeforge.test}
spec:
  group: harness.kubeforge.test
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              min: {type: integer}
              max: {type: integer}
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: spec.min must be at most spec.max
"""


def test_cel_validation_rule_rejects_an_invalid_object_with_its_message(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("apply", "-f", "-", input=CEL_CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.harness.kubeforge.test", "--timeout=30s"
    )
    good = {
        "apiVersion": "harness.kubeforge.test/v1",
        "kind": "Widget",
        "metadata": {"name": "ok", "namespace": namespace},
        "spec": {"min": 1, "max": 2},
    }
    cluster.apply(good)
    bad = {**good, "metadata": {"name": "bad", "namespace": namespace}, "spec": {"min": 3, "max": 2}}
    proc = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0
    assert "spec.min must be at most spec.max" in proc.stderr


def _gpu_deployment(name: str, namespace: str, tolerate: bool) -> dict[str, object]:
    pod: dict[str, object] = {
        "containers": [{"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
    }
    if tolerate:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod},
        },
    }


def test_gpu_pod_with_toleration_runs_on_h200_and_without_stays_pending(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        [_gpu_deployment("tolerant", namespace, True), _gpu_deployment("intolerant", namespace, False)]
    )
    cluster.kubectl("rollout", "status", "deployment/tolerant", "-n", namespace, "--timeout=60s")
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=tolerant", "-o", "json").stdout
    )
    node = pods["items"][0]["spec"]["nodeName"]
    assert node.startswith("kwok-h200-")

    def pending_reason() -> str | None:
        out = json.loads(
            cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=intolerant", "-o", "json").stdout
        )["items"]
        conds = out[0]["status"].get("conditions", []) if out else []
        msgs = [c.get("message", "") for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"]
        return msgs[0] if msgs else None

    message = str(cluster.wait_until("the scheduler's reason", pending_reason, timeout=30))
    assert "untolerated taint" in message and "Insufficient nvidia.com/gpu" in message
    phase = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", "app=intolerant", "-o", "jsonpath={.items[0].status.phase}"
    ).stdout
    assert phase == "Pending"


def test_owned_objects_are_garbage_collected(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    cluster.apply(child)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    cluster.wait_until(
        "the child to be collected",
        lambda: cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
        timeout=60,
    )


@pytest.mark.parametrize("exit_code", [None, 3])
def test_job_pods_complete_or_fail_as_told(cluster: Cluster, namespace: str, exit_code: int | None) -> None:
    annotations = {"kwok.kubeforge.io/run-for": "200ms"}
    if exit_code is not None:
        annotations["kwok.kubeforge.io/exit-code"] = str(exit_code)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }
    cluster.apply(job)
    want = "Complete" if exit_code is None else "Failed"
    cluster.kubectl("wait", f"--for=condition={want}", "job/j", "-n", namespace, "--timeout=60s")
    if exit_code is not None:
        code = cluster.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-o",
            "jsonpath={.items[0].status.containerStatuses[0].state.terminated.exitCode}",
        ).stdout
        assert code == str(exit_code)
