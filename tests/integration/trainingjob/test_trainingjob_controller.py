"""The TrainingJob controller against the real local control plane and its kwok fleet.

Pods on fake nodes run until a test tells them how they end (annotation kwok.kubeforge.io/exit-code), standing
in for the training runtime; progress is published the way the runtime does it (the pod's
kubeforge.io/progress annotation).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.usefixtures("operator")
EXIT = "kwok.kubeforge.io/exit-code"


def trainingjob(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "ghcr.io/kubeforge/runtime:test", "model": {"builtin": "mlp"}, **spec},
    }


def status(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "trainingjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}


def wait_phase(
    cluster: Cluster, name: str, namespace: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    return cluster.wait_until(  # type: ignore[return-value]
        f"{name} phase {phase}",
        lambda: (s := status(cluster, name, namespace)).get("phase") == phase and s,
        timeout=timeout,
    )


def pods(cluster: Cluster, name: str, namespace: str, phase: str | None = None) -> list[dict[str, Any]]:
    sel = ["-l", f"kubeforge.io/training-job={name}"]
    items = json.loads(cluster.kubectl("get", "pods", "-n", namespace, *sel, "-o", "json").stdout)["items"]
    return [p for p in items if phase is None or p["status"].get("phase") == phase]


def running_pods(cluster: Cluster, name: str, namespace: str, n: int) -> list[dict[str, Any]]:
    return cluster.wait_until(  # type: ignore[return-value]
        f"{n} running pods of {name}",
        lambda: len(r := pods(cluster, name, namespace, "Running")) == n and r,
        timeout=60,
    )


def end_pod(cluster: Cluster, namespace: str, pod: str, code: int, message: str = "") -> None:
    args = [f"{EXIT}={code}"] + ([f"kwok.kubeforge.io/message={message}"] if message else [])
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, *args, "--overwrite")


def events(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, str]]:
    out = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=TrainingJob,involvedObject.name={name}",
        "-o",
        "json",
    ).stdout
    return [(e["reason"], e["message"]) for e in json.loads(out)["items"]]


def test_h200_job_lands_on_h200_nodes_with_resources_tolerations_and_env(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        trainingjob(
            "llama",
            namespace,
            nodes={"count": 2},
            processesPerNode=8,
            accelerator={"vendor": "nvidia", "product": "NVIDIA-H200", "count": 8},
        )
    )
    st = wait_phase(cluster, "llama", namespace, "Running")
    assert (st["nodesReady"], st["nodesDesired"]) == (2, 2)
    for pod in running_pods(cluster, "llama", namespace, 2):
        spec = pod["spec"]
        assert spec["nodeName"].startswith("kwok-h200-")
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PET_NPROC_PER_NODE"] == "8" and env["PET_NNODES"] == "2"
        assert env["PET_RDZV_ENDPOINT"] == f"llama-0.kubeforge-trainers.{namespace}.svc:29400"
    svc = cluster.get("service", "kubeforge-trainers", namespace)
    assert svc["spec"]["clusterIP"] == "None"  # type: ignore[index]

    def dns_names() -> set[str]:
        """Hostnames the namespace's EndpointSlices publish: what cluster DNS serves as
        <hostname>.kubeforge-trainers.<namespace>.svc."""
        out = cluster.kubectl(
            "get",
            "endpointslices",
            "-n",
            namespace,
            "-l",
            "kubernetes.io/service-name=kubeforge-trainers",
            "-o",
            "json",
        )
        slices = json.loads(out.stdout)["items"]
        return {e.get("hostname") for s in slices for e in s.get("endpoints") or [] if e.get("addresses")}

    cluster.wait_until("both pods named in DNS", lambda: {"llama-0", "llama-1"} <= dns_names())


def test_ascend_job_lands_on_910b_nodes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        trainingjob("npu", namespace, accelerator={"vendor": "ascend", "product": "Ascend910B", "count": 8})
    )
    wait_phase(cluster, "npu", namespace, "Running")
    [pod] = running_pods(cluster, "npu", namespace, 1)
    assert pod["spec"]["nodeName"].startswith("kwok-ascend910b-")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["huawei.com/Ascend910"] == "8"


def test_success_publishes_progress_then_registers_the_model(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        trainingjob(
            "digits",
            namespace,
            nodes={"count": 2},
            optimizer={"steps": 50},
            register={"modelName": "digits-cnn", "aliases": ["staging"]},
        )
    )
    pod0, pod1 = running_pods(cluster, "digits", namespace, 2)
    progress = {
        "state": "running",
        "step": 20,
        "totalSteps": 50,
        "loss": 0.5,
        "worldSize": 2,
        "runId": "run123",
        "lastCheckpoint": "/checkpoints/step-20",
        "lastCheckpointStep": 20,
    }
    cluster.kubectl(
        "annotate",
        "pod",
        pod0["metadata"]["name"],
        "-n",
        namespace,
        f"kubeforge.io/progress={json.dumps(progress)}",
        "--overwrite",
    )
    st = cluster.wait_until(
        "progress in status",
        lambda: (s := status(cluster, "digits", namespace)).get("currentStep") == 20 and s,
    )
    assert st["progress"] == "20/50" and st["mlflowRunId"] == "run123" and st["lastCheckpointStep"] == 20
    for pod in (pod0, pod1):
        end_pod(cluster, namespace, pod["metadata"]["name"], 0)
    st = wait_phase(cluster, "digits", namespace, "Succeeded")
    assert st["modelVersion"] == "digits"
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in st["conditions"])
    mv: Any = cluster.get("modelversion", "digits", namespace)
    assert mv["spec"]["modelName"] == "digits-cnn"
    assert mv["spec"]["source"]["trainingJob"] == "digits"
    assert mv["spec"]["aliases"] == ["staging"]
    cluster.kubectl(
        "wait", "--for=condition=Complete", "trainingjob/digits", "-n", namespace, "--timeout=10s"
    )


def test_retryable_exit_code_restarts_within_the_budget(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("flaky", namespace, failurePolicy={"maxRestarts": 2}))
    [pod] = running_pods(cluster, "flaky", namespace, 1)
    end_pod(cluster, namespace, pod["metadata"]["name"], 137, "OOMKilled")
    st = cluster.wait_until(
        "a restart",
        lambda: (
            (s := status(cluster, "flaky", namespace)).get("restarts") == 1
            and s.get("phase") == "Running"
            and s
        ),
    )
    assert st["phase"] == "Running"
    assert any(r == "Restarting" for r, _ in events(cluster, namespace, "flaky"))
    [new] = running_pods(cluster, "flaky", namespace, 1)
    assert new["metadata"]["name"] != pod["metadata"]["name"]


def test_non_retryable_exit_code_fails_the_job_with_the_reason(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("broken", namespace, failurePolicy={"maxRestarts": 3}))
    [pod] = running_pods(cluster, "broken", namespace, 1)
    end_pod(cluster, namespace, pod["metadata"]["name"], 2, "ModuleNotFoundError: mymodel")
    st = wait_phase(cluster, "broken", namespace, "Failed")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NonRetryableExitCode"
    assert "exit code 2" in failed["message"] and "ModuleNotFoundError" in failed["message"]
    assert st.get("restarts", 0) == 0
    assert any(r == "Failed" and "exit code 2" in m for r, m in events(cluster, namespace, "broken"))


def test_exhausted_restart_budget_fails_the_job(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("doomed", namespace, failurePolicy={"maxRestarts": 1}))
    for attempt in range(2):
        [pod] = running_pods(cluster, "doomed", namespace, 1)
        end_pod(cluster, namespace, pod["metadata"]["name"], 143)
        if attempt == 0:
            cluster.wait_until("the retry", lambda: len(pods(cluster, "doomed", namespace, "Failed")) == 1)
    st = wait_phase(cluster, "doomed", namespace, "Failed")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RestartBudgetExhausted" and "maxRestarts=1" in failed["message"]


def test_suspend_deletes_pods_and_resume_brings_them_back(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("pause", namespace, nodes={"count": 2}))
    running_pods(cluster, "pause", namespace, 2)
    cluster.merge_patch("trainingjob", "pause", namespace, {"spec": {"suspend": True}})
    wait_phase(cluster, "pause", namespace, "Suspended")
    cluster.wait_until("pods gone", lambda: not pods(cluster, "pause", namespace, "Running"))
    cluster.merge_patch("trainingjob", "pause", namespace, {"spec": {"suspend": False}})
    wait_phase(cluster, "pause", namespace, "Running")
    running_pods(cluster, "pause", namespace, 2)


def test_kubectl_scale_resizes_an_elastic_job(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("elastic", namespace, nodes={"count": 2, "min": 1, "max": 4}))
    running_pods(cluster, "elastic", namespace, 2)
    cluster.kubectl("scale", "trainingjob/elastic", "-n", namespace, "--replicas=3")
    running_pods(cluster, "elastic", namespace, 3)
    st = wait_phase(cluster, "elastic", namespace, "Running")
    assert st["nodesDesired"] == 3
    cluster.kubectl("scale", "trainingjob/elastic", "-n", namespace, "--replicas=1")
    running_pods(cluster, "elastic", namespace, 1)
    job = cluster.get("job", "elastic", namespace)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1  # type: ignore[index]


def h200_pods(cluster: Cluster) -> list[str]:
    """Pods anywhere on the H200 nodes (earlier tests' pods linger while their namespaces are deleted)."""
    out = cluster.kubectl("get", "pods", "-A", "-o", "json").stdout
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in json.loads(out)["items"]
        if (p["spec"].get("nodeName") or "").startswith("kwok-h200-")
    ]


