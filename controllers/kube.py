"""The one module that talks to the Kubernetes API (besides kopf's own watching and status patching).

Writes are server-side apply with the field manager `kubeforge`, so re-applying an unchanged desired object is
a no-op and fields other managers own (an autoscaler's replicas, a user's labels) are left alone.
Calls are synchronous: kopf runs sync handlers in its thread pool, and the urllib3 pool is shared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from crds.common import API_VERSION, FIELD_MANAGER

Obj = dict[str, Any]
log = logging.getLogger("kubeforge.kube")
EVENT_COMPONENT = "kubeforge-operator"
EVENT_INSTANCE = socket.gethostname()

# (apiVersion, kind) -> (plural, namespaced). Only what the operator manages or reads.
_RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Event"): ("events", True),
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Node"): ("nodes", False),
    ("batch/v1", "Job"): ("jobs", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): ("podgroups", True),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ("httproutes", True),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): ("grpcroutes", True),
    (API_VERSION, "TrainingJob"): ("trainingjobs", True),
    (API_VERSION, "ModelVersion"): ("modelversions", True),
    (API_VERSION, "InferenceService"): ("inferenceservices", True),
}


@dataclass
class KubeError(Exception):
    """A failed API call. `transient` tells whether retrying later can help."""

    status: int
    reason: str
    message: str

    @property
    def transient(self) -> bool:
        return self.status in (0, 408, 409, 429) or self.status >= 500

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


def path(
    api_version: str,
    kind: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    try:
        plural, namespaced = _RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(
            f"unknown resource {api_version}/{kind}: add it to controllers.kube._RESOURCES"
        ) from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespaced and namespace:
        parts += ["namespaces", namespace]
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def compare_versions(a: str | None, b: str | None) -> int | None:
    """-1, 0 or 1 as resourceVersion `a` is older than, the same as or newer than `b` (two versions of one
    resource); None when either is not a positive decimal integer without leading zeros, the form that
    Kubernetes guarantees comparable since 1.35 (KEP-5504; etcd revisions have always had it)."""
    if not (a and b and a.isdigit() and b.isdigit() and a[0] != "0" and b[0] != "0"):
        return None
    ka, kb = (len(a), a), (len(b), b)
    return (ka > kb) - (ka < kb)


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api

    def _call(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Obj | None:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            m, full_url, hdrs, payload, post = self._api.param_serialize(
                method=method,
                resource_path=url,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(
                m, full_url, header_params=hdrs, body=payload, post_params=post, _request_timeout=timeout
            )
            data = resp.read()  # type: ignore[no-untyped-call]
        except ApiException as e:  # raised by the REST layer for transport-level failures
            raise KubeError(int(e.status or 0), str(e.reason), str(e.body or e.reason)) from None
        except (HTTPError, OSError) as e:
            raise KubeError(0, "Unreachable", str(e)) from None
        if resp.status >= 400:
            if resp.status == 404 and method in ("GET", "DELETE"):
                return None
            message = str(resp.reason)
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                message = json.loads(data).get("message", message)
            raise KubeError(int(resp.status), str(resp.reason), message)
        loaded: Obj = json.loads(data) if data else {}
        return loaded

    def apply(self, obj: Obj, *, subresource: str | None = None, force: bool = True) -> Obj:
        """Server-side apply of a complete desired object."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)
        query = [("fieldManager", FIELD_MANAGER), ("force", "true" if force else "false")]
        out = self._call("PATCH", url, body=obj, query=query, content_type="application/apply-patch+yaml")
        assert out is not None
        return out

    def create(self, obj: Obj, *, manager: str) -> Obj | None:
        """Create `obj` as field manager `manager`; None when it exists already (nothing is changed then)."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        try:
            return self._call("POST", url, body=obj, query=[("fieldManager", manager)])
        except KubeError as e:
            if e.status == 409:
                return None
            raise

    def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event about `involved` (apiVersion, kind, metadata name/namespace/uid) through
        this pooled client. kopf.event would post it from a per-object task: a burst of events for many
        objects then opens one TLS connection each (a handshake per event on both sides).
        Events help but are auxiliary: one that cannot be posted is logged, the caller goes on."""
        meta = involved["metadata"]
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        ref = {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        }
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "involvedObject": ref,
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": EVENT_INSTANCE,
            "action": reason,
            "count": 1,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
        }
        try:
            self._call("POST", path("v1", "Event", meta["namespace"]), body=body)
        except KubeError as e:
            log.warning(
                "could not post event %s %s on %s/%s: %s", type_, reason, ref["namespace"], ref["name"], e
            )

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Obj | None:
        return self._call("GET", path(api_version, kind, namespace, name))

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        query: list[tuple[str, Any]] = []
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        out = self._call("GET", path(api_version, kind, namespace), query=query)
        items: list[Obj] = (out or {}).get("items", [])
        return items

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj:
        """JSON merge patch (for the few fields we own without applying a whole object)."""
        out = self._call(
            "PATCH",
            path(api_version, kind, namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
        )
        assert out is not None
        return out

    def delete(
        self, api_version: str, kind: str, namespace: str | None, name: str, propagation: str = "Background"
    ) -> bool:
        """Delete; False when it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        return self._call("DELETE", path(api_version, kind, namespace, name), body=body) is not None


_lock = threading.Lock()
_kube: Kube | None = None


def kube() -> Kube:
    """The process-wide client: in-cluster credentials when present, else KUBECONFIG."""
    global _kube
    with _lock:
        if _kube is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            cfg = client.Configuration.get_default_copy()
            cfg.connection_pool_maxsize = 32
            _kube = Kube(client.ApiClient(cfg))
        return _kube
