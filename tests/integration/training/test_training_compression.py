"""Gradient compression, measured: the profiler's backend events (gloo:all_reduce, gloo:reduce_scatter ...)
record the dtype and shape of every tensor handed to the communication backend during the profiled steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_local

pytestmark = pytest.mark.integration


def mlp_spec(tmp: Path, mode: str, compression: str) -> dict[str, Any]:
    return {
        "model": {"builtin": "mlp", "preset": "tiny"},
        "data": {"builtin": "digits"},
        "optimizer": {"steps": 6, "globalBatchSize": 16},
        "parallelism": {"data": 2, "dataMode": mode},
        "gradientCompression": compression,
        "profiling": {"startStep": 4, "steps": 2},
        "checkpoint": {"intervalSteps": 100, "path": str(tmp / f"c-{mode}-{compression}")},
    }


def comm_bytes(tmp: Path, mode: str, compression: str) -> dict[str, int]:
    run = run_local(tmp, mlp_spec(tmp, mode, compression), 2, name=f"{mode}-{compression}")
    assert run.code == 0
    return json.loads((tmp / f"c-{mode}-{compression}" / "profile" / "collective_bytes.json").read_text())


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, int]]:
    tmp = tmp_path_factory.mktemp("none")
    return {mode: comm_bytes(tmp, mode, "none") for mode in ("ddp", "fsdp")}


@pytest.mark.parametrize(
    ("mode", "compression", "collective"),
    [("ddp", "fp16", "all_reduce"), ("ddp", "bf16", "all_reduce"), ("fsdp", "bf16", "reduce_scatter")],
)
def test_half_precision_compression_halves_gradient_bytes(
    uncompressed: dict[str, dict[str, int]], tmp_path: Path, mode: str, compression: str, collective: str
) -> None:
    base, got = uncompressed[mode], comm_bytes(tmp_path, mode, compression)
    if (
        collective not in base
    ):  # gloo has no native reduce-scatter: FSDP2 reduces gradients by all-reduce there
        collective = "all_reduce"
    ratio = got[collective] / base[collective]
    print(f"\n{mode} {compression}: {collective} {base[collective]} -> {got[collective]} bytes ({ratio:.3f})")
    assert 0.49 <= ratio <= 0.51
    if mode == "fsdp":  # parameters are still gathered in fp32: only the gradients are compressed
        assert got["all_gather"] == base["all_gather"]


def test_powersgd_sends_a_fraction_of_the_gradient(
    uncompressed: dict[str, dict[str, int]], tmp_path: Path
) -> None:
    base, got = uncompressed["ddp"], comm_bytes(tmp_path, "ddp", "powerSGD")
    ratio = got["all_reduce"] / base["all_reduce"]
    print(
        f"\nddp powerSGD rank 1: all_reduce {base['all_reduce']} -> {got['all_reduce']} bytes ({ratio:.3f})"
    )
    assert ratio < 0.1
