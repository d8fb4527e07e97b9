"""Status derivation: observed Job and pods → phase, conditions, node target and events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controllers.conditions import get_condition
from controllers.trainingjob.status import JobView, PodView, derive, finished_job, job_view, pod_view
from crds.trainingjob import TrainingJobSpec, TrainingProgress

NOW = "2026-11-28T12:10:00Z"
EARLY = "2026-11-28T12:00:00Z"


def spec(**kw: Any) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({"model": {"builtin": "mlp"}, **kw})


def running(i: int, created: str = EARLY, **kw: Any) -> PodView:
    return PodView(name=f"j-{i}", index=i, phase="Running", ready=True, created=created, **kw)


def pending(
    i: int, created: str = EARLY, why: str | None = "0/13 nodes are available: Insufficient nvidia.com/gpu"
) -> PodView:
    return PodView(name=f"j-{i}", index=i, phase="Pending", ready=False, created=created, unschedulable=why)


def job(n: int, **kw: Any) -> JobView:
    return JobView(completions=n, suspended=kw.pop("suspended", False), **kw)


@pytest.mark.parametrize(
    ("name", "kw", "previous", "jv", "pods", "phase", "reason"),
    [
        ("no job yet", {}, {}, None, [], "Pending", None),
        (
            "all nodes ready",
            {"nodes": {"count": 2}},
            {},
            job(2, active=2),
            [running(0), running(1)],
            "Running",
            "AllNodesReady",
        ),
        (
            "unschedulable below minimum",
            {"nodes": {"count": 2}},
            {},
            job(2, active=2),
            [pending(0), pending(1)],
            "Pending",
            "Unschedulable",
        ),
        (
            "complete",
            {},
            {},
            job(1, succeeded=1, conditions={"Complete": ("CompletionsReached", "")}),
            [],
            "Succeeded",
            "Succeeded",
        ),
        (
            "budget exhausted",
            {"failurePolicy": {"maxRestarts": 2}},
            {},
            job(1, failed=3, conditions={"Failed": ("BackoffLimitExceeded", "")}),
            [PodView("j-0", 0, "Failed", False, EARLY, exit_code=137)],
            "Failed",
            "RestartBudgetExhausted",
        ),
        (
            "non-retryable code",
            {},
            {},
            job(1, failed=1, conditions={"Failed": ("PodFailurePolicy", "")}),
            [PodView("j-0", 0, "Failed", False, EARLY, exit_code=3, message="bad entry point")],
            "Failed",
            "NonRetryableExitCode",
        ),
        (
            "deadline",
            {"activeDeadlineSeconds": 60},
            {},
            job(1, conditions={"Failed": ("DeadlineExceeded", "")}),
            [],
            "Failed",
            "DeadlineExceeded",
        ),
        ("suspended", {"suspend": True}, {}, job(1, suspended=True), [], "Suspended", "Suspended"),
        (
            "queued",
            {"scheduling": {"queueName": "q"}},
            {},
            job(1, suspended=True),
            [],
            "Suspended",
            "WaitingForAdmission",
        ),
        (
            "retry after a failure",
            {"nodes": {"count": 2}},
            {"restarts": 0},
            job(2, failed=1, active=2),
            [running(0), PodView("j-1", 1, "Pending", False, NOW)],
            "Restarting",
            "Restarting",
        ),
    ],
)
def test_phase_table(
    name: str,
    kw: dict[str, Any],
    previous: dict[str, Any],
    jv: JobView | None,
    pods: list[PodView],
    phase: str,
    reason: str | None,
) -> None:
    out = derive(spec(**kw), 3, previous, jv, pods, NOW)
    assert out.status["phase"] == phase, name
    assert out.status["observedGeneration"] == 3
    if reason:
        reasons = {c["reason"] for c in out.status["conditions"]}
        assert reason in reasons, (name, out.status["conditions"])


def test_failure_message_names_the_exit_code_and_the_fix() -> None:
    out = derive(
        spec(),
        1,
        {},
        job(1, failed=1, conditions={"Failed": ("PodFailurePolicy", "")}),
        [PodView("j-0", 0, "Failed", False, EARLY, exit_code=3)],
        NOW,
    )
    msg = out.status["message"]
    assert "exit code 3" in msg and "retryableExitCodes" in msg
    assert ("Warning", "Failed", msg) in out.events


def test_scale_up_that_cannot_be_scheduled_carries_on_at_the_size_it_has() -> None:
    s = spec(nodes={"count": 3, "min": 1, "max": 4}, scheduling={"scheduleTimeoutSeconds": 60})
    pods = [running(0), running(1), pending(2, created="2026-11-28T12:08:00Z")]
    out = derive(s, 2, {"nodesTarget": 2}, job(3, active=3), pods, NOW)
    assert out.nodes_target == 2
    assert out.status["scaleUpBlockedTarget"] == 3
    assert out.status["phase"] == "Running"
    scaling = get_condition(out.status["conditions"], "Scaling")
    assert scaling and scaling["status"] == "False" and scaling["reason"] == "ScaleUpUnschedulable"
    assert any(r == "ScaleUpUnschedulable" for _, r, _ in out.events)
    # young pending pods are still given their chance
    young = derive(s, 2, {}, job(3, active=3), [running(0), running(1), pending(2, created=NOW)], NOW)
    assert young.nodes_target == 3 and young.status["phase"] == "Scaling"


def test_held_scale_up_is_retried_when_the_user_changes_the_size_or_after_four_timeouts() -> None:
    s = spec(nodes={"count": 3, "min": 1, "max": 4}, scheduling={"scheduleTimeoutSeconds": 60})
    held = {"nodesTarget": 2, "scaleUpBlockedTarget": 3, "scaleUpBlockedAt": "2026-11-28T12:09:00Z"}
    same = derive(s, 2, held, job(2, active=2), [running(0), running(1)], NOW)
    assert same.nodes_target == 2 and same.status["phase"] == "Running"
    bigger = spec(nodes={"count": 4, "min": 1, "max": 4}, scheduling={"scheduleTimeoutSeconds": 60})
    assert derive(bigger, 3, held, job(2, active=2), [running(0), running(1)], NOW).nodes_target == 4
    old = {**held, "scaleUpBlockedAt": "2026-11-28T12:04:00Z"}
    assert derive(s, 2, old, job(2, active=2), [running(0), running(1)], NOW).nodes_target == 3


def test_held_scale_up_keeps_a_pod_that_got_a_node_after_the_size_was_decided() -> None:
    """Held at 3 of 6 while pod 3 was unschedulable; the scheduler placed it a moment later: run at 4, not
    delete a pod that runs (and never shrink below the size decided)."""
    s = spec(nodes={"count": 6, "min": 1, "max": 6}, scheduling={"scheduleTimeoutSeconds": 3})
    held = {"nodesTarget": 3, "scaleUpBlockedTarget": 6, "scaleUpBlockedAt": NOW}
    stuck = [pending(i, created="2026-11-28T12:08:00Z") for i in (4, 5)]
    four = derive(s, 2, held, job(3, active=4), [running(0), running(1), running(2), running(3), *stuck], NOW)
    assert four.nodes_target == 4 and four.status["scaleUpBlockedTarget"] == 6
    three = derive(s, 2, held, job(3, active=3), [running(0), running(1), running(2), *stuck], NOW)
    assert three.nodes_target == 3 and three.status["scaleUpBlockedTarget"] == 6
    # a pod the scheduler has not judged yet (no verdict: not unschedulable, not ready) does not grow it
    fresh = PodView(name="j-3", index=3, phase="Pending", ready=False, created=NOW)
    unjudged = derive(s, 2, held, job(3, active=4), [running(0), running(1), running(2), fresh, *stuck], NOW)
    assert unjudged.nodes_target == 3


def test_progress_comes_from_the_runtime() -> None:
    report = TrainingProgress(
        step=40,
        total_steps=100,
        loss=1.25,
        world_size=16,
        run_id="abc",
        last_checkpoint="/ckpt/step-40",
        last_checkpoint_step=40,
        updated=NOW,
    )
    pods = [running(0, progress=report), running(1)]
    out = derive(spec(), 1, {}, job(2, active=2), pods, NOW)
    st = out.status
    assert (st["currentStep"], st["totalSteps"], st["progress"]) == (40, 100, "40/100")
    assert (st["worldSize"], st["mlflowRunId"], st["lastCheckpointStep"], st["loss"]) == (16, "abc", 40, 1.25)


def test_pod_and_job_views_read_real_object_shapes() -> None:
    pod = {
        "metadata": {
            "name": "j-1",
            "creationTimestamp": EARLY,
            "annotations": {
                "batch.kubernetes.io/job-completion-index": "1",
                "kubeforge.io/progress": json.dumps({"step": 7, "totalSteps": 9}),
            },
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no gpus"}
            ],
        },
    }
    v = pod_view(pod)
    assert (v.index, v.unschedulable, v.progress and v.progress.step) == (1, "no gpus", 7)
    failed = {
        "metadata": {"name": "j-0"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "message": "oom"}}}],
        },
    }
    assert (pod_view(failed).exit_code, pod_view(failed).message) == (137, "oom")
    j = job_view(
        {
            "spec": {"completions": 2, "suspend": False},
            "status": {
                "active": 1,
                "failed": 2,
                "conditions": [{"type": "Failed", "status": "True", "reason": "X"}],
            },
        }
    )
    assert (j.completions, j.active, j.failed, j.conditions) == (2, 1, 2, {"Failed": ("X", "")})


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = derive(spec(), 1, {}, job(1, active=1), [running(0)], EARLY)
    again = derive(spec(), 1, first.status, job(1, active=1), [running(0)], NOW)
    t0 = get_condition(first.status["conditions"], "Running")
    t1 = get_condition(again.status["conditions"], "Running")
    assert t0 and t1 and t0["lastTransitionTime"] == t1["lastTransitionTime"] == EARLY


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_whose_job_was_collected_stays_finished(phase: str) -> None:
    """ttlSecondsAfterFinished deletes the Job: not "no Job yet", so training must not start again."""
    previous = {"phase": phase, "nodesTarget": 2, "completionTime": EARLY, "conditions": []}
    out = derive(spec(nodes={"count": 2}, ttlSecondsAfterFinished=60), 1, previous, None, [], NOW)
    assert out.status == previous
    assert out.events == []


def test_a_deleted_job_counts_as_finished_only_if_it_had_finished() -> None:
    """The last state of a Job deleted by ttlSecondsAfterFinished tells the sync how the TrainingJob ended."""
    owner = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "TrainingJob", "name": "t", "uid": "u-1"}

    def body(*conditions: str, owners: list[dict[str, str]] | None = None) -> dict[str, Any]:
        return {
            "metadata": {"name": "t", "ownerReferences": [owner] if owners is None else owners},
            "spec": {"completions": 1, "parallelism": 1},
            "status": {"conditions": [{"type": c, "status": "True"} for c in conditions], "succeeded": 1},
        }

    done = finished_job(body("SuccessCriteriaMet", "Complete"))
    assert done is not None and done[0] == "u-1" and "Complete" in done[1].conditions
    out = derive(spec(), 1, {"phase": "Running"}, done[1], [], NOW)
    assert out.status["phase"] == "Succeeded"
    failed = finished_job(body("FailureTarget", "Failed"))
    assert failed is not None and "Failed" in failed[1].conditions
    assert finished_job(body()) is None  # deleted while running: the operator starts it again
    assert finished_job(body("Complete", owners=[])) is None  # not ours
