"""InferenceService → desired child objects. Pure: no kopf, no Kubernetes client, no clock.

Children (all owned by the InferenceService, so deleting it garbage-collects them):
- ConfigMap <name>-spec: the InferenceService as `kubeforge-serve --spec` reads it, mounted at /etc/kubeforge.
- Deployment <name>-predictor: the stable model. Each pod compiles first, in the init container `compile`
  (`kubeforge-serve compile`, into the compile cache: a PersistentVolumeClaim when compile.cacheClaimName is
  set, so a second pod on the same hardware loads the artifact instead of compiling), then serves it in the
  container `server` (REST and gRPC; ready once the compiled model passed its check against eager and warmed
  up). Rolling updates add a pod before they take one away (maxUnavailable 0): a new model or setting never
  lowers the ready capacity, and a model that fails to compile or start leaves the old pods serving.
- Deployment <name>-canary (when spec.canary): the canary model, same pod shape.
- Service <name>: REST and gRPC, in front of both Deployments' pods. The traffic split is by ready pods
  (docs/inferenceservice.md): kube-proxy spreads connections evenly over endpoints, so the canary's share is
  its pods' share of the endpoints. A canary of 0 % is left out of it, 100 % takes the stable pods out.
- Service <name>-canary (when spec.canary): the canary's pods alone, to try the canary directly.
- With spec.route (the Gateway API): Service <name>-predictor (the stable pods alone), an HTTPRoute <name>
  (spec.route.http, to the REST port) and a GRPCRoute <name> (spec.route.grpc, to the gRPC port), each
  splitting requests between <name>-predictor and <name>-canary by weight: the canary's share exactly, per
  request, whatever the pod counts (the Service <name> keeps its split by pods for in-cluster clients).
- HorizontalPodAutoscaler <name>-predictor (when spec.autoscaling): scales the stable Deployment, whose
  replicas the operator then leaves to it.
- PodDisruptionBudget <name>-predictor: a drain evicts the stable pods one at a time; the pods of each role
  are spread over nodes (softly).

Every pod serves the model under the InferenceService's name, so a client's URL (/v2/models/<name>/infer)
is the same whichever pod, stable or canary, answers it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from controllers import owned
from controllers.owned import Owner as Owner
from controllers.owned import owned_meta, owner_labels
from controllers.placement import placement, pod_resources
from crds.common import (
    LABEL_INFERENCE_SERVICE,
    LABEL_ROLE,
    SPEC_MOUNT_DIR,
    pod_image,
)
from crds.inferenceservice import InferenceServiceSpec

Obj = dict[str, Any]

PREDICTOR = "predictor"
CANARY = "canary"
ROLES = (PREDICTOR, CANARY)
SPEC_FILE = "inferenceservice.yaml"
CACHE_DIR = "/var/cache/kubeforge"
TERMINATION_LOG = "/dev/termination-log"
INIT_CONTAINER = "compile"
CONTAINER = "server"
DRAIN_DELAY_S = 5  # readiness 503 this long after SIGTERM, for the endpoints to drop the pod first
GRACE_S = 30  # then in-flight requests get this long to finish (the server's --grace-s default)
PROGRESS_DEADLINE_S = 1800  # a cold compile of a large model takes minutes; past this the roll-out failed
DEFAULT_CPU_TARGET = 80  # autoscaling with no target named: CPU utilization, as KServe's default
INFLIGHT_METRIC = "kubeforge_inflight"
ANNOTATION_CONFIG_HASH = "kubeforge.io/config-hash"
ANNOTATION_MODEL_URI = "kubeforge.io/model-uri"
GATEWAY_API = "gateway.networking.k8s.io/v1"
ROUTE_KINDS = {"http": "HTTPRoute", "grpc": "GRPCRoute"}  # spec.route field -> kind


@dataclass(frozen=True)
class RenderConfig:
    """What the operator adds from its own settings."""

    default_image: str
    mlflow_tracking_uri: str | None = None


@dataclass(frozen=True)
class Models:
    """The resolved model URIs (a ModelVersion reference resolved to its models:/name/N)."""

    stable: str
    canary: str | None = None


def labels(owner: Owner) -> dict[str, str]:
    return owner_labels(LABEL_INFERENCE_SERVICE, owner)


def deployment_name(owner: Owner, role: str) -> str:
    return f"{owner.name}-{role}"


def selector(owner: Owner, role: str = PREDICTOR) -> str:
    """The label selector of a role's pods (the scale subresource's, for the stable role)."""
    return f"{LABEL_INFERENCE_SERVICE}={owner.name},{LABEL_ROLE}={role}"


def _meta(owner: Owner, name: str, role: str | None = None) -> Obj:
    return owned_meta(
        "InferenceService", owner, name, {**labels(owner), **({LABEL_ROLE: role} if role else {})}
    )


def spec_config_map(owner: Owner, spec: InferenceServiceSpec) -> Obj:
    return owned.spec_config_map("InferenceService", owner, spec, SPEC_FILE, labels(owner))


def canary_replicas(stable: int, percent: int) -> int:
    """Canary pods for `percent` of the traffic beside `stable` stable pods, the split being by pods: the
    nearest count, at least one (a declared canary is always compiled and reachable through <name>-canary),
    as many as the stable pods at 100 % (they then leave the Service)."""
    if percent >= 100:
        return max(1, stable)
    if percent <= 0 or stable <= 0:
        return 1
    return max(1, math.floor(stable * percent / (100 - percent) + 0.5))


def _env(spec: InferenceServiceSpec, cfg: RenderConfig) -> list[Obj]:
    env: list[Obj] = []
    if cfg.mlflow_tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": cfg.mlflow_tracking_uri})
    env += [{"name": k, "value": v} for k, v in sorted((spec.env or {}).items())]
    return env


def _args(owner: Owner, model_uri: str) -> list[str]:
    return [
        "--spec",
        f"{SPEC_MOUNT_DIR}/{SPEC_FILE}",
        "--model-uri",
        model_uri,
        "--model-name",
        owner.name,
        "--cache-dir",
        CACHE_DIR,
    ]


def pod_template(
    owner: Owner, spec: InferenceServiceSpec, cfg: RenderConfig, role: str, model_uri: str, config_hash: str
) -> Obj:
    place = placement(spec.accelerator)
    resources = pod_resources(spec.resources, spec.accelerator)
    image = pod_image(spec, cfg.default_image)
    env = _env(spec, cfg)
    mounts = [
        {"name": "spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
        {"name": "compile-cache", "mountPath": CACHE_DIR},
    ]
    http, grpc = spec.ports.http, spec.ports.grpc
    cache: Obj = (
        {"persistentVolumeClaim": {"claimName": spec.compile.cache_claim_name}}
        if spec.compile.cache_claim_name
        else {"emptyDir": {}}
    )
    pod: Obj = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": DRAIN_DELAY_S + GRACE_S + 10,
        "initContainers": [
            {
                "name": INIT_CONTAINER,
                "image": image,
                "command": ["kubeforge-serve", "compile"],
                # the compile summary (backend, fallbacks, cache hit) or its error, for the operator's status
                "args": [*_args(owner, model_uri), "--termination-log", TERMINATION_LOG],
                "env": env,
                "resources": resources,  # compiles for, and checks on, the pod's own accelerator
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "containers": [
            {
                "name": CONTAINER,
                "image": image,
                "command": ["kubeforge-serve", "serve"],
                "args": [
                    *_args(owner, model_uri),
                    "--host",
                    "0.0.0.0",
                    "--drain-delay-s",
                    str(DRAIN_DELAY_S),
                ],
                "env": env,
                "ports": [
                    {"name": "http", "containerPort": http, "protocol": "TCP"},
                    {"name": "grpc", "containerPort": grpc, "protocol": "TCP"},
                ],
                "resources": resources,
                "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
                # loading the compiled artifact (or jit compiling) may take minutes: liveness waits for it
                "startupProbe": {
                    "httpGet": {"path": "/v2/health/live", "port": "http"},
                    "periodSeconds": 5,
                    "failureThreshold": 120,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/v2/health/live", "port": "http"},
                    "periodSeconds": 10,
                    "failureThreshold": 3,
                },
                "readinessProbe": {
                    "httpGet": {"path": "/v2/health/ready", "port": "http"},
                    "periodSeconds": 2,
                    "failureThreshold": 1,
                },
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [
            {"name": "spec", "configMap": {"name": f"{owner.name}-spec"}},
            {"name": "compile-cache", **cache},
            # protocol workers hand tensors to the model process through shared memory: more than the
            # container runtime's 64 MiB /dev/shm
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if place.tolerations:
        pod["tolerations"] = place.tolerations
    if place.node_selector:
        pod["nodeSelector"] = place.node_selector
    # one node down should take as few of a role's pods as can be: spread them over nodes, softly (a
    # GPU fleet may have fewer free nodes than replicas), counting only the pods of the same revision
    pod["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {LABEL_INFERENCE_SERVICE: owner.name, LABEL_ROLE: role}},
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]
    return {
        "metadata": {
            "labels": {**labels(owner), LABEL_ROLE: role},
            "annotations": {
                # a new spec rolls the pods (a changed ConfigMap alone would not)
                ANNOTATION_CONFIG_HASH: config_hash,
                ANNOTATION_MODEL_URI: model_uri,
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(http),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod,
    }


def deployment(
    owner: Owner,
    spec: InferenceServiceSpec,
    cfg: RenderConfig,
    role: str,
    model_uri: str,
    replicas: int | None,
    config_hash: str,
) -> Obj:
    """A role's Deployment; `replicas` None leaves them to the HorizontalPodAutoscaler."""
    dspec: Obj = {
        "selector": {"matchLabels": {LABEL_INFERENCE_SERVICE: owner.name, LABEL_ROLE: role}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
        "revisionHistoryLimit": 3,
        "template": pod_template(owner, spec, cfg, role, model_uri, config_hash),
    }
    if replicas is not None:
        dspec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, deployment_name(owner, role), role),
        "spec": dspec,
    }


