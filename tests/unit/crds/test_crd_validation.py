"""crds.validation: the operator's one-call re-check."""

from __future__ import annotations

import pytest

from crds import validation

pytestmark = pytest.mark.unit


def tj(spec: dict[str, object], name: str = "job", phase: str | None = None) -> dict[str, object]:
    obj: dict[str, object] = {"kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
    if phase:
        obj["status"] = {"phase": phase}
    return obj


def test_valid_object_has_no_errors() -> None:
    assert validation.errors(tj({"model": {"builtin": "llama"}})) == []


def test_errors_name_the_field_and_carry_the_cel_message() -> None:
    problems = validation.errors(
        tj({"model": {"builtin": "llama"}, "nodes": {"count": 2, "min": 3}}, name="1x")
    )
    assert (
        "spec.nodes: nodes.min must be at most nodes.count: lower nodes.min or raise nodes.count" in problems
    )
    assert any(p.startswith("metadata.name: metadata.name must be a DNS-1035 label") for p in problems)
    assert validation.errors({"kind": "Nope"})[0].startswith("kind: unknown kind")


def test_update_errors() -> None:
    old = tj({"model": {"builtin": "llama"}}, phase="Running")
    new = tj({"model": {"builtin": "mlp"}})
    assert any("spec.model cannot change" in p for p in validation.update_errors(old, new))
    mv_old = {"kind": "ModelVersion", "spec": {"modelName": "a", "source": {"runId": "r"}}}
    mv_new = {"kind": "ModelVersion", "spec": {"modelName": "b", "source": {"runId": "r"}}}
    assert validation.update_errors(mv_old, mv_new) == [
        "modelName is immutable: create a new ModelVersion to register into another model"
    ]
