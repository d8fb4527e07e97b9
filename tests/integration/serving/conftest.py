"""Serving integration fixtures: an MLflow registry on SQLite (no server) holding small models, and
`kubeforge-serve` processes on 127.0.0.1 with ports picked by the OS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
WIDE = 16384  # features of Registry.wide: 64 KiB rows, what protocol workers receive into shared memory


@dataclass
class Registry:
    env: dict[str, str]
    mlp: torch.nn.Module  # the weights registered as models:/mlp (version 1, alias champion)
    slow_path: Path  # a local MLflow model (pickle format) of examples.Sleepy
    root: Path
    wide: torch.nn.Module  # an MLP taking 64 KiB rows (16,384 floats): bodies that go through workers' slots
    wide_path: Path  # its local MLflow model


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from runtime.serving.examples import MLP, Sleepy, log_and_register

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("serving-tests", artifact_location=str(root / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    torch.manual_seed(0)
    mlp = MLP().eval()
    log_and_register(mlp, torch.randn(2, 16), "mlp", alias="champion")  # MLflow's default pt2 format
    slow = root / "slow"
    x = torch.ones(1, 4)
    mlflow.pytorch.save_model(
        Sleepy(0.4),
        str(slow),
        serialization_format="pickle",
        signature=infer_signature(x.numpy(), (x * 2).numpy()),
    )
    wide = MLP(d_in=WIDE, hidden=8).eval()
    wide_path = root / "wide"
    xw = torch.randn(1, WIDE)
    with torch.no_grad():
        mlflow.pytorch.save_model(
            wide,
            str(wide_path),
            serialization_format="pickle",
            signature=infer_signature(xw.numpy(), wide(xw).numpy()),
        )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PYTHONUNBUFFERED": "1"}
    yield Registry(env, mlp, slow, root, wide, wide_path)
    for k, v in zip(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"), old, strict=True):
        if v is None:
            os.environ.pop(k, None)


@dataclass
class Serve:
    """One `kubeforge-serve serve` process; its JSON log lines are collected in `logs`."""

    proc: subprocess.Popen[str]
    logs: list[dict[str, Any]] = field(default_factory=list)
    http_port: int = 0
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self, msg: str) -> dict[str, Any] | None:
        return next((entry for entry in self.logs if entry.get("msg") == msg), None)

    def wait_log(self, msg: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.log(msg)
            if entry is not None:
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"kubeforge-serve exited ({self.proc.returncode}): {self.logs[-5:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {msg!r} log line in {timeout} s: {self.logs[-5:]}")

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        ready = self.wait_log("ready", timeout)
        assert httpx.get(f"{self.url}/v2/health/ready").status_code == 200
        return ready

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def grpc_health(target: str, service: str = "") -> str:
    """The standard gRPC health protocol's Check (what Kubernetes' `grpc` probes call), with grpcio and the
    messages written out by hand (grpc.health.v1: HealthCheckRequest {string service = 1}, HealthCheckResponse
    {ServingStatus status = 1}): "SERVING", "NOT_SERVING", or the call's error status."""
    import grpc

    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if name else b""
    with grpc.insecure_channel(target) as ch:
        try:
            reply = ch.unary_unary("/grpc.health.v1.Health/Check")(request, timeout=10)
        except grpc.RpcError as e:
            return str(e.code())  # type: ignore[attr-defined]
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}.get(reply, repr(reply))


def metric_sum(text: str, prefix: str) -> float:
    """The sum of the Prometheus samples in `text` (a /metrics page) whose line starts with `prefix`: a
    name and "{", or a name and the first of its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def start_serve(env: dict[str, str], *args: str, command: str = "serve") -> Serve:
    cmd = [sys.executable, "-m", "runtime.serving.cli", command, *args]
    if command == "serve":
        cmd += ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    s = Serve(proc)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"msg": "raw", "line": line.rstrip()}
            s.logs.append(entry)
            if entry.get("msg") == "listening":
                s.http_port, s.grpc_port = entry["http_port"], entry["grpc_port"]

    threading.Thread(target=pump, daemon=True).start()
    if command == "serve":
        s.wait_log("listening", 120)
    return s


def start_mlp(registry: Registry, workers: str, *extra: str) -> Serve:
    """models:/mlp@champion, eager on CPU, with `workers` protocol workers and the `extra` flags."""
    return start_serve(
        registry.env, "--workers", workers, "--model-uri", "models:/mlp@champion", "--mode", "eager", *extra
    )


@pytest.fixture(scope="session", params=["0", "2"], ids=["one-process", "2-workers"])
def mlp_server(registry: Registry, request: pytest.FixtureRequest) -> Iterator[Serve]:
    """models:/mlp@champion, eager on CPU, small payload limit, batching with a 20 ms window; served by the
    model process's own event loop, and by two protocol worker processes (shared memory to the model)."""
    s = start_mlp(
        registry,
        request.param,
        "--max-batch-size",
        "8",
        "--max-delay-ms",
        "20",
        "--max-payload-mb",
        "0.25",
    )
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def wide_server(registry: Registry) -> Iterator[Serve]:
    """Registry.wide, eager on CPU, served by two protocol worker processes: its requests' bodies are
    received into the workers' shared-memory slots, and the slot an answer gives back is the next one lent."""
    s = start_wide(registry)
    yield s
    s.stop()


def start_wide(registry: Registry, *extra: str) -> Serve:
    """Registry.wide, eager on CPU, two protocol workers, max batch 8: started and ready."""
    s = start_serve(
        registry.env,
        *("--workers", "2", "--model-uri", str(registry.wide_path), "--model-name", "wide"),
        *("--mode", "eager", "--max-batch-size", "8", "--max-delay-ms", "2", *extra),
    )
    s.wait_ready()
    return s
