"""The committed CRDs, the chart's copy and docs/api.md are exactly what the models generate."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from crds import generate

pytestmark = pytest.mark.unit

FILES = generate.render_all()


@pytest.mark.parametrize("rel", sorted(FILES))
def test_committed_file_matches_generated(rel: str) -> None:
    path = generate.ROOT / rel
    assert path.exists(), f"{rel} missing: run kubeforge-gen-crds"
    assert path.read_text() == FILES[rel], f"{rel} is stale: run kubeforge-gen-crds and commit"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, sub in node.get("properties", {}).items():
            found += _walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            found += _walk(node["items"], path + "[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += _walk(node["additionalProperties"], path + "{}")
    return found


@pytest.mark.parametrize("kind", generate.KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: generate.Kind) -> None:
    doc = generate.crd(kind)
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(root)
    assert "$ref" not in text and "anyOf" not in text and "allOf" not in text and "oneOf" not in text
    for path, node in _walk(root):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if path not in ("", ".metadata") and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{kind.kind}{path} has no description"


@pytest.mark.parametrize("kind", generate.KINDS, ids=lambda k: k.kind)
def test_subresources_and_names(kind: generate.Kind) -> None:
    doc = generate.crd(kind)
    version = doc["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert doc["spec"]["names"]["categories"] == ["kubeforge"]
    assert "isvc" not in doc["spec"]["names"]["shortNames"]  # KServe's
    if kind.kind in ("TrainingJob", "InferenceService"):
        assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"


def test_spec_defaults_skip_operator_owned_image() -> None:
    root = generate.crd(generate.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = root["properties"]["spec"]["properties"]
    assert "default" not in spec["image"]
    assert spec["parallelism"]["default"]["data"] == -1
    assert spec["optimizer"]["properties"]["gradClipNorm"]["nullable"] is True


def test_check_mode_reports_stale(tmp_path: Any) -> None:
    assert generate.main(["--root", str(tmp_path), "--check"]) == 1
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.main(["--root", str(tmp_path), "--check"]) == 0
