"""When the registry service last read each of its sources (SQLModel): the cluster (lineage.observe) and
MLflow's aliases (promotions.record). A reading counts whether or not it found anything."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, Session, SQLModel

CLUSTER, MLFLOW = "cluster", "mlflow"


class Reading(SQLModel, table=True):
    """One row per source: when it was last read."""

    source: str = Field(primary_key=True)
    at: datetime


def last_read(session: Session, source: str) -> datetime | None:
    """When `source` was last read; None before its first reading."""
    row = session.get(Reading, source)
    return row.at if row else None


def mark_read(session: Session, source: str, now: datetime) -> datetime | None:
    """Record a reading of `source` at `now` (committed with the session); returns the one before it."""
    row = session.get(Reading, source)
    before = row.at if row else None
    row = row or Reading(source=source, at=now)
    row.at = now
    session.add(row)
    return before
