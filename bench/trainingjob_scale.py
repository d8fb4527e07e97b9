"""Benchmark: many TrainingJobs submitted at once to the local control plane.

    .venv/bin/python bench/trainingjob_scale.py [--jobs 1000] [--namespaces 10] [--kubeconfig PATH] [--keep]

Without --kubeconfig it starts (or reuses) a PRIVATE local control plane with hack/cluster.sh
(KUBEFORGE_CLUSTER_DIR=.state/bench-cluster, KUBEFORGE_PORT_BASE=17440, so the shared cluster is left alone)
and stops it at the end unless --keep. The CRDs are applied, the operator runs as a subprocess
(`kubeforge-operator --standalone`), and its RSS (with children) is sampled every 0.2 s.

Measures, in the same run:
1. baseline: the API server alone creating the same objects (a ConfigMap and an Indexed Job per job, the
   shared Service and trainer identity per namespace, rendered by controllers/trainingjob/render.py; Jobs
   suspended so no pods follow) with server-side apply from --workers threads, the operator's worker count;
2. the operator: --jobs TrainingJobs created at once (--submitters client threads) spread over --namespaces
   namespaces, observed through watch streams (or, with --observe poll, lists every --poll seconds) until
   every job has its Job and ConfigMap and a status.phase of Pending or Running. Per-job latency: create
   response -> first check seeing both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GROUP, VERSION, PLURAL = "kubeforge.io", "v1alpha1", "trainingjobs"
LABEL = "kubeforge.io/training-job"
CLUSTER_ENV = {
    "KUBEFORGE_CLUSTER_DIR": str(ROOT / ".state" / "bench-cluster"),
    "KUBEFORGE_PORT_BASE": "17440",
}
OK_PHASES = ("Pending", "Running")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cluster_sh(cmd: str) -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "cluster.sh"), cmd],
        env={**os.environ, **CLUSTER_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def kubectl_bin() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-control-plane.sh")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1]) / "kubectl"


def trainingjob(name: str, namespace: str) -> dict[str, Any]:
    """The body of tests/integration/trainingjob's `trainingjob()` helper, one node, a small CPU request."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "ghcr.io/kubeforge/runtime:test",
            "model": {"builtin": "mlp"},
            "nodes": {"count": 1},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        },
    }


