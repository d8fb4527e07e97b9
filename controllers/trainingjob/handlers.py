"""kopf glue of the TrainingJob controller.

Level-triggered: every event of a TrainingJob, of its Job or of its pods schedules one `sync` of that
TrainingJob (debounced), which renders the desired children (render.py), applies them with server-side apply,
derives the status from what the Job and pods report (status.py) and patches it only when it changed.
kopf indexes keep the observed objects in memory, so a sync costs no list calls. Nothing is stored in
annotations and no finalizer is added: ownerReferences clean up the children.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from controllers import config
from controllers.kube import KubeError, kube
from controllers.trainingjob import render
from controllers.trainingjob.status import JobView, PodView, derive, job_view, pod_view
from crds.common import API_VERSION, GROUP, LABEL_TRAINING_JOB, VERSION
from crds.trainingjob import TrainingJobSpec, object_rule_errors

PLURAL = "trainingjobs"
DEBOUNCE_SECONDS = 0.05
log = logging.getLogger("kubeforge.trainingjob")
Key = tuple[str, str]

RBAC_RECHECK_SECONDS = 300.0
_rbac_done: dict[str, float] = {}  # namespace -> when its trainer identity was last applied
_pending: dict[Key, asyncio.Task[None]] = {}
_live: dict[str, Any] = {}  # the kopf indexes, captured from the first handler call (they are live views)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def _reset(**_: Any) -> None:
    """Forget state of an earlier run in this process (tests run the operator several times)."""
    _rbac_done.clear()
    _pending.clear()
    _live.clear()


@kopf.index(GROUP, VERSION, PLURAL)
def tj_objects(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    obj = {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}
    return {(namespace or "", name): obj}


@kopf.index("batch", "v1", "jobs", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
def tj_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, JobView]:
    return {(namespace or "", labels[LABEL_TRAINING_JOB]): job_view(dict(body))}


@kopf.index("", "v1", "pods", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
def tj_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, PodView]:
    return {(namespace or "", labels[LABEL_TRAINING_JOB]): pod_view(dict(body))}


def _schedule(key: Key, kwargs: dict[str, Any]) -> None:
    """Sync `key` soon; bursts of events for one TrainingJob collapse into one sync."""
    for index in ("tj_objects", "tj_jobs", "tj_pods"):
        if index in kwargs:
            _live[index] = kwargs[index]
    task = _pending.get(key)
    if task is not None and not task.done():
        return
    _pending[key] = asyncio.get_running_loop().create_task(_debounced(key))


async def _debounced(key: Key) -> None:
    await asyncio.sleep(DEBOUNCE_SECONDS)
    _pending.pop(key, None)
    loop = asyncio.get_running_loop()
    try:
        # kopf.event needs the operator's context variables: run the sync inside a copy of them
        await loop.run_in_executor(None, contextvars.copy_context().run, sync, key)
    except KubeError as e:
        log.warning("sync of %s/%s failed (%s); retrying", *key, e)
        await asyncio.sleep(2.0)
        _schedule(key, {})
    except Exception:  # never let one object take the operator down
        log.exception("sync of %s/%s failed unexpectedly", *key)


def _first(store: Iterable[Any] | None) -> Any:
    return next(iter(store or ()), None)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_trainingjob(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    if type != "DELETED":
        _schedule((namespace or "", name), kwargs)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def on_job(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _schedule((namespace or "", labels[LABEL_TRAINING_JOB]), kwargs)


@kopf.on.event("", "v1", "pods", labels={LABEL_TRAINING_JOB: kopf.PRESENT})
async def on_pod(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _schedule((namespace or "", labels[LABEL_TRAINING_JOB]), kwargs)


def _needs_clock(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ("Pending", "Scaling") or status.get("scaleUpBlockedTarget") is not None


@kopf.timer(GROUP, VERSION, PLURAL, interval=5, when=_needs_clock)
async def tick(namespace: str | None, name: str, **kwargs: Any) -> None:
    """Time-based decisions (a scale-up that waited too long) need a clock, not an event."""
    _schedule((namespace or "", name), kwargs)


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
    }


def _event(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, _body(obj)), type=type_, reason=reason, message=message[:1000])


def _patch_status(obj: dict[str, Any], new: dict[str, Any]) -> None:
    old = obj.get("status") or {}
    if new == old:
        return
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    meta = obj["metadata"]
    kube().patch(
        API_VERSION, "TrainingJob", meta["namespace"], meta["name"], {"status": patch}, subresource="status"
    )


def _invalid(obj: dict[str, Any], problems: list[str]) -> None:
    """A spec the API server let through (older CRD, validation off) that we cannot run: say so, never
    raise."""
    message = "; ".join(problems)[:2000]
    status = dict(obj.get("status") or {})
    generation = obj["metadata"].get("generation", 0)
    from controllers.conditions import set_condition

    conds = set_condition(
        status.get("conditions") or [],
        "Failed",
        True,
        "InvalidSpec",
        message,
        generation=generation,
        now=_now(),
    )
    new = {
        **status,
        "phase": "Failed",
        "message": message,
        "conditions": conds,
        "observedGeneration": generation,
    }
    if new != status:
        _event(obj, "Warning", "InvalidSpec", message)
        _patch_status(obj, new)


def _validate(obj: dict[str, Any]) -> TrainingJobSpec | list[str]:
    try:
        spec = TrainingJobSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:
        return [f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    problems = object_rule_errors(obj)
    return problems or spec


def sync(key: Key) -> None:
    """Bring one TrainingJob's children and status in line with its spec and what the cluster reports."""
    if "tj_objects" not in _live:
        return
    obj = _first(_live["tj_objects"].get(key))
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    spec = _validate(obj)
    if isinstance(spec, list):
        _invalid(obj, spec)
        return
    cfg = config.load()
    meta = obj["metadata"]
    owner = render.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    rcfg = render.RenderConfig(
        default_image=cfg.runtime_image,
        mlflow_tracking_uri=cfg.pod_mlflow_tracking_uri,
        gang_scheduler_name=cfg.gang_scheduler_name,
    )
    job: JobView | None = _first(_live["tj_jobs"].get(key))
    pods: list[PodView] = list(_live["tj_pods"].get(key) or ())
    previous = dict(obj.get("status") or {})
    outcome = derive(spec, int(meta.get("generation") or 0), previous, job, pods, _now())
    outcome.status["selector"] = render.selector(owner)
    terminal = outcome.status.get("phase") in ("Succeeded", "Failed")

    if not terminal:
        api = kube()
        if time.monotonic() - _rbac_done.get(owner.namespace, -RBAC_RECHECK_SECONDS) >= RBAC_RECHECK_SECONDS:
            for child in render.trainer_rbac(owner.namespace):
                api.apply(child)
            _rbac_done[owner.namespace] = time.monotonic()
        for child in render.render(owner, spec, rcfg, outcome.nodes_target, creating=job is None):
            if child["kind"] == "PodGroup":
                try:
                    api.apply(child)
                except KubeError as e:
                    if e.status != 404:
                        raise
                    _gang_unavailable(obj, outcome.status)
                continue
            api.apply(child)
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
    _patch_status(obj, outcome.status)


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
        now=_now(),
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
