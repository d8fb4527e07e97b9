"""Numerical equivalence: every parallel layout follows the single-process loss curve.

Same seed, same weights, same global batch per step on every layout; fp32 on CPU. What differs is only the
order of floating-point reductions (all-reduce / reduce-scatter sums, split matmuls), which moves the loss by
about 1e-6 over 20 steps. TOLERANCE is 100 x that: loose enough for reduction order, far tighter than any real
bug (a wrong gradient scale, a dropped micro-batch or a mis-sharded weight moves it by 1e-2 or more within a
few steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Run, run_local, tiny_llama

pytestmark = pytest.mark.integration
TOLERANCE = 1e-4
STEPS = 20

PP = {"microBatches": 2}  # pipelines need at least as many micro-batches as stages
LAYOUTS: list[tuple[str, int, dict[str, Any]]] = [
    ("dp2-fsdp", 2, {"data": 2}),
    ("dp2-ddp", 2, {"data": 2, "dataMode": "ddp"}),
    ("tp2", 2, {"tensor": 2}),
    ("pp2-gpipe", 2, {"pipeline": 2, "pipelineSchedule": "GPipe", **PP}),
    ("dp2-tp2", 4, {"data": 2, "tensor": 2}),
    ("dp2-pp2-1f1b", 4, {"data": 2, "pipeline": 2, **PP}),
    (
        "tp2-pp2-interleaved",  # 2 ranks x 2 stages each: 4 layers
        4,
        {"tensor": 2, "pipeline": 2, "pipelineSchedule": "Interleaved1F1B", "stagesPerRank": 2, **PP},
    ),
    (
        "dp2-pp2-zero-bubble",  # 2 ranks x 2 stages each under FSDP2: 4 layers
        4,
        {"data": 2, "pipeline": 2, "pipelineSchedule": "InterleavedZeroBubble", "stagesPerRank": 2, **PP},
    ),
    (
        "dp2-pp2-zbv",  # 2 ranks x 2 stages each in a V under FSDP2: rank 0 holds the first and last layer
        4,
        {"data": 2, "pipeline": 2, "pipelineSchedule": "ZBVZeroBubble", "stagesPerRank": 2, **PP},
    ),
    (
        "dp2-pp2-dualpipev",  # the same V; DualPipeV needs micro-batches >= stages: 4
        4,
        {"data": 2, "pipeline": 2, "pipelineSchedule": "DualPipeV", "stagesPerRank": 2, "microBatches": 4},
    ),
    (
        "tp2-pp2-dualpipev-sp",  # the V under tensor and sequence parallelism: rank 0's last stage ends in
        4,  # vocabulary-sharded logits (loss parallel) while its first stage takes the tokens
        {
            "tensor": 2,
            "pipeline": 2,
            "pipelineSchedule": "DualPipeV",
            "stagesPerRank": 2,
            "microBatches": 4,
            "sequenceParallel": True,
        },
    ),
    ("hsdp-2x2", 4, {"data": 4, "dataMode": "hsdp", "dataReplicate": 2}),
    ("dp2-tp2-pp2", 8, {"data": 2, "tensor": 2, "pipeline": 2, **PP}),
    ("tp2-sp", 2, {"tensor": 2, "sequenceParallel": True}),
    ("dp2-tp2-pp2-sp", 8, {"data": 2, "tensor": 2, "pipeline": 2, "sequenceParallel": True, **PP}),
]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """Single-process runs, one per model depth, made on first use."""
    return _Baselines(tmp_path_factory)


class _Baselines(dict[int, Run]):
    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, layers: int) -> Run:
        tmp = self.factory.mktemp(f"single{layers}")
        run = run_local(tmp, tiny_llama(tmp, layers=layers), 1, name="single")
        assert run.code == 0
        self[layers] = run
        return run


@pytest.mark.parametrize(("name", "nproc", "layout"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_follows_single_process_curve(
    baselines: dict[int, Run], tmp_path: Path, name: str, nproc: int, layout: dict[str, Any]
) -> None:
    layers = 4 if layout.get("stagesPerRank", 1) > 1 else 2
    baseline = baselines[layers]
    spec = tiny_llama(tmp_path, layers=layers, parallelism=layout)
    run = run_local(tmp_path, spec, nproc, name=name)
    assert run.code == 0
    start = run.events("start")[0]
    assert start["world_size"] == nproc
    assert ("(sequence parallel)" in start["layout"]) == bool(layout.get("sequenceParallel"))
    if layout.get("pipeline", 1) > 1:  # the layout line names the schedule and the stages a rank
        schedule = layout.get("pipelineSchedule", "1F1B")
        assert f"({schedule}, {layout.get('stagesPerRank', 1)} stages a rank)" in start["layout"]
    ref, got = baseline.losses(), run.losses()
    assert sorted(got) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 0.5, "the baseline must actually learn for the comparison to mean anything"
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst <= TOLERANCE, f"{name}: max |loss - single-process loss| = {worst:.3g} over {STEPS} steps"
