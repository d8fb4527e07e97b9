"""End to end: a TrainingJob trains a real model, and the trained model ends up registered in MLflow.

The local control plane's pods run on kwok nodes and execute nothing, so the training runtime runs here, as
the job's pod 0 would: on the spec the operator mounted into the pod (its ConfigMap), with the pod's own
identity (a token of the `kubeforge-trainer` service account the operator created, whose Role lets it patch
its pod), publishing progress on the pod and logging the run and the model to MLflow. Then the pod exits 0
(kwok), and the rest is the operator's: TrainingJob Succeeded with the run in status → ModelVersion created
→ version registered in MLflow with the alias → ModelVersion Ready. Lineage is checked at every link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cluster import Cluster
from tests.fixtures.mlflow import MlflowServer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("operator_with_mlflow")


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def api_server(cluster: Cluster) -> tuple[str, str]:
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    return host, port


def test_trained_model_is_registered_with_its_lineage(
    cluster: Cluster, namespace: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    model = f"e2e-digits-{uuid.uuid4().hex[:6]}"
    cluster.apply(
        {
            "apiVersion": "kubeforge.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "digits", "namespace": namespace},
            "spec": {
                "image": "ghcr.io/kubeforge/runtime:test",
                "model": {"builtin": "mlp", "preset": "tiny"},
                "data": {"builtin": "digits"},
                "optimizer": {"steps": 30, "globalBatchSize": 32, "learningRate": 0.003},
                "processesPerNode": 2,
                "checkpoint": {"intervalSteps": 10},
                "register": {"modelName": model, "aliases": ["staging"]},
            },
        }
    )
    pod = cluster.wait_until(
        "pod 0 running",
        lambda: next(
            (
                p
                for p in get_json(cluster, "pods", "-n", namespace, "-l", "kubeforge.io/training-job=digits")[
                    "items"
                ]
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
    )
    pod_name = pod["metadata"]["name"]  # type: ignore[index]
    env_of_pod = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}  # type: ignore[index]

    # what the pod would see: the mounted spec, its service account, its environment
    spec_file = tmp_path / "trainingjob.yaml"
    configmap = get_json(cluster, "configmap", "digits-spec", "-n", namespace)
    spec_file.write_text(configmap["data"]["trainingjob.yaml"])
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    token = cluster.kubectl("create", "token", "kubeforge-trainer", "-n", namespace).stdout.strip()
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_text((cluster.kubeconfig.parent / "pki" / "ca.crt").read_text())
    host, port = api_server(cluster)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env_of_pod.get("MLFLOW_TRACKING_URI") or "",
        "PET_RDZV_ID": env_of_pod["PET_RDZV_ID"] or "",
        "KUBEFORGE_POD_NAME": pod_name,
        "KUBEFORGE_POD_NAMESPACE": namespace,
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBEFORGE_SERVICEACCOUNT_DIR": str(sa),
    }
    assert env["MLFLOW_TRACKING_URI"] == mlflow_server.uri, "the operator gives pods its MLflow"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.training.cli",
            str(spec_file),
            "--local",
            "--set",
            f"checkpoint.path={tmp_path / 'ckpt'}",
            "--progress-interval",
            "1",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the runtime's progress reached the pod, and the operator put it in the TrainingJob's status
    st = cluster.wait_until(
        "final progress in status",
        lambda: (
            (s := get_json(cluster, "trainingjob", "digits", "-n", namespace).get("status", {})).get(
                "currentStep"
            )
            == 30
            and s.get("mlflowRunId")
            and s
        ),
    )
    run_id = st["mlflowRunId"]  # type: ignore[index]
    assert st["worldSize"] == 2 and st["lastCheckpointStep"] == 30, st  # type: ignore[index]
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.data.metrics["loss"] < 2.3  # ln(10) = 2.303 is chance on ten classes
    assert run.data.tags.get("kubeforge.job-id") == env_of_pod["PET_RDZV_ID"]

    # the pod exits 0: the operator finishes the job and registers the model
    cluster.kubectl("annotate", "pod", pod_name, "-n", namespace, "kwok.kubeforge.io/exit-code=0")
    cluster.wait_until(
        "TrainingJob Succeeded",
        lambda: (
            get_json(cluster, "trainingjob", "digits", "-n", namespace)["status"].get("phase") == "Succeeded"
        ),
    )
    mv = cluster.wait_until(
        "ModelVersion Ready",
        lambda: (
            (m := get_json(cluster, "modelversion", "digits", "-n", namespace)).get("status", {}).get("phase")
            == "Ready"
            and m
        ),
        timeout=90,
    )
    mv_status = mv["status"]  # type: ignore[index]
    assert mv["spec"]["source"]["trainingJob"] == "digits"  # type: ignore[index]
    assert mv_status["runId"] == run_id and mv_status["aliases"] == ["staging"]
    version = client.get_model_version_by_alias(model, "staging")
    assert version.version == mv_status["registryVersion"]
    assert version.run_id == run_id
    # MLflow 3 keeps a logged model's files apart from the run's artifacts: the version is that model
    assert version.source.startswith("models:/m-"), version.source
    assert client.get_logged_model(version.source.removeprefix("models:/")).source_run_id == run_id

    # the trained model is deployed: the InferenceService resolves the ModelVersion to its fixed version, and
    # the pod's compile step (run here, as the training pod's runtime was) loads that version from MLflow
    served = {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "digits", "namespace": namespace},
        "spec": {
            "image": "ghcr.io/kubeforge/runtime:test",
            "model": {"modelVersion": "digits"},
            "compile": {"mode": "eager", "backend": "cpu", "warmupBatchSizes": [1, 4]},
        },
    }
    cluster.apply(served)
    isvc = cluster.wait_until(
        "InferenceService Ready",
        lambda: (
            (i := get_json(cluster, "infsvc", "digits", "-n", namespace)).get("status", {}).get("phase")
            == "Ready"
            and i
        ),
    )
    assert isvc["status"]["modelUri"] == mv_status["modelUri"] == f"models:/{model}/{version.version}"  # type: ignore[index]
    [serving_pod] = get_json(
        cluster,
        "pods",
        "-n",
        namespace,
        "-l",
        "kubeforge.io/inference-service=digits,kubeforge.io/role=predictor",
    )["items"]
    init = serving_pod["spec"]["initContainers"][0]
    (tmp_path / "inferenceservice.yaml").write_text(
        get_json(cluster, "configmap", "digits-spec", "-n", namespace)["data"]["inferenceservice.yaml"]
    )
    where = {  # the pod's paths, here
        "/etc/kubeforge/inferenceservice.yaml": tmp_path / "inferenceservice.yaml",
        "/var/cache/kubeforge": tmp_path / "cache",
        "/dev/termination-log": tmp_path / "termination-log",
    }
    args = [str(where.get(a, a)) for a in init["args"]]
    pod_env = {e["name"]: e["value"] for e in init["env"]}
    assert pod_env["MLFLOW_TRACKING_URI"] == mlflow_server.uri
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.serving.cli", *init["command"][1:], *args],
        env={**os.environ, **pod_env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    said = json.loads((tmp_path / "termination-log").read_text())
    assert str(said["version"]) == version.version and said["backend"] and said["mode"] == "eager", said
    # what that compile step said reaches the InferenceService's status through the pod (kwok's stand-in
    # reads it from the environment): the new pods roll in and report it
    served["spec"]["env"] = {"KWOK_COMPILE_SUMMARY": json.dumps(said)}  # type: ignore[index]
    cluster.apply(served)
    cluster.wait_until(
        "status.backend from the compile step",
        lambda: (
            get_json(cluster, "infsvc", "digits", "-n", namespace).get("status", {}).get("backend")
            == f"{said['backend']}/{said['mode']}"
        ),
    )

    # the registry service shows the whole line: the TrainingJob and its run, the ModelVersion, the
    # InferenceService serving the version, and the run's metrics; read from the real API server and MLflow
    from fastapi.testclient import TestClient
    from sqlmodel import create_engine

    from model_registry.mlflow_gateway import MlflowGateway
    from model_registry.service import cluster_lister, create_app

    app = create_app(
        MlflowGateway(mlflow_server.uri),
        create_engine(f"sqlite:///{tmp_path / 'lineage.db'}"),
        cluster_lister(str(cluster.kubeconfig)),
        refresh_seconds=0,
    )
    http = TestClient(app)
    shown = http.get(f"/api/models/{model}/versions/{version.version}").json()
    line = {step: [(x["namespace"], x["name"]) for x in links] for step, links in shown["lineage"].items()}
    assert line == {
        "training": [(namespace, "digits")],
        "registration": [(namespace, "digits")],
        "deployment": [(namespace, "digits")],
    }
    assert shown["lineage"]["training"][0]["run_id"] == run_id
    assert shown["run"]["metrics"]["loss"] == run.data.metrics["loss"]
    page = http.get(f"/models/{model}/versions/{version.version}")
    curve = http.get(f"/api/runs/{run_id}/metrics/loss").json()["history"]
    assert page.status_code == 200 and len(curve) > 1  # the training's loss, a curve on the version's page
    assert '<figure class="chart" data-metric="loss">' in page.text and "<polyline points=" in page.text
    # the alias as the registry first read it, declared by the ModelVersion the TrainingJob created
    moves = http.get(f"/api/models/{model}").json()["promotions"]
    assert [(m["alias"], m["previous"], m["version"], m["declared_by"]) for m in moves] == [
        ("staging", None, version.version, f"{namespace}/digits")
    ]
