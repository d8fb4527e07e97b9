"""Reading the TrainingJob spec the runtime runs: a YAML/JSON file with a TrainingJob object or a bare
spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from crds.trainingjob import TrainingJobSpec, parse_spec


def load_object(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    obj = yaml.safe_load(text)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a TrainingJob object or a spec mapping, got {type(obj).__name__}")
    return obj


def apply_overrides(obj: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``key.path=value`` overrides (camelCase keys of the spec; values parsed as YAML)."""
    spec = obj.setdefault("spec", {}) if ("kind" in obj or "spec" in obj) else obj
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        node = spec
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return obj


def load_spec(path: str | Path, sets: list[str] | None = None) -> TrainingJobSpec:
    return parse_spec(apply_overrides(load_object(path), sets or []))


def write_spec(spec: TrainingJobSpec, path: Path) -> None:
    path.write_text(json.dumps({"spec": spec.to_document()}))
