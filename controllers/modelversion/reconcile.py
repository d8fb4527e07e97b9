"""Pure planning of a ModelVersion's registry state: spec + what MLflow holds now -> the calls to make.

Nothing here talks to MLflow or Kubernetes or reads a clock; handlers.py gathers the observations, runs the
plan through model_registry.mlflow_gateway and derives the status with status.py.

Rules (docs/modelversion.md):
- the registry version is found by its `kubeforge.io/uid` tag, created with that tag in the same call;
- aliases are exactly as declared: declared ones point at our version, undeclared ones are removed from it;
- an alias claimed by several ModelVersions of one registered model goes to the oldest claimant
  (creationTimestamp, then namespace/name); the others never touch it and report the conflict;
- tags: the declared ones are set; the keys we set are remembered in the `kubeforge.io/managed-tags` tag of
  the version, so a key removed from the spec is deleted and keys set by hand in MLflow are left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from crds.modelversion import ModelSource, ModelVersionSpec
from model_registry.mlflow_gateway import ModelVersion

TAG_PREFIX = "kubeforge.io/"
UID_TAG = "kubeforge.io/uid"
NAMESPACE_TAG = "kubeforge.io/namespace"
NAME_TAG = "kubeforge.io/name"
MANAGED_TAGS_TAG = "kubeforge.io/managed-tags"
ARCHIVED_TAG = "kubeforge.io/archived"

_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
_RUNS_URI = re.compile(r"^runs:/([^/]+)(/.*)?$")


# --- claims: who declares which alias -------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Claim:
    """A ModelVersion declaring an alias. Ordered by seniority: the smallest claim wins."""

    created: str  # metadata.creationTimestamp (RFC 3339, UTC, 'Z': sorts as text)
    namespace: str
    name: str
    uid: str = field(compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def winner(claims: Iterable[Claim]) -> Claim | None:
    """The claim that holds an alias: the oldest, ties broken by namespace then name. Deterministic."""
    return min(claims, default=None)


# --- validation ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """A user error: the field to fix and how."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def parse(spec: Mapping[str, Any] | None) -> ModelVersionSpec | list[Problem]:
    """The typed spec, or the problems that make it invalid (field paths as the user wrote them)."""
    try:
        parsed = ModelVersionSpec.model_validate(dict(spec or {}))
    except ValidationError as e:
        out = []
        for err in e.errors():
            path = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            out.append(Problem(path, str(err["msg"]).removeprefix("Value error, ")))
        return out
    return validate(parsed) or parsed


def validate(spec: ModelVersionSpec) -> list[Problem]:
    """What the CRD schema cannot say (or a stale CRD let through), re-checked defensively."""
    out: list[Problem] = []
    s = spec.source
    given = [n for n, v in (("trainingJob", s.training_job), ("runId", s.run_id), ("uri", s.uri)) if v]
    if len(given) != 1:
        out.append(
            Problem(
                "spec.source",
                "set exactly one of trainingJob, runId or uri"
                + (f" (found {', '.join(given)})" if given else ""),
            )
        )
    seen: set[str] = set()
    for i, alias in enumerate(spec.aliases):
        where = f"spec.aliases[{i}]"
        if not _ALIAS.match(alias):
            out.append(Problem(where, f"alias {alias!r} may only hold letters, digits, '_' and '-'"))
        elif _RESERVED_ALIAS.match(alias):
            out.append(
                Problem(
                    where, f"alias {alias!r} is reserved by MLflow ('latest' and 'v<N>'); choose another name"
                )
            )
        if alias in seen:
            out.append(Problem(where, f"alias {alias!r} is listed twice"))
        seen.add(alias)
    for key in spec.tags or {}:
        if key.startswith(TAG_PREFIX):
            out.append(
                Problem(
                    f"spec.tags[{key!r}]",
                    f"keys starting with {TAG_PREFIX} are reserved for the operator; rename the tag",
                )
            )
    return out


# --- the source ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedSource:
    uri: str
    run_id: str | None


@dataclass(frozen=True)
class SourceNotReady:
    """Not yet resolvable (the TrainingJob has not finished): requeue."""

    reason: str
    message: str
    retry_after: float


def run_id_of(uri: str) -> str | None:
    m = _RUNS_URI.match(uri)
    return m.group(1) if m else None


def resolve_source(
    source: ModelSource, training_job: Mapping[str, Any] | None
) -> ResolvedSource | SourceNotReady | Problem:
    """The artifact URI and run of the version. `training_job` is the TrainingJob object named by
    source.trainingJob (None when it does not exist)."""
    if source.uri:
        return ResolvedSource(source.uri, run_id_of(source.uri))
    if source.run_id:
        path = source.artifact_path.strip("/")
        return ResolvedSource(f"runs:/{source.run_id}/{path}", source.run_id)
    if source.training_job:
        job = source.training_job
        if training_job is None:
            return SourceNotReady("TrainingJobNotFound", f"TrainingJob {job!r} does not exist (yet)", 10)
        st = training_job.get("status") or {}
        phase = st.get("phase")
        run_id = st.get("mlflowRunId")
        if phase == "Failed":
            failed = f"TrainingJob {job!r} failed: no model to register"
            return SourceNotReady("TrainingJobFailed", failed, 60)
        if phase != "Succeeded":
            waiting = f"waiting for TrainingJob {job!r} to succeed (phase {phase or 'unknown'})"
            return SourceNotReady("TrainingJobNotSucceeded", waiting, 5)
        if not run_id:
            return SourceNotReady(
                "TrainingJobHasNoRun",
                f"TrainingJob {job!r} succeeded but reports no MLflow run (status.mlflowRunId)",
                10,
            )
        return ResolvedSource(f"runs:/{run_id}/model", str(run_id))
    return Problem("spec.source", "set exactly one of trainingJob, runId or uri")


