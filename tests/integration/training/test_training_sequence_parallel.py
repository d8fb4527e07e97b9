"""Sequence parallelism splits the residual stream along the sequence over the tensor-parallel ranks, and
the model still computes what the unparallelized model computes (2 processes, gloo, 127.0.0.1)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.training.models.llama import LlamaArgs, Transformer
from runtime.training.parallel.tensor_parallel import apply_llama_tp

pytestmark = pytest.mark.integration
ARGS = LlamaArgs(dim=32, layers=2, heads=4, vocab=64, max_seq_len=16)


def _rank(rank: int, port: int, sequence_parallel: bool, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        whole = Transformer(ARGS, seed=5)
        model = Transformer(ARGS, seed=5)
        apply_llama_tp(model, init_device_mesh("cpu", (2,)), sequence_parallel)
        seen: list[torch.Size] = []
        model.layers["0"].register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
        x = torch.randint(0, ARGS.vocab, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = model(x), whole(x)
        torch.save(
            {"between_blocks": tuple(seen[0]), "diff": (got - want).abs().max().item()}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, sequence_parallel: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"sp{int(sequence_parallel)}")
    mp.spawn(_rank, args=(port, sequence_parallel, out), nprocs=2)
    return [torch.load(f"{out}.{r}") for r in range(2)]


def test_the_residual_stream_holds_half_the_tokens_per_rank(tmp_path: Path) -> None:
    plain, split = _run(tmp_path, False), _run(tmp_path, True)
    for r in range(2):
        assert plain[r]["between_blocks"] == (2, 16, 32)  # tensor parallelism alone: every token
        assert split[r]["between_blocks"] == (2, 8, 32)  # sequence parallel: this rank's half
        assert plain[r]["diff"] < 1e-5 and split[r]["diff"] < 1e-5  # the same logits as one process
