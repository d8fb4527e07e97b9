"""Every example in examples/ passes the pydantic mirror of the API (the API server check is in
tests/integration/api)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from crds import inferenceservice, modelversion, trainingjob
from crds.common import API_VERSION

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.yaml"))


def test_there_are_examples_of_every_kind() -> None:
    kinds = {d["kind"] for f in EXAMPLES for d in yaml.safe_load_all(f.read_text()) if d}
    assert {"TrainingJob", "ModelVersion", "InferenceService"} <= kinds
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        obj: dict[str, Any] = doc
        assert obj["apiVersion"] == API_VERSION
        if obj["kind"] == "TrainingJob":
            trainingjob.parse_spec(obj)
            assert trainingjob.object_rule_errors(obj) == []
        elif obj["kind"] == "ModelVersion":
            modelversion.parse_spec(obj)
        elif obj["kind"] == "InferenceService":
            inferenceservice.parse_spec(obj)
            assert inferenceservice.object_rule_errors(obj) == []