def test_unschedulable_scale_up_carries_on_at_the_size_it_has(cluster: Cluster, namespace: str) -> None:
    # 4 H200 nodes of 8 GPUs: asking for 6 whole nodes can never be scheduled beyond 4 (once all 4 are free)
    cluster.wait_until("the H200 nodes free of other pods", lambda: not h200_pods(cluster))
    cluster.apply(
        trainingjob(
            "greedy",
            namespace,
            nodes={"count": 2, "min": 1, "max": 6},
            accelerator={"vendor": "nvidia", "count": 8},
            scheduling={"scheduleTimeoutSeconds": 3},
        )
    )
    running_pods(cluster, "greedy", namespace, 2)
    cluster.kubectl("scale", "trainingjob/greedy", "-n", namespace, "--replicas=6")

    # held, then settled at the 4 nodes there are (when two new pods race for the last node, the Job swaps
    # the higher index for the lower one: readiness can follow the hold by a moment). Status and Job are two
    # objects, written one after the other by a sync: read them until one snapshot agrees (a CI run read a
    # status of 4 beside a Job already at 3 from a later sync; a Job that stays off the status still fails).
    def settled() -> tuple[dict[str, Any], dict[str, Any]] | None:
        s = status(cluster, "greedy", namespace)
        if s.get("scaleUpBlockedTarget") != 6 or s.get("nodesReady") != 4:
            return None
        j = cluster.get("job", "greedy", namespace)
        return (s, j) if j["spec"]["parallelism"] == s.get("nodesTarget") else None  # type: ignore[index]

    st, job = cluster.wait_until("the held scale-up at 4 ready nodes, Job and status agreeing", settled, 60)
    assert st["nodesTarget"] == st["nodesReady"] == 4
    assert st["phase"] == "Running"
    scaling = next(c for c in st["conditions"] if c["type"] == "Scaling")
    assert scaling["reason"] == "ScaleUpUnschedulable"
    assert job["spec"]["parallelism"] == 4
    assert any(
        r == "ScaleUpUnschedulable" and "Insufficient nvidia.com/gpu" in m
        for r, m in events(cluster, namespace, "greedy")
    )


