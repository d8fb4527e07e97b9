"""kopf glue of the InferenceService controller.

Level-triggered, as the TrainingJob controller: every event of an InferenceService, of its Deployments,
pods or routes (Gateway API, when the cluster serves it), or of a ModelVersion it names schedules one
debounced `sync` of it (controllers.syncloop), which resolves its models (a ModelVersion reference to the
version's models:/name/N once it is Ready, an MLflow alias to the version it points at: `pin`), renders the
children (render.py), applies them with server-side apply, derives the status (status.py, routes.py) and
patches it when it changed. kopf indexes hold the observed objects, so a sync costs no list calls. No
finalizer: ownerReferences clean up the children.

Children are re-applied only when what they are rendered from changed, a Deployment went missing, or
APPLY_RECHECK_SECONDS passed (which also undoes edits of them).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import kopf
from pydantic import ValidationError

from controllers import conditions, config, registry
from controllers.inferenceservice import render, routes
from controllers.inferenceservice.status import (
    DeploymentView,
    ModelRef,
    PodView,
    deployment_view,
    derive,
    pod_view,
)
from controllers.kube import KubeError, kube
from controllers.statuswriter import StatusWriter
from controllers.syncloop import SyncLoop, first, quiet_handlers
from crds import validation
from crds.common import GROUP, LABEL_INFERENCE_SERVICE, VERSION
from crds.inferenceservice import InferenceServiceSpec, object_rule_errors
from model_registry.mlflow_gateway import RegistryError

PLURAL = "inferenceservices"
APPLY_RECHECK_SECONDS = 300.0
ALIAS_TIMER_SECONDS = 5.0  # how often an InferenceService naming an alias syncs (MLflow is asked less often)
ROUTE_RETRY_SECONDS = 30.0  # routes that could not be created (no Gateway API yet) are tried again this often
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[\w-]+)$")
log = logging.getLogger("kubeforge.inferenceservice")
Key = tuple[str, str]

_status = StatusWriter("InferenceService")
_applied: dict[Key, tuple[tuple[Any, ...], float]] = {}  # InferenceService -> (render inputs, when applied)
_loop = SyncLoop(
    lambda key: sync(key),
    log,
    (
        "isvc_objects",
        "isvc_deployments",
        "isvc_pods",
        "isvc_modelversions",
        "isvc_httproutes",
        "isvc_grpcroutes",
    ),
)
_route_errors: dict[Key, routes.Routing] = {}  # why the last apply could not create an object's routes
# (registered model, alias) -> (the version it pointed at, when MLflow said so)
_aliases: dict[tuple[str, str], tuple[str | None, float]] = {}


quiet_handlers(
    "on_inferenceservice",
    "on_isvc_deployment",
    "on_isvc_pod",
    "on_isvc_modelversion",
    "on_isvc_route",
    timers=("recheck_alias", "recheck_routes"),
)


@kopf.on.startup()
def _reset(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Forget state of an earlier run in this process (tests run the operator several times)."""
    _status.clear()
    _applied.clear()
    _aliases.clear()
    _route_errors.clear()
    _loop.reset(settings.execution.executor)


