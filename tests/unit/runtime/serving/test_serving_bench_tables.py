"""bench/serve_bench.py's pure parts: wrk's report, the "x naive" cell, what a point's counters cover."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest


def _bench_module(name: str) -> Any:
    """bench/<name>.py, imported by its path (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[4] / "bench" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


serve_bench = _bench_module("serve_bench")

# wrk 4.2's report with --latency, for a server that answered some requests late and refused others
WRK = """Running 3s test @ http://127.0.0.1:8000/v2/models/m/infer
  4 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.06ms    2.10ms  15.97ms   71.20%
    Req/Sec     1.85k   120.00     2.10k    70.00%
  Latency Distribution
     50%    8.06ms
     75%    9.10ms
     90%   11.40ms
     99%    1.20s
  22113 requests in 3.00s, 5.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 5
  Non-2xx or 3xx responses: 7
Requests/sec:   7371.00
Transfer/sec:      1.70MB
"""


def test_wrk_report_gives_rate_percentiles_and_every_kind_of_error() -> None:
    r = serve_bench.parse_wrk(WRK)
    assert r["rps"] == 7371.0
    assert r["p50"] == pytest.approx(8.06)
    assert r["p99"] == pytest.approx(1200.0)  # seconds read as such
    assert r["errors"] == 7 + 2 + 5  # refusals, then read errors and timeouts


def test_wrk_report_without_errors_or_a_rate() -> None:
    clean = "\n".join(x for x in WRK.splitlines() if "errors" not in x and "Non-2xx" not in x)
    assert serve_bench.parse_wrk(clean)["errors"] == 0
    assert math.isnan(serve_bench.parse_wrk("unable to connect to 127.0.0.1:8000")["rps"])


def test_times_naive_is_a_lower_bound_when_the_naive_server_answered_nothing() -> None:
    assert serve_bench.times_naive(100.0, 5.0, 3) == "20.0"
    # nothing answered within 3 s: the naive server's rate was below 1/3 row/s, the ratio above 3x ours
    assert serve_bench.times_naive(11551.0, 0.0, 3) == "> 34,653"
    assert serve_bench.times_naive(11551.0, float("nan"), 3) == ""  # its load failed: no claim at all


def test_a_point_that_answered_nothing_has_no_latency() -> None:
    assert serve_bench.latency_cell({"rps": 0.0, "p50": 0.0}, "p50") == "none"
    assert serve_bench.latency_cell({"rps": 12.0, "p50": 54.734}, "p50") == "54.73"


def test_load_span_covers_the_generator_warm_up() -> None:
    # 3 s of window, grpcload's 0.5 s warm-up before it: the server counted 3.5 s worth of requests
    assert serve_bench.load_span(35_000, 10_000, 3) == (35_000, 3.5)
    assert serve_bench.load_span(0, 400.0, 3) == (1200.0, 3)  # no counted rows (the naive server): the window


def test_host_shares_compare_each_server_point_with_the_host_input_ceiling_at_its_batch() -> None:
    results = {
        ("kubeforge w8 REST binary", 1): {"rps": 700.0},
        ("kubeforge w8 REST binary", 64): {"rps": 12_000.0},
        ("naive FastAPI eager", 64): {"rps": 3.0},  # not a server point of ours
    }
    ceil = {
        1: {"rps": 2_000.0, "host_rps": 1_750.0},
        32: {"rps": 18_000.0, "host_rps": 15_000.0},  # concurrency 64 runs at the max batch, 32
    }
    line = serve_bench.host_shares(results, ceil, max_batch=32)
    assert "kubeforge w8 REST binary at 1: 40 %" in line
    assert "kubeforge w8 REST binary at 64: 80 %" in line
    assert "naive" not in line
    # on a CPU there is no host-input ceiling: no line at all
    assert serve_bench.host_shares(results, {1: {"rps": 2_000.0}, 32: {"rps": 9.0}}, max_batch=32) == ""


def test_the_grpc_load_generator_named_in_the_environment_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the lent GPU machine there is no Go to build bench/grpcload: every bench takes $GRPC_LOAD (the
    thirteenth session's busypoll_bench ignored it and refused to run there)."""
    tool = tmp_path / "grpcload"
    tool.write_bytes(b"")
    monkeypatch.setenv("GRPC_LOAD", str(tool))
    assert serve_bench.grpc_load_tool("") == str(tool)
    assert serve_bench.grpc_load_tool(str(tmp_path / "given")) is None  # named but missing: no other is taken
    monkeypatch.setenv("GRPC_LOAD", str(tmp_path / "missing"))
    assert serve_bench.grpc_load_tool("") is None


def test_the_grpc_load_generator_gets_the_threads_wrk_gets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both load generators share the host with the server: grpcload runs as many Go threads as wrk runs
    threads (GOMAXPROCS), at most one a request, unless $BENCH_GRPC_PROCS sets them (0: Go's own default)."""
    tool = tmp_path / "grpcload"  # answers as grpcload does, its rate the GOMAXPROCS it was given (-1: none)
    tool.write_text(
        '#!/bin/sh\necho "{\\"calls\\": 1, \\"rps\\": ${GOMAXPROCS:--1}, \\"p50_ms\\": 1, '
        '\\"p99_ms\\": 2, \\"errors\\": {}}"\n'
    )
    tool.chmod(0o755)
    monkeypatch.setenv("BENCH_WRK_THREADS", "4")
    monkeypatch.setenv("GOMAXPROCS", "16")  # the caller's own is not what the generator gets
    monkeypatch.delenv("BENCH_GRPC_PROCS", raising=False)

    def procs(c: int) -> float:
        return serve_bench._grpc_load(str(tool), "127.0.0.1:1", b"x", c, 1, tmp_path)["rps"]

    assert (procs(128), procs(2)) == (4, 2)
    monkeypatch.setenv("BENCH_GRPC_PROCS", "3")
    assert procs(128) == 3
    monkeypatch.setenv("BENCH_GRPC_PROCS", "0")
    monkeypatch.delenv("GOMAXPROCS")
    assert procs(128) == -1


def test_the_host_line_measures_this_host_and_names_each_figure() -> None:
    """Each bench table carries how fast the host was before and after its points (bench/hostspeed.py)."""
    h = _bench_module("hostspeed").measure()
    assert 1 < h.python_ns < 100_000 and 0.01 < h.copy_gbps < 10_000 and 0 < h.wakeup_us < 1_000_000
    assert h.cpus >= 1 and h.cpu_model
    line = h.line("before")
    assert line.startswith("host (before): Python ") and f"{h.copy_gbps:.1f} GB/s" in line
    assert f"{h.cpus:g} CPUs allowed" in line and "µs" in h.short()
