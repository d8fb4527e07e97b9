"""The Helm chart: lint, render, fail on contradictory values, and the rendered manifests accepted by the
real API server (`kubectl apply --dry-run=server`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "kubeforge"


def _find_helm() -> str | None:
    """helm from the control-plane build (hack/build-control-plane.sh), else PATH; no cluster needed."""
    built = sorted(Path.home().glob(".cache/kubeforge/k8s-*/bin/helm"))
    return str(built[-1]) if built else shutil.which("helm")


@pytest.fixture(scope="module")
def helm_bin() -> str:
    found = _find_helm()
    if found is None:
        pytest.skip("helm not built yet (hack/build-control-plane.sh)")
    return found


def helm(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(helm_bin: str, *sets: str, namespace: str = "kubeforge-system") -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = helm(helm_bin, "template", "kf", str(CHART), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def ns(cluster: Any) -> Iterator[str]:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_lint(helm_bin: str) -> None:
    helm(helm_bin, "lint", "--strict", str(CHART))
    helm(
        helm_bin,
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "replicaCount=2",
        "--set",
        "peering.enabled=true",
        "--set",
        "config.mlflowTrackingUri=http://mlflow:5000",
    )


def test_default_render(helm_bin: str) -> None:
    docs = render(helm_bin)
    crds = by_kind(docs, "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "inferenceservices.kubeforge.io",
        "modelversions.kubeforge.io",
        "trainingjobs.kubeforge.io",
    ]
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        generated = yaml.safe_load((ROOT / "crds" / f"{crd['metadata']['name']}.yaml").read_text())
        assert crd["spec"] == generated["spec"], "the chart's CRDs differ from crds/: run kubeforge-gen-crds"
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubeforge-operator"]
    assert "--standalone" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"] for e in container["env"]}
    assert {"POD_ID", "KUBEFORGE_GANG_SCHEDULER_NAME"} <= env
    (role,) = by_kind(docs, "ClusterRole")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    for needed in (
        "trainingjobs/status",
        "inferenceservices/finalizers",
        "pods",
        "jobs",
        "services",
        "configmaps",
        "events",
        "serviceaccounts",
        "roles",
        "rolebindings",
        "deployments",
        "horizontalpodautoscalers",
        "podgroups",
        "leases",
        "clusterkopfpeerings",
        "customresourcedefinitions",
    ):
        assert needed in resources, needed
    assert by_kind(docs, "ServiceAccount") and by_kind(docs, "ClusterRoleBinding")


def test_values_reach_the_operator(helm_bin: str) -> None:
    docs = render(
        helm_bin,
        "config.mlflowTrackingUri=http://mlflow.mlflow:5000",
        "watchNamespaces={team-a,team-b}",
        "replicaCount=2",
        "peering.enabled=true",
        "crds.enabled=false",
    )
    assert not by_kind(docs, "CustomResourceDefinition") or all(
        d["metadata"]["name"].endswith("kopf.dev") for d in by_kind(docs, "CustomResourceDefinition")
    )
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--peering=kubeforge" in container["args"] and "--standalone" not in container["args"]
    assert "--namespace=team-a" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEFORGE_MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000"
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["replicaCount=3"], "replicaCount > 1 needs peering.enabled=true"),
        (["serviceAccount.create=false"], "serviceAccount.create=false needs serviceAccount.name"),
        (["config.podMlflowTrackingUri=http://x:5000"], "config.podMlflowTrackingUri is set but"),
        (
            ["extraEnv[0].name=KUBEFORGE_RUNTIME_IMAGE", "extraEnv[0].value=x"],
            "use the config.* value instead",
        ),
        (["registry.enabled=true"], "registry.enabled=true needs config.mlflowTrackingUri"),
        (["unknownValue=1"], "unknownValue"),
        (["logging.format=xml"], "/logging/format"),
    ],
    ids=[
        "replicas-without-peering",
        "sa-without-name",
        "pod-uri-without-uri",
        "env-clash",
        "registry-without-mlflow",
        "unknown-key",
        "enum",
    ],
)
def test_contradictory_values_fail(helm_bin: str, sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = helm(helm_bin, "template", "kf", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_rendered_chart_is_accepted_by_the_api_server(helm_bin: str, cluster: Any, ns: str) -> None:
    out = helm(
        helm_bin,
        "template",
        "kf",
        str(CHART),
        "--namespace",
        ns,
        "--set",
        "config.mlflowTrackingUri=http://mlflow:5000",
        "--set",
        "registry.enabled=true",
        "--set",
        "registry.ingress.enabled=true",
        "--set",
        "registry.ingress.host=registry.example.com",
        "--set",
        "registry.ingress.tlsSecretName=registry-tls",
    ).stdout
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=out, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "deployment.apps/kf-kubeforge created (server dry run)" in proc.stdout
    assert "deployment.apps/kf-kubeforge-registry created (server dry run)" in proc.stdout
    assert "ingress.networking.k8s.io/kf-kubeforge-registry created (server dry run)" in proc.stdout
    [ingress] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Ingress"]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "registry.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": "kf-kubeforge-registry",
        "port": {"name": "http"},
    }
    assert ingress["spec"]["tls"] == [{"secretName": "registry-tls", "hosts": ["registry.example.com"]}]
    plain = helm(helm_bin, "template", "kf", str(CHART), "--set", "config.mlflowTrackingUri=http://m:5000",
                 "--set", "registry.enabled=true").stdout  # fmt: skip
    assert "kind: Ingress" not in plain  # off by default


def test_crds_keep_off_drops_the_resource_policy(helm_bin: str) -> None:
    crds = by_kind(render(helm_bin, "crds.keep=false"), "CustomResourceDefinition")
    assert len(crds) == 3
    assert all("helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in crds)


def _needed() -> list[tuple[str, str, str, str]]:
    """(verb, group, resource, subresource) the controllers use: every kind controllers.kube may touch, the
    watches kopf opens, status patches and events."""
    from controllers.kube import _RESOURCES

    out: list[tuple[str, str, str, str]] = []
    for (api_version, kind), (plural, _) in _RESOURCES.items():
        group = api_version.rpartition("/")[0]
        if kind in ("Namespace", "Node"):
            verbs = ["get", "list", "watch"]
        elif kind == "Event":
            verbs = ["create"]
        elif group == "kubeforge.io":
            verbs = ["get", "list", "watch", "patch"] + (
                ["create", "delete"] if kind == "ModelVersion" else []
            )
            out.append(("patch", group, plural, "status"))
        else:  # children: applied (created or patched), read, watched, deleted
            verbs = ["get", "list", "watch", "create", "patch", "delete"]
        out += [(v, group, plural, "") for v in verbs]
    return out


def test_the_operators_role_allows_what_the_controllers_do(helm_bin: str, cluster: Any, ns: str) -> None:
    """The chart's ClusterRole, bound for real, asked by the API server's own authorizer (SubjectAccessReview)
    for every call the controllers make: a kind added to a controller without RBAC fails here, not in a
    user's cluster."""
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    out = helm(helm_bin, "template", release, str(CHART), "--namespace", ns).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    rbac = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")]
    (sa,) = by_kind(rbac, "ServiceAccount")
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(rbac))
    try:
        user = f"system:serviceaccount:{ns}:{sa['metadata']['name']}"
        denied = [a for a in _needed() if not _allowed(cluster, user, ns, *a)]
        assert not denied, f"the chart's ClusterRole denies (verb, group, resource, subresource): {denied}"
    finally:
        for kind in ("ClusterRoleBinding", "ClusterRole"):
            for d in by_kind(rbac, kind):
                cluster.kubectl("delete", kind.lower(), d["metadata"]["name"], "--wait=false", check=False)


