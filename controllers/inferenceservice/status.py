"""InferenceService status from what its Deployments, pods and ModelVersions report. Pure: no kopf, no client.

Per role (predictor: the stable model; canary), the first that holds of:
1. its model does not resolve (a ModelVersion missing, not Ready or Failed): Pending, or Failed;
2. a pod's compile failed (the init container `compile` ended non-zero: its termination message names the
   cause, e.g. the backend that is missing) or its server crash-loops, or the roll-out passed its progress
   deadline: Failed (the old pods, if any, keep serving: maxUnavailable is 0);
3. every pod runs the current template and is ready: Ready;
4. a pod cannot be scheduled, or its image cannot be pulled: Pending (RollingOut while old pods serve);
5. a pod is compiling: Compiling (RollingOut while old pods serve);
6. otherwise: RollingOut while some pod serves, else Pending.
The InferenceService is Ready when the predictor is, and the canary too when there is one, and with
spec.route its routes carry the traffic (routes.py); its phase is Ready, else Failed if a role failed, else
Routing when only the routes are missing, else RollingOut, Compiling or Pending, the furthest along of its
roles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from controllers.conditions import set_condition
from controllers.inferenceservice.render import (
    ANNOTATION_MODEL_URI,
    CANARY,
    CONTAINER,
    INIT_CONTAINER,
    PREDICTOR,
    Owner,
    deployment_name,
    selector,
)
from controllers.inferenceservice.routes import Routing
from crds.common import LABEL_ROLE
from crds.inferenceservice import InferenceServiceSpec

Obj = dict[str, Any]
PULL_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}
)


@dataclass(frozen=True)
class ModelRef:
    """A role's model, resolved: `uri` set, or why not (`failed`: it will not resolve by waiting)."""

    uri: str | None
    reason: str = "Resolved"
    message: str = ""
    failed: bool = False


@dataclass(frozen=True)
class DeploymentView:
    role: str
    generation: int
    observed_generation: int
    replicas: int  # desired (spec)
    status_replicas: int  # pods of every revision
    updated: int
    ready: int
    available: int
    model_uri: str | None  # of the current template
    deadline_exceeded: str | None  # the Progressing condition's message once ProgressDeadlineExceeded


def deployment_view(body: Obj) -> DeploymentView:
    meta, spec, st = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    progressing: Obj = next((c for c in st.get("conditions") or [] if c.get("type") == "Progressing"), {})
    template_meta = (spec.get("template") or {}).get("metadata") or {}
    return DeploymentView(
        role=str((meta.get("labels") or {}).get(LABEL_ROLE, "")),
        generation=int(meta.get("generation") or 0),
        observed_generation=int(st.get("observedGeneration") or 0),
        replicas=int(spec.get("replicas", 1)),
        status_replicas=int(st.get("replicas") or 0),
        updated=int(st.get("updatedReplicas") or 0),
        ready=int(st.get("readyReplicas") or 0),
        available=int(st.get("availableReplicas") or 0),
        model_uri=(template_meta.get("annotations") or {}).get(ANNOTATION_MODEL_URI),
        deadline_exceeded=(
            str(progressing.get("message") or "")
            if progressing.get("reason") == "ProgressDeadlineExceeded"
            else None
        ),
    )


@dataclass(frozen=True)
class PodView:
    name: str
    role: str
    model_uri: str | None
    ready: bool = False
    deleting: bool = False
    compiling: bool = False
    compile_failed: str | None = None  # the failed compile's termination message
    compile_summary: str | None = None  # the successful compile's (JSON: backend, fallbacks, cache hit)
    crash_loop: str | None = None  # the server's last termination message, while it crash-loops
    pull_error: str | None = None
    unschedulable: str | None = None


def _terminated(cs: Obj) -> Obj | None:
    """The container's current termination, else its last one."""
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def _why(term: Obj) -> str:
    text = str(term.get("message") or "").strip()
    return text or f"exit code {term.get('exitCode')} ({term.get('reason') or 'no message'})"


