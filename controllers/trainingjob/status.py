"""Observed Job and pods → TrainingJob status. Pure: the clock comes in as `now`.

The size the job runs at (`nodesTarget`) is decided here too, because it follows from what the scheduler
did: a scale-up whose new pods stay unschedulable for scheduling.scheduleTimeoutSeconds is given up, the
job carries on at the nodes it has, and the scale-up is retried when nodes.count changes or after four
timeouts (the most common complaint about elastic jobs is a scale-up that leaves them stuck).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from controllers.conditions import get_condition, set_condition
from crds.common import ANNOTATION_PROGRESS
from crds.trainingjob import TrainingJobSpec, TrainingProgress

Obj = dict[str, Any]
EXIT_CODE_REASONS = {
    137: "killed (SIGKILL, often out of memory)",
    143: "terminated (SIGTERM)",
    130: "interrupted",
}


@dataclass(frozen=True)
class PodView:
    name: str
    index: int | None
    phase: str
    ready: bool
    created: str
    unschedulable: str | None = None  # the scheduler's message while the pod cannot be placed
    exit_code: int | None = None
    message: str | None = None
    progress: TrainingProgress | None = None
    deleting: bool = False


@dataclass(frozen=True)
class JobView:
    completions: int
    suspended: bool
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    conditions: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # type -> (reason, message), True only
    start_time: str | None = None
    completion_time: str | None = None


@dataclass
class Outcome:
    status: Obj
    nodes_target: int
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)

    @property
    def succeeded(self) -> bool:
        return self.status.get("phase") == "Succeeded"


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _progress(annotations: dict[str, str] | None, message: str | None) -> TrainingProgress | None:
    for raw in ((annotations or {}).get(ANNOTATION_PROGRESS), message):
        if not raw:
            continue
        try:
            return TrainingProgress.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            continue
    return None


def pod_view(pod: Obj) -> PodView:
    """What status derivation needs of a Pod object."""
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    ann = meta.get("annotations") or {}
    idx = ann.get("batch.kubernetes.io/job-completion-index")
    unschedulable = None
    ready = False
    for c in st.get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
        ):
            unschedulable = c.get("message") or "unschedulable"
        if c.get("type") == "Ready" and c.get("status") == "True":
            ready = True
    exit_code = message = None
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            exit_code, message = term.get("exitCode"), term.get("message")
    return PodView(
        name=meta.get("name", ""),
        index=int(idx) if idx is not None and str(idx).isdigit() else None,
        phase=st.get("phase", "Pending"),
        ready=ready,
        created=meta.get("creationTimestamp", ""),
        unschedulable=unschedulable,
        exit_code=exit_code,
        message=message,
        progress=_progress(ann, message),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def job_view(job: Obj) -> JobView:
    spec, st = job.get("spec") or {}, job.get("status") or {}
    conds = {
        c["type"]: (c.get("reason", ""), c.get("message", ""))
        for c in st.get("conditions") or []
        if c.get("status") == "True"
    }
    return JobView(
        completions=int(spec.get("completions") or 0),
        suspended=bool(spec.get("suspend")),
        active=int(st.get("active") or 0),
        ready=int(st.get("ready") or 0),
        succeeded=int(st.get("succeeded") or 0),
        failed=int(st.get("failed") or 0),
        conditions=conds,
        start_time=st.get("startTime"),
        completion_time=st.get("completionTime"),
    )


FINISHED_JOB_CONDITIONS = frozenset({"Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"})


def finished_job(job: Obj) -> tuple[str, JobView] | None:
    """(owning TrainingJob's uid, view) of a Job that had finished, from its last state (a DELETED watch
    event); None for a Job deleted before it finished, or not owned by a TrainingJob."""
    view = job_view(job)
    if not FINISHED_JOB_CONDITIONS & view.conditions.keys():
        return None
    refs = (job.get("metadata") or {}).get("ownerReferences") or []
    owner = next((r.get("uid") for r in refs if r.get("kind") == "TrainingJob"), None)
    return (owner, view) if owner else None


def _latest_progress(pods: list[PodView]) -> TrainingProgress | None:
    reports = [p.progress for p in pods if p.progress]
    return max(reports, key=lambda r: (r.step, r.updated or ""), default=None)


def _failure_reason(job: JobView, pods: list[PodView], spec: TrainingJobSpec) -> tuple[str, str]:
    # with a podFailurePolicy the Job controller sets FailureTarget first, with the same reason
    reason, message = job.conditions.get("Failed") or job.conditions.get("FailureTarget") or ("Failed", "")
    failed = [p for p in pods if p.phase == "Failed" and p.exit_code not in (None, 0)]
    last = max(failed, key=lambda p: p.created, default=None)
    code = f"exit code {last.exit_code}" if last else "a failure"
    if last and last.exit_code in EXIT_CODE_REASONS:
        code += f", {EXIT_CODE_REASONS[last.exit_code]}"
    detail = f": {last.message.strip()[:300]}" if last and last.message else ""
    if reason == "PodFailurePolicy":
        return "NonRetryableExitCode", (
            f"pod {last.name if last else '?'} ended with {code}{detail}; it is not in "
            f"failurePolicy.retryableExitCodes {sorted(spec.failure_policy.retryable_exit_codes)}, so the "
            "job "
            "failed without retrying (add the code there if it is transient)"
        )
    if reason == "BackoffLimitExceeded":
        return "RestartBudgetExhausted", (
            f"{job.failed} pod failures used up "
            f"failurePolicy.maxRestarts={spec.failure_policy.max_restarts}; "
            f"the last ended with {code}{detail}"
        )
    if reason == "DeadlineExceeded":
        return "DeadlineExceeded", (
            f"the job ran longer than activeDeadlineSeconds={spec.active_deadline_seconds}"
        )
    return reason or "Failed", message or f"the job failed with {code}{detail}"


def derive(
    spec: TrainingJobSpec, generation: int, previous: Obj, job: JobView | None, pods: list[PodView], now: str
) -> Outcome:
    """The TrainingJob's next status, the node count to run at, and the Events to post."""
    if previous.get("phase") in ("Succeeded", "Failed") and job is None:
        # Finished, and the Job is gone (ttlSecondsAfterFinished, or deleted by hand): a finished TrainingJob
        # is final, it is never run again. Its status stays as it was.
        return Outcome(status=dict(previous), nodes_target=int(previous.get("nodesTarget") or 0))
    prev_conditions: list[Obj] = list(previous.get("conditions") or [])
    conds = prev_conditions
    events: list[tuple[str, str, str]] = []
    lo = spec.nodes.min or spec.nodes.count
    desired = spec.nodes.count
    st: Obj = {k: v for k, v in previous.items() if k != "conditions"}
    st.update(observedGeneration=generation, nodesDesired=desired)

    def cond(type_: str, value: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, value, reason, message, generation=generation, now=now)

    live = [p for p in pods if p.phase in ("Pending", "Running") and not p.deleting]
    ready = [p for p in live if p.ready and p.phase == "Running"]
    unschedulable = [p for p in live if p.unschedulable]
    progress = _latest_progress(pods)

    # --- the size to run at (scale-ups that cannot be scheduled are held) ---
    target = int(previous.get("nodesTarget") or desired)
    blocked_target = previous.get("scaleUpBlockedTarget")
    blocked_at = previous.get("scaleUpBlockedAt")
    timeout = spec.scheduling.schedule_timeout_seconds
    if blocked_target is not None and (
        blocked_target != desired
        or not blocked_at
        or (_ts(now) - _ts(blocked_at)).total_seconds() > 4 * timeout
    ):
        blocked_target = blocked_at = None  # the user changed the size, or it is time to try again
        target = desired
    if blocked_target is None:
        target = desired
    stuck = [p for p in unschedulable if (_ts(now) - _ts(p.created)).total_seconds() > timeout]
    # The size kept is the pods that got a node (ready or about to be), not those ready at this instant, and
    # it is decided once per held scale-up: the Job then deletes the pods of the indexes above it, and a pod
    # pending only until those leave must not shrink the job again.
    placed = [p for p in live if not p.unschedulable]
    held = blocked_target is not None
    if (
        not held
        and target > lo
        and stuck
        and len(ready) >= lo
        and len(placed) < target
        and job
        and not job.suspended
    ):
        events.append(
            (
                "Warning",
                "ScaleUpUnschedulable",
                f"{len(stuck)} new pod(s) could not be scheduled for {timeout} s "
                f"({stuck[0].unschedulable}); carrying on at {len(placed)} of {desired} nodes",
            )
        )
        blocked_target, blocked_at, target = desired, now, len(placed)
    elif held and target < len(ready):
        # a pod that was unschedulable when the size was decided got a node after all and runs (the scheduler
        # retries unschedulable pods on its own schedule): keep it rather than delete it. Ready pods, not
        # placed ones: a pod just created has no scheduling verdict yet and would grow the job past its nodes.
        target = min(len(ready), desired)
    st.update(nodesTarget=target, scaleUpBlockedTarget=blocked_target, scaleUpBlockedAt=blocked_at)

    # --- progress published by the runtime ---
    if progress:
        st.update(
            currentStep=progress.step,
            totalSteps=progress.total_steps or spec.optimizer.steps,
            progress=f"{progress.step}/{progress.total_steps or spec.optimizer.steps}",
        )
        for key, value in (
            ("loss", progress.loss),
            ("worldSize", progress.world_size),
            ("lastCheckpoint", progress.last_checkpoint),
            ("lastCheckpointStep", progress.last_checkpoint_step),
            ("mlflowRunId", progress.run_id),
            ("mlflowRunUrl", progress.run_url),
        ):
            if value is not None:
                st[key] = value
    else:
        st.setdefault("totalSteps", spec.optimizer.steps)
        st.setdefault("progress", f"{st.get('currentStep', 0)}/{spec.optimizer.steps}")
    st["nodesReady"] = len(ready)
    failed_job = job is not None and ("Failed" in job.conditions or "FailureTarget" in job.conditions)
    # pods replaced after a failure; the last failure of a failed job was not retried
    restarts = max((job.failed if job else 0) - (1 if failed_job else 0), 0)
    if progress:
        restarts = max(restarts, progress.restarts)
    st["restarts"] = restarts

    # --- phase and conditions ---
    phase: str
    message = ""
    if job is None:
        phase, message = "Pending", "creating the job's pods"
    elif "Complete" in job.conditions or "SuccessCriteriaMet" in job.conditions:
        phase, message = "Succeeded", f"trained {st.get('currentStep', spec.optimizer.steps)} steps"
        st["completionTime"] = job.completion_time or st.get("completionTime") or now
        cond("Complete", True, "Succeeded", message)
        cond("Running", False, "Succeeded", "the job has finished")
    elif "Failed" in job.conditions or "FailureTarget" in job.conditions:
        reason, message = _failure_reason(job, pods, spec)
        phase = "Failed"
        st["completionTime"] = job.completion_time or st.get("completionTime") or now
        cond("Failed", True, reason, message)
        cond("Running", False, reason, "the job has failed")
    elif job.suspended:
        phase = "Suspended"
        queued = bool(spec.scheduling.queue_name) and not spec.suspend
        reason = "WaitingForAdmission" if queued else "Suspended"
        message = (
            f"waiting for Kueue to admit it from queue {spec.scheduling.queue_name}"
            if queued
            else "spec.suspend is true: pods deleted, checkpoints kept"
        )
        cond("Suspended", True, reason, message)
        cond("Running", False, reason, message)
    else:
        if get_condition(conds, "Suspended"):
            cond("Suspended", False, "Resumed", "the job runs again")
        if len(ready) < lo and unschedulable:
            phase = "Pending"
            message = f"{len(unschedulable)} pod(s) cannot be scheduled: {unschedulable[0].unschedulable}"
            before = get_condition(prev_conditions, "Running")
            if not before or before.get("reason") != "Unschedulable":
                events.append(("Warning", "Unschedulable", message))
            cond("Running", False, "Unschedulable", message)
        elif restarts > int(previous.get("restarts") or 0) and len(ready) < target:
            phase = "Restarting"
            message = (
                f"restart {restarts} of {spec.failure_policy.max_restarts}: the group re-forms and resumes "
                f"from the last checkpoint"
            )
            cond("Running", False, "Restarting", message)
            events.append(("Warning", "Restarting", message))
        elif len(ready) >= target:
            phase, message = "Running", f"{len(ready)} of {desired} nodes running"
            st.setdefault("startTime", job.start_time or now)
            cond("Running", True, "AllNodesReady" if target == desired else "RunningBelowDesired", message)
        elif len(ready) >= lo and (target != (job.completions or target) or len(live) > len(ready)):
            phase, message = "Scaling", f"{len(ready)} of {target} nodes ready"
            st.setdefault("startTime", job.start_time or now)
            cond("Running", True, "Scaling", message)
        else:
            phase, message = "Pending", f"{len(ready)} of {target} nodes ready"
            cond("Running", False, "PodsStarting", message)
        if blocked_target is not None:
            cond(
                "Scaling",
                False,
                "ScaleUpUnschedulable",
                f"could not schedule {blocked_target} nodes; running at {target} (retried when nodes.count "
                f"changes or after {4 * timeout} s)",
            )
        elif target != (job.completions or target) or phase == "Scaling":
            cond("Scaling", True, "Resizing", f"resizing to {target} nodes")
        elif get_condition(conds, "Scaling"):
            cond("Scaling", False, "Stable", f"running at {target} nodes")
    if job is not None:
        cond("Created", True, "JobCreated", "the Job and its spec ConfigMap exist")
    if phase != previous.get("phase") and phase in ("Succeeded", "Failed", "Suspended"):
        events.append(("Normal" if phase != "Failed" else "Warning", phase, message))
    st.update(phase=phase, message=message, conditions=conds)
    return Outcome(status={k: v for k, v in st.items() if v is not None}, nodes_target=target, events=events)
