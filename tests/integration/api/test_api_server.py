"""The kubeforge.io/v1alpha1 API against the real API server: CRDs apply, examples are accepted, invalid
objects are rejected with the messages users must see, transition rules, scale subresource, explain."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = ROOT / "crds"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
API = "kubeforge.io/v1alpha1"


@pytest.fixture(scope="module")
def kf(cluster: Any) -> Any:
    """The cluster with the committed CRDs applied the way users apply them (`kubectl apply -f crds/`)."""
    cluster.kubectl("apply", "-f", str(CRD_DIR))
    for plural in ("trainingjobs", "modelversions", "inferenceservices"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.kubeforge.io", "--timeout=60s")
    return cluster


@pytest.fixture(scope="module")
def ns(kf: Any) -> Iterator[str]:
    name = f"api-{uuid.uuid4().hex[:8]}"
    kf.kubectl("create", "namespace", name)
    yield name
    kf.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tjob(spec: dict[str, Any] | None = None, name: str = "tj") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": _merge({"model": {"builtin": "llama"}}, spec or {}),
    }


def mver(spec: dict[str, Any] | None = None, name: str = "mv") -> dict[str, Any]:
    base = {"modelName": "m", "source": {"runId": "abc"}}
    return {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": _merge(base, spec or {}),
    }


def isvc(spec: dict[str, Any] | None = None, name: str = "svc") -> dict[str, Any]:
    base = {"model": {"uri": "models:/m@champion"}}
    return {
        "apiVersion": API,
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": _merge(base, spec or {}),
    }


def _replace(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


# (id, object, text the API server's error must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "tj-two-model-sources",
        tjob({"model": {"entrypoint": "pkg.mod:build"}}),
        "set exactly one of model.builtin (a built-in model: llama, cnn, mlp) or model.entrypoint",
    ),
    (
        "tj-no-model-source",
        _replace(tjob(), "spec.model", {"preset": "tiny"}),
        "set exactly one of model.builtin",
    ),
    (
        "tj-degrees-product",
        tjob({"nodes": {"count": 2}, "parallelism": {"data": 3}}),
        "spec.parallelism.data: Invalid value: parallelism.data * parallelism.tensor * "
        "parallelism.pipeline must equal nodes.count * processesPerNode",
    ),
    (
        "tj-tp-pp-divides",
        tjob({"processesPerNode": 3, "parallelism": {"tensor": 2}}),
        "parallelism.tensor * parallelism.pipeline must divide nodes.count * processesPerNode",
    ),
    (
        "tj-elastic-data",
        tjob({"nodes": {"count": 2, "min": 1, "max": 4}, "parallelism": {"data": 2}}),
        "parallelism.data must be -1 for an elastic job",
    ),
    (
        "tj-elastic-whole-replicas",
        tjob(
            {"nodes": {"count": 2, "min": 1, "max": 4}, "processesPerNode": 3, "parallelism": {"tensor": 2}}
        ),
        "processesPerNode must be a multiple of parallelism.tensor * parallelism.pipeline for an elastic job",
    ),
    (
        "tj-min-above-count",
        tjob({"nodes": {"count": 2, "min": 3}}),
        "spec.nodes.min: Invalid value: nodes.min must be at most nodes.count",
    ),
    ("tj-count-above-max", tjob({"nodes": {"count": 5, "max": 4}}), "nodes.count must be at most nodes.max"),
    (
        "tj-powersgd-fsdp",
        tjob({"gradientCompression": "powerSGD"}),
        "gradientCompression powerSGD requires parallelism.dataMode ddp",
    ),
    (
        "tj-interleaved-one-stage",
        tjob({"parallelism": {"pipelineSchedule": "Interleaved1F1B"}}),
        "parallelism.stagesPerRank must be at least 2 for pipelineSchedule Interleaved1F1B",
    ),
    (
        "tj-stages-without-interleaved",
        tjob({"parallelism": {"stagesPerRank": 2}}),
        "parallelism.stagesPerRank above 1 needs pipelineSchedule DualPipeV, Interleaved1F1B, "
        "InterleavedZeroBubble or ZBVZeroBubble",
    ),
    (
        "tj-micro-batches",
        tjob({"processesPerNode": 2, "parallelism": {"pipeline": 2}}),
        "parallelism.microBatches must be at least parallelism.pipeline",
    ),
    (
        "tj-gpu-count-zero",
        tjob({"accelerator": {"vendor": "nvidia"}}),
        "accelerator.count must be at least 1 when accelerator.vendor is not cpu",
    ),
    (
        "tj-cpu-count",
        tjob({"accelerator": {"count": 2}}),
        "accelerator.count must be 0 when accelerator.vendor is cpu",
    ),
    (
        "tj-cpu-product",
        tjob({"accelerator": {"product": "NVIDIA-H200"}}),
        "accelerator.product needs a vendor",
    ),
    ("tj-env-owned", tjob({"env": {"WORLD_SIZE": "8"}}), "env must not set variables the operator owns"),
    (
        "tj-alias-latest",
        tjob({"register": {"modelName": "m", "aliases": ["latest"]}}),
        "aliases must not be 'latest' or v<number>",
    ),
    (
        "tj-text-file-no-path",
        tjob({"data": {"builtin": "text-file"}}),
        "spec.data.path: Required value: data.path is required when data.builtin is text-file",
    ),
    (
        "tj-warmup",
        tjob({"optimizer": {"steps": 10, "warmupSteps": 20}}),
        "optimizer.warmupSteps must not exceed optimizer.steps",
    ),
    ("tj-preset", tjob({"model": {"preset": "70b"}}), "model.preset must be tiny, small, 125m, 1b, 3b or 8b"),
    ("tj-data-zero", tjob({"parallelism": {"data": 0}}), "parallelism.data must not be 0"),
    (
        "tj-hsdp-replicate",
        tjob({"parallelism": {"dataReplicate": 2}}),
        "parallelism.dataReplicate above 1 needs dataMode hsdp",
    ),
    (
        "tj-zero-bubble-one-stage",
        tjob(
            {"parallelism": {"pipeline": 2, "microBatches": 2, "pipelineSchedule": "InterleavedZeroBubble"}}
        ),
        "parallelism.stagesPerRank must be at least 2 for pipelineSchedule Interleaved1F1B or "
        "InterleavedZeroBubble",
    ),
    (
        "tj-zero-bubble-compiled",
        tjob(
            {
                "compile": True,
                "parallelism": {
                    "pipeline": 2,
                    "microBatches": 2,
                    "pipelineSchedule": "InterleavedZeroBubble",
                    "stagesPerRank": 2,
                },
            }
        ),
        "which torch.compile'd blocks cannot do: set compile: false",
    ),
    (
        "tj-zbv-three-stages",
        tjob(
            {
                "parallelism": {
                    "pipeline": 2,
                    "microBatches": 2,
                    "pipelineSchedule": "ZBVZeroBubble",
                    "stagesPerRank": 3,
                }
            }
        ),
        "parallelism.stagesPerRank must be 2 for pipelineSchedule DualPipeV or ZBVZeroBubble",
    ),
    (
        "tj-sequence-parallel-alone",
        tjob({"parallelism": {"sequenceParallel": True}}),
        "parallelism.sequenceParallel splits what tensor parallelism replicates",
    ),
    ("tj-precision-enum", tjob({"precision": "fp8"}), 'spec.precision: Unsupported value: "fp8"'),
    (
        "tj-exit-code-range",
        tjob({"failurePolicy": {"retryableExitCodes": [0]}}),
        "should be greater than or equal to 1",
    ),
    (
        "tj-entrypoint-pattern",
        tjob({"model": {"builtin": None, "entrypoint": "not a function"}}),
        "spec.model.entrypoint: Invalid value",
    ),
    ("tj-name", tjob(name="1-job"), "metadata.name must be a DNS-1035 label of at most 50 characters"),
    ("tj-unknown-field", tjob({"gpus": 8}), 'unknown field "spec.gpus"'),
    (
        "mv-two-sources",
        mver({"source": {"uri": "s3://b/m"}}),
        "set exactly one of source.trainingJob (a TrainingJob in this namespace), source.runId",
    ),
    (
        "mv-no-source",
        _replace(mver(), "spec.source", {"artifactPath": "model"}),
        "set exactly one of source.",
    ),
    ("mv-alias-version", mver({"aliases": ["v3"]}), "aliases must not be 'latest' or v<number>"),
    ("mv-alias-chars", mver({"aliases": ["prod/eu"]}), "spec.aliases[0]: Invalid value"),
    ("mv-deletion-policy", mver({"deletionPolicy": "Purge"}), 'Unsupported value: "Purge"'),
    (
        "mv-model-name",
        _replace(mver(), "spec", {"source": {"runId": "abc"}}),
        "spec.modelName: Required value",
    ),
    (
        "is-two-models",
        isvc({"model": {"modelVersion": "mv"}}),
        "set exactly one of modelVersion (a ModelVersion in this namespace) or uri",
    ),
    (
        "is-canary-no-model",
        isvc({"canary": {"model": {}}}),
        "spec.canary.model: Invalid value: model: set exactly one of modelVersion",
    ),
    (
        "is-canary-same",
        isvc({"canary": {"model": {"uri": "models:/m@champion"}}}),
        "canary.model must differ from model",
    ),
    (
        "is-canary-traffic",
        isvc({"canary": {"model": {"uri": "models:/m/2"}, "trafficPercent": 101}}),
        "spec.canary.trafficPercent: Invalid value: 101: spec.canary.trafficPercent in body should be "
        "less than or equal to 100",
    ),
    (
        "is-autoscaling",
        isvc({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}),
        "autoscaling.minReplicas must be at most autoscaling.maxReplicas",
    ),
    ("is-ports", isvc({"ports": {"http": 9000, "grpc": 9000}}), "ports.http and ports.grpc must differ"),
    (
        "is-priority",
        isvc({"batching": {"defaultPriorityLevel": 1}}),
        "batching.defaultPriorityLevel must be at most batching.priorityLevels",
    ),
    (
        "is-backend-vendor",
        isvc({"compile": {"backend": "tensorrt"}}),
        "compile.backend must match accelerator.vendor",
    ),
    (
        "is-warmup-batch",
        isvc({"compile": {"warmupBatchSizes": [1, 64]}}),
        "compile.warmupBatchSizes must not exceed batching.maxBatchSize",
    ),
    ("is-uri-pattern", isvc({"model": {"uri": "models:/m"}}), "spec.model.uri: Invalid value"),
    (
        "is-ascend-count",
        isvc({"accelerator": {"vendor": "ascend"}}),
        "accelerator.count must be at least 1 when accelerator.vendor is not cpu",
    ),
    (
        "is-name",
        isvc(name="svc-" + "x" * 50),
        "metadata.name must be a DNS-1035 label of at most 48 characters",
    ),
]


def test_invalid_table_is_large_enough() -> None:
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("case", "obj", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected(kf: Any, ns: str, case: str, obj: dict[str, Any], message: str) -> None:
    doc = json.loads(json.dumps(obj))  # None values are sent as nulls (dropped by the server)
    proc = kf.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0, f"{case}: accepted\n{proc.stdout}"
    assert message in proc.stderr, f"{case}: expected {message!r} in\n{proc.stderr}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted(kf: Any, ns: str, path: Path) -> None:
    proc = kf.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(path), check=False)
    assert proc.returncode == 0, proc.stderr


def test_defaults_are_applied_and_apply_does_not_drift(kf: Any, ns: str) -> None:
    manifest = yaml.safe_dump(tjob(name="defaults"))
    kf.kubectl("apply", "-n", ns, "-f", "-", input=manifest)
    spec = kf.get("trainingjob", "defaults", ns)["spec"]
    assert spec["parallelism"]["data"] == -1
    assert spec["nodes"] == {"count": 1}
    assert spec["failurePolicy"]["retryableExitCodes"] == [130, 137, 143]
    assert "image" not in spec  # the operator's runtime image applies
    diff = kf.kubectl("diff", "-n", ns, "-f", "-", input=manifest, check=False)
    assert diff.returncode == 0, diff.stdout
    again = kf.kubectl("apply", "-n", ns, "-f", "-", input=manifest)
    assert "unchanged" in again.stdout


def test_modelversion_model_name_and_source_are_immutable(kf: Any, ns: str) -> None:
    kf.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(mver(name="immutable")))
    renamed = kf.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(mver({"modelName": "other"}, name="immutable")),
        check=False,
    )
    assert "modelName is immutable: create a new ModelVersion" in renamed.stderr
    moved = kf.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(mver({"source": {"runId": "def"}}, name="immutable")),
        check=False,
    )
    assert "source is immutable" in moved.stderr
    aliased = kf.kubectl(
        "apply", "-n", ns, "-f", "-", input=json.dumps(mver({"aliases": ["champion"]}, name="immutable"))
    )
    assert "configured" in aliased.stdout


def _status(kf: Any, ns: str, name: str, phase: str) -> None:
    kf.merge_patch("trainingjob", name, ns, {"status": {"phase": phase}}, "--subresource=status")


def _patch(kf: Any, ns: str, name: str, spec: dict[str, Any]) -> Any:
    return kf.merge_patch("trainingjob", name, ns, {"spec": spec}, check=False)


def test_trainingjob_layout_is_frozen_while_running(kf: Any, ns: str) -> None:
    kf.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(tjob({"processesPerNode": 2}, name="frozen")))
    assert _patch(kf, ns, "frozen", {"processesPerNode": 4}).returncode == 0  # not started: anything goes
    _status(kf, ns, "frozen", "Running")
    model = _patch(kf, ns, "frozen", {"model": {"builtin": "mlp"}})
    assert "spec.model cannot change once the job has started" in model.stderr
    ppn = _patch(kf, ns, "frozen", {"processesPerNode": 2})
    assert "spec.processesPerNode cannot change while the job runs" in ppn.stderr
    acc = _patch(kf, ns, "frozen", {"accelerator": {"vendor": "nvidia", "count": 1}})
    assert "spec.accelerator cannot change while the job runs" in acc.stderr
    tp = _patch(kf, ns, "frozen", {"parallelism": {"tensor": 2}})
    assert "spec.parallelism.tensor cannot change while the job runs" in tp.stderr
    assert _patch(kf, ns, "frozen", {"optimizer": {"steps": 500}}).returncode == 0  # the rest stays mutable
    _status(kf, ns, "frozen", "Suspended")
    assert _patch(kf, ns, "frozen", {"processesPerNode": 2}).returncode == 0
    assert (
        "cannot change once the job has started"
        in _patch(kf, ns, "frozen", {"model": {"builtin": "mlp"}}).stderr
    )


def test_scale_subresource(kf: Any, ns: str) -> None:
    kf.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(tjob({"nodes": {"count": 1, "max": 4}}, name="elastic")),
    )
    kf.kubectl("scale", "trainingjob/elastic", "-n", ns, "--replicas", "3")
    assert kf.get("trainingjob", "elastic", ns)["spec"]["nodes"]["count"] == 3
    over = kf.kubectl("scale", "trainingjob/elastic", "-n", ns, "--replicas", "5", check=False)
    assert "nodes.count must be at most nodes.max" in over.stderr
    kf.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc(name="scaled")))
    kf.kubectl("scale", "inferenceservice/scaled", "-n", ns, "--replicas", "4")
    assert kf.get("inferenceservice", "scaled", ns)["spec"]["replicas"] == 4


def test_explain_teaches(kf: Any) -> None:
    out = kf.kubectl("explain", "trainingjob.spec.parallelism").stdout
    assert "How the processes are laid out" in out
    assert "tensor" in out and "Tensor-parallel degree" in out
    assert "Interleaved1F1B" in kf.kubectl("explain", "trainingjob.spec.parallelism.pipelineSchedule").stdout


def test_printer_columns_short_names_and_category(kf: Any, ns: str) -> None:
    kf.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(tjob(name="columns")))
    header = kf.kubectl("get", "tjob", "columns", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "NODES", "READY", "PROGRESS", "AGE"]
    assert kf.kubectl("get", "infsvc", "-n", ns).returncode == 0  # short names resolve
    assert kf.kubectl("get", "mver", "-n", ns).returncode == 0
    listed = kf.kubectl("get", "kubeforge", "-n", ns, "-o", "name").stdout
    assert "trainingjob.kubeforge.io/columns" in listed