def _ports(spec: InferenceServiceSpec) -> list[Obj]:
    return [
        {"name": "http", "port": spec.ports.http, "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": spec.ports.grpc,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        },
    ]


def service(owner: Owner, spec: InferenceServiceSpec) -> Obj:
    """The InferenceService's Service: stable and canary pods, except a canary at 0 % or 100 %."""
    sel = {LABEL_INFERENCE_SERVICE: owner.name}
    if spec.canary is None or spec.canary.traffic_percent == 0:
        sel[LABEL_ROLE] = PREDICTOR
    elif spec.canary.traffic_percent == 100:
        sel[LABEL_ROLE] = CANARY
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, owner.name),
        "spec": {"type": "ClusterIP", "selector": sel, "ports": _ports(spec)},
    }


def role_service(owner: Owner, spec: InferenceServiceSpec, role: str) -> Obj:
    """<name>-<role>: one role's pods alone (the canary's, to try it directly; the stable ones, a route's
    stable backend)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, deployment_name(owner, role), role),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_INFERENCE_SERVICE: owner.name, LABEL_ROLE: role},
            "ports": _ports(spec),
        },
    }


def route(owner: Owner, spec: InferenceServiceSpec, protocol: str, canary_share: int | None) -> Obj:
    """The HTTPRoute ("http") or GRPCRoute ("grpc") <name>: every request of the listeners and host names it
    attaches to, to the stable pods and, with a canary (`canary_share` not None), to the canary's by weight
    (100 - w and w)."""
    assert spec.route is not None
    target = getattr(spec.route, protocol)
    assert target is not None
    port = spec.ports.http if protocol == "http" else spec.ports.grpc
    backends: list[Obj] = [{"name": deployment_name(owner, PREDICTOR), "port": port}]
    if canary_share is not None:
        backends = [
            {**backends[0], "weight": 100 - canary_share},
            {"name": deployment_name(owner, CANARY), "port": port, "weight": canary_share},
        ]
    parents: list[Obj] = []
    for ref in target.parent_refs:
        parent: Obj = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref.name}
        if ref.namespace:
            parent["namespace"] = ref.namespace
        if ref.section_name:
            parent["sectionName"] = ref.section_name
        parents.append(parent)
    rspec: Obj = {"parentRefs": parents, "rules": [{"backendRefs": backends}]}
    if target.hostnames:
        rspec["hostnames"] = list(target.hostnames)
    return {
        "apiVersion": GATEWAY_API,
        "kind": ROUTE_KINDS[protocol],
        "metadata": _meta(owner, owner.name),
        "spec": rspec,
    }


def canary_weight(spec: InferenceServiceSpec, canary_serving: bool) -> int:
    """The canary's weight in the routes: its trafficPercent once one of its pods is ready, 0 before (a
    Gateway would send that share to a Service without endpoints: errors, where the split by pods has
    none)."""
    assert spec.canary is not None
    return spec.canary.traffic_percent if canary_serving else 0


def routes(owner: Owner, spec: InferenceServiceSpec, canary_share: int | None) -> list[Obj]:
    """The routes spec.route asks for (none without it)."""
    if spec.route is None:
        return []
    wanted = [p for p in ROUTE_KINDS if getattr(spec.route, p) is not None]
    return [route(owner, spec, p, canary_share) for p in wanted]


def disruption_budget(owner: Owner) -> Obj:
    """Voluntary disruptions (a node drain, a cluster upgrade) evict the stable pods one at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, deployment_name(owner, PREDICTOR), PREDICTOR),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {LABEL_INFERENCE_SERVICE: owner.name, LABEL_ROLE: PREDICTOR}},
        },
    }


