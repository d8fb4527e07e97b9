"""The operator's kopf settings that change kopf's behaviour (no cluster needed)."""

from __future__ import annotations

from typing import Any, cast

import kopf

from controllers.app import ChangeTrackedDiffBase
from crds.common import API_VERSION

STORAGE = ChangeTrackedDiffBase(prefix="kubeforge.io", key="last-handled-configuration")


def _body(api_version: str, kind: str, annotations: dict[str, str] | None = None, **extra: Any) -> kopf.Body:
    meta = {"name": "x", "namespace": "ns", "annotations": annotations or {}}
    raw = {"apiVersion": api_version, "kind": kind, "metadata": meta, **extra}
    return kopf.Body(cast(kopf.RawBody, raw))


def test_modelversions_keep_kopfs_diff_base() -> None:
    """Change handlers (on.update of spec) need the essence and the stored last-handled configuration."""
    stored = '{"spec": {"modelName": "old"}}'
    annotations = {"kubeforge.io/last-handled-configuration": stored}
    body = _body(
        API_VERSION, "ModelVersion", annotations, spec={"modelName": "new"}, status={"phase": "Ready"}
    )
    assert STORAGE.build(body=body) == {"spec": {"modelName": "new"}}
    assert STORAGE.fetch(body=body) == {"spec": {"modelName": "old"}}


def test_level_triggered_kinds_get_an_empty_essence() -> None:
    """TrainingJobs, Jobs and pods have no change handlers: no deep copy per event, and no diff."""
    for api_version, kind in ((API_VERSION, "TrainingJob"), ("batch/v1", "Job"), ("v1", "Pod")):
        body = _body(api_version, kind, spec={"big": list(range(100))})
        assert STORAGE.build(body=body) == {}
        assert STORAGE.fetch(body=body) == {}
