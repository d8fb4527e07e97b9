"""kopf glue of the ModelVersion controller: observe (MLflow, the cluster), plan (reconcile.py), act,
report (status.py). Handlers are synchronous (kopf runs them in its thread pool), as MlflowClient and
controllers.kube are.

- create / update (spec) / resume: the full reconcile; requeued with kopf.TemporaryError while the source is
  not ready, the version is PENDING_REGISTRATION or MLflow is unavailable (exponential backoff);
- a timer (KUBEFORGE_DRIFT_INTERVAL seconds) re-checks registered versions: aliases or tags changed in MLflow
  are set back to the spec (with an Event), conflicts re-evaluated, the signature summary filled in;
- delete (kopf's finalizer): the deletion policy, never deleting or archiving a version an InferenceService
  serves.

Test-only fault injection: KUBEFORGE_FAULT=modelversion.after-create makes the process exit (status 137) right
after MLflow created the version and before the status is patched, so crash-safety tests can kill the operator
at the worst moment. Never set it anywhere else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from controllers import conditions, config
from controllers.kube import KubeError, kube
from controllers.modelversion.reconcile import (
    UID_TAG,
    Claim,
    DeleteAlias,
    DeleteTags,
    Problem,
    SetAlias,
    SetDescription,
    SetTags,
    SourceNotReady,
    create_request,
    parse,
    plan_sync,
    resolve_source,
    serving_references,
)
from controllers.modelversion.status import Observation, Status, build_status, status_patch
from controllers.registry import gateway
from crds.common import API_VERSION, GROUP, VERSION
from crds.modelversion import ModelVersionSpec
from model_registry.mlflow_gateway import (
    FAILED_REGISTRATION,
    PENDING_REGISTRATION,
    READY,
    ModelVersion,
    RegistryRejected,
    RegistryUnavailable,
)

PLURAL = "modelversions"
INDEX = "modelversion_alias_claims"
FAULT_ENV = "KUBEFORGE_FAULT"


MAX_BACKOFF = config.env_float("KUBEFORGE_MODELVERSION_MAX_BACKOFF", 30.0)  # seconds between retries, at most
SERVED_RECHECK = config.env_float("KUBEFORGE_MODELVERSION_SERVED_RECHECK", 10.0)  # blocked deletion re-check
DRIFT_INTERVAL = config.load().drift_interval_seconds

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    """One reconcile at a time per object: the timer must never race a create into a second version."""
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def _fault(point: str) -> None:
    """Test-only crash point (see the module docstring)."""
    if os.environ.get(FAULT_ENV) == point:
        os._exit(137)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _backoff(retry: int, base: float = 1.0) -> float:
    return float(min(base * 2 ** min(retry, 10), MAX_BACKOFF))


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def _ref(c: Claim) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelVersion",
        "metadata": {"name": c.name, "namespace": c.namespace, "uid": c.uid},
    }


# --- the alias claims index ---------------------------------------------------------------------------
@kopf.index(GROUP, VERSION, PLURAL, id=INDEX)
def modelversion_alias_claims(
    name: str, namespace: str | None, uid: str, spec: Mapping[str, Any], meta: Mapping[str, Any], **_: Any
) -> dict[tuple[str, str], Claim]:
    """(registered model, alias) -> the ModelVersions declaring it, cluster-wide.

    Objects being deleted let go of their aliases."""
    if meta.get("deletionTimestamp"):
        return {}
    model = spec.get("modelName")
    claim = Claim(str(meta.get("creationTimestamp") or ""), namespace or "", name, uid=uid)
    return {(str(model), str(a)): claim for a in spec.get("aliases") or [] if model}


def _claims(index: Any, model: str, aliases: Iterable[str]) -> dict[str, list[Claim]]:
    if index is None:
        return {}
    return {a: list(index.get((model, a), [])) for a in set(aliases)}


# --- reconcile ----------------------------------------------------------------------------------------
class _Ctx:
    """One reconcile: the object, where its status goes, and the events to post."""

    def __init__(self, body: Mapping[str, Any], patch: Any) -> None:
        self.body = body
        meta = body.get("metadata") or {}
        self.uid = str(meta.get("uid"))
        self.name = str(meta.get("name"))
        self.namespace = str(meta.get("namespace"))
        self.generation = meta.get("generation")
        self.created = str(meta.get("creationTimestamp") or "")
        self.prev: Status = _plain(body.get("status") or {})
        self.patch = patch

    def finish(self, obs: Observation) -> Status:
        desired = build_status(self.prev, obs, conditions.now())
        diff = status_patch(self.prev, desired)
        if diff:
            self.patch.setdefault("status", {}).update(diff)
        return desired

    def event(self, type_: str, reason: str, message: str, on: Mapping[str, Any] | None = None) -> None:
        kube().event(on or self.body, type_, reason, message)

    def problems(self, problems: list[Problem]) -> None:
        st = self.finish(Observation(generation=self.generation, problems=problems))
        if _condition(self.prev, "Ready").get("message") != _condition(st, "Ready").get("message"):
            self.event("Warning", "InvalidSpec", "; ".join(map(str, problems)))


def _source_field(spec: ModelVersionSpec) -> str:
    s = spec.source
    if s.training_job:
        return "spec.source.trainingJob"
    return "spec.source.runId" if s.run_id else "spec.source.uri"


def _reconcile(body: Mapping[str, Any], patch: Any, retry: int, index: Any, *, from_timer: bool) -> None:
    ctx = _Ctx(body, patch)
    gw = gateway()
    if gw is None:
        ctx.finish(Observation(generation=ctx.generation, configured=False))
        return
    parsed = parse(body.get("spec"))
    if isinstance(parsed, list):
        ctx.problems(parsed)
        return
    spec = parsed
    model = spec.model_name
    step = ("spec.modelName", "MLflow rejected the registered model")
    try:
        found = gw.find_versions_by_tag(model, UID_TAG, ctx.uid)
        run_url: str | None = None
        if found:
            version = found[0]
            model_aliases = gw.get_aliases(model)
        else:
            job = None
            if spec.source.training_job:
                job = kube().get(API_VERSION, "TrainingJob", ctx.namespace, spec.source.training_job)
            src = resolve_source(spec.source, job)
            if isinstance(src, Problem):
                ctx.problems([src])
                return
            if isinstance(src, SourceNotReady):
                ctx.finish(Observation(generation=ctx.generation, not_ready=src))
                raise kopf.TemporaryError(src.message, delay=src.retry_after)
            rm = gw.ensure_registered_model(model)
            if src.run_id:
                step = (_source_field(spec), "MLflow cannot use the run")
                run = gw.get_run(src.run_id)
                if run is None:
                    ctx.problems(
                        [
                            Problem(
                                _source_field(spec),
                                f"MLflow run {src.run_id!r} does not exist; name an existing run",
                            )
                        ]
                    )
                    return
                run_url = gw.run_link(run) or None
            req = create_request(spec, src, uid=ctx.uid, namespace=ctx.namespace, name=ctx.name)
            step = (_source_field(spec), f"MLflow refused to register {req.source}")
            version = gw.create_version(
                model,
                req.source,
                run_id=req.run_id,
                tags=req.tags,
                description=req.description,
                run_link=run_url,
            )
            _fault("modelversion.after-create")
            ctx.event("Normal", "Registered", f"registered {version.model_uri} from {req.source}")
            model_aliases = dict(rm.aliases)

        if version.status == PENDING_REGISTRATION:
            ctx.finish(Observation(generation=ctx.generation, version=version, run_url=run_url))
            pending = f"{version.model_uri} is PENDING_REGISTRATION"
            raise kopf.TemporaryError(pending, delay=_backoff(retry, 0.5))
        if version.status == FAILED_REGISTRATION:
            st = ctx.finish(Observation(generation=ctx.generation, version=version, run_url=run_url))
            if ctx.prev.get("registryStatus") != FAILED_REGISTRATION:
                ctx.event("Warning", "RegistrationFailed", _condition(st, "Ready").get("message", ""))
            return

        me = Claim(ctx.created, ctx.namespace, ctx.name, uid=ctx.uid)
        claims = _claims(index, model, [*spec.aliases, *model_aliases])
        plan = plan_sync(
            spec, version, model_aliases, me=me, claims=claims, previously_held=ctx.prev.get("aliases") or []
        )
        for action in plan.actions:
            if isinstance(action, SetAlias):
                step = (f"spec.aliases ({action.alias})", "MLflow rejected the alias")
                gw.set_alias(model, action.alias, action.version)
            elif isinstance(action, DeleteAlias):
                step = ("spec.aliases", "MLflow refused to remove an alias")
                gw.delete_alias(model, action.alias)
            elif isinstance(action, SetTags):
                step = ("spec.tags", "MLflow rejected the tags")
                gw.set_version_tags(model, version.version, action.tags)
            elif isinstance(action, DeleteTags):
                step = ("spec.tags", "MLflow refused to remove tags")
                gw.delete_version_tags(model, version.version, list(action.keys))
            elif isinstance(action, SetDescription):
                step = ("spec.description", "MLflow rejected the description")
                gw.set_description(model, version.version, action.description)

        signature = ctx.prev.get("signature")
        if signature is None and from_timer and version.status == READY:
            signature = gw.signature_summary(version.source) or "(unavailable)"
        st = ctx.finish(
            Observation(
                generation=ctx.generation, version=version, run_url=run_url, plan=plan, signature=signature
            )
        )
    except RegistryUnavailable as e:
        st = ctx.finish(Observation(generation=ctx.generation, registry_error=e.message[:500]))
        if _condition(ctx.prev, "RegistryAvailable").get("status") != "False":
            ctx.event("Warning", "RegistryUnavailable", f"MLflow is unavailable: {e.message[:300]}; retrying")
        if from_timer:
            return
        raise kopf.TemporaryError(f"MLflow unavailable: {e.message[:200]}", delay=_backoff(retry)) from None
    except RegistryRejected as e:
        ctx.problems([Problem(step[0], f"{step[1]}: {e.message[:500]}")])
        return
    except KubeError as e:
        if e.transient:
            raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=_backoff(retry)) from None
        raise

    # Events for what a user must see.
    if ctx.prev.get("registryVersion") and ctx.prev.get("registryVersion") != version.version:
        pass  # a different version than recorded: can only happen if the recorded one was deleted by hand
    if (
        _condition(st, "RegistryAvailable").get("status") == "True"
        and _condition(ctx.prev, "RegistryAvailable").get("status") == "False"
    ):
        ctx.event("Normal", "RegistryAvailable", "MLflow is reachable again")
    if plan.drifted_aliases:
        moved = f"{', '.join(plan.drifted_aliases)} ({version.model_uri})"
        ctx.event(
            "Warning",
            "AliasDriftCorrected",
            f"aliases changed outside Kubernetes set back to the spec: {moved}",
        )
    if plan.drifted_tags:
        ctx.event(
            "Warning",
            "TagDriftCorrected",
            f"tags changed outside Kubernetes set back to the spec: {', '.join(plan.drifted_tags)}",
        )
    old_msg = _condition(ctx.prev, "AliasesReady").get("message")
    new_cond = _condition(st, "AliasesReady")
    if new_cond.get("reason") == "AliasConflict" and new_cond.get("message") != old_msg:
        ctx.event("Warning", "AliasConflict", str(new_cond.get("message")))
        for alias, top in plan.lost.items():  # tell the holder too, now rather than at its next check
            ctx.event(
                "Warning",
                "AliasConflict",
                f"alias {alias!r} is also declared by ModelVersion {ctx.namespace}/{ctx.name} (created "
                f"later), which does not get it: remove the alias from one of them",
                on=_ref(top),
            )


# --- handlers -----------------------------------------------------------------------------------------
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_modelversion(body: kopf.Body, patch: kopf.Patch, retry: int, **kwargs: Any) -> None:
    with _lock(str(body.metadata.uid)):
        _reconcile(body, patch, retry, kwargs.get(INDEX), from_timer=False)


@kopf.timer(GROUP, VERSION, PLURAL, interval=DRIFT_INTERVAL, initial_delay=DRIFT_INTERVAL)
def check_modelversion_drift(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    """Drift detection of registered versions (creation is left to the handlers above)."""
    if body.metadata.get("deletionTimestamp") or not (body.get("status") or {}).get("registryVersion"):
        return
    lock = _lock(str(body.metadata.uid))
    if not lock.acquire(blocking=False):
        return  # a reconcile is running: it does the same
    try:
        _reconcile(body, patch, 0, kwargs.get(INDEX), from_timer=True)
    finally:
        lock.release()


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_modelversion(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
    """The deletion policy, through kopf's finalizer."""
    uid = str(body.metadata.uid)
    with _lock(uid):
        try:
            _delete(body, patch, retry)
        finally:
            with _locks_guard:
                _locks.pop(uid, None)