class Api:
    """Thin raw access: custom-object creates, metadata-only and full lists served from the watch cache."""

    def __init__(self, pool: int) -> None:
        from kubernetes import client, config

        config.load_kube_config()  # type: ignore[no-untyped-call]
        cfg = client.Configuration.get_default_copy()
        cfg.connection_pool_maxsize = pool
        self.client = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self.client)
        self.core = client.CoreV1Api(self.client)

    def get(self, url: str, query: list[tuple[str, Any]], accept: str = "application/json") -> Any:
        m, full, hdrs, body, post = self.client.param_serialize(
            method="GET",
            resource_path=url,
            query_params=query,
            header_params={"Accept": accept},
            auth_settings=["BearerToken"],
        )
        resp = self.client.call_api(m, full, header_params=hdrs, body=body, post_params=post)
        return json.loads(resp.read())  # type: ignore[no-untyped-call]

    def names(self, url: str) -> set[tuple[str, str]]:
        """(namespace, name) of every object at `url` with the training-job label, metadata only."""
        out = self.get(
            url,
            [("labelSelector", LABEL), ("resourceVersion", "0")],
            accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        return {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in out.get("items") or []}

    def phases(self) -> dict[tuple[str, str], str | None]:
        out = self.get(f"/apis/{GROUP}/{VERSION}/{PLURAL}", [("resourceVersion", "0")])
        return {
            (i["metadata"]["namespace"], i["metadata"]["name"]): (i.get("status") or {}).get("phase")
            for i in out.get("items") or []
        }

    def pod_phases(self) -> dict[str, int]:
        out = self.get("/api/v1/pods", [("labelSelector", LABEL), ("resourceVersion", "0")])
        counts: dict[str, int] = {}
        for p in out.get("items") or []:
            ph = (p.get("status") or {}).get("phase", "?")
            counts[ph] = counts.get(ph, 0) + 1
        return counts

    def request_counts(self) -> dict[str, float]:
        """apiserver_request_total by verb and resource[/subresource] (writes and lists; watches left out)."""
        m, full, hdrs, body, post = self.client.param_serialize(
            method="GET",
            resource_path="/metrics",
            header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"],
        )
        text = self.client.call_api(m, full, header_params=hdrs, body=body, post_params=post).read().decode()  # type: ignore[no-untyped-call]
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            if not labels.get("resource") or labels.get("verb") in ("WATCH", "CONNECT"):
                continue
            sub = f"/{labels['subresource']}" if labels.get("subresource") else ""
            key = f"{labels['verb']} {labels['resource']}{sub}"
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    def create_namespaces(self, names: Iterable[str]) -> None:
        for n in names:
            self.core.create_namespace({"metadata": {"name": n, "labels": {"kubeforge.io/bench": "tj"}}})  # type: ignore[arg-type]

    def delete_namespaces(self, names: list[str], timeout: float) -> float:
        from kubernetes.client import ApiException

        t0 = time.perf_counter()
        for n in names:
            try:
                self.core.delete_namespace(n)
            except ApiException as e:
                if e.status != 404:
                    raise
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            left = {str(i.metadata.name) for i in self.core.list_namespace().items if i.metadata} & set(names)
            if not left:
                return time.perf_counter() - t0
            time.sleep(1.0)
        log(f"namespaces still terminating after {timeout:.0f} s: {sorted(left)[:3]}...")
        return time.perf_counter() - t0


class Watch:
    """What one watch stream shows: (namespace, name) -> status.phase (None for metadata-only streams).

    The observer must not be a load of its own: a list of 1,000 objects every round (managedFields and all)
    costs the API server and this process far more than streaming each change once.
    """

    def __init__(
        self, api: Api, url: str, *, metadata_only: bool, labelled: bool = True, suffix: str = ""
    ) -> None:
        self.api, self.url, self.metadata_only, self.suffix = api, url, metadata_only, suffix
        self.selector = [("labelSelector", LABEL)] if labelled else []
        self.seen: dict[tuple[str, str], str | None] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        accept = (
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
            if self.metadata_only
            else "application/json"
        )
        rv = "0"
        try:
            while True:
                m, full, hdrs, body, post = self.api.client.param_serialize(
                    method="GET",
                    resource_path=self.url,
                    query_params=[
                        ("watch", "true"),
                        *self.selector,
                        ("resourceVersion", rv),
                        ("timeoutSeconds", 900),
                    ],
                    header_params={"Accept": accept},
                    auth_settings=["BearerToken"],
                )
                resp = self.api.client.call_api(
                    m, full, header_params=hdrs, body=body, post_params=post, _request_timeout=None
                )
                buf = b""
                for chunk in resp.response.stream(65536, decode_content=False):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            rv = self._event(json.loads(line)) or rv
        except BaseException as e:  # reported by the main thread (snapshot)
            self.error = e

    def _event(self, ev: dict[str, Any]) -> str | None:
        obj = ev.get("object") or {}
        meta = obj.get("metadata") or {}
        if ev.get("type") == "ERROR" or "name" not in meta:
            raise RuntimeError(f"watch {self.url}: {ev}")
        name = str(meta["name"])
        if self.suffix:
            if not name.endswith(self.suffix):
                return str(meta.get("resourceVersion") or "")
            name = name[: -len(self.suffix)]
        key = (str(meta["namespace"]), name)
        with self.lock:
            if ev["type"] == "DELETED":
                self.seen.pop(key, None)
            elif ev["type"] in ("ADDED", "MODIFIED"):
                self.seen[key] = (obj.get("status") or {}).get("phase")
        return str(meta.get("resourceVersion") or "")

    def snapshot(self) -> dict[tuple[str, str], str | None]:
        if self.error is not None:
            raise RuntimeError(f"watch {self.url} failed: {self.error}")
        with self.lock:
            return dict(self.seen)


def run_pool(fn: Callable[[Any], Any], items: list[Any], threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(fn, i) for i in items]:
            f.result()


def baseline(api: Api, n: int, namespaces: int, workers: int) -> tuple[float, int]:
    """Seconds the API server alone takes to server-side-apply what the operator creates, and how many."""
    from controllers.kube import Kube
    from controllers.trainingjob import render
    from crds.trainingjob import TrainingJobSpec

    nss = [f"bench-base-{i}" for i in range(namespaces)]
    api.create_namespaces(nss)
    cfg = render.RenderConfig(default_image="ghcr.io/kubeforge/runtime:test")
    objs: list[dict[str, Any]] = [o for ns in nss for o in render.namespace_objects(ns)]
    for i in range(n):
        ns = nss[i % namespaces]
        body = trainingjob(f"tj-{i:04d}", ns)
        spec = TrainingJobSpec.model_validate(body["spec"])
        owner = render.Owner(name=body["metadata"]["name"], namespace=ns, uid=str(uuid.uuid4()))
        for child in render.render(owner, spec, cfg, 1, creating=True):
            del child["metadata"][
                "ownerReferences"
            ]  # no owner exists: the garbage collector would delete them
            if child["kind"] == "Job":
                child["spec"]["suspend"] = True  # the API server alone: no pods
            objs.append(child)
    kube = Kube(api.client)
    t0 = time.perf_counter()
    run_pool(kube.apply, objs, workers)
    took = time.perf_counter() - t0
    log(f"baseline: {len(objs)} objects applied in {took:.1f} s; deleting the baseline namespaces")
    api.delete_namespaces(nss, 300)
    return took, len(objs)


class Sampler:
    """Peak RSS (process + children) of the operator every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu(self) -> float:
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.rss()
            except psutil.Error:
                return
            self.peak = max(self.peak, r)
            self.samples.append((time.perf_counter(), r))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)


def control_plane(kubeconfig: str) -> dict[str, psutil.Process]:
    """The processes of a hack/cluster.sh cluster (its pids/ folder beside the kubeconfig), if any."""
    procs: dict[str, psutil.Process] = {}
    for f in sorted((Path(kubeconfig).parent / "pids").glob("*")):
        with contextlib.suppress(ValueError, OSError, psutil.Error):
            procs[f.name] = psutil.Process(int(f.read_text().strip()))
    return procs


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, p in procs.items():
        try:
            t = p.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def start_operator(liveness_port: int, command: str | None) -> subprocess.Popen[bytes]:
    logf = open(ROOT / ".state" / "bench-trainingjob-operator.log", "wb")  # noqa: SIM115 - lives with the operator
    op = subprocess.Popen(
        [
            *(shlex.split(command) if command else [str(ROOT / ".venv" / "bin" / "kubeforge-operator")]),
            "--standalone",
            "--liveness",
            f"http://127.0.0.1:{liveness_port}/healthz",
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if op.poll() is not None:
            raise RuntimeError("the operator exited early; see .state/bench-trainingjob-operator.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return op
        except OSError:
            time.sleep(0.2)
    op.terminate()
    raise RuntimeError("the operator was not healthy after 90 s")


def stop_operator(op: subprocess.Popen[bytes]) -> None:
    if op.poll() is None:
        op.terminate()
        try:
            op.wait(30)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--kubeconfig", help="use this cluster instead of starting the private one")
    ap.add_argument("--keep", action="store_true", help="leave the private cluster up")
    ap.add_argument("--submitters", type=int, default=32, help="client threads creating TrainingJobs")
    ap.add_argument("--workers", type=int, default=16, help="threads of the baseline (the operator's)")
    ap.add_argument(
        "--observe",
        choices=("watch", "poll"),
        default="watch",
        help="how the benchmark sees progress: three watch streams, or (the older way, a load of its own) "
        "three lists every --poll seconds",
    )
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between checks (and list rounds)")
    ap.add_argument("--settle", type=float, default=10.0, help="RSS sampled this long after all status")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--liveness-port", type=int, default=17480)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--operator-cmd", help="run this instead of kubeforge-operator (e.g. under a profiler)")
    args = ap.parse_args()

    started_cluster = False
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    else:
        out = cluster_sh("up")
        os.environ["KUBECONFIG"] = out.strip().splitlines()[-1].split("=", 1)[1]
        started_cluster = True
    kubectl = kubectl_bin()
    crds = sorted(str(p) for p in (ROOT / "crds").glob("*.yaml"))
    subprocess.run(
        [str(kubectl), "apply", "--server-side", "--force-conflicts", *[a for f in crds for a in ("-f", f)]],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(kubectl), "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
        check=True,
        capture_output=True,
    )
    api = Api(pool=max(args.submitters, args.workers) + 4)

    base_s, base_n = None, 0
    if not args.no_baseline:
        base_s, base_n = baseline(api, args.jobs, args.namespaces, args.workers)

    nss = [f"bench-tj-{i}" for i in range(args.namespaces)]
    api.create_namespaces(nss)
    op = start_operator(args.liveness_port, args.operator_cmd)
    sampler = Sampler(op.pid)
    try:
        time.sleep(2.0)  # let the watches start
        rss_idle = sampler.rss()
        cpu0 = sampler.cpu()
        keys = [(nss[i % args.namespaces], f"tj-{i:04d}") for i in range(args.jobs)]
        created: dict[tuple[str, str], float] = {}

        def create(key: tuple[str, str]) -> None:
            api.custom.create_namespaced_custom_object(
                GROUP, VERSION, key[0], PLURAL, trainingjob(key[1], key[0])
            )
            created[key] = time.perf_counter()

        watches: list[Watch] = []
        if args.observe == "watch":
            watches = [
                Watch(api, "/apis/batch/v1/jobs", metadata_only=True),
                Watch(api, "/api/v1/configmaps", metadata_only=True, suffix="-spec"),
                Watch(api, f"/apis/{GROUP}/{VERSION}/{PLURAL}", metadata_only=False, labelled=False),
            ]
            time.sleep(1.0)
        log(
            f"submitting {args.jobs} TrainingJobs over {args.namespaces} namespaces ({args.observe} observer)"
        )
        load_before = os.getloadavg()[0]
        cp = control_plane(os.environ["KUBECONFIG"])
        cp0, busy0 = cpu_seconds(cp), machine_busy()
        req0 = api.request_counts()
        t0 = time.perf_counter()
        run_pool(create, keys, args.submitters)
        submit_s = time.perf_counter() - t0
        log(f"submitted in {submit_s:.1f} s")

        want = set(keys)
        children_at: float | None = None
        status_at: float | None = None
        done: dict[tuple[str, str], float] = {}
        rounds = 0
        while status_at is None:
            if time.perf_counter() - t0 > args.timeout:
                raise TimeoutError(f"{len(want) - len(done)} jobs not done after {args.timeout:.0f} s")
            r0 = time.perf_counter()
            if watches:
                jobs, cms = (set(w.snapshot()) for w in watches[:2])
                phases = watches[2].snapshot()
            else:
                jobs = api.names("/apis/batch/v1/jobs")
                cms = {
                    (ns, n[: -len("-spec")])
                    for ns, n in api.names("/api/v1/configmaps")
                    if n.endswith("-spec")
                }
                phases = api.phases()
            now = time.perf_counter()
            rounds += 1
            with_children = want & jobs & cms
            if children_at is None and len(with_children) == len(want):
                children_at = now - t0
            for k in with_children:
                if k not in done and phases.get(k) in OK_PHASES:
                    done[k] = now
            if len(done) == len(want):
                status_at = now - t0
                break
            if rounds % max(1, round(5 / args.poll)) == 0:
                log(f"{now - t0:5.1f} s: {len(with_children)} with children, {len(done)} done")
            time.sleep(max(0.0, args.poll - (now - r0)))
        cpu_s = sampler.cpu() - cpu0
        cp1, busy1 = cpu_seconds(cp), machine_busy()
        cp_cpu = {k: cp1[k] - cp0[k] for k in cp1 if k in cp0}
        busy_s = busy1 - busy0
        req1 = api.request_counts()
        requests = {k: v - req0.get(k, 0.0) for k, v in req1.items() if v - req0.get(k, 0.0) > 0}
        load_after = os.getloadavg()[0]
        log(f"all {len(want)} done at {status_at:.1f} s; sampling RSS {args.settle:.0f} s more")
        peak_run = sampler.peak
        time.sleep(args.settle)
        phase_counts: dict[str, int] = {}
        for ph in api.phases().values():
            phase_counts[str(ph)] = phase_counts.get(str(ph), 0) + 1
        pods = api.pod_phases()
        lat = [done[k] - created[k] for k in keys]
    finally:
        sampler.stop()
        if not (started_cluster and not args.keep):  # a private cluster is thrown away whole, faster
            log("deleting the benchmark namespaces (operator still running: it holds the timers' finalizers)")
            cleanup_s = api.delete_namespaces(nss, 600)
            log(f"namespaces gone in {cleanup_s:.0f} s")
        stop_operator(op)
        if started_cluster and not args.keep:
            cluster_sh("down")

    assert children_at is not None and status_at is not None
    mib = 1024 * 1024
    rows: list[tuple[str, str]] = [
        ("TrainingJobs", f"{args.jobs} over {args.namespaces} namespaces"),
        (
            "observer",
            "watch streams" if args.observe == "watch" else f"lists every {args.poll} s ({rounds} rounds)",
        ),
        (f"submit (create requests, {args.submitters} threads)", f"{submit_s:.1f} s"),
        ("time to all children (Job + spec ConfigMap)", f"{children_at:.1f} s"),
        ("time to all status Pending/Running", f"{status_at:.1f} s"),
        ("per-job create -> children + status, p50", f"{statistics.median(lat):.1f} s"),
        ("per-job create -> children + status, p99", f"{pct(lat, 99):.1f} s"),
        ("operator RSS idle (before submit)", f"{rss_idle / mib:.0f} MiB"),
        ("operator peak RSS (to all status)", f"{peak_run / mib:.0f} MiB"),
        (f"operator peak RSS (incl. {args.settle:.0f} s after)", f"{sampler.peak / mib:.0f} MiB"),
        ("operator CPU seconds (submit -> all status)", f"{cpu_s:.1f} s ({cpu_s / status_at:.2f} cores)"),
        (
            "control plane CPU seconds (submit -> all status)",
            ", ".join(f"{k} {v:.1f}" for k, v in sorted(cp_cpu.items(), key=lambda kv: -kv[1])) or "n/a",
        ),
        (
            f"machine CPU busy (submit -> all status, {psutil.cpu_count()} cores)",
            f"{busy_s:.1f} of {status_at * (psutil.cpu_count() or 1):.1f} core-seconds",
        ),
        (
            "API requests served (submit -> all status), largest",
            f"{sum(requests.values()):.0f}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(requests.items(), key=lambda kv: -kv[1])[:8]),
        ),
        ("TrainingJob phases after settle", ", ".join(f"{k} {v}" for k, v in sorted(phase_counts.items()))),
        ("machine load average (1 min) at submit / at all status", f"{load_before:.1f} / {load_after:.1f}"),
        ("pods after settle", ", ".join(f"{k} {v}" for k, v in sorted(pods.items()))),
    ]
    if base_s is not None:
        rows += [
            (f"baseline: API server alone, {base_n} objects (SSA)", f"{base_s:.1f} s"),
            ("ratio: time to all children / baseline", f"{children_at / base_s:.2f}x"),
            ("ratio: time to all status / baseline", f"{status_at / base_s:.2f}x"),
        ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'measurement':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for label, value in rows:
        print(f"| {label:<{width}} | {value} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "jobs": args.jobs,
                    "submit_s": submit_s,
                    "children_s": children_at,
                    "status_s": status_at,
                    "latency_p50_s": statistics.median(lat),
                    "latency_p99_s": pct(lat, 99),
                    "rss_idle_bytes": rss_idle,
                    "rss_peak_run_bytes": peak_run,
                    "rss_peak_bytes": sampler.peak,
                    "cpu_s": cpu_s,
                    "baseline_s": base_s,
                    "phases": phase_counts,
                    "pods": pods,
                    "load_before": load_before,
                    "control_plane_cpu_s": cp_cpu,
                    "machine_busy_s": busy_s,
                    "requests": requests,
                    "load_after": load_after,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
