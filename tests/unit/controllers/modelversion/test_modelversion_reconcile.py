"""Table-driven tests of the pure ModelVersion planning (no MLflow, no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controllers.modelversion.reconcile import (
    MANAGED_TAGS_TAG,
    UID_TAG,
    Claim,
    DeleteAlias,
    DeleteTags,
    ResolvedSource,
    SetAlias,
    SetDescription,
    SetTags,
    SourceNotReady,
    create_request,
    parse,
    plan_sync,
    resolve_source,
    run_id_of,
    serving_references,
    validate,
    winner,
)
from crds.modelversion import ModelSource, ModelVersionSpec
from model_registry.mlflow_gateway import ModelVersion

ME = Claim("2026-01-01T00:00:01Z", "ns", "me", uid="uid-me")
OLDER = Claim("2026-01-01T00:00:00Z", "ns", "older", uid="uid-older")
NEWER = Claim("2026-01-01T00:00:02Z", "ns", "newer", uid="uid-newer")
SAME_TIME_A = Claim("2026-01-01T00:00:01Z", "ns", "a-first", uid="uid-a")


def spec(**kw: Any) -> ModelVersionSpec:
    base: dict[str, Any] = {"modelName": "m", "source": {"uri": "s3://b/k"}}
    base.update(kw)
    return ModelVersionSpec.model_validate(base)


def version(v: str = "3", tags: dict[str, str] | None = None, description: str = "") -> ModelVersion:
    return ModelVersion(
        name="m",
        version=v,
        status="READY",
        source="s3://b/k",
        tags=tags or {UID_TAG: "uid-me"},
        description=description,
    )


# --- winner -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ([ME], ME),
        ([ME, OLDER, NEWER], OLDER),
        ([NEWER, ME], ME),
        ([ME, SAME_TIME_A], SAME_TIME_A),  # tie on time -> namespace/name
        ([Claim("2026-01-01T00:00:01Z", "a-ns", "z", uid="x"), ME], Claim("", "a-ns", "z", uid="x")),
        ([], None),
    ],
)
def test_winner_is_oldest_then_by_name(claims: list[Claim], expected: Claim | None) -> None:
    got = winner(claims)
    if expected is None or expected.created:
        assert got == expected
    else:
        assert got is not None and (got.namespace, got.name) == (expected.namespace, expected.name)


def test_winner_does_not_depend_on_order() -> None:
    import itertools

    for perm in itertools.permutations([ME, OLDER, NEWER, SAME_TIME_A]):
        assert winner(perm) == OLDER


# --- validation ---------------------------------------------------------------------------------------
def raw_spec(**kw: Any) -> ModelVersionSpec:
    """A spec that skipped validation (as if an old CRD had let it through)."""
    src = ModelSource.model_construct(
        **{
            "training_job": None,
            "run_id": None,
            "uri": "s3://b/k",
            "artifact_path": "model",
            **kw.pop("source", {}),
        }
    )
    fields: dict[str, Any] = {
        "model_name": "m",
        "source": src,
        "aliases": [],
        "tags": None,
        "description": None,
    }
    fields.update(kw)
    return ModelVersionSpec.model_construct(**fields)


@pytest.mark.parametrize(
    ("kw", "fields"),
    [
        ({}, []),
        ({"aliases": ["champion", "staging-2", "a_b"]}, []),
        ({"aliases": ["latest"]}, ["spec.aliases[0]"]),
        ({"aliases": ["ok", "V12"]}, ["spec.aliases[1]"]),
        ({"aliases": ["has space"]}, ["spec.aliases[0]"]),
        ({"aliases": ["x", "x"]}, ["spec.aliases[1]"]),
        ({"tags": {"team": "a", "kubeforge.io/uid": "forged"}}, ["spec.tags['kubeforge.io/uid']"]),
        ({"source": {"uri": None}}, ["spec.source"]),
        ({"source": {"uri": "s3://x", "run_id": "r"}}, ["spec.source"]),
    ],
)
def test_validate(kw: dict[str, Any], fields: list[str]) -> None:
    assert [p.field for p in validate(raw_spec(**kw))] == fields


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"modelName": "m", "source": {}}, "spec.source"),
        ({"modelName": "m", "source": {"uri": "s3://x"}, "aliases": ["latest"]}, "spec.aliases"),
        ({"source": {"uri": "s3://x"}}, "spec.modelName"),
        ({"modelName": "m", "source": {"uri": "s3://x"}, "deletionPolicy": "Shred"}, "spec.deletionPolicy"),
        ({"modelName": "m", "source": {"uri": "s3://x"}, "tags": {"kubeforge.io/x": "1"}}, "spec.tags"),
    ],
)
def test_parse_names_the_field(raw: dict[str, Any], field: str) -> None:
    got = parse(raw)
    assert isinstance(got, list) and got, got
    # model-level rules report at `spec` and name the field in their message
    assert got[0].field.startswith(field) or field.removeprefix("spec.") in got[0].message, got


def test_parse_ok() -> None:
    got = parse({"modelName": "m", "source": {"runId": "r"}, "aliases": ["champion"]})
    assert isinstance(got, ModelVersionSpec) and got.aliases == ["champion"]


# --- source -------------------------------------------------------------------------------------------
JOB_OK = {"status": {"phase": "Succeeded", "mlflowRunId": "run42"}}


@pytest.mark.parametrize(
    ("source", "job", "expected"),
    [
        ({"uri": "s3://b/k"}, None, ResolvedSource("s3://b/k", None)),
        ({"uri": "runs:/abc/model"}, None, ResolvedSource("runs:/abc/model", "abc")),
        ({"runId": "abc"}, None, ResolvedSource("runs:/abc/model", "abc")),
        ({"runId": "abc", "artifactPath": "/sub/dir/"}, None, ResolvedSource("runs:/abc/sub/dir", "abc")),
        ({"trainingJob": "tj"}, JOB_OK, ResolvedSource("runs:/run42/model", "run42")),
        ({"trainingJob": "tj"}, None, "TrainingJobNotFound"),
        ({"trainingJob": "tj"}, {"status": {"phase": "Running"}}, "TrainingJobNotSucceeded"),
        ({"trainingJob": "tj"}, {}, "TrainingJobNotSucceeded"),
        ({"trainingJob": "tj"}, {"status": {"phase": "Succeeded"}}, "TrainingJobHasNoRun"),
        ({"trainingJob": "tj"}, {"status": {"phase": "Failed"}}, "TrainingJobFailed"),
    ],
)
def test_resolve_source(source: dict[str, Any], job: dict[str, Any] | None, expected: object) -> None:
    got = resolve_source(ModelSource.model_validate(source), job)
    if isinstance(expected, str):
        assert isinstance(got, SourceNotReady) and got.reason == expected and got.retry_after > 0
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("uri", "run"), [("runs:/r1/m", "r1"), ("runs:/r1", "r1"), ("models:/m/1", None), ("s3://runs:/x", None)]
)
def test_run_id_of(uri: str, run: str | None) -> None:
    assert run_id_of(uri) == run


def test_create_request_tags_uid_and_remembers_managed_keys() -> None:
    req = create_request(
        spec(tags={"team": "a"}, description="d"),
        ResolvedSource("runs:/r/model", "r"),
        uid="u1",
        namespace="ns",
        name="mv",
    )
    assert req.tags[UID_TAG] == "u1" and req.tags["team"] == "a"
    assert json.loads(req.tags[MANAGED_TAGS_TAG]) == ["team"]
    assert (req.source, req.run_id, req.description) == ("runs:/r/model", "r", "d")
    assert (
        MANAGED_TAGS_TAG
        not in create_request(spec(), ResolvedSource("s3://x", None), uid="u", namespace="n", name="x").tags
    )


# --- aliases ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("aliases", "model_aliases", "claims", "previously", "actions", "held", "lost", "drift"),
    [
        # nothing declared, nothing held
        ([], {}, {}, [], [], [], {}, []),
        # new alias
        (["champion"], {}, {}, [], [SetAlias("champion", "3")], ["champion"], {}, []),
        # already in place: no call
        (["champion"], {"champion": "3"}, {}, ["champion"], [], ["champion"], {}, []),
        # moved in the UI to version 2: moved back, reported as drift
        (
            ["champion"],
            {"champion": "2"},
            {},
            ["champion"],
            [SetAlias("champion", "3")],
            ["champion"],
            {},
            ["champion"],
        ),
        # removed in the UI: set again, drift
        (["champion"], {}, {}, ["champion"], [SetAlias("champion", "3")], ["champion"], {}, ["champion"]),
        # spec moved alias from another (unmanaged) version to ours: not drift (we never held it)
        (["champion"], {"champion": "1"}, {}, [], [SetAlias("champion", "3")], ["champion"], {}, []),
        # removed from the spec: deleted
        ([], {"old": "3"}, {}, ["old"], [DeleteAlias("old")], [], {}, []),
        # added by hand on our version: deleted, drift
        ([], {"extra": "3"}, {}, [], [DeleteAlias("extra")], [], {}, ["extra"]),
        # undeclared alias on another version: not ours, untouched
        ([], {"other": "1"}, {}, [], [], [], {}, []),
        # conflict, we are older: we take it
        (
            ["champion"],
            {"champion": "9"},
            {"champion": [ME, NEWER]},
            [],
            [SetAlias("champion", "3")],
            ["champion"],
            {},
            [],
        ),
        # conflict, the other is older: we never touch it
        (["champion"], {"champion": "9"}, {"champion": [ME, OLDER]}, [], [], [], {"champion": OLDER}, []),
        # conflict lost while we still hold it (the winner has not moved it yet): leave it, report lost
        (
            ["champion"],
            {"champion": "3"},
            {"champion": [OLDER, ME]},
            ["champion"],
            [],
            ["champion"],
            {"champion": OLDER},
            [],
        ),
        # undeclared by us but claimed by another ModelVersion: leave it to them
        ([], {"shared": "3"}, {"shared": [NEWER]}, [], [], ["shared"], {}, []),
    ],
)
def test_plan_aliases(
    aliases: list[str],
    model_aliases: dict[str, str],
    claims: dict[str, list[Claim]],
    previously: list[str],
    actions: list[object],
    held: list[str],
    lost: dict[str, Claim],
    drift: list[str],
) -> None:
    plan = plan_sync(
        spec(aliases=aliases), version(), model_aliases, me=ME, claims=claims, previously_held=previously
    )
    assert [a for a in plan.actions if isinstance(a, SetAlias | DeleteAlias)] == actions
    assert list(plan.held) == held
    assert dict(plan.lost) == lost
    assert list(plan.drifted_aliases) == drift


def test_conflict_is_stable_from_both_sides() -> None:
    """Both claimants compute the same owner whatever the MLflow state: no flapping."""
    for holder in ("3", "4", None):
        ma = {"champion": holder} if holder else {}
        old = plan_sync(
            spec(aliases=["champion"]), version("3"), ma, me=OLDER, claims={"champion": [OLDER, NEWER]}
        )
        new = plan_sync(
            spec(aliases=["champion"]), version("4"), ma, me=NEWER, claims={"champion": [OLDER, NEWER]}
        )
        assert "champion" not in new.lost or new.lost["champion"] == OLDER
        assert not [a for a in new.actions if isinstance(a, SetAlias)]
        assert (SetAlias("champion", "3") in old.actions) == (holder != "3")
        assert new.rivals["champion"] == (OLDER,) and old.rivals["champion"] == (NEWER,)


# --- tags and description -----------------------------------------------------------------------------
def managed(*keys: str) -> str:
    return json.dumps(sorted(keys))


@pytest.mark.parametrize(
    ("desired", "current", "actions", "drift"),
    [
        (None, {}, [], []),
        ({"a": "1"}, {}, [SetTags({"a": "1", MANAGED_TAGS_TAG: managed("a")})], []),
        ({"a": "1"}, {"a": "1", MANAGED_TAGS_TAG: managed("a")}, [], []),
        ({"a": "2"}, {"a": "1", MANAGED_TAGS_TAG: managed("a")}, [SetTags({"a": "2"})], ["a"]),
        (
            {},
            {"a": "1", MANAGED_TAGS_TAG: managed("a")},
            [SetTags({MANAGED_TAGS_TAG: "[]"}), DeleteTags(("a",))],
            [],
        ),
        # a tag set by hand (not managed) is left alone
        ({"a": "1"}, {"a": "1", "manual": "x", MANAGED_TAGS_TAG: managed("a")}, [], []),
        # a user tag that already had the value but was not managed yet: only the managed list changes
        ({"a": "1"}, {"a": "1"}, [SetTags({MANAGED_TAGS_TAG: managed("a")})], []),
    ],
)
def test_plan_tags(
    desired: dict[str, str] | None, current: dict[str, str], actions: list[object], drift: list[str]
) -> None:
    plan = plan_sync(spec(tags=desired), version(tags={UID_TAG: "uid-me", **current}), {}, me=ME, claims={})
    assert [a for a in plan.actions if isinstance(a, SetTags | DeleteTags)] == actions
    assert list(plan.drifted_tags) == drift


@pytest.mark.parametrize(
    ("desired", "current", "actions"),
    [
        (None, "by hand", []),
        ("d", "d", []),
        ("new", "old", [SetDescription("new")]),
        ("", "old", [SetDescription("")]),
    ],
)
def test_plan_description(desired: str | None, current: str, actions: list[object]) -> None:
    plan = plan_sync(spec(description=desired), version(description=current), {}, me=ME, claims={})
    assert [a for a in plan.actions if isinstance(a, SetDescription)] == actions


# --- serving ------------------------------------------------------------------------------------------
def isvc(name: str, model: dict[str, str], canary: dict[str, str] | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"model": model}
    if canary:
        s["canary"] = {"model": canary}
    return {"metadata": {"name": name}, "spec": s}


@pytest.mark.parametrize(
    ("services", "served_by"),
    [
        ([], []),
        ([isvc("a", {"modelVersion": "mv"})], ["a"]),
        ([isvc("a", {"modelVersion": "other"})], []),
        ([isvc("b", {"modelVersion": "other"}, {"modelVersion": "mv"})], ["b"]),
        ([isvc("c", {"uri": "models:/m/3"})], ["c"]),
        ([isvc("c", {"uri": "models:/m/4"})], []),
        ([isvc("d", {"uri": "models:/m@champion"})], ["d"]),
        ([isvc("d", {"uri": "models:/m@staging"})], []),
        ([isvc("e", {"uri": "models:/other/3"}), isvc("f", {"modelVersion": "mv"})], ["f"]),
    ],
)
def test_serving_references(services: list[dict[str, Any]], served_by: list[str]) -> None:
    assert (
        serving_references(services, name="mv", model_name="m", version="3", aliases=["champion"])
        == served_by
    )
