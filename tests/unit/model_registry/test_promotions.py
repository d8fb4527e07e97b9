"""The promotions trail: what changed between two readings of MLflow's aliases, and who declared it (a real
SQLite database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, SQLModel, create_engine

from model_registry import promotions
from model_registry.promotions import OUTSIDE

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def session() -> Session:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    return Session(engine)


def mv(name: str, model: str, version: str | None, *aliases: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"modelName": model, "aliases": list(aliases)},
        "status": {"registryVersion": version} if version else {},
    }


def moves(found: list[promotions.Promotion]) -> list[tuple[str, str, str | None, str, str]]:
    return [(p.model_name, p.alias, p.previous, p.version, p.declared_by) for p in found]


def test_first_reading_then_sets_moves_and_removals() -> None:
    s = session()
    first = promotions.record(s, {"digits": {"champion": "1"}, "churn": {}}, None, T0)
    # aliases already there when the registry first reads: their past is not known
    assert moves(first) == [("digits", "champion", None, "1", "")]
    assert promotions.record(s, {"digits": {"champion": "1"}}, None, T0 + timedelta(seconds=10)) == []

    declared = promotions.declarations(
        [mv("digits-2", "digits", "2", "champion", "latest"), mv("digits-3", "digits", None, "canary")]
    )
    assert declared == {("digits", "champion", "2"): "ml/digits-2", ("digits", "latest", "2"): "ml/digits-2"}
    t2 = T0 + timedelta(seconds=20)
    second = promotions.record(s, {"digits": {"champion": "2", "latest": "2", "shadow": "1"}}, declared, t2)
    assert moves(second) == [
        ("digits", "champion", "1", "2", "ml/digits-2"),
        ("digits", "latest", "", "2", "ml/digits-2"),
        ("digits", "shadow", "", "1", OUTSIDE),  # set in MLflow itself: no ModelVersion declares it
    ]

    t3 = T0 + timedelta(seconds=30)
    third = promotions.record(s, {"digits": {"champion": "2"}, "churn": {"prod": "4"}}, {}, t3)
    assert moves(third) == [
        ("churn", "prod", "", "4", OUTSIDE),
        ("digits", "latest", "2", "", ""),
        ("digits", "shadow", "1", "", ""),
    ]

    # a model MLflow stops listing keeps its trail and its state: no removals are made up
    assert promotions.record(s, {"digits": {"champion": "2"}}, {}, T0 + timedelta(seconds=40)) == []
    assert moves(promotions.record(s, {"churn": {}}, {}, T0 + timedelta(seconds=50))) == [
        ("churn", "prod", "4", "", "")
    ]

    trail = promotions.trail(s, "digits")
    assert [(p.alias, p.previous, p.version) for p in trail] == [  # newest first
        ("shadow", "1", ""),
        ("latest", "2", ""),
        ("shadow", "", "1"),
        ("latest", "", "2"),
        ("champion", "1", "2"),
        ("champion", None, "1"),
    ]
    assert len(promotions.trail(s, "digits", limit=2)) == 2


def test_a_later_reading_of_an_empty_registry_is_not_a_first_reading() -> None:
    s = session()
    assert promotions.record(s, {"digits": {}}, {}, T0) == []
    # the registry was reading: an alias that appears since is new, not "already there"
    assert moves(promotions.record(s, {"digits": {"a": "1"}}, {}, T0 + timedelta(seconds=1))) == [
        ("digits", "a", "", "1", OUTSIDE)
    ]
