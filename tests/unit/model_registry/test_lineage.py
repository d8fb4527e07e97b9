"""The lineage record: what the kubeforge.io objects say, kept after they are gone (a real SQLite
database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, SQLModel, create_engine, select

from model_registry import lineage

T1, T2 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC), datetime(2026, 12, 6, 11, 0, tzinfo=UTC)


def tj(name: str, run: str, phase: str = "Succeeded") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"register": {"modelName": "digits"}},
        "status": {"mlflowRunId": run, "phase": phase},
    }


def mv(name: str, version: str | None, run: str, job: str) -> dict[str, Any]:
    st = {"runId": run, **({"registryVersion": version} if version else {})}
    return {
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"modelName": "digits", "source": {"trainingJob": job}},
        "status": st,
    }


def isvc(name: str, *targets: tuple[str, int, int]) -> dict[str, Any]:
    traffic = [{"modelUri": u, "percent": p, "readyReplicas": r} for u, p, r in targets]
    return {"metadata": {"name": name, "namespace": "ml"}, "spec": {}, "status": {"traffic": traffic}}


def session() -> Session:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    return Session(engine)


def test_a_versions_lineage_from_its_run_to_what_serves_it_and_what_did() -> None:
    s = session()
    first = {
        "training": [tj("train-a", "run-a"), tj("train-b", "run-b", "Running")],
        "registration": [mv("digits-a", "1", "run-a", "train-a"), mv("digits-b", None, "run-b", "train-b")],
        "deployment": [isvc("web", ("models:/digits/1", 75, 3), ("models:/digits/2", 25, 1))],
    }
    assert lineage.observe(s, first, T1) == 5  # digits-b is not registered yet: no link
    got = lineage.lineage_of(s, "digits", "1", "run-a")
    assert [(x.name, x.detail) for x in got["training"]] == [("train-a", "Succeeded")]
    assert [(x.name, x.detail, x.run_id) for x in got["registration"]] == [
        ("digits-a", "TrainingJob train-a", "run-a")
    ]
    assert [(x.name, x.detail) for x in got["deployment"]] == [("web", "75% of the traffic, 3 ready pod(s)")]

    # an hour later the TrainingJob is gone (ttl) and the service serves version 2 alone, from a new one
    later = {
        "training": [],
        "registration": [mv("digits-a", "1", "run-a", "train-a")],
        "deployment": [isvc("web", ("models:/digits/2", 100, 4)), isvc("web2", ("models:/digits/1", 100, 1))],
    }
    lineage.observe(s, later, T2)
    got = lineage.lineage_of(s, "digits", "1", "run-a")
    [train] = got["training"]
    assert (train.name, train.first_seen, train.last_seen) == ("train-a", T1, T1)  # history outlives it
    assert [(d.name, d.last_seen) for d in got["deployment"]] == [("web2", T2), ("web", T1)]  # newest first
    [v2] = lineage.lineage_of(s, "digits", "2", "")["deployment"]
    assert (v2.detail, v2.first_seen, v2.last_seen) == ("100% of the traffic, 4 ready pod(s)", T1, T2)


def test_uris_that_name_no_version_are_not_lineage() -> None:
    s = session()
    objs = {"deployment": [isvc("web", ("models:/digits@champion", 100, 1), ("runs:/abc/model", 0, 0))]}
    assert lineage.observe(s, objs, T1) == 0


def test_when_the_cluster_was_last_read_even_when_it_showed_nothing() -> None:
    s = session()
    assert lineage.last_observed(s) is None
    lineage.observe(s, {"deployment": [isvc("web", ("models:/digits/1", 100, 1))]}, T1)
    lineage.observe(s, {"deployment": []}, T2)  # web is gone: the reading still counts
    [web] = lineage.lineage_of(s, "digits", "1", "")["deployment"]
    seen = lineage.last_observed(s)
    # SQLite hands datetimes back without their zone (both sides alike: the service compares them as read)
    assert seen is not None and seen.replace(tzinfo=UTC) == T2 and web.last_seen.replace(tzinfo=UTC) == T1


def test_many_objects_are_recorded_once_each_and_updated_in_place() -> None:
    s = session()
    many = {"deployment": [isvc(f"web{i}", (f"models:/digits/{i}", 100, 1)) for i in range(1200)]}
    assert lineage.observe(s, many, T1) == 1200  # more names than one query takes (500)
    many["deployment"][700] = isvc("web700", ("models:/digits/700", 100, 3))
    assert lineage.observe(s, many, T2) == 1200
    links = s.exec(select(lineage.Link)).all()
    assert len(links) == 1200 and {link.last_seen.replace(tzinfo=UTC) for link in links} == {T2}
    [web700] = [link for link in links if link.name == "web700"]
    assert (
        web700.detail == "100% of the traffic, 3 ready pod(s)" and web700.first_seen.replace(tzinfo=UTC) == T1
    )