def pod_view(body: Obj) -> PodView:
    meta, st = body.get("metadata") or {}, body.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    sched = conds.get("PodScheduled") or {}
    compiling = False
    compile_failed = compile_summary = crash_loop = pull_error = None
    for cs in st.get("initContainerStatuses") or []:
        if cs.get("name") != INIT_CONTAINER:
            continue
        state = cs.get("state") or {}
        term = _terminated(cs)
        if "running" in state:
            compiling = True
        elif term is not None and term.get("exitCode") not in (0, None):
            compile_failed = _why(term)
        elif (state.get("terminated") or {}).get("exitCode") == 0:
            compile_summary = str(state["terminated"].get("message") or "") or None
    for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in PULL_ERRORS:
            pull_error = f"{cs.get('name')}: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
        if cs.get("name") == CONTAINER and waiting.get("reason") == "CrashLoopBackOff":
            term = _terminated(cs)
            crash_loop = _why(term) if term else str(waiting.get("message") or "CrashLoopBackOff")
    return PodView(
        name=str(meta.get("name")),
        role=str((meta.get("labels") or {}).get(LABEL_ROLE, "")),
        model_uri=(meta.get("annotations") or {}).get(ANNOTATION_MODEL_URI),
        ready=(conds.get("Ready") or {}).get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        compiling=compiling,
        compile_failed=compile_failed,
        compile_summary=compile_summary,
        crash_loop=crash_loop,
        pull_error=pull_error,
        unschedulable=(
            str(sched.get("message") or "unschedulable")
            if sched.get("status") == "False" and sched.get("reason") == "Unschedulable"
            else None
        ),
    )


@dataclass(frozen=True)
class RoleState:
    phase: str  # Ready, Failed, RollingOut, Compiling, Pending
    reason: str
    message: str
    serving: int = 0  # ready pods


@dataclass
class Outcome:
    status: Obj
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def role_state(
    role: str, ref: ModelRef, dep: DeploymentView | None, pods: list[PodView], owner: Owner
) -> RoleState:
    if ref.uri is None:
        return RoleState("Failed" if ref.failed else "Pending", ref.reason, ref.message)
    name = deployment_name(owner, role)
    if dep is None:
        return RoleState("Pending", "Creating", f"creating Deployment {name}")
    mine = [p for p in pods if p.role == role and not p.deleting]
    serving = dep.ready
    for p in mine:
        if p.compile_failed:
            return RoleState("Failed", "CompileFailed", f"pod {p.name}: {p.compile_failed}", serving)
    for p in mine:
        if p.crash_loop:
            return RoleState("Failed", "ServerCrashLoop", f"pod {p.name}: {p.crash_loop}", serving)
    if dep.deadline_exceeded is not None:
        return RoleState("Failed", "ProgressDeadlineExceeded", dep.deadline_exceeded, serving)
    current = dep.observed_generation >= dep.generation and dep.model_uri == ref.uri
    if dep.replicas == 0:
        return RoleState("Pending", "NoReplicas", f"Deployment {name} has 0 replicas")
    if (
        current
        and dep.updated == dep.replicas
        and dep.status_replicas == dep.replicas
        and dep.available >= dep.replicas
    ):
        return RoleState("Ready", "Ready", f"{dep.ready} pod(s) serving {ref.uri}", serving)
    waiting = "RollingOut" if serving else None
    for p in mine:
        if p.unschedulable:
            return RoleState(
                waiting or "Pending", "Unschedulable", f"pod {p.name}: {p.unschedulable}", serving
            )
    for p in mine:
        if p.pull_error:
            return RoleState(
                waiting or "Pending", "ImagePullBackOff", f"pod {p.name}: {p.pull_error}", serving
            )
    compiling = [p.name for p in mine if p.compiling]
    if compiling:
        return RoleState(
            waiting or "Compiling",
            "Compiling",
            f"compiling {ref.uri} in pod(s) {', '.join(compiling)}",
            serving,
        )
    return RoleState(
        waiting or "Pending",
        "RollingOut" if serving else "Starting",
        f"{dep.updated}/{dep.replicas} pod(s) updated, {dep.ready} ready, of Deployment {name}",
        serving,
    )


def backend_of(pods: list[PodView], role: str = PREDICTOR) -> tuple[str | None, list[str]]:
    """The backend a role's ready pods compiled for ("cuda/jit"), from a compile summary, and the
    fallbacks taken."""
    for p in pods:
        if p.role != role or not p.ready or not p.compile_summary:
            continue
        try:
            info = json.loads(p.compile_summary)
        except ValueError:
            continue
        if isinstance(info, dict) and info.get("backend"):
            return f"{info['backend']}/{info.get('mode')}", [str(f) for f in info.get("fallbacks") or []]
    return None, []


