"""Table-driven tests of the pure ModelVersion status derivation."""

from __future__ import annotations

from typing import Any

import pytest

from controllers.modelversion.reconcile import Claim, Plan, Problem, SourceNotReady
from controllers.modelversion.status import Observation, build_status, status_patch
from model_registry.mlflow_gateway import ModelVersion

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
V_READY = ModelVersion(
    name="m",
    version="3",
    status="READY",
    source="runs:/r/model",
    run_id="r",
    run_link="http://ui/#/experiments/0/runs/r",
)
V_PENDING = ModelVersion(name="m", version="3", status="PENDING_REGISTRATION", source="s3://x")
V_FAILED = ModelVersion(
    name="m", version="3", status="FAILED_REGISTRATION", status_message="boom", source="s3://x"
)
OLDER = Claim(T0, "ns", "older", uid="u0")
PLAN_OK = Plan(actions=(), held=("champion",), lost={}, rivals={}, drifted_aliases=(), drifted_tags=())
PLAN_LOST = Plan(
    actions=(),
    held=(),
    lost={"champion": OLDER},
    rivals={"champion": (OLDER,)},
    drifted_aliases=(),
    drifted_tags=(),
)


def conds(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


@pytest.mark.parametrize(
    ("obs", "phase", "ready", "extra"),
    [
        (
            Observation(generation=1, version=V_READY, plan=PLAN_OK),
            "Ready",
            ("True", "Ready"),
            {"AliasesReady": ("True", "AliasesInPlace"), "RegistryAvailable": ("True", "Reachable")},
        ),
        (
            Observation(generation=1, version=V_PENDING, plan=None),
            "Registering",
            ("False", "PendingRegistration"),
            {},
        ),
        (
            Observation(generation=1, version=V_FAILED, plan=None),
            "Failed",
            ("False", "RegistrationFailed"),
            {},
        ),
        (
            Observation(generation=1, version=V_READY, plan=PLAN_LOST),
            "Pending",
            ("False", "AliasConflict"),
            {"AliasesReady": ("False", "AliasConflict")},
        ),
        (
            Observation(generation=1, problems=[Problem("spec.aliases[0]", "reserved")]),
            "Failed",
            ("False", "InvalidSpec"),
            {"SourceResolved": ("False", "InvalidSpec")},
        ),
        (
            Observation(generation=1, not_ready=SourceNotReady("TrainingJobNotSucceeded", "waiting", 5)),
            "Pending",
            ("False", "TrainingJobNotSucceeded"),
            {"SourceResolved": ("False", "TrainingJobNotSucceeded")},
        ),
        (
            Observation(generation=1, registry_error="connection refused"),
            "Pending",
            ("False", "RegistryUnavailable"),
            {"RegistryAvailable": ("False", "RegistryUnavailable")},
        ),
        (
            Observation(generation=1, configured=False),
            "Pending",
            ("False", "NotConfigured"),
            {"RegistryAvailable": ("False", "NotConfigured")},
        ),
        (
            Observation(generation=1, version=V_READY, plan=PLAN_OK, deleting=True, served_by=["svc"]),
            "Deleting",
            ("True", "Ready"),
            {"DeletionBlocked": ("True", "ServedByInferenceService")},
        ),
    ],
)
def test_phase_and_conditions(
    obs: Observation, phase: str, ready: tuple[str, str], extra: dict[str, tuple[str, str]]
) -> None:
    st = build_status(None, obs, T0)
    assert st["phase"] == phase
    c = conds(st)
    assert c["Ready"] == ready
    for k, v in extra.items():
        assert c[k] == v
    assert st["observedGeneration"] == 1
    assert all(x["observedGeneration"] == 1 and x["lastTransitionTime"] == T0 for x in st["conditions"])


def test_ready_fields() -> None:
    st = build_status(
        None, Observation(generation=2, version=V_READY, plan=PLAN_OK, signature="inputs: [x]"), T0
    )
    assert st["registryVersion"] == "3" and st["registryStatus"] == "READY"
    assert st["modelUri"] == "models:/m/3" and st["sourceUri"] == "runs:/r/model" and st["runId"] == "r"
    assert (
        st["runUrl"].endswith("/runs/r")
        and st["aliases"] == ["champion"]
        and st["signature"] == "inputs: [x]"
    )
    assert "registryMessage" not in st


def test_registry_down_keeps_last_known_state() -> None:
    ready = build_status(None, Observation(generation=1, version=V_READY, plan=PLAN_OK, signature="sig"), T0)
    down = build_status(ready, Observation(generation=1, registry_error="connection refused"), T1)
    assert down["phase"] == "Ready" and conds(down)["Ready"] == ("True", "Ready")
    assert conds(down)["RegistryAvailable"] == ("False", "RegistryUnavailable")
    assert down["registryVersion"] == "3" and down["aliases"] == ["champion"] and down["signature"] == "sig"
    ltt = {c["type"]: c["lastTransitionTime"] for c in down["conditions"]}
    assert ltt["Ready"] == T0 and ltt["RegistryAvailable"] == T1
    back = build_status(down, Observation(generation=1, version=V_READY, plan=PLAN_OK), T1)
    assert conds(back)["RegistryAvailable"] == ("True", "Reachable")


def test_unchanged_status_gives_no_patch() -> None:
    obs = Observation(generation=1, version=V_READY, plan=PLAN_OK)
    first = build_status(None, obs, T0)
    again = build_status(first, obs, T1)  # later clock, same state: same status
    assert again == first
    assert status_patch(first, again) is None


def test_status_patch_removes_dropped_keys() -> None:
    assert status_patch({"a": 1, "b": 2}, {"a": 1}) == {"b": None}
    assert status_patch({}, {"a": 1}) == {"a": 1}
    assert status_patch(None, {"a": 1}) == {"a": 1}


def test_conflict_message_names_the_winner_and_the_fix() -> None:
    st = build_status(None, Observation(generation=1, version=V_READY, plan=PLAN_LOST), T0)
    msg = next(c["message"] for c in st["conditions"] if c["type"] == "AliasesReady")
    assert "ns/older" in msg and "champion" in msg and "remove the alias" in msg


def test_winner_of_a_conflict_stays_ready_and_names_the_rival() -> None:
    newer = Claim("2026-01-01T00:00:09Z", "ns", "newer", uid="u9")
    plan = Plan(
        actions=(),
        held=("champion",),
        lost={},
        rivals={"champion": (newer,)},
        drifted_aliases=(),
        drifted_tags=(),
    )
    st = build_status(None, Observation(generation=1, version=V_READY, plan=plan), T0)
    assert conds(st)["AliasesReady"] == ("True", "AliasConflict") and conds(st)["Ready"] == ("True", "Ready")
    msg = next(c["message"] for c in st["conditions"] if c["type"] == "AliasesReady")
    assert "ns/newer" in msg and "champion" in msg