def autoscaler(owner: Owner, spec: InferenceServiceSpec) -> Obj:
    a = spec.autoscaling
    assert a is not None
    metrics: list[Obj] = []
    if a.target_concurrency is not None:  # a per-pod custom metric (a Prometheus adapter serves it)
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": INFLIGHT_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(a.target_concurrency)},
                },
            }
        )
    if a.target_cpu_utilization is not None or not metrics:
        cpu = a.target_cpu_utilization or DEFAULT_CPU_TARGET
        metrics.append(
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu}},
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(owner, deployment_name(owner, PREDICTOR), PREDICTOR),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(owner, PREDICTOR),
            },
            # 0 needs the HPAScaleToZero feature gate, off by default: the fewest is then one pod
            "minReplicas": max(1, a.min_replicas),
            "maxReplicas": a.max_replicas,
            "metrics": metrics,
        },
    }


# What the spec says that the pods do not read from their spec file (sizes, the canary's share and model, the
# routes: they reach the pods through the Deployments, or not at all). A change of them must not restart the
# stable pods.
NOT_READ_BY_PODS = frozenset({"replicas", "autoscaling", "canary", "route"})


def config_hash(spec: InferenceServiceSpec) -> str:
    """Hash of what the pods read from the spec file: a change of it rolls them."""
    read = spec.model_dump_json(exclude=set(NOT_READ_BY_PODS))
    return hashlib.sha256(read.encode()).hexdigest()[:16]


