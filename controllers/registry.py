"""The operator's MLflow registry client, shared by the controllers (None when no MLflow is configured)."""

from __future__ import annotations

from functools import lru_cache

from controllers import config
from model_registry.mlflow_gateway import MlflowGateway


@lru_cache(maxsize=4)
def _gateway(tracking_uri: str, ui_url: str | None) -> MlflowGateway:
    return MlflowGateway(
        tracking_uri, ui_url=ui_url, timeout_s=config.env_float("KUBEFORGE_MLFLOW_TIMEOUT", 10.0)
    )


def gateway() -> MlflowGateway | None:
    cfg = config.load()
    return _gateway(cfg.mlflow_tracking_uri, cfg.mlflow_ui_url) if cfg.mlflow_tracking_uri else None