@kopf.index(GROUP, VERSION, PLURAL)
async def isvc_objects(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    obj = {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}
    return {(namespace or "", name): obj}


@kopf.index("apps", "v1", "deployments", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def isvc_deployments(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, DeploymentView]:
    return {(namespace or "", labels[LABEL_INFERENCE_SERVICE]): deployment_view(dict(body))}


@kopf.index("", "v1", "pods", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def isvc_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, PodView]:
    return {(namespace or "", labels[LABEL_INFERENCE_SERVICE]): pod_view(dict(body))}


# The routes: indexed and watched when the cluster serves the Gateway API (kopf starts on its CRDs when they
# appear, and says at start-up that it cannot serve them until then).
def _route_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body) -> dict[Key, routes.RouteView]:
    return {(namespace or "", labels[LABEL_INFERENCE_SERVICE]): routes.route_view(dict(body))}


@kopf.index("gateway.networking.k8s.io", "v1", "httproutes", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def isvc_httproutes(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, routes.RouteView]:
    return _route_index(namespace, labels, body)


@kopf.index("gateway.networking.k8s.io", "v1", "grpcroutes", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def isvc_grpcroutes(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, routes.RouteView]:
    return _route_index(namespace, labels, body)


@kopf.on.event(
    "gateway.networking.k8s.io", "v1", "httproutes", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT}
)
@kopf.on.event(
    "gateway.networking.k8s.io", "v1", "grpcroutes", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT}
)
async def on_isvc_route(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _loop.schedule((namespace or "", labels[LABEL_INFERENCE_SERVICE]), kwargs)


@kopf.index(GROUP, VERSION, "modelversions")
async def isvc_modelversions(
    namespace: str | None, name: str, status: kopf.Status, **_: Any
) -> dict[Key, dict[str, Any]]:
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    view = {"phase": status.get("phase"), "modelUri": status.get("modelUri"), "message": ready.get("message")}
    return {(namespace or "", name): view}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_inferenceservice(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    key = (namespace or "", name)
    if type != "DELETED":
        _loop.schedule(key, kwargs)
    else:
        _applied.pop(key, None)
        _route_errors.pop(key, None)
        _status.forget(key)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def on_isvc_deployment(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _loop.schedule((namespace or "", labels[LABEL_INFERENCE_SERVICE]), kwargs)


@kopf.on.event("", "v1", "pods", labels={LABEL_INFERENCE_SERVICE: kopf.PRESENT})
async def on_isvc_pod(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _loop.schedule((namespace or "", labels[LABEL_INFERENCE_SERVICE]), kwargs)


@kopf.on.event(GROUP, VERSION, "modelversions")
async def on_isvc_modelversion(namespace: str | None, name: str, **kwargs: Any) -> None:
    """A ModelVersion changed: sync the InferenceServices of its namespace that name it."""
    objects = kwargs.get("isvc_objects")
    if objects is None:
        return
    ns = namespace or ""
    for (obj_ns, obj_name), store in list(objects.items()):
        obj = first(store)
        if obj_ns == ns and obj is not None and name in _version_refs(obj.get("spec") or {}):
            _loop.schedule((obj_ns, obj_name), kwargs)


def _names_alias(spec: kopf.Spec, **_: Any) -> bool:
    refs = [spec.get("model") or {}, (spec.get("canary") or {}).get("model") or {}]
    return any(ALIAS_URI.match(str(r.get("uri") or "")) for r in refs)


@kopf.timer(GROUP, VERSION, PLURAL, interval=ALIAS_TIMER_SECONDS, when=_names_alias)
async def recheck_alias(namespace: str | None, name: str, **kwargs: Any) -> None:
    """An alias can move in MLflow without any event in the cluster: look again now and then."""
    _loop.schedule((namespace or "", name), kwargs)


def _has_route(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("route"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=ROUTE_RETRY_SECONDS, when=_has_route)
async def recheck_routes(namespace: str | None, name: str, **kwargs: Any) -> None:
    """Routes that could not be created are tried again (the Gateway API's CRDs may be installed since)."""
    if (namespace or "", name) in _route_errors:
        _loop.schedule((namespace or "", name), kwargs)


def _version_refs(spec: dict[str, Any]) -> set[str]:
    refs = [spec.get("model") or {}, (spec.get("canary") or {}).get("model") or {}]
    return {str(r["modelVersion"]) for r in refs if r.get("modelVersion")}


def resolve(ref: Any, namespace: str, deployed: DeploymentView | None) -> ModelRef:
    """A role's model: its uri, or its ModelVersion's models:/name/N once that is Ready. A version that stops
    being Ready (an alias conflict, MLflow away) does not take down the pods serving it: the URI they run
    stays resolved until the reference points elsewhere."""
    if ref.uri:
        return pin(ref.uri, deployed)
    name = ref.model_version
    mv = first(_loop.store("isvc_modelversions", (namespace, name)))
    if mv is not None and mv.get("phase") == "Ready" and mv.get("modelUri"):
        return ModelRef(str(mv["modelUri"]))
    if (
        deployed is not None
        and deployed.model_uri
        and mv is not None
        and mv.get("modelUri") == deployed.model_uri
    ):
        return ModelRef(deployed.model_uri)
    if mv is None:
        return ModelRef(
            None,
            "ModelVersionNotFound",
            f"ModelVersion {name} does not exist in namespace {namespace}: create it, or set model.uri",
        )
    phase = mv.get("phase") or "not registered yet"
    detail = f": {mv['message']}" if mv.get("message") else ""
    if phase == "Failed":
        return ModelRef(None, "ModelVersionFailed", f"ModelVersion {name} failed{detail}", failed=True)
    return ModelRef(None, "ModelVersionNotReady", f"ModelVersion {name} is {phase}{detail}")


def pin(uri: str, deployed: DeploymentView | None) -> ModelRef:
    """models:/<name>@<alias> as the version the alias points at in MLflow now, models:/<name>/<N>: every pod
    then loads the same version, and an alias that moves rolls the pods to the new one like any other model
    change (MLflow is asked about an alias at most once per KUBEFORGE_DRIFT_INTERVAL seconds). Without an
    MLflow configured the URI goes to the pods as it is, each resolving it when it starts. Other URIs as they
    are."""
    m = ALIAS_URI.match(uri)
    gw = registry.gateway()
    if m is None or gw is None:
        return ModelRef(uri)
    name, alias = m["name"], m["alias"]
    seen = _aliases.get((name, alias))
    if seen is None or time.monotonic() - seen[1] >= config.load().drift_interval_seconds:
        try:
            seen = (gw.get_aliases(name).get(alias), time.monotonic())
        except RegistryError as e:
            if deployed is not None and (deployed.model_uri or "").startswith(f"models:/{name}/"):
                return ModelRef(deployed.model_uri)  # MLflow away: what runs keeps running
            return ModelRef(None, "RegistryUnavailable", f"cannot resolve {uri} in MLflow: {e}")
        _aliases[(name, alias)] = seen
    if seen[0] is None:
        return ModelRef(
            None,
            "ModelAliasNotFound",
            f"registered model {name} has no alias {alias} in MLflow: set the alias, or set the URI to"
            f" models:/{name}/<version>",
        )
    return ModelRef(f"models:/{name}/{seen[0]}")


def sync(key: Key) -> None:
    """Bring one InferenceService's children and status in line with its spec and what the cluster reports."""
    obj = first(_loop.store("isvc_objects", key))
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    spec: InferenceServiceSpec | None
    try:  # validated once per sync; every problem in the API server's words only when there is one
        spec = InferenceServiceSpec.model_validate(obj.get("spec") or {})
    except ValidationError:
        spec = None
    if spec is None or object_rule_errors(obj):
        problems = validation.errors({"kind": "InferenceService", **obj})
        _status.invalid(obj, problems, condition=("Ready", False), now=conditions.now())
        return
    meta = obj["metadata"]
    owner = render.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    deployments: dict[str, DeploymentView] = {
        d.role: d for d in _loop.store("isvc_deployments", key) or () if d.role in render.ROLES
    }
    pods: list[PodView] = list(_loop.store("isvc_pods", key) or ())
    refs = {render.PREDICTOR: resolve(spec.model, owner.namespace, deployments.get(render.PREDICTOR))}
    if spec.canary is not None:
        refs[render.CANARY] = resolve(spec.canary.model, owner.namespace, deployments.get(render.CANARY))
    if refs[render.PREDICTOR].uri is not None:
        _apply_children(key, obj, owner, spec, refs, deployments)
    observed = {
        v.kind: v for index in ("isvc_httproutes", "isvc_grpcroutes") for v in _loop.store(index, key) or ()
    }
    route = routes.routing(spec, owner, observed, _route_errors.get(key))
    generation = int(meta.get("generation") or 0)
    outcome = derive(
        spec, owner, generation, _status.previous(obj), refs, deployments, pods, conditions.now(), route
    )
    for type_, reason, message in outcome.events:
        _status.event(obj, type_, reason, message)
    _status.write(obj, outcome.status)


def _apply_children(
    key: Key,
    obj: dict[str, Any],
    owner: render.Owner,
    spec: InferenceServiceSpec,
    refs: dict[str, ModelRef],
    deployments: dict[str, DeploymentView],
) -> None:
    cfg = config.load()
    rcfg = render.RenderConfig(
        default_image=cfg.runtime_image, mlflow_tracking_uri=cfg.pod_mlflow_tracking_uri
    )
    canary = refs.get(render.CANARY)
    models = render.Models(refs[render.PREDICTOR].uri or "", canary.uri if canary else None)
    pred = deployments.get(render.PREDICTOR)
    # under autoscaling the canary follows the stable Deployment's size, which the autoscaler sets
    stable_replicas = pred.replicas if pred and spec.autoscaling and spec.canary else None
    canary_dep = deployments.get(render.CANARY)
    canary_serving = canary_dep is not None and canary_dep.ready > 0  # the routes' canary weight waits for it
    inputs = (owner.uid, spec.model_dump_json(), models, stable_replicas, canary_serving, rcfg)
    missing = pred is None or (models.canary is not None and render.CANARY not in deployments)
    last = _applied.get(key)
    recheck = ROUTE_RETRY_SECONDS if key in _route_errors else APPLY_RECHECK_SECONDS
    if not missing and last is not None and last[0] == inputs and time.monotonic() - last[1] < recheck:
        return
    for role in render.ROLES:
        old = deployments[role].model_uri if role in deployments else None
        new = models.stable if role == render.PREDICTOR else models.canary
        if old and new and old != new:
            _status.event(obj, "Normal", "ModelChanged", f"{role}: rolling out {new} in place of {old}")
    _route_errors.pop(key, None)
    children = render.render(
        owner, spec, rcfg, models, stable_replicas=stable_replicas, canary_serving=canary_serving
    )
    for child in children:
        try:
            kube().apply(child)
        except KubeError as e:
            if e.transient or child["kind"] not in render.ROUTE_KINDS.values():
                raise
            # the rest serves without the routes: reported in status (Routed), not raised
            _route_errors[key] = (
                routes.gateway_api_missing(owner)
                if e.status == 404
                else routes.Routing(False, "RouteInvalid", f"{child['kind']} {owner.name}: {e.message}")
            )
    for api_version, kind, name in render.unwanted(spec, owner):
        kube().delete(api_version, kind, owner.namespace, name)
    _applied[key] = (inputs, time.monotonic())
