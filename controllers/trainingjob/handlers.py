"""kopf glue of the TrainingJob controller.

Level-triggered: every event of a TrainingJob, of its Job or of its pods schedules one `sync` of that
TrainingJob (debounced), which renders the desired children (render.py), applies them with server-side apply,
derives the status from what the Job and pods report (status.py) and patches it only when it changed.
kopf indexes keep the observed objects in memory, so a sync costs no list calls. Nothing is stored in
annotations and no finalizer is added (except kopf's own while an elastic job's timer runs): ownerReferences
clean up the children.

The children are rendered and applied only when what they are rendered from (uid, generation, node target)
changed since they were last applied, or APPLY_RECHECK_SECONDS ago (which also restores a ConfigMap someone
deleted or edited; the namespace's shared objects are re-applied as often); a Job missing from the index is
applied again at once. Most syncs (a pod became ready, our own status patch) then cost neither a rendering nor
an API call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf
from pydantic import ValidationError

from controllers import conditions, config
from controllers.kube import KubeError, kube
from controllers.statuswriter import StatusWriter
from controllers.syncloop import SyncLoop, first, quiet_handlers
from controllers.trainingjob import render
from controllers.trainingjob.status import JobView, PodView, derive, finished_job, job_view, pod_view
from crds.common import API_VERSION, GROUP, LABEL_TRAINING_JOB, VERSION
from crds.trainingjob import TrainingJobSpec, object_rule_errors

PLURAL = "trainingjobs"
log = logging.getLogger("kubeforge.trainingjob")
Key = tuple[str, str]

NAMESPACE_RECHECK_SECONDS = 300.0
APPLY_RECHECK_SECONDS = 300.0
_ns_done: dict[str, float] = {}  # namespace -> when its shared objects were last applied
_ns_locks: dict[str, threading.Lock] = {}  # namespace -> held while its shared objects are applied
_applied: dict[Key, tuple[tuple[Any, ...], float]] = {}  # TrainingJob -> (render inputs, when applied)
_status = StatusWriter("TrainingJob")
# TrainingJob -> (its uid, last view) of its finished Job that was deleted (ttlSecondsAfterFinished) perhaps
# before a sync saw it finish: the sync then still learns how it ended instead of starting it again
_finished: dict[Key, tuple[str, JobView]] = {}
_loop = SyncLoop(lambda key: sync(key), log, ("tj_objects", "tj_jobs", "tj_pods"))


quiet_handlers("on_trainingjob", "on_job", "on_pod", timers=("tick",))


@kopf.on.startup()
def _reset(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Forget state of an earlier run in this process (tests run the operator several times)."""
    _ns_done.clear()
    _ns_locks.clear()
    _applied.clear()
    _status.clear()
    _finished.clear()
    _loop.reset(settings.execution.executor)


