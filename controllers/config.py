"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from crds.common import DEFAULT_IMAGE


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator needs to know about its surroundings.

    mlflow_tracking_uri: the registry the operator talks to (KUBEFORGE_MLFLOW_TRACKING_URI).
    pod_mlflow_tracking_uri: the URI pods get as MLFLOW_TRACKING_URI (KUBEFORGE_POD_MLFLOW_TRACKING_URI;
        default the operator's — they differ when the operator runs outside the cluster).
    mlflow_ui_url: base of links to runs and models in status (KUBEFORGE_MLFLOW_UI_URL; default the
        tracking URI
        when it is http(s)).
    runtime_image: default image of training and serving pods (KUBEFORGE_RUNTIME_IMAGE).
    gang_scheduler_name: schedulerName of gang-scheduled pods (KUBEFORGE_GANG_SCHEDULER_NAME, default
        scheduler-plugins' "scheduler-plugins-scheduler").
    drift_interval_seconds: how often registry state is compared with the spec (KUBEFORGE_DRIFT_INTERVAL).
    """

    mlflow_tracking_uri: str | None
    pod_mlflow_tracking_uri: str | None
    mlflow_ui_url: str | None
    runtime_image: str
    gang_scheduler_name: str
    drift_interval_seconds: float

    @property
    def mlflow_configured(self) -> bool:
        return bool(self.mlflow_tracking_uri)


def env_float(name: str, default: float) -> float:
    """A number from the environment; `default` when it is unset or not a number."""
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@lru_cache(maxsize=1)
def load() -> OperatorConfig:
    env = os.environ
    tracking = env.get("KUBEFORGE_MLFLOW_TRACKING_URI") or None
    ui = env.get("KUBEFORGE_MLFLOW_UI_URL") or (
        tracking if tracking and tracking.startswith("http") else None
    )
    return OperatorConfig(
        mlflow_tracking_uri=tracking,
        pod_mlflow_tracking_uri=env.get("KUBEFORGE_POD_MLFLOW_TRACKING_URI") or tracking,
        mlflow_ui_url=ui.rstrip("/") if ui else None,
        runtime_image=env.get("KUBEFORGE_RUNTIME_IMAGE", DEFAULT_IMAGE),
        gang_scheduler_name=env.get("KUBEFORGE_GANG_SCHEDULER_NAME", "scheduler-plugins-scheduler"),
        drift_interval_seconds=float(env.get("KUBEFORGE_DRIFT_INTERVAL", "30")),
    )
