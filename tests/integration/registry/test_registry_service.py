"""The registry service against a real MLflow server: models, versions, aliases and run metrics from MLflow,
lineage from what the cluster's objects said (here handed in as the lister's answer; the end-to-end test reads
them from the real API server), JSON and HTML."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import create_engine

from model_registry.mlflow_gateway import MlflowGateway
from model_registry.service import create_app
from tests.fixtures.mlflow import MlflowServer

pytestmark = pytest.mark.integration


def test_models_versions_metrics_lineage_and_pages(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = mlflow_server.client()
    model = f"reg-{uuid.uuid4().hex[:6]}"
    run = client.create_run(client.create_experiment(f"exp-{model}"))
    client.log_metric(run.info.run_id, "loss", 2.0, step=1)
    client.log_metric(run.info.run_id, "loss", 0.25, step=2)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(model, description="digits <script>alert(1)</script>")
    for _ in range(2):
        client.create_model_version(
            model, f"s3://bucket/{model}", run_id=run.info.run_id, await_creation_for=0
        )
    client.set_registered_model_alias(model, "champion", "2")
    objects: dict[str, list[dict[str, Any]]] = {
        "training": [
            {
                "metadata": {"name": "train", "namespace": "ml"},
                "spec": {"register": {"modelName": model}},
                "status": {"mlflowRunId": run.info.run_id, "phase": "Succeeded"},
            }
        ],
        "registration": [
            {
                "metadata": {"name": "v2", "namespace": "ml"},
                "spec": {"modelName": model, "source": {"trainingJob": "train"}, "aliases": ["champion"]},
                "status": {"registryVersion": "2", "runId": run.info.run_id},
            }
        ],
        "deployment": [
            {
                "metadata": {"name": "web", "namespace": "ml"},
                "status": {
                    "traffic": [{"modelUri": f"models:/{model}/2", "percent": 100, "readyReplicas": 2}]
                },
            }
        ],
    }
    # MLflow answers in pages: the gateway follows them to the end
    gw = MlflowGateway(mlflow_server.uri)
    extra = f"pages-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(extra)  # two models at least: pages of one
    everything = [m.name for m in gw.list_models()]
    assert {model, extra} <= set(everything) and [m.name for m in gw.list_models(page_size=1)] == everything
    assert [v.version for v in gw.list_versions(model, page_size=1)] == ["2", "1"]
    engine = create_engine(f"sqlite:///{tmp_path / 'lineage.db'}")
    app = create_app(MlflowGateway(mlflow_server.uri), engine, lambda: objects, refresh_seconds=0)
    http = TestClient(app)

    listed = http.get("/api/models").json()["models"]
    mine = next(m for m in listed if m["name"] == model)
    assert mine["aliases"] == {"champion": "2"}
    detail = http.get(f"/api/models/{model}").json()
    assert [(v["version"], v["aliases"]) for v in detail["versions"]] == [("2", ["champion"]), ("1", [])]
    got = http.get(f"/api/models/{model}/versions/2").json()
    assert got["run"]["metrics"] == {"loss": 0.25} and got["run"]["run_id"] == run.info.run_id
    lineage = got["lineage"]
    assert [(x["name"], x["detail"]) for x in lineage["training"]] == [("train", "Succeeded")]
    assert [x["name"] for x in lineage["registration"]] == ["v2"]
    assert [(x["name"], x["detail"], x["current"]) for x in lineage["deployment"]] == [
        ("web", "100% of the traffic, 2 ready pod(s)", True)
    ]
    assert (
        got["run"]["link"]
        == f"{mlflow_server.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    )
    curve = http.get(f"/api/runs/{run.info.run_id}/metrics/loss").json()["history"]
    assert curve == [{"step": 1, "value": 2.0}, {"step": 2, "value": 0.25}]
    client.log_metric(run.info.run_id, "eval/accuracy", 0.5, step=2)  # a key with a slash in it
    assert http.get(f"/api/runs/{run.info.run_id}/metrics/eval/accuracy").json()["history"] == [
        {"step": 2, "value": 0.5}
    ]
    unknown = http.get("/api/runs/0123456789abcdef0123456789abcdef/metrics/loss")
    assert (
        unknown.status_code == 404 and "no run '0123456789abcdef0123456789abcdef'" in unknown.json()["detail"]
    )

    def named(q: str) -> list[str]:
        return [m["name"] for m in http.get("/api/models", params={"q": q}).json()["models"]]

    assert named(model.upper()) == [model] and model in named("CHAMPION")  # any case, aliases too
    assert model not in named("nothing-like-it")
    assert http.get(f"/api/models/{model}/versions/1").json()["lineage"]["deployment"] == []

    # promotions: the alias as first read (declared by the ModelVersion v2), then moved in MLflow itself
    def trail() -> list[tuple[str, str | None, str, str]]:
        moves = http.get(f"/api/models/{model}").json()["promotions"]
        return [(p["alias"], p["previous"], p["version"], p["declared_by"]) for p in moves]

    assert trail() == [("champion", None, "2", "ml/v2")]
    client.set_registered_model_alias(model, "champion", "1")
    assert trail() == [("champion", "2", "1", "outside Kubernetes"), ("champion", None, "2", "ml/v2")]
    assert "moved 2 → 1" in http.get(f"/models/{model}").text

    # the record outlives the objects: the cluster forgets them, the registry does not
    objects.update(training=[], registration=[], deployment=[])
    again = http.get(f"/api/models/{model}/versions/2").json()["lineage"]
    assert [(x["name"], x["current"]) for x in again["training"]] == [("train", False)]
    assert [(x["name"], x["current"]) for x in again["deployment"]] == [("web", False)]

    missing = http.get(f"/api/models/{model}/versions/9")
    assert missing.status_code == 404 and "no version 9" in missing.json()["detail"]
    assert http.get("/api/models/no-such-model").status_code == 404
    bad = http.get(f"/api/models/{model}/versions/latest")
    assert bad.status_code == 404 and "not a version number" in bad.json()["detail"]

    index = http.get("/").text
    assert f'href="/models/{model}"' in index and "champion → 2" in index
    assert "<script>alert" not in index and "&lt;script&gt;" in index  # autoescaped
    page = http.get(f"/models/{model}/versions/2").text
    assert run.info.run_id in page and "ml/web" in page and "ml/train" in page and "0.25" in page


def test_mlflow_away_is_a_503_that_says_so(tmp_path: Path) -> None:
    app = create_app(MlflowGateway("http://127.0.0.1:9"), create_engine(f"sqlite:///{tmp_path / 'l.db'}"))
    r = TestClient(app).get("/api/models")
    assert r.status_code == 503 and "MLflow is unavailable" in r.json()["detail"]
