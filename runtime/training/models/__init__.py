"""Built-in models, each with its parallelize function, and the dispatch from a spec to a TrainTask."""

from __future__ import annotations

from crds.trainingjob import TrainingJobSpec
from runtime.training.protocol import TrainTask, load_task


def build_task(spec: TrainingJobSpec) -> TrainTask:
    """The TrainTask of a spec: a built-in model with its data, or the user's entry point."""
    if spec.model.entrypoint:
        return load_task(spec.model.entrypoint, spec)
    kind = str(spec.model.builtin or "")
    if kind == "llama":
        from runtime.training.models import llama

        return llama.build_task(spec)
    if kind in ("cnn", "mlp"):
        from runtime.training.models import vision

        return vision.build_task(spec, kind)
    raise ValueError("spec.model needs builtin (llama, cnn, mlp) or entrypoint ('package.module:function')")
