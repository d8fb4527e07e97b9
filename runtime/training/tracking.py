"""MLflow tracking (rank 0), optional: without a tracking URI, or without mlflow installed, nothing is logged.

One run per job. Its id is kept in ``<checkpoint path>/mlflow_run_id`` and the run is tagged with the job's
identity (``kubeforge.job-id``: the rendezvous id, PET_RDZV_ID), so an elastic restart, a rescheduled pod or a
resumed job continues the same run instead of starting another.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crds.trainingjob import TrainingJobSpec

log = logging.getLogger("kubeforge.tracking")
JOB_TAG = "kubeforge.job-id"


class Tracker:
    """No-op tracker; MlflowTracker overrides what it records."""

    run_id: str | None = None
    run_url: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, files: list[Path], folder: str) -> None: ...

    def log_model(self, model: nn.Module, example: torch.Tensor) -> str | None:
        return None

    def finish(self, state: str) -> None: ...


def tracking_uri(spec: TrainingJobSpec) -> str | None:
    return spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, state_dir: Path, job_id: str, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment(experiment)
        id_file = state_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None and job_id:
            found = mlflow.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{JOB_TAG}` = '{job_id}'",
                output_format="list",
                max_results=1,
            )
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(run_name=run_name, tags={JOB_TAG: job_id} if job_id else None)
            state_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id)
        self.run_id = run.info.run_id
        base = uri.rstrip("/")
        self.run_url = (
            f"{base}/#/experiments/{exp.experiment_id}/runs/{self.run_id}"
            if base.startswith("http")
            else None
        )

    def log_params(self, params: dict[str, Any]) -> None:
        try:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        except Exception as e:  # params are immutable: a resumed run may already hold them
            log.info("params not logged again: %s", e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_artifacts(self, files: list[Path], folder: str) -> None:
        for f in files:
            self.mlflow.log_artifact(str(f), artifact_path=folder)

    def log_model(self, model: nn.Module, example: torch.Tensor) -> str | None:
        """Log ``model`` (one tensor in, one out) with the pytorch flavour, its signature and an input
        example."""
        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            out = model(example)
        sig = infer_signature(example.numpy(), out.float().numpy())
        # pickle, not MLflow 3's default pt2 (torch.export): an exported graph fixes every dimension the
        # example does not vary (a decoder's sequence length); the pickled module takes any batch and length.
        info = self.mlflow.pytorch.log_model(
            model,
            name="model",
            signature=sig,
            input_example=example.numpy(),
            serialization_format="pickle",
            # stated, not inferred: inference re-imports the model in a subprocess (slow) and the serving
            # image brings its own torch
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        return str(info.model_uri)

    def finish(self, state: str) -> None:
        self.mlflow.end_run(status={"succeeded": "FINISHED", "failed": "FAILED"}.get(state, "KILLED"))


def make_tracker(spec: TrainingJobSpec, state_dir: Path, run_name: str) -> Tracker:
    uri = tracking_uri(spec)
    if not uri:
        return Tracker()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning("MLflow tracking URI %s is set but mlflow is not installed: not tracking", uri)
        return Tracker()
    experiment = (
        spec.mlflow.experiment
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or os.environ.get("KUBEFORGE_POD_NAMESPACE")
        or "kubeforge"
    )
    job_id = os.environ.get("KUBEFORGE_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    return MlflowTracker(uri, experiment, state_dir, job_id, run_name)
