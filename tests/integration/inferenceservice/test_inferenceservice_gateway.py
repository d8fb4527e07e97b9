"""An InferenceService's exact canary weights through the Gateway API, against the real local control plane:
the Gateway API's own CRDs (hack/gateway-api.sh, from the Go module proxy) installed while the operator runs,
the routes it creates, and what it says while no Gateway has accepted them, once one refused, and once one
did. This cluster runs no Gateway controller: the test writes the route status one would (as kwok stands in
for the kubelet)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster
from tests.integration.inferenceservice.test_inferenceservice_controller import (
    V1,
    V2,
    condition,
    get,
    isvc,
    wait_status,
)

pytestmark = pytest.mark.usefixtures("operator")
ROOT = Path(__file__).resolve().parents[3]
GATEWAY = {"name": "inference", "namespace": "gateways"}


@pytest.fixture(scope="module")
def gateway_api(cluster: Cluster) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "gateway-api.sh"), "install"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def backends(cluster: Cluster, kind: str, name: str, namespace: str) -> list[tuple[str, int, int | None]]:
    route = get(cluster, kind, name, namespace) or {}
    rules = (route.get("spec") or {}).get("rules") or [{}]
    return [(b["name"], b["port"], b.get("weight")) for b in rules[0].get("backendRefs") or []]


def gateway_says(
    cluster: Cluster, kind: str, name: str, namespace: str, accepted: tuple[str, str, str], section: str = ""
) -> None:
    """Write the route's status as the Gateway's controller would: Accepted (status, reason, message) and
    ResolvedRefs, for the route's current generation."""
    route = get(cluster, kind, name, namespace)
    assert route is not None
    gen, now = route["metadata"]["generation"], datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [
        {"type": "Accepted", "status": accepted[0], "reason": accepted[1], "message": accepted[2]},
        {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": ""},
    ]
    ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", **GATEWAY}
    if section:
        ref["sectionName"] = section
    parent = {
        "parentRef": ref,
        "controllerName": "example.com/gateway-controller",
        "conditions": [{**c, "observedGeneration": gen, "lastTransitionTime": now} for c in conditions],
    }
    cluster.kubectl(
        "patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"parents": [parent]}}),
    )  # fmt: skip


def test_routes_split_by_weight_once_the_gateway_accepts_them(
    gateway_api: None, cluster: Cluster, namespace: str
) -> None:
    route = {
        "http": {"parentRefs": [GATEWAY], "hostnames": ["cnn.example.com"]},
        "grpc": {"parentRefs": [{**GATEWAY, "sectionName": "grpc"}]},
    }
    canary = {"model": {"uri": V2}, "trafficPercent": 10}
    cluster.apply(isvc("cnn", namespace, replicas=2, canary=canary, route=route))

    # the pods serve, but no Gateway has taken the routes yet: Routing, and the split is still the pods'
    st = wait_status(cluster, "cnn", namespace, "Routing", lambda s: s.get("phase") == "Routing")
    assert condition(st, "Routed")["reason"] == "RouteNotAccepted"
    assert "no controller of Gateway gateways/inference has accepted it yet" in st["message"]
    assert st["trafficSummary"] == "stable 67% / canary 33% (asked 10%)"
    assert condition(st, "Ready")["status"] == "False"
    assert backends(cluster, "httproute", "cnn", namespace) == [
        ("cnn-predictor", 8080, 90),
        ("cnn-canary", 8080, 10),
    ]
    assert backends(cluster, "grpcroute", "cnn", namespace) == [
        ("cnn-predictor", 8081, 90),
        ("cnn-canary", 8081, 10),
    ]
    stable = get(cluster, "service", "cnn-predictor", namespace)
    assert stable is not None and stable["spec"]["selector"]["kubeforge.io/role"] == "predictor"

    # a Gateway refuses the GRPCRoute: its reason, in the InferenceService's status
    gateway_says(cluster, "httproute", "cnn", namespace, ("True", "Accepted", ""))
    refused = ("False", "NotAllowedByListeners", "listener grpc allows no GRPCRoute")
    gateway_says(cluster, "grpcroute", "cnn", namespace, refused, section="grpc")
    st = wait_status(
        cluster,
        "cnn",
        namespace,
        "refused",
        lambda s: condition(s, "Routed").get("reason") == "NotAllowedByListeners",
    )
    assert st["phase"] == "Routing"
    assert condition(st, "Routed")["message"] == (
        "GRPCRoute cnn: Gateway gateways/inference (listener grpc): listener grpc allows no GRPCRoute"
    )

    # accepted: Ready, and the split is the weights, exactly
    gateway_says(cluster, "grpcroute", "cnn", namespace, ("True", "Accepted", ""), section="grpc")
    st = wait_status(cluster, "cnn", namespace, "Ready", lambda s: s.get("phase") == "Ready")
    assert st["trafficSummary"] == "stable 90% / canary 10% (by weight)"
    assert [(t["modelUri"], t["percent"]) for t in st["traffic"]] == [(V1, 90), (V2, 10)]

    # new weights: the routes change, and the Gateway must read them before they count
    cluster.merge_patch("inferenceservice", "cnn", namespace, {"spec": {"canary": {"trafficPercent": 25}}})
    cluster.wait_until(
        "weights 75/25",
        lambda: (
            backends(cluster, "httproute", "cnn", namespace)
            == [("cnn-predictor", 8080, 75), ("cnn-canary", 8080, 25)]
        ),
    )
    st = wait_status(cluster, "cnn", namespace, "stale", lambda s: s.get("phase") == "Routing")
    assert "has not read its latest change" in condition(st, "Routed")["message"]
    gateway_says(cluster, "httproute", "cnn", namespace, ("True", "Accepted", ""))
    gateway_says(cluster, "grpcroute", "cnn", namespace, ("True", "Accepted", ""), section="grpc")
    wait_status(
        cluster,
        "cnn",
        namespace,
        "75/25",
        lambda s: s.get("trafficSummary") == "stable 75% / canary 25% (by weight)",
    )

    # spec.route removed: routes, the stable Service and the condition go; the split is the pods' again
    cluster.kubectl(
        "patch", "inferenceservice", "cnn", "-n", namespace, "--type=json", "-p",
        '[{"op": "remove", "path": "/spec/route"}]',
    )  # fmt: skip
    st = wait_status(cluster, "cnn", namespace, "no route", lambda s: condition(s, "Routed") == {})
    assert st["phase"] == "Ready" and "(by weight)" not in st["trafficSummary"]
    cluster.wait_until(
        "route children deleted",
        lambda: all(
            get(cluster, kind, name, namespace) is None
            for kind, name in (("httproute", "cnn"), ("grpcroute", "cnn"), ("service", "cnn-predictor"))
        ),
    )
