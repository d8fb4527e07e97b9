"""Learning-rate schedule, collective byte counting, checkpoint discovery, entry points, spec overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from crds.trainingjob import TrainingJobSpec
from runtime.training.checkpoint import complete_checkpoints
from runtime.training.job import lr_at
from runtime.training.metrics import collective_bytes
from runtime.training.protocol import EntryPointError, resolve_entrypoint
from runtime.training.spec import apply_overrides


def test_lr_warmup_then_cosine_to_a_tenth() -> None:
    s = TrainingJobSpec.model_validate(
        {"model": {"builtin": "mlp"}, "optimizer": {"steps": 100, "warmupSteps": 10, "learningRate": 1.0}}
    )
    assert lr_at(s, 5) == pytest.approx(0.5)
    assert lr_at(s, 10) == pytest.approx(1.0)
    assert lr_at(s, 100) == pytest.approx(0.1)
    assert lr_at(s, 20) > lr_at(s, 60) > lr_at(s, 90)


def test_collective_bytes_from_backend_events() -> None:
    trace = {
        "traceEvents": [
            {"name": "gloo:all_reduce", "args": {"Input type": ["c10::Half"], "Input Dims": [[1000]]}},
            {"name": "nccl:all_reduce", "args": {"Input type": ["float"], "Input Dims": [[10, 10]]}},
            {
                "name": "nccl:reduce_scatter",
                "args": {"Input type": ["c10::BFloat16"], "Input Dims": [[[8], [8]]]},
            },
            {"name": "c10d::allreduce_", "args": {"Input type": ["TensorList"], "Input Dims": [[[1000]]]}},
        ]
    }
    assert collective_bytes(trace) == {"all_reduce": 2000 + 400, "reduce_scatter": 32}


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        if complete:
            (d / ".metadata").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [5, 10]
    assert complete_checkpoints(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_colon", "must look like"),
        ("json:nothing_here", "has no attribute"),
        ("definitely_missing_pkg.mod:fn", "cannot be imported"),
        ("json:__doc__", "not a function"),
    ],
)
def test_entrypoint_errors(ref: str, message: str) -> None:
    with pytest.raises(EntryPointError, match=message):
        resolve_entrypoint(ref)


def test_overrides_parse_yaml_values() -> None:
    obj = apply_overrides(
        {"kind": "TrainingJob", "spec": {"optimizer": {"steps": 5}}},
        ["optimizer.steps=20", "parallelism.tensor=2", "compile=true"],
    )
    assert obj["spec"] == {"optimizer": {"steps": 20}, "parallelism": {"tensor": 2}, "compile": True}


def test_a_null_that_differs_from_its_default_reaches_the_workers_and_the_pods(tmp_path: Path) -> None:
    """optimizer.gradClipNorm: null turns clipping off (the default is 1.0): the spec file the launcher
    writes for its workers, and the one the operator mounts into pods, must keep that null."""
    from controllers.trainingjob import render
    from runtime.training.spec import load_spec, write_spec

    spec = TrainingJobSpec.model_validate({"model": {"builtin": "mlp"}, "optimizer": {"gradClipNorm": None}})
    assert spec.optimizer.grad_clip_norm is None
    write_spec(spec, tmp_path / "workers.json")
    assert load_spec(tmp_path / "workers.json") == spec
    owner = render.Owner(name="j", namespace="n", uid="u")
    cm = render.spec_config_map(owner, spec)
    (tmp_path / "pod.yaml").write_text(cm["data"]["trainingjob.yaml"])
    assert load_spec(tmp_path / "pod.yaml").optimizer.grad_clip_norm is None
    assert load_spec(tmp_path / "pod.yaml") == spec
