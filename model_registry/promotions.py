"""Promotions: an audit trail of where each alias pointed and when (SQLModel).

MLflow keeps only where an alias points now. `record` compares MLflow's aliases with the state it recorded
at the previous reading and appends a Promotion for each alias set, moved or removed in between, with the
ModelVersion object that declares the alias at its new version when the cluster says one does (otherwise it
was set outside Kubernetes, in MLflow itself). Readings are periodic (the registry service's
`--refresh-seconds`): an alias moved twice between two readings shows as one move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from model_registry import readings

Declarations = Mapping[tuple[str, str, str], str]  # (model, alias, version) -> "namespace/name"
OUTSIDE = "outside Kubernetes"  # the cluster was read and no ModelVersion declares the alias there


class AliasState(SQLModel, table=True):
    """Where an alias pointed at the last reading."""

    __table_args__ = (UniqueConstraint("model_name", "alias"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True)
    alias: str
    version: str


class Promotion(SQLModel, table=True):
    """An alias set, moved or removed between two readings."""

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True)
    alias: str
    previous: str | None = None  # "" the alias did not exist; None: unknown (first reading of the registry)
    version: str = ""  # "" the alias was removed
    # the ModelVersion "namespace/name" declaring the alias at `version`, or OUTSIDE; "" not known (removals,
    # or the cluster was not read)
    declared_by: str = ""
    at: datetime = Field(index=True)


def declarations(modelversions: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], str]:
    """(model, alias, version) -> the ModelVersion declaring that alias for the version it registered."""
    out: dict[tuple[str, str, str], str] = {}
    for obj in modelversions:
        meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        model, version = str(spec.get("modelName") or ""), str(st.get("registryVersion") or "")
        if model and version:
            for alias in spec.get("aliases") or []:
                out[(model, str(alias), version)] = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    return out


def record(
    session: Session,
    aliases: Mapping[str, Mapping[str, str]],
    declared: Declarations | None,
    now: datetime,
) -> list[Promotion]:
    """Compare `aliases` ({model: {alias: version}}, every model MLflow listed) with the recorded state and
    append what changed; returns the new promotions. `declared`: the cluster's ModelVersions' aliases (None:
    the cluster was not read). A model MLflow no longer lists keeps its trail as it was (a listing is not
    proof of deletion)."""
    first_reading = readings.mark_read(session, readings.MLFLOW, now) is None  # nothing's past is known
    state: dict[tuple[str, str], AliasState] = {
        (s.model_name, s.alias): s
        for s in session.exec(select(AliasState).where(col(AliasState.model_name).in_(list(aliases))))
    }
    found: list[Promotion] = []
    for model, now_aliases in aliases.items():
        for alias, version in sorted(now_aliases.items()):
            held = state.pop((model, alias), None)
            if held is not None and held.version == version:
                continue
            found.append(
                Promotion(
                    model_name=model,
                    alias=alias,
                    previous=None if first_reading else (held.version if held else ""),
                    version=version,
                    declared_by="" if declared is None else declared.get((model, alias, version), OUTSIDE),
                    at=now,
                )
            )
            if held is None:
                session.add(AliasState(model_name=model, alias=alias, version=version))
            else:
                held.version = version
                session.add(held)
    for (model, alias), gone in sorted(state.items()):  # held at the last reading, not now: removed
        found.append(Promotion(model_name=model, alias=alias, previous=gone.version, version="", at=now))
        session.delete(gone)
    session.add_all(found)
    session.commit()
    return found


def trail(session: Session, model_name: str, limit: int = 200) -> list[Promotion]:
    """A model's promotions, newest first."""
    stmt = (
        select(Promotion)
        .where(Promotion.model_name == model_name)
        .order_by(col(Promotion.at).desc(), col(Promotion.id).desc())
        .limit(limit)
    )
    return list(session.exec(stmt))
