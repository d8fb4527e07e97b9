"""One entry point for the operator's defensive re-check and for tools: the same rules as the API server.

    problems = validation.errors(obj)              # create: schema bounds + cross-field rules
    problems = validation.update_errors(old, new)  # update: also the transition (oldSelf) rules

Each problem is "<field path>: <message>", the message being the CEL rule's message word for word.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from crds import inferenceservice, modelversion, trainingjob
from crds.common import KubeModel

_SPECS: dict[str, type[KubeModel]] = {
    "TrainingJob": trainingjob.TrainingJobSpec,
    "ModelVersion": modelversion.ModelVersionSpec,
    "InferenceService": inferenceservice.InferenceServiceSpec,
}


def _path(loc: tuple[int | str, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def errors(obj: dict[str, Any]) -> list[str]:
    """Problems of a whole object (kind, metadata, spec); empty when the API server would accept it."""
    kind = obj.get("kind", "")
    model = _SPECS.get(kind)
    if model is None:
        return [f"kind: unknown kind {kind!r}: expected one of {', '.join(_SPECS)}"]
    problems: list[str] = []
    try:
        model.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        for err in exc.errors():
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{_path(err['loc'])}: {message}")
    if kind == "TrainingJob":
        problems += [f"metadata.name: {m}" for m in trainingjob.object_rule_errors(obj)]
    elif kind == "InferenceService":
        problems += [f"metadata.name: {m}" for m in inferenceservice.object_rule_errors(obj)]
    return problems


def update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Problems of an update from `old` to `new` (both whole objects, `old` with its status)."""
    problems = errors(new)
    kind = new.get("kind")
    if kind == "TrainingJob":
        problems += trainingjob.update_errors(old, new)
    elif kind == "ModelVersion" and not problems:
        try:
            before = modelversion.parse_spec(old)
        except ValidationError:
            return problems
        problems += modelversion.update_errors(before, modelversion.parse_spec(new))
    return problems
