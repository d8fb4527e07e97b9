"""Tensor parallelism with DTensor plans (Megatron-style column / row splits), optionally with sequence
parallelism and with loss parallelism (`apply_llama_tp`).

Activations between blocks are plain tensors, replicated or (sequence parallel) this rank's part of the
sequence, so tensor-parallel blocks compose with pipeline stages and FSDP2 without layout changes at the
boundaries; only the logits may leave as a DTensor (loss parallel), from the last stage of a pipeline too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
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


def apply_llama_tp(
    model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = False
) -> None:
    """Shard heads and the FFN hidden size over ``tp_mesh``; the embedding and the output layer shard the
    vocabulary and return replicated activations / logits.

    ``sequence_parallel`` (Megatron's sequence parallelism, as torchtitan applies it): between the blocks'
    matmuls the activations are split along the sequence instead of replicated, so the norms and the
    residual stream hold 1/tp of the tokens on each rank: the row-parallel layers reduce-scatter their output
    over the sequence instead of all-reducing it, and each block all-gathers it before its column-parallel
    layers. The same bytes cross the wire; the norms' and the residuals' activations shrink by tp.

    ``loss_parallel``: the output layer's logits stay split over the vocabulary (a DTensor) for a loss run
    under DTensor's loss_parallel: no rank holds a whole (batch, seq, vocab) of them."""
    seq = Shard(1)
    top: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        out = seq if sequence_parallel else Replicate()
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=out)
    if model.output is not None:
        inp = seq if sequence_parallel else Replicate()
        # loss parallel: the logits stay a DTensor split over the vocabulary
        out = Shard(-1) if loss_parallel else Replicate()
        top["output"] = ColwiseParallel(
            input_layouts=inp, output_layouts=out, use_local_output=not loss_parallel
        )
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if top:
        parallelize_module(model, tp_mesh, top)  # type: ignore[arg-type]
    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {k: style() for k, style in BLOCK_PLAN.items()}
        if sequence_parallel:
            for norm in ("attention_norm", "ffn_norm"):
                plan[norm] = SequenceParallel()
            for proj in ("attention.wo", "feed_forward.w2"):
                plan[proj] = RowwiseParallel(output_layouts=seq)
            # the attention takes (x, cos, sin): only x is split, and gathered whole before wq / wk / wv
            plan["attention"] = PrepareModuleInput(
                input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None)
            )
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            )
        parallelize_module(block, tp_mesh, plan)
