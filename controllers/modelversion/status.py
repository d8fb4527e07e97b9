"""Pure derivation of a ModelVersion's status from what the reconcile observed and did.

Conditions (type: reason when False):
- SourceResolved: InvalidSpec, TrainingJobNotFound, TrainingJobNotSucceeded, TrainingJobHasNoRun, ...
- RegistryAvailable: RegistryUnavailable (MLflow unreachable or failing; retried with backoff), NotConfigured
- AliasesReady: AliasConflict (another, older ModelVersion holds a declared alias), Pending
- Ready: the version is READY in MLflow and every declared alias points at it. While MLflow is unreachable
  a Ready version stays Ready (last known state) and only RegistryAvailable turns False.
- DeletionBlocked (only while deleting): ServedByInferenceService.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controllers.modelversion.reconcile import Plan, Problem, SourceNotReady
from model_registry.mlflow_gateway import FAILED_REGISTRATION, PENDING_REGISTRATION, READY, ModelVersion

Status = dict[str, Any]

_REGISTRY_FIELDS = (
    "registryVersion",
    "registryStatus",
    "registryMessage",
    "sourceUri",
    "runId",
    "runUrl",
    "aliases",
    "signature",
    "modelUri",
)


@dataclass(frozen=True)
class Observation:
    generation: int | None = None
    configured: bool = True  # an MLflow tracking URI is configured
    problems: Sequence[Problem] = ()  # user errors (permanent until the spec changes)
    not_ready: SourceNotReady | None = None
    registry_error: str | None = None  # transient: MLflow unreachable or failing
    version: ModelVersion | None = None
    source_uri: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    signature: str | None = None
    plan: Plan | None = None
    deleting: bool = False
    served_by: Sequence[str] = field(default_factory=tuple)


def _cond(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def conflict_message(plan: Plan) -> str:
    lost = [
        f"alias {a!r} is held by ModelVersion {c.ref} (created earlier)" for a, c in sorted(plan.lost.items())
    ]
    return "; ".join(lost) + ": remove the alias from one of them" if lost else ""


def rivals_message(plan: Plan) -> str:
    held = [
        f"alias {a!r} is held here; also declared by {', '.join(f'ModelVersion {c.ref}' for c in cs)} "
        "(created later), which does not get it"
        for a, cs in sorted(plan.rivals.items())
    ]
    return "; ".join(held) + ": remove the alias from one of them" if held else ""


def build_status(previous: Mapping[str, Any] | None, obs: Observation, now: str) -> Status:
    """The whole status object. Registry fields not observed this time (MLflow down) keep their last value;
    lastTransitionTime only moves when a condition's status changes."""
    prev = dict(previous or {})
    st: Status = {k: prev[k] for k in _REGISTRY_FIELDS if prev.get(k) is not None}
    v = obs.version
    if v is not None:
        st.update(
            registryVersion=v.version,
            registryStatus=v.status,
            modelUri=v.model_uri,
            sourceUri=v.source or obs.source_uri,
            runId=v.run_id or obs.run_id or None,
        )
        st["registryMessage"] = v.status_message or None
        if v.run_link or obs.run_url:
            st["runUrl"] = v.run_link or obs.run_url
    elif obs.source_uri:
        st["sourceUri"] = obs.source_uri
        st["runId"] = obs.run_id
    if obs.plan is not None:
        st["aliases"] = list(obs.plan.held)
    if obs.signature is not None:
        st["signature"] = obs.signature
    st = {k: val for k, val in st.items() if val not in (None, "")}

    prev_conds = {c.get("type"): c for c in prev.get("conditions") or []}
    conds: list[dict[str, Any]] = []

    # SourceResolved
    if obs.problems:
        conds.append(_cond("SourceResolved", False, "InvalidSpec", "; ".join(map(str, obs.problems))))
    elif obs.not_ready is not None:
        conds.append(_cond("SourceResolved", False, obs.not_ready.reason, obs.not_ready.message))
    elif v is not None or obs.source_uri:
        conds.append(_cond("SourceResolved", True, "Resolved", st.get("sourceUri", "")))
    elif "SourceResolved" in prev_conds:
        conds.append(dict(prev_conds["SourceResolved"]))

    # RegistryAvailable
    if not obs.configured:
        conds.append(
            _cond(
                "RegistryAvailable",
                False,
                "NotConfigured",
                "the operator has no MLflow tracking URI (KUBEFORGE_MLFLOW_TRACKING_URI)",
            )
        )
    elif obs.registry_error is not None:
        conds.append(
            _cond(
                "RegistryAvailable",
                False,
                "RegistryUnavailable",
                f"{obs.registry_error} (retrying with backoff)",
            )
        )
    elif obs.problems or obs.not_ready:
        if "RegistryAvailable" in prev_conds:
            conds.append(dict(prev_conds["RegistryAvailable"]))
    else:
        conds.append(_cond("RegistryAvailable", True, "Reachable"))

    # AliasesReady
    plan = obs.plan
    if plan is not None:
        if plan.lost:
            conds.append(_cond("AliasesReady", False, "AliasConflict", conflict_message(plan)))
        elif plan.rivals:  # we hold them, and say who else declares them
            conds.append(_cond("AliasesReady", True, "AliasConflict", rivals_message(plan)))
        else:
            held = ", ".join(plan.held)
            conds.append(_cond("AliasesReady", True, "AliasesInPlace" if plan.held else "NoAliases", held))
    elif "AliasesReady" in prev_conds:
        conds.append(dict(prev_conds["AliasesReady"]))

    # Ready and phase
    ready_prev = prev_conds.get("Ready")
    if obs.problems:
        ready, phase = _cond("Ready", False, "InvalidSpec", "; ".join(map(str, obs.problems))), "Failed"
    elif not obs.configured:
        ready, phase = _cond("Ready", False, "NotConfigured", "no MLflow registry configured"), "Pending"
    elif obs.registry_error is not None and (v is None or plan is None):
        if ready_prev is not None and ready_prev.get("status") == "True":
            ready, phase = dict(ready_prev), str(prev.get("phase") or "Ready")
        else:
            ready = _cond("Ready", False, "RegistryUnavailable", obs.registry_error)
            phase = str(prev.get("phase") or "Pending")
            if phase in ("Ready", "Failed"):
                phase = "Pending"
    elif obs.not_ready is not None:
        ready, phase = _cond("Ready", False, obs.not_ready.reason, obs.not_ready.message), "Pending"
    elif v is None:
        ready, phase = _cond("Ready", False, "Pending", "not registered yet"), "Pending"
    elif v.status == FAILED_REGISTRATION:
        why = v.status_message or "MLflow failed the registration"
        ready = _cond("Ready", False, "RegistrationFailed", why)
        phase = "Failed"
    elif v.status == PENDING_REGISTRATION or v.status != READY:
        ready = _cond("Ready", False, "PendingRegistration", f"MLflow status {v.status}")
        phase = "Registering"
    elif plan is not None and plan.lost:
        ready, phase = _cond("Ready", False, "AliasConflict", conflict_message(plan)), "Pending"
    else:
        ready, phase = _cond("Ready", True, "Ready", f"{v.model_uri} is READY"), "Ready"
    conds.append(ready)

    if obs.deleting:
        phase = "Deleting"
        if obs.served_by:
            conds.append(
                _cond(
                    "DeletionBlocked",
                    True,
                    "ServedByInferenceService",
                    f"still served by InferenceService {', '.join(obs.served_by)}; the registry "
                    "version is kept until no InferenceService serves it",
                )
            )
        else:
            conds.append(_cond("DeletionBlocked", False, "NotServed"))

    for c in conds:
        old = prev_conds.get(c["type"])
        if obs.generation is not None:
            c["observedGeneration"] = obs.generation
        same = old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime")
        c["lastTransitionTime"] = old["lastTransitionTime"] if same and old is not None else now
    st["conditions"] = conds
    st["phase"] = phase
    if obs.generation is not None:
        st["observedGeneration"] = obs.generation
    return st


def status_patch(current: Mapping[str, Any] | None, desired: Status) -> Status | None:
    """A merge patch turning `current` into `desired` (removed keys: None); None when nothing changed."""
    cur = dict(current or {})
    if cur == desired:
        return None
    patch: Status = {k: v for k, v in desired.items() if cur.get(k) != v}
    for k in cur:
        if k not in desired:
            patch[k] = None
    return patch or None
