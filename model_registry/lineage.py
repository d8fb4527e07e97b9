"""Lineage: training job → MLflow run → registered version → deployments, kept in a database (SQLModel).

MLflow is the system of record for runs, models, versions and aliases; the cluster holds who trained,
registered and serves them, but only while those objects exist (a finished TrainingJob may be collected by
its ttlSecondsAfterFinished, an InferenceService deleted). `observe` records what the kubeforge.io objects
say, each link with when it was first and last seen, so that a version's history outlives them: the registry
service shows both what serves a version now and what did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from model_registry import readings

TRAINING, REGISTRATION, DEPLOYMENT = "training", "registration", "deployment"
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class Link(SQLModel, table=True):
    """One kubeforge.io object's part in a version's lineage."""

    __table_args__ = (UniqueConstraint("kind", "namespace", "name", "model_name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)  # training, registration, deployment
    namespace: str
    name: str  # the TrainingJob, ModelVersion or InferenceService
    model_name: str = Field(default="", index=True)  # registered model (training: the one it registers)
    version: str = Field(default="", index=True)  # registry version ("" for training)
    run_id: str = Field(default="", index=True)
    detail: str = ""  # training: phase; registration: source; deployment: traffic share and ready pods
    first_seen: datetime
    last_seen: datetime


def _links(kind: str, obj: Mapping[str, Any]) -> Iterable[dict[str, str]]:
    meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    base = {"kind": kind, "namespace": str(meta.get("namespace") or ""), "name": str(meta.get("name") or "")}
    if kind == TRAINING:
        yield {
            **base,
            "model_name": str((spec.get("register") or {}).get("modelName") or ""),
            "version": "",
            "run_id": str(st.get("mlflowRunId") or ""),
            "detail": str(st.get("phase") or ""),
        }
    elif kind == REGISTRATION and st.get("registryVersion"):
        source = spec.get("source") or {}
        origin = (
            f"TrainingJob {source['trainingJob']}"
            if source.get("trainingJob")
            else str(source.get("uri") or source.get("runId") or "")
        )
        yield {
            **base,
            "model_name": str(spec.get("modelName") or ""),
            "version": str(st["registryVersion"]),
            "run_id": str(st.get("runId") or ""),
            "detail": origin,
        }
    elif kind == DEPLOYMENT:
        for target in st.get("traffic") or []:
            m = _VERSION_URI.match(str(target.get("modelUri") or ""))
            if m:
                pods = target.get("readyReplicas", 0)
                share = f"{target.get('percent', 0)}% of the traffic, {pods} ready pod(s)"
                yield {
                    **base,
                    "model_name": m["name"],
                    "version": m["version"],
                    "run_id": "",
                    "detail": share,
                }


def observe(session: Session, objects: Mapping[str, Iterable[Mapping[str, Any]]], now: datetime) -> int:
    """Record the links the objects show ({"training": TrainingJobs, "registration": ModelVersions,
    "deployment": InferenceServices}); returns how many were seen. Links not seen keep their last_seen.
    The recorded links of the objects shown are read in a few queries (by name, 500 at a time), not one per
    link."""
    wanted = [fields for kind, objs in objects.items() for obj in objs for fields in _links(kind, obj)]
    names = sorted({f["name"] for f in wanted})
    held: dict[tuple[str, ...], Link] = {}
    for i in range(0, len(names), 500):
        for link in session.exec(select(Link).where(col(Link.name).in_(names[i : i + 500]))):
            held[(link.kind, link.namespace, link.name, link.model_name, link.version)] = link
    for fields in wanted:
        key = tuple(fields[k] for k in ("kind", "namespace", "name", "model_name", "version"))
        found = held.get(key)
        if found is None:
            found = held[key] = Link.model_validate({**fields, "first_seen": now, "last_seen": now})
        else:
            found.run_id = fields["run_id"] or found.run_id
            found.detail, found.last_seen = fields["detail"], now
        session.add(found)
    readings.mark_read(session, readings.CLUSTER, now)
    session.commit()
    return len(wanted)


def lineage_of(session: Session, model_name: str, version: str, run_id: str) -> dict[str, list[Link]]:
    """Who trained (through the version's run), registered and serves (or served) a version."""
    trainings = session.exec(select(Link).filter_by(kind=TRAINING, run_id=run_id)).all() if run_id else []
    registrations = session.exec(
        select(Link).filter_by(kind=REGISTRATION, model_name=model_name, version=version)
    ).all()
    deployments = session.exec(
        select(Link).filter_by(kind=DEPLOYMENT, model_name=model_name, version=version)
    ).all()
    return {
        TRAINING: list(trainings),
        REGISTRATION: list(registrations),
        DEPLOYMENT: sorted(deployments, key=lambda d: d.last_seen, reverse=True),
    }


def last_observed(session: Session) -> datetime | None:
    """When the cluster was last read: a link last seen before then belongs to an object that is gone (or
    no longer says it); None before the first reading."""
    return readings.last_read(session, readings.CLUSTER)
