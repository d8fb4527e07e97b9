"""What sequence and loss parallelism save: the activations a tensor-parallel rank keeps for the backward
pass of the llama's forward and cross-entropy, with the activations between blocks replicated (tensor
parallelism alone) or split along the sequence (`parallelism.sequenceParallel`), and the logits gathered
whole or left split over the vocabulary (loss parallelism, on whenever there is tensor parallelism), for
the whole model and for the last of 2 pipeline stages (half the layers, the output layer and the loss),
measured in the same run on 2 processes (gloo, 127.0.0.1).

Activation bytes are counted as autograd saves them (torch.autograd.graph.saved_tensors_hooks: each distinct
storage once, parameters left out), so the figure is exact and the same on any machine; the step time is
this machine's CPU (2 processes on 2 cores), a sanity check, not a GPU figure.

    python bench/train_sp_memory.py                      # dim 256, 4 layers, batch 2 x 1,024 tokens
    python bench/train_sp_memory.py --seq 256 --layers 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402


def _loss(model: Any, x: Any, y: Any) -> Any:
    """The llama's cross-entropy and its backward; under loss_parallel when the logits come vocabulary-split
    (the runtime's train step's own loss_context)."""
    from torch.distributed.tensor import DTensor

    from runtime.training.job import loss_context
    from runtime.training.models.llama import lm_loss

    logits = model(x)
    with loss_context(isinstance(logits, DTensor)):
        loss = lm_loss(logits, y)
        loss.backward()
    return loss


def _saved_bytes(model: Any, x: Any, y: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during a forward, loss and backward."""
    import torch

    def storage(t: torch.Tensor) -> Any:
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's part
        while hasattr(local, "elem"):  # a collective's result (AsyncCollectiveTensor) holds the tensor
            local = local.elem
        return local.untyped_storage()

    params = {storage(p).data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = storage(t)
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, x, y)
    return sum(seen.values())


def _rank(rank: int, port: int, a: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from runtime.training.models.llama import LlamaArgs, Transformer, split_llama
    from runtime.training.parallel.tensor_parallel import apply_llama_tp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    args = LlamaArgs(dim=a.dim, layers=a.layers, heads=a.heads, vocab=a.vocab, max_seq_len=a.seq)
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, a.vocab, (a.batch, a.seq), generator=g) for _ in range(2))
    result: dict[str, Any] = {}
    # the last of 2 pipeline stages takes the previous stage's activations (this rank's half of the sequence
    # under sequence parallelism) and ends in the output layer and the loss
    hidden = torch.randn(a.batch, a.seq // 2, a.dim, generator=g)
    for name, tp, sp, lp, last_stage in (
        ("one process (no tensor parallelism)", False, False, False, False),
        ("tensor 2", True, False, False, False),
        ("tensor 2, sequence parallel", True, True, False, False),
        ("tensor 2, sequence and loss parallel", True, True, True, False),
        ("last of 2 pipeline stages, tensor 2, sequence parallel", True, True, False, True),
        ("last of 2 pipeline stages, tensor 2, sequence and loss parallel", True, True, True, True),
    ):
        model = Transformer(args, seed=0)
        if last_stage:
            model = split_llama(model, [1], 2)[0]
        if tp:
            apply_llama_tp(model, mesh, sp, lp)
        inputs = hidden if last_stage else x
        saved = _saved_bytes(model, inputs, y)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            _loss(model, inputs, y)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        result[name] = {"saved_mb": saved / 2**20, "step_ms": 1e3 * sorted(times)[len(times) // 2]}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        mp.spawn(_rank, args=(port, a, out), nprocs=2)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    print(
        f"`python bench/train_sp_memory.py --dim {a.dim} --layers {a.layers} --heads {a.heads} --vocab "
        f"{a.vocab} --seq {a.seq} --batch {a.batch}`\n"
    )
    print(
        f"llama dim {a.dim}, {a.layers} layers, {a.heads} heads, vocabulary {a.vocab}; batch {a.batch} x "
        f"{a.seq} tokens, fp32; per rank, the larger of the 2\n"
    )
    print("| layout | activations saved for backward, MB | x tensor 2 | step ms (this CPU) |")
    print("|---|---:|---:|---:|")
    base = max(r["tensor 2"]["saved_mb"] for r in ranks)
    for name in ranks[0]:
        mb = max(r[name]["saved_mb"] for r in ranks)
        ms = max(r[name]["step_ms"] for r in ranks)
        print(f"| {name} | {mb:,.1f} | {mb / base:.2f} | {ms:,.0f} |")


if __name__ == "__main__":
    main()
