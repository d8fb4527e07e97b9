"""Kubernetes-style conditions (metav1.Condition) kept in plain dicts, as status stores them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


def now() -> str:
    """The time as conditions and status timestamps carry it (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Obj],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: str,
) -> list[Obj]:
    """A copy of `conditions` with `type_` set; lastTransitionTime moves only when the status changes."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions if c.get("type") != type_]
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else now
    cond: Obj = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return sorted(out, key=lambda c: str(c["type"]))


def get_condition(conditions: list[Obj] | None, type_: str) -> Obj | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[Obj] | None, type_: str) -> bool:
    c = get_condition(conditions, type_)
    return bool(c and c.get("status") == "True")
