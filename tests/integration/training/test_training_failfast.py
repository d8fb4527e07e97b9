"""Bad layouts and bad entry points fail fast with a message naming what to change; a good user entry point
trains through the documented protocol."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_local, tiny_llama, write_job

from runtime.training import cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("nproc", "spec_changes", "expected"),
    [
        (4, {"parallelism": {"tensor": 3}}, "parallelism.tensor"),
        (4, {"parallelism": {"pipeline": 2, "microBatches": 1}}, "microBatches"),
        (2, {"parallelism": {"tensor": 2, "dataMode": "ddp"}}, "dataMode ddp"),
        (
            2,
            {"model": {"builtin": "llama", "options": {"heads": 3, "dim": 48}}, "parallelism": {"tensor": 2}},
            "parallelism.tensor",
        ),
        (
            2,
            {"model": {"builtin": "cnn"}, "data": {"builtin": "digits"}, "parallelism": {"tensor": 2}},
            "tensor: 1",
        ),
        (2, {"parallelism": {"sequenceParallel": True}}, "set parallelism.tensor to 2 or more"),
        (
            2,
            {
                "parallelism": {
                    "pipeline": 2,
                    "pipelineSchedule": "InterleavedZeroBubble",
                    "stagesPerRank": 2,
                    "microBatches": 2,
                },
                "model": {"builtin": "llama", "options": {"dim": 32, "layers": 4, "heads": 4}},
                "compile": True,
            },
            "which torch.compile'd blocks cannot do: set compile: false",
        ),
        (
            2,
            {"parallelism": {"tensor": 2, "sequenceParallel": True}, "data": {"sequenceLength": 15}},
            "data.sequenceLength (15) over parallelism.tensor (2)",
        ),
        (2, {"model": {"entrypoint": "no_such_package.mod:make"}}, "no_such_package.mod"),
        (2, {"model": {"entrypoint": "training_entrypoints:missing"}}, "no attribute 'missing'"),
        (2, {"model": {"entrypoint": "training_entrypoints:NOT_CALLABLE"}}, "not a function"),
    ],
)
def test_rejected_before_any_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nproc: int, spec_changes: dict, expected: str
) -> None:
    spec = tiny_llama(tmp_path, **spec_changes)
    if "entrypoint" in spec["model"]:
        spec["model"] = {"entrypoint": spec["model"]["entrypoint"]}
    t0 = time.monotonic()
    code = cli.main([str(write_job(tmp_path / "bad.yaml", spec)), "--local", "--nproc-per-node", str(nproc)])
    assert code == cli.EXIT_USER_ERROR
    assert time.monotonic() - t0 < 5
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entrypoint", "parallelism"),
    [
        ("regression_task", {}),
        ("meta_regression_task", {}),  # FSDP2 shards on meta, then each rank fills its own
        ("meta_regression_task", {"dataMode": "ddp"}),  # filled before DDP broadcasts rank 0's weights
    ],
)
def test_user_entrypoint_trains(tmp_path: Path, entrypoint: str, parallelism: dict) -> None:
    spec = {
        "model": {"entrypoint": f"training_entrypoints:{entrypoint}"},
        "optimizer": {"steps": 30, "globalBatchSize": 32, "learningRate": 0.3},
        "parallelism": parallelism,
        "checkpoint": {"intervalSteps": 100, "path": str(tmp_path / "c")},
    }
    run = run_local(tmp_path, spec, 2, name="user")
    assert run.code == 0 and run.progress["state"] == "succeeded"
    losses = run.losses()
    assert losses[30] < losses[1] / 10


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        ("wrong_type", "must return runtime.training.protocol.TrainTask"),
        ("meta_without_init", "TrainTask.init_weights must be set"),
    ],
)
def test_a_bad_entrypoint_task_fails_fast(tmp_path: Path, entrypoint: str, expected: str) -> None:
    spec = {
        "model": {"entrypoint": f"training_entrypoints:{entrypoint}"},
        "checkpoint": {"path": str(tmp_path / "c")},
    }
    t0 = time.monotonic()  # restarts still happen (the agent restarts any failure) but each fails at once
    run = run_local(tmp_path, spec, 2, "--max-restarts", "1", name="wrong")
    assert run.code == cli.EXIT_USER_ERROR
    assert time.monotonic() - t0 < 60
    assert run.progress["state"] == "failed"
    assert expected in run.progress["message"]
