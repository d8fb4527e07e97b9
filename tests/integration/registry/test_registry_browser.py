"""The registry's pages in a real browser (headless Chromium): what a person clicks through, against a real
MLflow server; the lineage handed in as the cluster's objects would say it (the e2e test reads them from the
real API server)."""

from __future__ import annotations

import itertools
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, create_engine

from model_registry import promotions
from model_registry.mlflow_gateway import MlflowGateway
from model_registry.service import create_app
from tests.fixtures.browser import serve
from tests.fixtures.mlflow import MlflowServer

pytestmark = pytest.mark.integration


def test_filter_click_through_lineage_and_curve(
    mlflow_server: MlflowServer, page: Any, tmp_path: Path
) -> None:
    client = mlflow_server.client()
    tag = uuid.uuid4().hex[:6]
    model, other = f"digits-{tag}", f"churn-{tag}"
    run = client.create_run(client.create_experiment(f"exp-{tag}"), run_name=f"train-{tag}")
    rid = run.info.run_id
    losses = [2.3 * 0.7**i for i in range(12)]
    for step, loss in enumerate(losses, start=1):
        client.log_metric(rid, "loss", loss, step=step)
    client.log_metric(rid, "loss", math.nan, step=13)  # a diverged step: stored by MLflow, not drawable
    client.log_metric(rid, "accuracy", 0.97, step=12)
    client.log_param(rid, "lr", "0.003")
    client.set_terminated(rid)
    client.create_registered_model(model, description="handwritten digits")
    client.create_registered_model(other, description="who leaves")
    for _ in range(2):
        client.create_model_version(model, f"s3://bucket/{model}", run_id=rid, await_creation_for=0)
    client.set_registered_model_alias(model, "champion", "2")
    serving = {
        "metadata": {"name": "web", "namespace": "ml"},
        "status": {"traffic": [{"modelUri": f"models:/{model}/2", "percent": 100, "readyReplicas": 2}]},
    }
    objects: dict[str, list[dict[str, Any]]] = {
        "training": [
            {
                "metadata": {"name": f"train-{tag}", "namespace": "ml"},
                "spec": {"register": {"modelName": model}},
                "status": {"mlflowRunId": rid, "phase": "Succeeded"},
            }
        ],
        "registration": [
            {
                "metadata": {"name": "v2", "namespace": "ml"},
                "spec": {"modelName": model, "source": {"trainingJob": f"train-{tag}"}},
                "status": {"registryVersion": "2", "runId": rid},
            }
        ],
        "deployment": [serving],
    }
    gateway = MlflowGateway(mlflow_server.uri)
    engine = create_engine(f"sqlite:///{tmp_path / 'l.db'}")
    app = create_app(gateway, engine, lambda: objects, 0)

    def recorded(n: int) -> list[tuple[str | None, str]]:
        """The trail once it holds n promotions (the service reads on its own, every second here)."""
        deadline = time.monotonic() + 20
        while True:
            with Session(engine) as session:
                moves = [(p.previous, p.version) for p in promotions.trail(session, model)]
            if len(moves) >= n or time.monotonic() > deadline:
                return moves
            time.sleep(0.2)

    with serve(app) as url:
        # the list narrows while typing (the script), and the form filters on the server without one
        page.goto(f"{url}/?q={tag}")
        rows = page.locator("#models tbody tr[data-search]")
        assert rows.count() == 2 and page.inner_text("#shown") == "2 models"
        page.fill("#filter", "champion")
        visible = page.locator("#models tbody tr[data-search]:visible")
        assert visible.count() == 1 and model in visible.inner_text()
        assert page.inner_text("#shown") == "1 model"
        page.fill("#filter", "LEAVES")  # descriptions too, any case
        assert page.locator("#models tbody tr[data-search]:visible").inner_text().startswith(other)
        page.fill("#filter", "")
        assert page.locator("#models tbody tr[data-search]:visible").count() == 2

        # model → version, by clicking
        page.click(f"text={model}")
        page.wait_for_url(f"{url}/models/{model}")
        versions = page.locator("#versions tbody tr")
        assert versions.count() == 2 and "champion" in versions.nth(0).inner_text()
        # each version's run's metrics side by side: the columns most runs logged, MLflow's last values
        header = page.locator("#versions thead th").all_inner_texts()
        assert header[:5] == ["version", "status", "aliases", "accuracy", "loss"]
        assert versions.nth(0).locator("td.metric").all_inner_texts() == ["0.97", "nan"]
        promoted = page.locator("#promotions tbody tr")
        assert (
            promoted.count() == 1
            and "2 (already so when the registry first read it)" in promoted.inner_text()
        )

        # promoted and rolled back while nobody looks: the service's own readings keep both moves
        client.set_registered_model_alias(model, "champion", "1")
        assert recorded(2)[0] == ("2", "1")
        client.set_registered_model_alias(model, "champion", "2")
        assert recorded(3)[0] == ("1", "2")
        page.reload()
        rows = [r.split("\t") for r in page.locator("#promotions tbody tr").all_inner_texts()]
        assert [r[2] for r in rows] == [
            "moved 1 → 2",
            "moved 2 → 1",
            "2 (already so when the registry first read it)",
        ]
        assert rows[0][3] == "outside Kubernetes (in MLflow)"
        page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
        page.click("#versions a >> text=2")
        page.wait_for_url(f"{url}/models/{model}/versions/2")

        # the lineage, left to right: job → run (a link into MLflow's UI) → version → what serves it now
        assert f"ml/train-{tag}" in page.inner_text("#chain-training")
        link = page.locator("#chain-run a")
        assert link.inner_text() == f"train-{tag}" and rid in (link.get_attribute("href") or "")
        assert "ModelVersion ml/v2" in page.inner_text("#chain-version")
        serves = page.locator("#chain-deployment div").inner_text()
        assert serves == "ml/web: 100% of the traffic, 2 ready pod(s) (now)"

        # the loss curve: a vertex per finite value, left to right and falling, in the browser's layout
        loss = page.locator('figure[data-metric="loss"]')
        points = loss.locator("polyline").get_attribute("points") or ""
        xy = [tuple(map(float, p.split(","))) for p in points.split()]
        assert len(xy) == len(losses)
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(xy))  # y grows downward
        box = loss.locator("svg").bounding_box()
        assert box is not None and box["width"] == 320 and box["height"] == 80
        caption = loss.locator("figcaption").inner_text()
        # MLflow's last value is the diverged step's; the curve's lowest is the last finite one
        assert caption.startswith(
            f"last nan · min {losses[-1]:.6g} · max 2.3 · steps 1\u201312 (12 points, 1 not"
        )
        single = page.locator('figure[data-metric="accuracy"]')
        assert single.locator("circle").count() == 1 and "(1 point)" in single.inner_text()  # a dot
        assert "0.003" in page.inner_text("#params")
        page.screenshot(path=str(tmp_path / "version.png"), full_page=True)
        assert (tmp_path / "version.png").stat().st_size > 10_000

        # the InferenceService moves on: the version page says until when it served
        objects["deployment"] = []
        page.reload()
        gone = page.locator("#chain-deployment div").inner_text()
        until = r"\(until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"
        assert re.fullmatch(rf"ml/web: 100% of the traffic, 2 ready pod\(s\) {until}", gone), gone

        # a wrong address is a page that says what is wrong, not JSON
        answer = page.goto(f"{url}/models/{model}/versions/7")
        assert answer is not None and answer.status == 404
        assert page.inner_text("h1") == "Error 404"
        assert f"no version 7 of registered model '{model}'" in page.inner_text("#detail")
        page.errors.clear()  # the browser logs the 404 itself