# The indexes are async: they only copy fields, and so never wait for a thread behind the syncs.
@kopf.index(GROUP, VERSION, PLURAL)
async def tj_objects(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    obj = {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}
    return {(namespace or "", name): obj}


@kopf.index("batch", "v1", "jobs", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def tj_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, JobView]:
    return {(namespace or "", labels[LABEL_TRAINING_JOB]): job_view(dict(body))}


@kopf.index("", "v1", "pods", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def tj_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, PodView]:
    return {(namespace or "", labels[LABEL_TRAINING_JOB]): pod_view(dict(body))}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_trainingjob(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    if type != "DELETED":
        _loop.schedule((namespace or "", name), kwargs)
    else:
        _applied.pop((namespace or "", name), None)
        _status.forget((namespace or "", name))
        _finished.pop((namespace or "", name), None)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def on_job(
    type: str, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **kwargs: Any
) -> None:
    key = (namespace or "", labels[LABEL_TRAINING_JOB])
    if type == "DELETED" and (done := finished_job(dict(body))) is not None:
        _finished[key] = done
    _loop.schedule(key, kwargs)


@kopf.on.event("", "v1", "pods", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def on_pod(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _loop.schedule((namespace or "", labels[LABEL_TRAINING_JOB]), kwargs)


def _needs_clock(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """Only a held scale-up, or an elastic job waiting for nodes, makes time-based decisions (status.derive):
    a fixed-size job that cannot be scheduled waits for events, not for a 5-second timer."""
    if status.get("scaleUpBlockedTarget") is not None:
        return True
    nodes = spec.get("nodes") or {}
    count = int(nodes.get("count") or 1)
    elastic = int(nodes.get("min") or count) < count
    return elastic and status.get("phase") in ("Pending", "Scaling")


@kopf.timer(GROUP, VERSION, PLURAL, interval=5, when=_needs_clock)
async def tick(namespace: str | None, name: str, **kwargs: Any) -> None:
    """Time-based decisions (a scale-up that waited too long) need a clock, not an event."""
    _loop.schedule((namespace or "", name), kwargs)


def _event(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    _status.event(obj, type_, reason, message)


def _validate(obj: dict[str, Any]) -> TrainingJobSpec | list[str]:
    try:
        spec = TrainingJobSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:
        return [f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    problems = object_rule_errors(obj)
    return problems or spec


def sync(key: Key) -> None:
    """Bring one TrainingJob's children and status in line with its spec and what the cluster reports."""
    obj = first(_loop.store("tj_objects", key))
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    spec = _validate(obj)
    if isinstance(spec, list):
        _status.invalid(obj, spec, condition=("Failed", True), now=conditions.now())
        return
    cfg = config.load()
    meta = obj["metadata"]
    owner = render.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    rcfg = render.RenderConfig(
        default_image=cfg.runtime_image,
        mlflow_tracking_uri=cfg.pod_mlflow_tracking_uri,
        gang_scheduler_name=cfg.gang_scheduler_name,
    )
    job: JobView | None = first(_loop.store("tj_jobs", key))
    if job is None and (gone := _finished.get(key)) is not None and gone[0] == meta["uid"]:
        job = gone[1]  # finished, then collected before a sync saw it finish
    pods: list[PodView] = list(_loop.store("tj_pods", key) or ())
    previous = _status.previous(obj)  # or our last status patch, when the index has not seen it yet
    generation, now = int(meta.get("generation") or 0), conditions.now()
    outcome = derive(spec, generation, previous, job, pods, now)
    terminal = outcome.status.get("phase") in ("Succeeded", "Failed")

    if not terminal:
        _ensure_namespace(owner.namespace)
        created, gang_missing = _apply_children(
            key, owner, spec, rcfg, generation, outcome.nodes_target, job_present=job is not None
        )
        if job is None and created is not None:
            # status from the Job just applied, not only on its watch event: one status patch less per job
            fresh = derive(spec, generation, previous, job_view(created), pods, now)
            if fresh.status.get("phase") not in ("Succeeded", "Failed"):
                outcome = fresh
        if gang_missing:
            _gang_unavailable(obj, outcome.status)
    elif outcome.succeeded and spec.registration and not previous.get("modelVersion"):
        outcome.status["modelVersion"] = _register(owner, spec)
        _event(
            obj,
            "Normal",
            "Registered",
            f"created ModelVersion {outcome.status['modelVersion']} for model {spec.registration.model_name}",
        )
    if terminal and previous.get("phase") != outcome.status.get("phase"):
        _clean_pods(owner, spec.clean_pod_policy, pods)
    for type_, reason, message in outcome.events:
        _event(obj, type_, reason, message)
    outcome.status["selector"] = render.selector(owner)
    _status.write(obj, outcome.status)


def _ensure_namespace(namespace: str) -> None:
    """The namespace's shared objects (trainer identity, the pods' headless Service), applied once per
    NAMESPACE_RECHECK_SECONDS; concurrent syncs of one namespace wait for the first one's apply instead of
    repeating it."""
    with _ns_locks.setdefault(namespace, threading.Lock()):
        if time.monotonic() - _ns_done.get(namespace, -NAMESPACE_RECHECK_SECONDS) < NAMESPACE_RECHECK_SECONDS:
            return
        for child in render.namespace_objects(namespace):
            kube().apply(child)
        _ns_done[namespace] = time.monotonic()


def _apply_children(
    key: Key,
    owner: render.Owner,
    spec: TrainingJobSpec,
    rcfg: render.RenderConfig,
    generation: int,
    target: int,
    *,
    job_present: bool,
) -> tuple[dict[str, Any] | None, bool]:
    """Render and server-side apply the children, unless the same inputs were applied in the last
    APPLY_RECHECK_SECONDS (rendering costs milliseconds: the spec ConfigMap is YAML).

    Returns the Job as the API server answered (when it was applied) and whether the PodGroup API is
    missing."""
    creating = not job_present
    # `creating` changes the rendering only for a Kueue-queued job (render.job: created suspended)
    inputs = (owner.uid, generation, target, creating and bool(spec.scheduling.queue_name))
    last = _applied.get(key)
    if last is not None and last[0] == inputs and time.monotonic() - last[1] < APPLY_RECHECK_SECONDS:
        if creating:  # applied, but gone from the index (deleted, or not yet seen): apply the Job alone
            return _apply(render.job(owner, spec, rcfg, target, creating=True), creating=True), False
        return None, False
    applied_job, gang_missing = None, False
    for child in render.render(owner, spec, rcfg, target, creating=creating):
        try:
            out = _apply(child, creating=creating)
        except KubeError as e:
            if child["kind"] != "PodGroup" or e.status != 404:
                raise
            gang_missing = True
            continue
        if child["kind"] == "Job":
            applied_job = out
    if not gang_missing:  # else the next sync tries the PodGroup again
        _applied[key] = (inputs, time.monotonic())
    return applied_job, gang_missing


def _apply(child: dict[str, Any], *, creating: bool) -> dict[str, Any] | None:
    """Server-side apply, except a queued Job's creation (render.QUEUED_CREATE_MANAGER: Kueue owns suspend).
    None when that Job exists already (the index had not seen it yet): it is left as it is."""
    if render.created_not_applied(child, creating=creating):
        return kube().create(child, manager=render.QUEUED_CREATE_MANAGER)
    return kube().apply(child)


def _gang_unavailable(obj: dict[str, Any], status: dict[str, Any]) -> None:
    from controllers.conditions import set_condition

    message = (
        "scheduling.gang is true but the cluster has no PodGroup API (scheduling.x-k8s.io): install "
        "scheduler-plugins' coscheduling, or set scheduling.gang to false"
    )
    status["conditions"] = set_condition(
        status.get("conditions") or [],
        "GangScheduling",
        False,
        "PodGroupAPIMissing",
        message,
        generation=obj["metadata"].get("generation"),
        now=conditions.now(),
    )
    if not any(
        c.get("reason") == "PodGroupAPIMissing" for c in (obj.get("status") or {}).get("conditions") or []
    ):
        _event(obj, "Warning", "PodGroupAPIMissing", message)


def _register(owner: render.Owner, spec: TrainingJobSpec) -> str:
    """The ModelVersion that registers the trained model (its own controller talks to MLflow)."""
    assert spec.registration is not None
    reg = spec.registration
    mv: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ModelVersion",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": render.labels(owner)},
        "spec": {"modelName": reg.model_name, "source": {"trainingJob": owner.name}, "aliases": reg.aliases},
    }
    if reg.tags:
        mv["spec"]["tags"] = reg.tags
    kube().apply(mv)
    return owner.name


def _clean_pods(owner: render.Owner, policy: str, pods: list[PodView]) -> None:
    """cleanPodPolicy on a finished job: All deletes every pod, Running those still running, None none."""
    doomed = [
        p for p in pods if policy == "All" or (policy == "Running" and p.phase in ("Pending", "Running"))
    ]
    for p in doomed:
        kube().delete("v1", "Pod", owner.namespace, p.name)