def render(
    owner: Owner,
    spec: InferenceServiceSpec,
    cfg: RenderConfig,
    models: Models,
    *,
    stable_replicas: int | None,
    canary_serving: bool = True,
) -> list[Obj]:
    """Every child the InferenceService wants, in the order to apply them (the routes, which need the Gateway
    API's CRDs, last). `stable_replicas`: the stable Deployment's replicas now (what the autoscaler chose),
    which sizes the canary under autoscaling; `canary_serving`: whether a canary pod is ready (its routes'
    weight is 0 until one is)."""
    cm = spec_config_map(owner, spec)
    digest = config_hash(spec)
    autoscaled = spec.autoscaling is not None
    stable = None if autoscaled else spec.replicas
    children = [
        cm,
        deployment(owner, spec, cfg, PREDICTOR, models.stable, stable, digest),
    ]
    if spec.canary is not None and models.canary is not None:
        base = spec.replicas
        if spec.autoscaling is not None:  # the size the autoscaler chose, else its floor
            base = stable_replicas or max(1, spec.autoscaling.min_replicas)
        children.append(
            deployment(
                owner,
                spec,
                cfg,
                CANARY,
                models.canary,
                canary_replicas(base, spec.canary.traffic_percent),
                digest,
            )
        )
        children.append(role_service(owner, spec, CANARY))
    children.append(service(owner, spec))
    children.append(disruption_budget(owner))
    if autoscaled:
        children.append(autoscaler(owner, spec))
    if spec.route is not None:
        children.append(role_service(owner, spec, PREDICTOR))
        with_canary = spec.canary is not None and models.canary is not None
        children += routes(owner, spec, canary_weight(spec, canary_serving) if with_canary else None)
    return children


def unwanted(spec: InferenceServiceSpec, owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of children an earlier spec may have made that this one does not want."""
    out: list[tuple[str, str, str]] = []
    if spec.canary is None:
        out += [
            ("apps/v1", "Deployment", deployment_name(owner, CANARY)),
            ("v1", "Service", deployment_name(owner, CANARY)),
        ]
    if spec.autoscaling is None:
        out.append(("autoscaling/v2", "HorizontalPodAutoscaler", deployment_name(owner, PREDICTOR)))
    if spec.route is None:
        out.append(("v1", "Service", deployment_name(owner, PREDICTOR)))
    for protocol, kind in ROUTE_KINDS.items():
        if spec.route is None or getattr(spec.route, protocol) is None:
            out.append((GATEWAY_API, kind, owner.name))
    return out