def traffic(
    spec: InferenceServiceSpec,
    refs: dict[str, ModelRef],
    states: dict[str, RoleState],
    weighted: bool = False,
) -> tuple[list[Obj], str]:
    """Each model's share of the requests, and the summary for `kubectl get`: by weight through routes that
    carry the traffic (`weighted`), else by ready pods behind the Service (kube-proxy spreads connections
    evenly over endpoints)."""
    stable = states[PREDICTOR].serving
    if spec.canary is None:
        return [_target(refs[PREDICTOR], 100, stable)], "stable 100%"
    canary, asked = states[CANARY].serving, spec.canary.traffic_percent
    if weighted:  # the canary's weight is 0 until one of its pods is ready (render.canary_weight)
        share = asked if canary else 0
        summary = f"stable {100 - share}% / canary {share}% (by weight" + (
            f", asked {asked}%: no canary pod is ready)" if share != asked else ")"
        )
        return [_target(refs[PREDICTOR], 100 - share, stable), _target(refs[CANARY], share, canary)], summary
    if asked in (0, 100):
        share = asked
    elif stable and canary:
        share = round(100 * canary / (stable + canary))
    else:
        share = 100 if canary else 0
    summary = f"stable {100 - share}% / canary {share}%" + (f" (asked {asked}%)" if share != asked else "")
    targets = [_target(refs[PREDICTOR], 100 - share, stable), _target(refs[CANARY], share, canary)]
    return targets, summary


def _target(ref: ModelRef, percent: int, ready: int) -> Obj:
    return {"modelUri": ref.uri or "", "percent": percent, "readyReplicas": ready}


PHASE_ORDER = ("Pending", "Compiling", "RollingOut", "Ready")


def derive(
    spec: InferenceServiceSpec,
    owner: Owner,
    generation: int,
    previous: Obj,
    refs: dict[str, ModelRef],
    deployments: dict[str, DeploymentView],
    pods: list[PodView],
    now: str,
    route: Routing | None = None,
) -> Outcome:
    """The status; `route`: whether spec.route's routes carry the traffic (None: no spec.route)."""
    roles = [PREDICTOR] + ([CANARY] if spec.canary is not None else [])
    states = {r: role_state(r, refs[r], deployments.get(r), pods, owner) for r in roles}
    conds: list[Obj] = [
        c for c in previous.get("conditions") or [] if c.get("type") not in ("CanaryReady", "Routed")
    ]
    if route is not None:
        conds = set_condition(
            conds, "Routed", route.routed, route.reason, route.message, generation=generation, now=now
        )
    for role, ctype in ((PREDICTOR, "PredictorReady"), (CANARY, "CanaryReady")):
        if role in states:
            s = states[role]
            conds = set_condition(
                conds, ctype, s.phase == "Ready", s.reason, s.message, generation=generation, now=now
            )
    failed = [r for r in roles if states[r].phase == "Failed"]
    if all(states[r].phase == "Ready" for r in roles):
        phase, reason, message = "Ready", "Ready", states[PREDICTOR].message
    elif failed:
        s = states[failed[0]]
        phase, reason = "Failed", s.reason
        message = f"{failed[0]}: {s.message}"
        if failed[0] == CANARY and states[PREDICTOR].serving:
            message += f"; the stable model still serves on {states[PREDICTOR].serving} pod(s)"
    else:  # the furthest along of the roles; "Ready" beside one that is not is a roll-out under way
        phase = max((states[x].phase for x in roles), key=PHASE_ORDER.index)
        phase = "RollingOut" if phase == "Ready" else phase
        r = next(x for x in roles if states[x].phase != "Ready")
        reason, message = states[r].reason, f"{r}: {states[r].message}"
    if phase == "Ready" and route is not None and not route.routed:
        phase, reason, message = "Routing", route.reason, route.message
    conds = set_condition(conds, "Ready", phase == "Ready", reason, message, generation=generation, now=now)
    targets, summary = traffic(spec, refs, states, weighted=route is not None and route.routed)
    pred = deployments.get(PREDICTOR)
    host = f"{owner.name}.{owner.namespace}.svc"
    status: Obj = {
        "phase": phase,
        "conditions": conds,
        "observedGeneration": generation,
        "url": f"http://{host}:{spec.ports.http}",
        "grpcAddress": f"{host}:{spec.ports.grpc}",
        "replicas": pred.status_replicas if pred else 0,
        "readyReplicas": pred.ready if pred else 0,
        "selector": selector(owner),
        "traffic": targets,
        "trafficSummary": summary,
    }
    if refs[PREDICTOR].uri:
        status["modelUri"] = refs[PREDICTOR].uri
    backend, fallbacks = backend_of(pods)
    if backend:
        status["backend"] = backend + (f" (fallbacks: {'; '.join(fallbacks)})" if fallbacks else "")
    elif previous.get("backend"):
        status["backend"] = previous["backend"]
    out = Outcome(status)
    if previous.get("phase") != phase or (phase == "Failed" and previous.get("message") != message):
        if phase == "Ready":
            out.events.append(("Normal", "Ready", f"{message}; traffic {summary}"))
        elif phase == "Failed":
            out.events.append(("Warning", reason, message))
    if fallbacks and status.get("backend") != previous.get("backend"):
        out.events.append(("Warning", "CompileFallback", f"{backend}: {'; '.join(fallbacks)}"))
    status["message"] = message
    return out
