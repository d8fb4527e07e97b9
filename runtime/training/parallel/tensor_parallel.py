"""Tensor parallelism with DTensor plans (Megatron-style column / row splits, no sequence parallelism).

Activations between blocks stay replicated plain tensors, so tensor-parallel blocks compose with pipeline
stages and FSDP2 without layout changes at the boundaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from runtime.training.models.llama import Transformer

BLOCK_PLAN: dict[str, type[ColwiseParallel] | type[RowwiseParallel]] = {
    "attention.wq": ColwiseParallel,
    "attention.wk": ColwiseParallel,
    "attention.wv": ColwiseParallel,
    "attention.wo": RowwiseParallel,
    "feed_forward.w1": ColwiseParallel,
    "feed_forward.w3": ColwiseParallel,
    "feed_forward.w2": RowwiseParallel,
}


def apply_llama_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard heads and the FFN hidden size over ``tp_mesh``; the embedding and the output layer shard the
    vocabulary and return replicated activations / logits."""
    top: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.output is not None:
        top["output"] = ColwiseParallel(output_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)  # type: ignore[arg-type]
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {k: style() for k, style in BLOCK_PLAN.items()})
