"""MLflow: one run per job across a stop and a resume, metrics and params logged by rank 0, and the final
model logged with the pytorch flavour (signature + input example) in a form the serving runtime loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_local

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")


def test_one_run_across_resume_and_a_loadable_model(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "model": {"builtin": "mlp", "preset": "tiny"},
        "data": {"builtin": "digits"},
        "optimizer": {"steps": 10, "globalBatchSize": 32, "learningRate": 0.01},
        "checkpoint": {"intervalSteps": 5, "path": str(tmp_path / "ckpt")},
        "mlflow": {"trackingUri": uri, "experiment": "kubeforge-test"},
    }
    first = run_local(tmp_path, spec, 2, "--stop-at-step", "5", name="a")
    assert first.code == 0 and first.progress["runId"]
    second = run_local(tmp_path, spec, 2, name="b")
    assert second.code == 0 and second.progress["state"] == "succeeded"
    assert second.progress["runId"] == first.progress["runId"], "a resumed job continues its MLflow run"

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(first.progress["runId"])
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 11))
    for key in ("lr", "grad_norm", "samples_per_s", "checkpoint_step"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.params["world_size"] == "2" and "layout" in run.data.params

    mlflow.set_tracking_uri(uri)
    model_uri = second.progress["modelUri"]
    model = mlflow.pytorch.load_model(model_uri)
    import torch

    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 10)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is not None
    (spec_in,) = info.signature.inputs.inputs
    assert tuple(spec_in.shape) == (-1, 1, 8, 8)
