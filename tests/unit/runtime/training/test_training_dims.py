"""ParallelDims: layouts resolved on CPU, errors that name the field to change."""

from __future__ import annotations

from typing import Any

import pytest

from crds.trainingjob import TrainingJobSpec
from runtime.training.parallel.dims import LayoutError, resolve, validate_range


def spec(**par: Any) -> TrainingJobSpec:
    """A spec with these layout fields, set after validation: the runtime re-checks the layout at the world
    size it actually gets (elastic jobs, --nproc-per-node), whatever the spec was validated against."""
    batch = par.pop("batch", 16)
    extra = par.pop("extra", {})
    s = TrainingJobSpec.model_validate(
        {"model": {"builtin": "llama"}, "optimizer": {"globalBatchSize": batch}}
    )
    for key, value in {**par, **extra.get("parallelism", {})}.items():
        setattr(s.parallelism, _snake(key), value)
    for key, value in extra.items():
        if key != "parallelism":
            setattr(s, _snake(key), value)
    return s


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


@pytest.mark.parametrize(
    ("par", "world", "expect"),
    [
        ({}, 8, {"dp_shard": 8, "dp_replicate": 1, "tp": 1, "pp": 1}),
        ({"tensor": 2, "pipeline": 2, "microBatches": 2}, 8, {"dp_shard": 2, "tp": 2, "pp": 2}),
        ({"dataMode": "ddp", "data": 4}, 4, {"dp_replicate": 4, "dp_shard": 1}),
        ({"dataMode": "hsdp", "dataReplicate": 2}, 8, {"dp_replicate": 2, "dp_shard": 4}),
        (
            {"pipeline": 2, "pipelineSchedule": "Interleaved1F1B", "stagesPerRank": 2, "microBatches": 4},
            2,
            {"num_stages": 4, "dp": 1},
        ),
        (
            {"pipeline": 2, "pipelineSchedule": "ZBVZeroBubble", "stagesPerRank": 2, "microBatches": 2},
            4,
            {"num_stages": 4, "dp": 2},
        ),
    ],
)
def test_layouts(par: dict[str, Any], world: int, expect: dict[str, int]) -> None:
    dims = resolve(spec(**par), world)
    assert dims.world_size == world == dims.pp * dims.dp * dims.tp
    for key, value in expect.items():
        assert getattr(dims, key) == value, key
    assert dims.local_batch * dims.dp == 16


@pytest.mark.parametrize(
    ("par", "world", "field"),
    [
        ({"tensor": 3}, 8, "parallelism.tensor"),
        ({"data": 2}, 8, "set parallelism.data to 8 or to -1"),
        ({"dataMode": "hsdp", "dataReplicate": 3}, 8, "parallelism.dataReplicate"),
        ({"dataReplicate": 2}, 8, "dataMode hsdp only"),
        ({"dataMode": "ddp", "tensor": 2}, 8, "dataMode ddp cannot be combined"),
        ({"pipeline": 2}, 8, "parallelism.microBatches (1) must be at least parallelism.pipeline (2)"),
        ({"pipeline": 2, "pipelineSchedule": "Interleaved1F1B", "microBatches": 2}, 8, "stagesPerRank"),
        ({"stagesPerRank": 2}, 8, "stagesPerRank: 1"),
        (
            {"pipeline": 2, "pipelineSchedule": "ZBVZeroBubble", "stagesPerRank": 3, "microBatches": 2},
            8,
            "stagesPerRank: 2",
        ),
        (
            {"pipeline": 2, "pipelineSchedule": "DualPipeV", "stagesPerRank": 2, "microBatches": 2},
            8,
            "DualPipeV needs parallelism.microBatches (2) of at least 2 x parallelism.pipeline (4",
        ),
        ({"batch": 12}, 8, "optimizer.globalBatchSize (12)"),
        (
            {
                "dataMode": "fsdp",
                "extra": {
                    "gradientCompression": "powerSGD",
                    "parallelism": {"dataMode": "ddp"},
                    "precision": "bf16",
                },
            },
            8,
            "precision fp32",
        ),
    ],
)
def test_errors_name_the_field(par: dict[str, Any], world: int, field: str) -> None:
    with pytest.raises(LayoutError, match=None) as err:
        resolve(spec(**par), world)
    assert field in str(err.value)


def test_elastic_range_checks_every_world_size() -> None:
    s = spec(tensor=2, batch=8)
    assert [d.dp for d in validate_range(s, 1, 2, 4)] == [2, 4]
    with pytest.raises(LayoutError, match="inside the elastic range 1:3"):
        validate_range(s, 1, 3, 4)  # 3 nodes: dp 6 does not divide the global batch of 8


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stage_placement_covers_every_stage_once(pp: int) -> None:
    """Looped (rank r: r, r + pp) and V-shaped (rank r: r, 2 pp - 1 - r) placements each hold every stage
    once; in the V the first rank holds the first and the last stage."""
    from runtime.training.parallel.pipeline import stage_ids

    looped = [stage_ids(r, pp, 2, "Interleaved1F1B") for r in range(pp)]
    for schedule in ("ZBVZeroBubble", "DualPipeV"):
        v = [stage_ids(r, pp, 2, schedule) for r in range(pp)]
        assert sorted(i for ids in v for i in ids) == list(range(2 * pp))
        assert v[0] == [0, 2 * pp - 1] and v[-1] == [pp - 1, pp]
    assert sorted(i for ids in looped for i in ids) == list(range(2 * pp))
    assert looped[0] == [0, pp]


def test_a_schedule_this_torch_lacks_is_refused_naming_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """DualPipeV came with torch 2.9 (pyproject allows 2.6): on a torch without it the layout check says so
    before any worker starts, instead of a KeyError or None call inside the workers."""
    import torch

    from runtime.training.parallel import pipeline

    monkeypatch.setitem(pipeline.SCHEDULES, "DualPipeV", None)
    par = {"pipeline": 2, "pipelineSchedule": "DualPipeV", "stagesPerRank": 2, "microBatches": 4}
    with pytest.raises(LayoutError) as err:
        resolve(spec(**par), 4)
    assert f"pipelineSchedule DualPipeV is not in this torch ({torch.__version__})" in str(err.value)
    monkeypatch.undo()
    assert resolve(spec(**par), 4).schedule == "DualPipeV"