def _delete(body: Mapping[str, Any], patch: Any, retry: int) -> None:
    ctx = _Ctx(body, patch)
    gw = gateway()
    parsed = parse(body.get("spec"))
    if gw is None or isinstance(parsed, list) or parsed.deletion_policy == "Keep":
        return  # Keep (or nothing we could have registered): the registry version stays as it is
    spec = parsed
    model = spec.model_name
    try:
        found = gw.find_versions_by_tag(model, UID_TAG, ctx.uid)
        if not found:
            return
        version = found[0]
        held = sorted(a for a, v in gw.get_aliases(model).items() if v == version.version)
        services = kube().list(API_VERSION, "InferenceService", ctx.namespace)
        served = serving_references(
            services, name=ctx.name, model_name=model, version=version.version, aliases=held
        )
        if served:
            ctx.finish(_deleting(ctx, version, served))
            if _condition(ctx.prev, "DeletionBlocked").get("status") != "True":
                what = "archived" if spec.deletion_policy == "Archive" else "deleted"
                ctx.event(
                    "Warning",
                    "DeletionBlocked",
                    f"{version.model_uri} is still served by InferenceService {', '.join(served)}: "
                    f"not {what} until it is not",
                )
            raise kopf.TemporaryError(f"served by {', '.join(served)}", delay=SERVED_RECHECK)
        if spec.deletion_policy == "Archive":
            gw.archive_version(model, version.version)
            ctx.event("Normal", "Archived", f"archived {version.model_uri} (aliases removed)")
        else:
            for v in found:
                gw.delete_version(model, v.version)
            ctx.event("Normal", "Deleted", f"deleted {version.model_uri} from the registry")
    except RegistryUnavailable as e:
        ctx.finish(Observation(generation=ctx.generation, registry_error=e.message[:500], deleting=True))
        raise kopf.TemporaryError(f"MLflow unavailable: {e.message[:200]}", delay=_backoff(retry)) from None
    except RegistryRejected as e:
        # Never hold the object forever for something MLflow will keep refusing: say so and let go.
        ctx.event("Warning", "RegistryCleanupFailed", f"registry version left as it is: {e.message[:500]}")
    except KubeError as e:
        if e.transient:
            raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=_backoff(retry)) from None
        raise


def _deleting(ctx: _Ctx, version: ModelVersion, served: list[str]) -> Observation:
    return Observation(generation=ctx.generation, version=version, deleting=True, served_by=served)