def test_deadline_exceeded_fails_the_job(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("slow", namespace, activeDeadlineSeconds=2))
    st = wait_phase(cluster, "slow", namespace, "Failed", timeout=60)
    assert any(c["reason"] == "DeadlineExceeded" for c in st["conditions"])


def test_unschedulable_product_is_reported_with_the_schedulers_reason(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        trainingjob(
            "nowhere", namespace, accelerator={"vendor": "nvidia", "product": "NVIDIA-B300", "count": 8}
        )
    )
    st = cluster.wait_until(
        "Unschedulable",
        lambda: (
            (s := status(cluster, "nowhere", namespace))
            .get("message", "")
            .startswith("1 pod(s) cannot be scheduled")
            and s
        ),
    )
    assert st["phase"] == "Pending"
    assert "node(s) didn't match Pod's node affinity/selector" in st["message"]
    cluster.wait_until(
        "the Event", lambda: any(r == "Unschedulable" for r, _ in events(cluster, namespace, "nowhere"))
    )


def test_deleting_the_trainingjob_collects_its_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("gone", namespace))
    running_pods(cluster, "gone", namespace, 1)
    cluster.kubectl("delete", "trainingjob", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    for kind, name in (("job", "gone"), ("configmap", "gone-spec")):
        cluster.wait_until(
            f"{kind} collected",
            lambda k=kind, n=name: cluster.kubectl("get", k, n, "-n", namespace, check=False).returncode != 0,
        )


def job_uid(cluster: Cluster, name: str, namespace: str) -> str | None:
    out = cluster.kubectl("get", "job", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}", check=False)
    return out.stdout or None if out.returncode == 0 else None


def test_job_collected_by_ttl_after_success_is_not_run_again(cluster: Cluster, namespace: str) -> None:
    cluster.apply(trainingjob("ttl", namespace, ttlSecondsAfterFinished=1))
    (pod,) = running_pods(cluster, "ttl", namespace, 1)
    first = job_uid(cluster, "ttl", namespace)
    end_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_phase(cluster, "ttl", namespace, "Succeeded")
    cluster.wait_until(
        "the TTL controller deletes the Job", lambda: job_uid(cluster, "ttl", namespace) != first
    )
    time.sleep(3)  # room for a wrong re-creation (the operator syncs within 0.1 s of the deletion)
    assert job_uid(cluster, "ttl", namespace) is None, "the finished TrainingJob was started again"
    assert status(cluster, "ttl", namespace)["phase"] == "Succeeded"


def job_suspended(cluster: Cluster, name: str, namespace: str) -> bool:
    out = cluster.kubectl("get", "job", name, "-n", namespace, "-o", "jsonpath={.spec.suspend}")
    return out.stdout == "true"


def test_queued_job_waits_for_kueue_then_runs_once_admitted(cluster: Cluster, namespace: str) -> None:
    """Kueue owns a queued Job's `suspend`: the operator creates it suspended and never flips it after."""
    cluster.apply(trainingjob("queued", namespace, scheduling={"queueName": "team-a"}))
    cluster.wait_until("the Job", lambda: job_uid(cluster, "queued", namespace))
    job = json.loads(cluster.kubectl("get", "job", "queued", "-n", namespace, "-o", "json").stdout)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    wait_phase(cluster, "queued", namespace, "Suspended")
    # the operator syncs again as the Job and status change; none of those syncs may unsuspend it
    cluster.kubectl("annotate", "trainingjob", "queued", "-n", namespace, "touch=1")
    time.sleep(3)
    assert job_suspended(cluster, "queued", namespace), "the Job was unsuspended before admission"
    assert not pods(cluster, "queued", namespace)
    # Kueue admits the workload: it unsuspends the Job with its own field manager
    cluster.merge_patch("job", "queued", namespace, {"spec": {"suspend": False}}, "--field-manager=kueue")
    running_pods(cluster, "queued", namespace, 1)
    wait_phase(cluster, "queued", namespace, "Running")
    cluster.kubectl("annotate", "trainingjob", "queued", "-n", namespace, "touch=2", "--overwrite")
    time.sleep(2)
    assert not job_suspended(cluster, "queued", namespace), "the operator suspended an admitted Job"
