"""Model URI → eager nn.Module + OIP signature + the identity the compile cache is keyed by.

Accepts MLflow URIs (`models:/name@alias`, `models:/name/N`, `runs:/<run>/<path>`), `file://` URIs and local
paths of an MLflow PyTorch-flavour model (a folder holding `MLmodel`). The signature comes from the model's
MLflow signature (tensor-based), or from `--input`/`--output` specs when a model was logged without one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.serving.compile.base import eval_mode
from runtime.serving.protocol import datatypes
from runtime.serving.signature import Signature, TensorSpec

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded or understood; the message says which and why."""


@dataclass(frozen=True)
class LoadedModel:
    module: torch.nn.Module
    signature: Signature
    name: str
    version: str
    uri: str
    identity: str  # stable id of these exact weights: MLflow model_uuid, or a content hash for bare paths
    local_path: Path


def _resolve_registry(uri: str) -> tuple[str, str]:
    """models:/ URI → (registered name, version number)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise ModelLoadError(f"model URI {uri!r} is not models:/name/N or models:/name@alias")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise ModelLoadError(f"cannot resolve {uri}: {e.message}") from e
    return m["name"], str(mv.version)


def _spec_from_mlflow(spec: Any, index: int, role: str) -> TensorSpec:
    if not hasattr(spec, "type") or not hasattr(spec, "shape"):
        raise ModelLoadError(
            f"the MLflow signature's {role}s are column-based; serving needs a tensor-based signature "
            "(log the model with numpy/torch examples) or --input/--output specs"
        )
    name = spec.name or f"{role}__{index}"
    return TensorSpec(name, datatypes.from_numpy(spec.type), tuple(int(d) for d in spec.shape))


def _signature(mlmodel: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Signature:
    sig = mlmodel.signature
    ins = list(inputs) or (
        [_spec_from_mlflow(s, i, "input") for i, s in enumerate(sig.inputs.inputs)] if sig else []
    )
    outs = list(outputs)
    if not outs and sig is not None and sig.outputs is not None:
        outs = [_spec_from_mlflow(s, i, "output") for i, s in enumerate(sig.outputs.inputs)]
    if not ins:
        raise ModelLoadError(
            "the model has no signature: log it with a signature (mlflow.models.infer_signature) "
            "or pass --input name:DATATYPE:dims (e.g. --input x:FP32:-1,16)"
        )
    return Signature(tuple(ins), tuple(outs))


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def load_model(
    uri: str,
    *,
    model_name: str | None = None,
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
) -> LoadedModel:
    """Download (if remote) and load the model on CPU in eval mode."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    version = "1"
    name = model_name
    if uri.startswith("models:/"):
        reg_name, version = _resolve_registry(uri)
        name = name or reg_name
    try:
        if uri.startswith(("models:/", "runs:/")):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        else:
            local = Path(uri.removeprefix("file://"))
    except (MlflowException, OSError) as e:
        raise ModelLoadError(f"cannot download {uri}: {e}") from e
    if not (local / "MLmodel").is_file():
        raise ModelLoadError(f"{uri} ({local}) holds no MLmodel file: not an MLflow model")
    mlmodel = Model.load(str(local / "MLmodel"))
    if "pytorch" not in mlmodel.flavors:
        raise ModelLoadError(f"{uri} has flavours {sorted(mlmodel.flavors)}, not 'pytorch'")
    try:
        module = mlflow.pytorch.load_model(str(local), **_load_kwargs(local, mlmodel))
    except Exception as e:  # unpickling user code can raise anything
        raise ModelLoadError(f"cannot load the PyTorch model from {uri}: {type(e).__name__}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{uri} did not load as a torch.nn.Module but as {type(module).__name__}")
    eval_mode(module)
    identity = mlmodel.model_uuid or _content_hash(local)
    if name is None:
        name = _default_name(uri, local)
    log.info(
        "model loaded",
        extra={"model": name, "version": version, "uri": uri, "identity": identity, "path": str(local)},
    )
    return LoadedModel(module, _signature(mlmodel, inputs, outputs), name, version, uri, identity, local)


def _default_name(uri: str, local: Path) -> str:
    if uri.startswith("runs:/"):
        return uri.split("/")[-1] or "model"
    return local.name or "model"


def _load_kwargs(local: Path, mlmodel: Any) -> dict[str, Any]:
    """MLflow's "pt2" format (torch.export, its default) takes no map_location; pickled modules do."""
    data = mlmodel.flavors["pytorch"].get("model_data", "data")
    return {} if (local / data / "model.pt2").exists() else {"map_location": "cpu"}