# --- creation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreateVersion:
    source: str
    run_id: str | None
    tags: Mapping[str, str]
    description: str | None


def create_request(
    spec: ModelVersionSpec, source: ResolvedSource, *, uid: str, namespace: str, name: str
) -> CreateVersion:
    """The version to create: the user's tags plus ours (uid first of all), in the same call."""
    user = dict(spec.tags or {})
    tags = {**user, UID_TAG: uid, NAMESPACE_TAG: namespace, NAME_TAG: name}
    if user:
        tags[MANAGED_TAGS_TAG] = json.dumps(sorted(user))
    return CreateVersion(source.uri, source.run_id, tags, spec.description)


# --- synchronisation of an existing version -----------------------------------------------------------
@dataclass(frozen=True)
class SetAlias:
    alias: str
    version: str


@dataclass(frozen=True)
class DeleteAlias:
    alias: str


@dataclass(frozen=True)
class SetTags:
    tags: Mapping[str, str]


@dataclass(frozen=True)
class DeleteTags:
    keys: tuple[str, ...]


@dataclass(frozen=True)
class SetDescription:
    description: str


Action = SetAlias | DeleteAlias | SetTags | DeleteTags | SetDescription


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    held: tuple[str, ...]  # aliases our version holds once the actions are done
    lost: Mapping[str, Claim]  # declared aliases another (older) ModelVersion holds: alias -> winner
    rivals: Mapping[str, tuple[Claim, ...]]  # declared aliases also claimed by others, won or lost
    drifted_aliases: tuple[str, ...]  # aliases we held that were moved or removed outside Kubernetes
    drifted_tags: tuple[str, ...]  # managed tags whose value was changed outside Kubernetes


def managed_tag_keys(version: ModelVersion) -> list[str]:
    raw = version.tags.get(MANAGED_TAGS_TAG)
    try:
        keys = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []


def plan_sync(
    spec: ModelVersionSpec,
    version: ModelVersion,
    model_aliases: Mapping[str, str],
    *,
    me: Claim,
    claims: Mapping[str, Iterable[Claim]],
    previously_held: Iterable[str] = (),
) -> Plan:
    """Bring `version` to the spec. `model_aliases` is the registered model's alias -> version now;
    `claims` maps each alias to the ModelVersions of the same registered model declaring it (any namespace);
    `previously_held` is status.aliases (what we held at the last reconcile, to tell drift from news)."""
    actions: list[Action] = []
    before = set(previously_held)
    declared = list(dict.fromkeys(spec.aliases))
    held = {a for a, v in model_aliases.items() if v == version.version}
    lost: dict[str, Claim] = {}
    rivals: dict[str, tuple[Claim, ...]] = {}
    drifted: list[str] = []

    for alias in declared:
        others = tuple(sorted(c for c in claims.get(alias, ()) if c.uid != me.uid))
        if others:
            rivals[alias] = others
        top = winner((me, *others))
        if top is not None and top.uid != me.uid:
            lost[alias] = top
            continue  # the winner moves it; we never touch it (no flapping)
        if model_aliases.get(alias) != version.version:
            actions.append(SetAlias(alias, version.version))
            held.add(alias)
            if alias in before:
                drifted.append(alias)

    claimed_by_others = {a for a, cs in claims.items() if any(c.uid != me.uid for c in cs)}
    for alias in sorted(held - set(declared)):
        if alias in claimed_by_others:
            continue  # another ModelVersion declares it and will move it
        actions.append(DeleteAlias(alias))
        held.discard(alias)
        if alias not in before:
            drifted.append(alias)  # added by hand in MLflow

    desired_tags = dict(spec.tags or {})
    previous_keys = managed_tag_keys(version)
    to_set = {k: v for k, v in desired_tags.items() if version.tags.get(k) != v}
    drifted_tags = sorted(k for k in to_set if k in previous_keys and k in version.tags)
    to_delete = tuple(sorted(k for k in previous_keys if k not in desired_tags and k in version.tags))
    if sorted(desired_tags) != sorted(previous_keys):
        to_set[MANAGED_TAGS_TAG] = json.dumps(sorted(desired_tags))
    if to_set:
        actions.append(SetTags(to_set))
    if to_delete:
        actions.append(DeleteTags(to_delete))
    if spec.description is not None and spec.description != version.description:
        actions.append(SetDescription(spec.description))

    return Plan(
        actions=tuple(actions),
        held=tuple(sorted(held)),
        lost=lost,
        rivals=rivals,
        drifted_aliases=tuple(sorted(set(drifted))),
        drifted_tags=tuple(drifted_tags),
    )


# --- deletion -----------------------------------------------------------------------------------------
def serving_references(
    inference_services: Iterable[Mapping[str, Any]],
    *,
    name: str,
    model_name: str,
    version: str,
    aliases: Iterable[str],
) -> list[str]:
    """Names of the InferenceServices (of our namespace) that serve this version: through
    spec.model.modelVersion / spec.canary.model.modelVersion naming the ModelVersion, or a uri that resolves
    to it (models:/<model>/<version> or models:/<model>@<alias it holds>)."""
    uris = {f"models:/{model_name}/{version}", *(f"models:/{model_name}@{a}" for a in aliases)}
    out: list[str] = []
    for isvc in inference_services:
        spec = isvc.get("spec") or {}
        refs = [spec.get("model") or {}, ((spec.get("canary") or {}).get("model")) or {}]
        if any(r.get("modelVersion") == name or r.get("uri") in uris for r in refs):
            out.append(str((isvc.get("metadata") or {}).get("name")))
    return sorted(out)
