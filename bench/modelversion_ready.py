"""Benchmark: time from applying a ModelVersion to Ready, against a real MLflow and control plane.

    .venv/bin/python bench/modelversion_ready.py [--n 20] [--burst 200]

Needs KUBECONFIG (a running local control plane with the CRDs applied, e.g. `make cluster`) and an MLflow
server (KUBEFORGE_MLFLOW_TRACKING_URI, else `hack/mlflow.sh start` is used). Starts the operator as a
subprocess (`kopf run --standalone`, watching only the benchmark's namespace) unless --no-operator.

Measures, in the same run:
1. baseline: MLflow alone, MlflowClient.create_model_version + set_registered_model_alias (what the
   controller must at least do);
2. sequential: one ModelVersion at a time, create request sent -> Ready=True seen on a watch;
3. burst: --burst ModelVersions created at once (16 client threads) -> all Ready.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "kubeforge.io", "v1alpha1", "modelversions"


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def tracking_uri() -> str:
    uri = os.environ.get("KUBEFORGE_MLFLOW_TRACKING_URI")
    if uri:
        return uri
    out = subprocess.run(
        ["bash", str(ROOT / "hack/mlflow.sh"), "start"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def operator_entry() -> Path:
    probe = subprocess.run([sys.executable, "-c", "import controllers.app"], cwd=ROOT, capture_output=True)
    if probe.returncode == 0:
        return ROOT / "operator" / "main.py"
    # controllers.app not importable yet (a sibling controller missing): the ModelVersion-only entry
    return ROOT / "tests" / "integration" / "modelversion" / "operator_entry.py"


class ReadyWatch:
    """Records when each object of a namespace is first seen with Ready=True (a watch, not polling)."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.ready: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop:
            w = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for ev in w.stream(  # type: ignore[no-untyped-call]
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    timeout_seconds=60,
                ):
                    obj = ev["object"]
                    conds = (obj.get("status") or {}).get("conditions") or []
                    if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds):
                        name = obj["metadata"]["name"]
                        with self.cond:
                            self.ready.setdefault(name, time.perf_counter())
                            self.cond.notify_all()
                    if self._stop:
                        break
            except Exception:  # reconnect
                time.sleep(0.1)

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        with self.cond:
            while not all(n in self.ready for n in names):
                left = deadline - time.perf_counter()
                if left <= 0:
                    missing = [n for n in names if n not in self.ready]
                    raise TimeoutError(f"{len(missing)} not Ready after {timeout} s, e.g. {missing[:3]}")
                self.cond.wait(left)

    def stop(self) -> None:
        self._stop = True


def body(name: str, ns: str, model: str, alias: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": model, "source": {"uri": f"s3://bench/{name}"}}
    if alias:
        spec["aliases"] = [alias]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelVersion",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="sequential samples")
    ap.add_argument("--burst", type=int, default=200, help="ModelVersions created at once (0: skip)")
    ap.add_argument("--no-operator", action="store_true", help="an operator already runs")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from kubernetes import client, config
    from mlflow import MlflowClient

    uri = tracking_uri()
    config.load_kube_config()  # type: ignore[no-untyped-call]
    api = client.CustomObjectsApi()
    core = client.CoreV1Api()
    ns = f"bench-mv-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]

    # 1. baseline: MLflow alone
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    base_model = f"bench-raw-{uuid.uuid4().hex[:8]}"
    mlc.create_registered_model(base_model)
    raw: list[float] = []
    for i in range(args.n):
        t0 = time.perf_counter()
        v = mlc.create_model_version(
            base_model, f"s3://bench/raw-{i}", tags={"kubeforge.io/uid": str(i)}, await_creation_for=0
        )
        mlc.set_registered_model_alias(base_model, "champion", v.version)
        raw.append(time.perf_counter() - t0)

    op = None
    if not args.no_operator:
        env = {**os.environ, "KUBEFORGE_MLFLOW_TRACKING_URI": uri}
        log = open(ROOT / ".state" / "bench-operator.log", "ab")  # noqa: SIM115 - lives as long as the operator
        op = subprocess.Popen(
            [str(ROOT / ".venv/bin/kopf"), "run", "--standalone", "--namespace", ns, str(operator_entry())],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    watch = ReadyWatch(api, ns)
    try:
        # warm-up (operator start-up, first MLflow connection, registered model creation)
        model = f"bench-{uuid.uuid4().hex[:8]}"
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body("warmup", ns, model, None))
        watch.wait(["warmup"], 120)

        # 2. sequential
        seq: list[float] = []
        for i in range(args.n):
            name = f"seq-{i}"
            t0 = time.perf_counter()
            api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body(name, ns, model, f"a{i}"))
            watch.wait([name], 60)
            seq.append(watch.ready[name] - t0)

        # 3. burst
        burst_s = None
        if args.burst:
            bmodel = f"bench-burst-{uuid.uuid4().hex[:8]}"
            names = [f"burst-{i}" for i in range(args.burst)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(
                    pool.map(
                        lambda n: api.create_namespaced_custom_object(
                            GROUP, VERSION, ns, PLURAL, body(n, ns, bmodel, None)
                        ),
                        names,
                    )
                )
            created = time.perf_counter() - t0
            watch.wait(names, 600)
            burst_s = max(watch.ready[n] for n in names) - t0
    finally:
        watch.stop()
        # delete while the operator still runs (it holds the finalizers)
        core.delete_namespace(ns)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                core.read_namespace(ns)
            except client.ApiException:
                break
            time.sleep(0.5)
        if op is not None:
            op.terminate()
            op.wait(30)

    rows = [
        ("MLflow alone: create version + set alias", statistics.median(raw), pct(raw, 90), len(raw)),
        ("ModelVersion apply -> Ready (one at a time)", statistics.median(seq), pct(seq, 90), len(seq)),
    ]
    print(f"\n{'measurement':<46} {'median':>9} {'p90':>9} {'n':>5}")
    for label, med, p90, n in rows:
        print(f"{label:<46} {med * 1000:>7.0f}ms {p90 * 1000:>7.0f}ms {n:>5}")
    if burst_s is not None:
        print(
            f"{args.burst} ModelVersions created at once -> all Ready: {burst_s:.1f} s "
            f"({args.burst / burst_s:.1f}/s; creating them took {created:.1f} s)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "raw_median_s": statistics.median(raw),
                    "raw_p90_s": pct(raw, 90),
                    "ready_median_s": statistics.median(seq),
                    "ready_p90_s": pct(seq, 90),
                    "burst": args.burst,
                    "burst_all_ready_s": burst_s,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
