"""Helpers of the ModelVersion integration tests: the operator as a subprocess, a TCP proxy to cut MLflow off,
object and event polling."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.cluster import Cluster, wait_for
from tests.fixtures.mlflow import MlflowServer

ROOT = Path(__file__).resolve().parents[3]
ENTRY = Path(__file__).with_name("operator_entry.py")
LOGS = ROOT / ".state" / "test-logs"
DRIFT = "2"  # seconds between drift checks in tests


class Operator:
    """`kopf run --standalone` of the operator, restricted to namespaces `<prefix>-*`."""

    def __init__(self, name: str, prefix: str, env: dict[str, str]) -> None:
        self.name, self.prefix, self.env = name, prefix, env
        self.proc: subprocess.Popen[bytes] | None = None
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"operator-{name}.log"

    def start(self, **extra_env: str) -> None:
        env = {**os.environ, **self.env, **extra_env}
        kopf = ROOT / ".venv" / "bin" / "kopf"
        cmd = [str(kopf), "run", "--standalone", "--namespace", f"{self.prefix}-*", str(ENTRY)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Proxy:
    """A TCP forwarder in front of MLflow; `cut()` closes it (connection refused), `restore()` reopens it."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port.rstrip("/")))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
            self._server.close()
            self._server = None
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def operator_env(cluster: Cluster, tracking_uri: str) -> dict[str, str]:
    return {
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBEFORGE_MLFLOW_TRACKING_URI": tracking_uri,
        "KUBEFORGE_DRIFT_INTERVAL": DRIFT,
        "KUBEFORGE_MODELVERSION_MAX_BACKOFF": "2",
        "KUBEFORGE_MODELVERSION_SERVED_RECHECK": "1",
        "KUBEFORGE_MLFLOW_TIMEOUT": "5",
        "KUBEFORGE_FAULT": "",
    }


def make_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    return name


# --- helpers --------------------------------------------------------------------------------------------
def unique_model() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


def modelversion(name: str, ns: str, model: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"modelName": model, "source": source, **spec},
    }


def get_mv(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    p = cluster.kubectl("get", "modelversion", name, "-n", ns, "-o", "yaml", check=False)
    return yaml.safe_load(p.stdout) if p.returncode == 0 else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def wait_condition(
    cluster: Cluster,
    ns: str,
    name: str,
    type_: str,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get_mv(cluster, ns, name)
        c = condition(obj, type_)
        if c.get("status") == status and (reason is None or c.get("reason") == reason):
            return obj
        return None

    try:
        out: dict[str, Any] = wait_for(f"{ns}/{name} {type_}={status} {reason or ''}", check, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\nobject: {yaml.safe_dump(get_mv(cluster, ns, name))}") from None
    return out


def events(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "yaml"
    ).stdout
    return list((yaml.safe_load(out) or {}).get("items") or [])


def wait_event(cluster: Cluster, ns: str, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        f"event {reason} on {ns}/{name}",
        lambda: next((e for e in events(cluster, ns, name) if e.get("reason") == reason), None),
        timeout,
    )
    return found


def versions_with_uid(client: Any, model: str, uid: str) -> list[Any]:
    return list(client.search_model_versions(f"name = '{model}' and tags.`kubeforge.io/uid` = '{uid}'"))


def make_run(server: MlflowServer) -> str:
    """An MLflow run with a small logged 'model' (an MLmodel file with a signature)."""
    client = server.client()
    exp = client.get_experiment_by_name("kubeforge-it")
    exp_id = exp.experiment_id if exp else client.create_experiment("kubeforge-it")
    run = client.create_run(exp_id)
    mlmodel = {
        "artifact_path": "model",
        "flavors": {"python_function": {"loader_module": "kubeforge.test"}},
        "signature": {
            "inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]',
            "outputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1]}}]',
        },
    }
    d = LOGS / f"model-{run.info.run_id}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    client.log_artifacts(run.info.run_id, str(d), "model")
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)
