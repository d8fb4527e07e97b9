"""Status patches of the level-triggered controllers (TrainingJob, InferenceService), safe against stale
indexes.

A sync reads its object from a kopf index, which may not have seen our own last status patch yet. Decisions
must then build on what we sent, not on the index's older status, and patching the same status again is a
wasted write. `StatusWriter` remembers each object's last patch and answers both questions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from controllers.conditions import set_condition
from controllers.kube import compare_versions, kube
from crds.common import API_VERSION

Key = tuple[str, str]


@dataclass(frozen=True)
class Sent:
    """Our last status patch of an object."""

    before: str | None  # the resourceVersion of the index's copy the status was derived from
    after: str | None  # the resourceVersion the patch produced
    status: dict[str, Any]


def unseen(version: str | None, sent: Sent) -> bool:
    """Whether the index's copy at `version` predates our last status patch (decisions must then build on
    what we sent, not on its status). Every version older than the patch's own does: also a copy from
    between two patches of ours, the first seen and the second not yet. Telling that copy by equality with
    the version a patch was derived from took it for current, and a sync built on the older status undid
    the newer one (which fits a CI sighting: a held scale-up's Job back at 3 nodes beside a status of 4).
    Versions that do not compare (not decimal integers) fall back to that equality."""
    order = compare_versions(version, sent.after)
    return version == sent.before if order is None else order < 0


class StatusWriter:
    """The status subresource of one kind of kubeforge.io, written whole (never as a difference)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._sent: dict[Key, Sent] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._sent.clear()

    def forget(self, key: Key) -> None:
        with self._lock:
            self._sent.pop(key, None)

    def previous(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The status a sync builds on: the index's copy, or our last patch when the index has not seen it."""
        meta = obj["metadata"]
        sent = self._sent.get((meta["namespace"], meta["name"]))
        if sent is not None and unseen(meta.get("resourceVersion"), sent):
            return dict(sent.status)
        return dict(obj.get("status") or {})

    def write(self, obj: dict[str, Any], new: dict[str, Any]) -> None:
        """Patch the status to `new` unless it is what the object (or our unseen last patch) holds."""
        old = obj.get("status") or {}
        if new == old:
            return
        meta = obj["metadata"]
        key, version = (meta["namespace"], meta["name"]), meta.get("resourceVersion")
        sent = self._sent.get(key)
        if sent is not None and sent.status == new and unseen(version, sent):
            return  # sent already: the index has not seen our patch yet
        # The whole status, not its difference from `old`: `old` comes from the index and may predate our
        # last patch, and a difference taken against it could leave a field of that patch standing beside
        # fields of this one (seen: nodesTarget 3 from one sync, nodesReady 4 from the next).
        patch = dict(new)
        patch.update({k: None for k in (*old, *(sent.status if sent else ())) if k not in new})
        out = kube().patch(
            API_VERSION, self.kind, meta["namespace"], meta["name"], {"status": patch}, subresource="status"
        )
        with self._lock:
            self._sent[key] = Sent(version, (out.get("metadata") or {}).get("resourceVersion"), new)

    def invalid(
        self, obj: dict[str, Any], problems: list[str], *, condition: tuple[str, bool], now: str
    ) -> None:
        """A spec the API server let through (an older CRD, validation off) that cannot run: phase Failed,
        reason InvalidSpec on `condition` (type, status), and a Warning event naming every problem. Never
        raises on the spec."""
        message = "; ".join(problems)[:2000]
        status = dict(obj.get("status") or {})
        generation = obj["metadata"].get("generation", 0)
        conds = set_condition(
            status.get("conditions") or [],
            condition[0],
            condition[1],
            "InvalidSpec",
            message,
            generation=generation,
            now=now,
        )
        new = {
            **status,
            "phase": "Failed",
            "message": message,
            "conditions": conds,
            "observedGeneration": generation,
        }
        if new != status:
            self.event(obj, "Warning", "InvalidSpec", message)
            self.write(obj, new)

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        involved = {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
        }
        kube().event(involved, type_, reason, message)
