"""Whether the Gateway API routes carry an InferenceService's traffic, from what the Gateways wrote in their
status, and what the InferenceService's status then says."""

from __future__ import annotations

from typing import Any

from controllers.conditions import get_condition
from controllers.inferenceservice import routes
from controllers.inferenceservice.render import CANARY, PREDICTOR, Owner
from controllers.inferenceservice.status import DeploymentView, ModelRef, PodView, derive
from crds.inferenceservice import InferenceServiceSpec

OWNER = Owner(name="bert", namespace="serving", uid="u-1")
ROUTE = {
    "http": {"parentRefs": [{"name": "inference", "namespace": "gateways"}]},
    "grpc": {"parentRefs": [{"name": "inference", "namespace": "gateways", "sectionName": "grpc"}]},
}


def spec(**kw: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"uri": "models:/bert/3"}, "route": ROUTE, **kw})


def cond(
    type_: str, status: str = "True", reason: str = "", message: str = "", gen: int = 2
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason or type_,
        "message": message,
        "observedGeneration": gen,
    }


def route(kind: str, *parents: tuple[dict[str, Any], list[dict[str, Any]]], gen: int = 2) -> routes.RouteView:
    body = {
        "kind": kind,
        "metadata": {"name": "bert", "namespace": "serving", "generation": gen},
        "status": {
            "parents": [
                {"parentRef": ref, "controllerName": "example.com/gateway", "conditions": cs}
                for ref, cs in parents
            ]
        },
    }
    return routes.route_view(body)


GW = {"name": "inference", "namespace": "gateways"}
GW_GRPC = {**GW, "sectionName": "grpc"}
OK = [cond("Accepted"), cond("ResolvedRefs")]


def test_routed_once_every_gateway_accepts_every_route_at_its_generation() -> None:
    both = {"HTTPRoute": route("HTTPRoute", (GW, OK)), "GRPCRoute": route("GRPCRoute", (GW_GRPC, OK))}
    got = routes.routing(spec(), OWNER, both, None)
    assert got == routes.Routing(
        True, "Accepted", "accepted by Gateway gateways/inference, Gateway gateways/inference (listener grpc)"
    )
    assert (
        routes.routing(
            InferenceServiceSpec.model_validate({"model": {"uri": "models:/b/1"}}), OWNER, both, None
        )
        is None
    )


def test_why_not_routed() -> None:
    http_ok = route("HTTPRoute", (GW, OK))
    cases = [
        ({"HTTPRoute": http_ok}, "RouteNotCreated", "GRPCRoute bert is not created yet"),
        (
            {"HTTPRoute": http_ok, "GRPCRoute": route("GRPCRoute", (GW, OK))},  # accepted on another listener
            "RouteNotAccepted",
            "GRPCRoute bert: no controller of Gateway gateways/inference (listener grpc) has accepted it yet "
            "(is the Gateway there, and its controller running?)",
        ),
        (
            {
                "HTTPRoute": http_ok,
                "GRPCRoute": route(
                    "GRPCRoute",
                    (
                        GW_GRPC,
                        [cond("Accepted", "False", "NotAllowedByListeners", "no listener allows GRPCRoute")],
                    ),
                ),
            },
            "NotAllowedByListeners",
            "GRPCRoute bert: Gateway gateways/inference (listener grpc): no listener allows GRPCRoute",
        ),
        (
            {
                "HTTPRoute": route(
                    "HTTPRoute", (GW, [cond("Accepted"), cond("ResolvedRefs", "False", "BackendNotFound")])
                ),
                "GRPCRoute": route("GRPCRoute", (GW_GRPC, OK)),
            },
            "BackendNotFound",
            "HTTPRoute bert: Gateway gateways/inference: BackendNotFound",
        ),
        (  # accepted, but for the weights before the last change
            {
                "HTTPRoute": route("HTTPRoute", (GW, OK), gen=3),
                "GRPCRoute": route("GRPCRoute", (GW_GRPC, OK)),
            },
            "RouteNotAccepted",
            "HTTPRoute bert: Gateway gateways/inference has not read its latest change",
        ),
    ]
    for observed, reason, message in cases:
        got = routes.routing(spec(), OWNER, observed, None)
        assert got is not None and (got.routed, got.reason, got.message) == (False, reason, message)
    missing = routes.gateway_api_missing(OWNER)
    assert routes.routing(spec(), OWNER, {}, missing) is missing
    assert missing.reason == "GatewayAPIMissing" and "install its CRDs" in missing.message


def test_status_reports_routing_and_the_split_by_weight() -> None:
    s = spec(replicas=3, canary={"model": {"uri": "models:/bert/4"}, "trafficPercent": 10})
    deps = {
        r: DeploymentView(r, 1, 1, n, n, n, n, n, uri, None)
        for r, n, uri in ((PREDICTOR, 3, "models:/bert/3"), (CANARY, 1, "models:/bert/4"))
    }
    pods = [PodView(f"p{i}", PREDICTOR, "models:/bert/3", ready=True) for i in range(3)]
    pods.append(PodView("c0", CANARY, "models:/bert/4", ready=True))
    refs = {PREDICTOR: ModelRef("models:/bert/3"), CANARY: ModelRef("models:/bert/4")}

    def status(route: routes.Routing | None) -> dict[str, Any]:
        return derive(s, OWNER, 2, {}, refs, deps, pods, "2026-12-07T02:00:00Z", route).status

    waiting = status(routes.Routing(False, "RouteNotAccepted", "HTTPRoute bert: no controller ..."))
    assert waiting["phase"] == "Routing"
    ready = get_condition(waiting["conditions"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RouteNotAccepted")
    assert get_condition(waiting["conditions"], "Routed")["status"] == "False"
    assert waiting["trafficSummary"] == "stable 75% / canary 25% (asked 10%)"  # the Service's, by pods

    routed = status(routes.Routing(True, "Accepted", "accepted by Gateway gateways/inference"))
    assert routed["phase"] == "Ready" and get_condition(routed["conditions"], "Routed")["status"] == "True"
    assert routed["trafficSummary"] == "stable 90% / canary 10% (by weight)"
    assert [(t["percent"], t["readyReplicas"]) for t in routed["traffic"]] == [(90, 3), (10, 1)]

    # no canary pod ready: its weight is 0 (render.canary_weight), and the status says why
    unready = {**deps, CANARY: DeploymentView(CANARY, 1, 1, 1, 1, 1, 0, 0, "models:/bert/4", None)}
    accepted = routes.Routing(True, "Accepted", "")
    held = derive(s, OWNER, 2, {}, refs, unready, pods, "2026-12-07T02:00:00Z", accepted).status
    assert held["trafficSummary"] == "stable 100% / canary 0% (by weight, asked 10%: no canary pod is ready)"

    # spec.route removed: the condition goes with it
    gone = derive(s, OWNER, 3, routed, refs, deps, pods, "2026-12-07T02:01:00Z", None).status
    assert get_condition(gone["conditions"], "Routed") is None
