"""Whether an InferenceService's Gateway API routes carry its traffic. Pure: no kopf, no client.

A route carries traffic once, for each Gateway (or listener) of its spec.route parentRefs, the Gateway's
controller wrote a parent status that accepts it (Accepted) and found its backends (ResolvedRefs), for the
route's latest generation (its current weights). Until then, or when a Gateway refuses it, the condition
Routed is False with the Gateway's own reason and message; without the Gateway API's CRDs, with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controllers.inferenceservice.render import ROUTE_KINDS, Owner
from crds.inferenceservice import InferenceServiceSpec

Obj = dict[str, Any]


@dataclass(frozen=True)
class ParentStatus:
    gateway: tuple[str, str, str]  # (namespace, name, sectionName or "")
    conditions: dict[str, Obj]  # type -> condition


@dataclass(frozen=True)
class RouteView:
    kind: str  # HTTPRoute, GRPCRoute
    generation: int
    parents: tuple[ParentStatus, ...]


def route_view(body: Obj) -> RouteView:
    meta, st = body.get("metadata") or {}, body.get("status") or {}
    ns = str(meta.get("namespace") or "")
    parents = []
    for p in st.get("parents") or []:
        ref = p.get("parentRef") or {}
        gw = (str(ref.get("namespace") or ns), str(ref.get("name") or ""), str(ref.get("sectionName") or ""))
        parents.append(ParentStatus(gw, {str(c.get("type")): c for c in p.get("conditions") or []}))
    return RouteView(str(body.get("kind") or ""), int(meta.get("generation") or 0), tuple(parents))


@dataclass(frozen=True)
class Routing:
    routed: bool
    reason: str
    message: str


def routing(
    spec: InferenceServiceSpec, owner: Owner, routes: dict[str, RouteView], apply_error: Routing | None
) -> Routing | None:
    """Routed or why not (None: spec.route is not set). `routes`: the observed routes by kind;
    `apply_error`: why the operator could not create them (the Gateway API's CRDs missing, say)."""
    if spec.route is None:
        return None
    if apply_error is not None:
        return apply_error
    accepted: list[str] = []
    for protocol, kind in ROUTE_KINDS.items():
        target = getattr(spec.route, protocol)
        if target is None:
            continue
        view = routes.get(kind)
        if view is None:
            return Routing(False, "RouteNotCreated", f"{kind} {owner.name} is not created yet")
        for ref in target.parent_refs:
            gw = (ref.namespace or owner.namespace, ref.name, ref.section_name or "")
            where = f"Gateway {gw[0]}/{gw[1]}" + (f" (listener {gw[2]})" if gw[2] else "")
            parent = next((p for p in view.parents if p.gateway == gw), None)
            if parent is None:
                return Routing(
                    False,
                    "RouteNotAccepted",
                    f"{kind} {owner.name}: no controller of {where} has accepted it yet (is the Gateway "
                    f"there, and its controller running?)",
                )
            for ctype in ("Accepted", "ResolvedRefs"):
                c = parent.conditions.get(ctype)
                if c is None or int(c.get("observedGeneration") or 0) < view.generation:
                    stale = f"{kind} {owner.name}: {where} has not read its latest change"
                    return Routing(False, "RouteNotAccepted", stale)
                if c.get("status") != "True":
                    why = f"{kind} {owner.name}: {where}: {c.get('message') or c.get('reason') or ctype}"
                    return Routing(False, str(c.get("reason") or ctype), why)
            accepted.append(where)
    return Routing(True, "Accepted", f"accepted by {', '.join(sorted(set(accepted)))}")


def gateway_api_missing(owner: Owner) -> Routing:
    return Routing(
        False,
        "GatewayAPIMissing",
        f"spec.route needs the Gateway API (HTTPRoute and GRPCRoute of gateway.networking.k8s.io/v1), which "
        f"this cluster does not serve: install its CRDs and a Gateway controller, or remove spec.route from "
        f"{owner.name} (the Service {owner.name} splits by pods meanwhile)",
    )
