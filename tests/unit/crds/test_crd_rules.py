"""The pydantic mirrors of the CEL rules: same rules, same messages, no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from crds import inferenceservice as isvc
from crds import modelversion as mv
from crds import trainingjob as tj
from crds.common import KubeModel, Rule

pytestmark = pytest.mark.unit

LLAMA = {"model": {"builtin": "llama"}}


def _err(model: type[KubeModel], data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


def test_minimal_objects_are_valid() -> None:
    assert tj.TrainingJobSpec.model_validate(LLAMA).nodes.count == 1
    assert mv.ModelVersionSpec.model_validate({"modelName": "m", "source": {"uri": "file:///m"}})
    assert isvc.InferenceServiceSpec.model_validate({"model": {"uri": "models:/m@champion"}})


TJ_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("two sources", {"model": {"builtin": "mlp", "entrypoint": "a.b:c"}}, "set exactly one of model.builtin"),
    ("no source", {"model": {}}, "set exactly one of model.builtin"),
    ("product", {**LLAMA, "nodes": {"count": 2}, "parallelism": {"data": 3}}, "must equal nodes.count"),
    ("divides", {**LLAMA, "processesPerNode": 3, "parallelism": {"tensor": 2}}, "must divide"),
    (
        "elastic data",
        {**LLAMA, "nodes": {"count": 2, "min": 1, "max": 4}, "parallelism": {"data": 2}},
        "-1 for an elastic",
    ),
    ("min", {**LLAMA, "nodes": {"count": 2, "min": 3}}, "nodes.min must be at most nodes.count"),
    ("max", {**LLAMA, "nodes": {"count": 5, "max": 4}}, "nodes.count must be at most nodes.max"),
    ("powerSGD", {**LLAMA, "gradientCompression": "powerSGD"}, "requires parallelism.dataMode ddp"),
    (
        "interleaved",
        {**LLAMA, "parallelism": {"pipelineSchedule": "Interleaved1F1B"}},
        "stagesPerRank must be",
    ),
    (
        "zbv",
        {**LLAMA, "parallelism": {"pipelineSchedule": "ZBVZeroBubble", "stagesPerRank": 3}},
        "stagesPerRank must be 2 for pipelineSchedule DualPipeV or ZBVZeroBubble",
    ),
    (
        "zbv compiled",
        {
            **LLAMA,
            "compile": True,
            "parallelism": {"pipelineSchedule": "ZBVZeroBubble", "stagesPerRank": 2},
        },
        "ZBVZeroBubble split each backward",
    ),
    (
        "dualpipev micro-batches",
        {
            **LLAMA,
            "parallelism": {
                "pipelineSchedule": "DualPipeV",
                "stagesPerRank": 2,
                "pipeline": 2,
                "microBatches": 3,
            },
        },
        "microBatches must be at least 2 x parallelism.pipeline (the stages) for pipelineSchedule DualPipeV",
    ),
    (
        "micro",
        {**LLAMA, "processesPerNode": 2, "parallelism": {"pipeline": 2}},
        "microBatches must be at least",
    ),
    ("gpu count", {**LLAMA, "accelerator": {"vendor": "nvidia"}}, "accelerator.count must be at least 1"),
    ("cpu count", {**LLAMA, "accelerator": {"count": 1}}, "accelerator.count must be 0"),
    ("env", {**LLAMA, "env": {"WORLD_SIZE": "8"}}, "env must not set"),
    ("alias", {**LLAMA, "register": {"modelName": "m", "aliases": ["latest"]}}, "aliases must not be"),
    ("text-file", {**LLAMA, "data": {"builtin": "text-file"}}, "data.path is required"),
]


@pytest.mark.parametrize(("name", "spec", "message"), TJ_CASES, ids=[c[0] for c in TJ_CASES])
def test_trainingjob_rules(name: str, spec: dict[str, Any], message: str) -> None:
    assert message in _err(tj.TrainingJobSpec, spec)


def test_elastic_job_with_leftover_data_is_valid() -> None:
    spec = tj.TrainingJobSpec.model_validate(
        {
            **LLAMA,
            "nodes": {"count": 2, "min": 1, "max": 4},
            "processesPerNode": 2,
            "parallelism": {"tensor": 2},
        }
    )
    assert spec.nodes.elastic


ISVC_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("two models", {"model": {"uri": "models:/m/1", "modelVersion": "v"}}, "set exactly one of modelVersion"),
    (
        "canary none",
        {"model": {"uri": "models:/m/1"}, "canary": {"model": {}}},
        "set exactly one of modelVersion",
    ),
    (
        "canary same",
        {"model": {"uri": "models:/m/1"}, "canary": {"model": {"uri": "models:/m/1"}}},
        "must differ",
    ),
    ("ports", {"model": {"uri": "models:/m/1"}, "ports": {"http": 9000, "grpc": 9000}}, "must differ"),
    (
        "hpa",
        {"model": {"uri": "models:/m/1"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        "minReplicas must",
    ),
    (
        "backend",
        {"model": {"uri": "models:/m/1"}, "compile": {"backend": "tensorrt"}},
        "must match accelerator",
    ),
    ("warm-up", {"model": {"uri": "models:/m/1"}, "compile": {"warmupBatchSizes": [64]}}, "warmupBatchSizes"),
    (
        "priority",
        {"model": {"uri": "models:/m/1"}, "batching": {"priorityLevels": 2, "defaultPriorityLevel": 3}},
        "batching.defaultPriorityLevel must be at most batching.priorityLevels",
    ),
]


@pytest.mark.parametrize(("name", "spec", "message"), ISVC_CASES, ids=[c[0] for c in ISVC_CASES])
def test_inferenceservice_rules(name: str, spec: dict[str, Any], message: str) -> None:
    assert message in _err(isvc.InferenceServiceSpec, spec)


def test_modelversion_rules_and_transitions() -> None:
    msg = _err(mv.ModelVersionSpec, {"modelName": "m", "source": {"uri": "x", "runId": "r"}})
    assert "set exactly one of source.trainingJob" in msg
    old = mv.ModelVersionSpec.model_validate({"modelName": "m", "source": {"runId": "r"}})
    new = old.model_copy(update={"model_name": "n"})
    assert mv.update_errors(old, old) == []
    assert mv.update_errors(old, new) == [
        "modelName is immutable: create a new ModelVersion to register into another model"
    ]


def test_trainingjob_transitions_follow_phase() -> None:
    old = {"spec": {"model": {"builtin": "llama"}, "processesPerNode": 1}, "status": {"phase": "Running"}}
    new = {"spec": {"model": {"builtin": "mlp"}, "processesPerNode": 2}}
    errors = tj.update_errors(old, new)
    assert any(e.startswith("spec.model cannot change") for e in errors)
    assert any(e.startswith("spec.processesPerNode cannot change") for e in errors)
    suspended = {**old, "status": {"phase": "Suspended"}}
    assert [e for e in tj.update_errors(suspended, new) if "processesPerNode" in e] == []
    assert tj.update_errors({**old, "status": {}}, new) == []


def test_object_name_rule() -> None:
    assert tj.object_rule_errors({"metadata": {"name": "ok-name"}}) == []
    assert tj.object_rule_errors({"metadata": {"name": "1bad"}})
    assert isvc.object_rule_errors({"metadata": {"name": "a" * 49}})


def _all_rules() -> list[Rule]:
    models: list[type[KubeModel]] = [tj.TrainingJobSpec, mv.ModelVersionSpec, isvc.InferenceServiceSpec]
    seen: list[type[Any]] = []
    while models:
        m = models.pop()
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            for t in (*getattr(f.annotation, "__args__", ()), f.annotation):
                if isinstance(t, type) and issubclass(t, KubeModel):
                    models.append(t)
    rules = [r for m in seen if issubclass(m, KubeModel) for r in m.x_rules]
    return rules + list(tj.OBJECT_RULES) + list(isvc.OBJECT_RULES)


def test_every_rule_has_a_mirror_and_a_fix() -> None:
    for rule in _all_rules():
        assert (rule.check is None) != (rule.transition is None), rule.cel
        assert ("oldSelf" in rule.cel) == (rule.transition is not None), rule.cel
        assert ":" in rule.message, f"message must say the fix after a colon: {rule.message}"