def _allowed(cluster: Any, user: str, ns: str, verb: str, group: str, resource: str, sub: str) -> bool:
    """The API server's own authorizer on one call of `user` (a SubjectAccessReview: not stored)."""
    sa_ns = user.split(":")[2]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"],
            "resourceAttributes": {
                "verb": verb,
                "group": group,
                "resource": resource,
                "subresource": sub,
                "namespace": ns,
            },
        },
    }
    answer = cluster.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)).stdout
    return bool(json.loads(answer)["status"].get("allowed"))


def test_the_registry_reads_the_kubeforge_objects_and_nothing_else(
    helm_bin: str, cluster: Any, ns: str
) -> None:
    release = f"reg-{uuid.uuid4().hex[:6]}"
    out = helm(
        helm_bin, "template", release, str(CHART), "--namespace", ns,
        "--set", "registry.enabled=true", "--set", "config.mlflowTrackingUri=http://mlflow:5000",
        "--set", "registry.persistence.claimName=lineage",
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    name = f"{release}-kubeforge-registry"
    (deploy,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == name]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kubeforge-registry"]
    assert "--mlflow-uri=http://mlflow:5000" in container["args"] and "--host=0.0.0.0" in container["args"]
    assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "lineage"}}]
    assert pod["serviceAccountName"] == name
    rbac = [
        d
        for d in docs
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding") and d["metadata"]["name"] == name
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    try:
        user = f"system:serviceaccount:{ns}:{name}"
        for plural in ("trainingjobs", "modelversions", "inferenceservices"):
            assert _allowed(cluster, user, "", "list", "kubeforge.io", plural, "")
        assert not _allowed(cluster, user, "", "patch", "kubeforge.io", "modelversions", "")
        assert not _allowed(cluster, user, ns, "list", "", "secrets", "")
        assert not _allowed(cluster, user, ns, "list", "", "pods", "")
    finally:
        for d in rbac:
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--wait=false", check=False)
