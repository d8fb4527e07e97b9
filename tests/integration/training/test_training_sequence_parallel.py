"""Sequence parallelism splits the residual stream along the sequence over the tensor-parallel ranks, loss
parallelism keeps the logits split over the vocabulary into the cross-entropy, and the model still computes
what the unparallelized model computes (2 processes, gloo, 127.0.0.1)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.training.models.llama import LlamaArgs, Transformer, lm_loss
from runtime.training.parallel.tensor_parallel import apply_llama_tp

pytestmark = pytest.mark.integration
ARGS = LlamaArgs(dim=32, layers=2, heads=4, vocab=64, max_seq_len=16)


def _rank(rank: int, port: int, sequence_parallel: bool, loss_parallel: bool, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        whole = Transformer(ARGS, seed=5)
        model = Transformer(ARGS, seed=5)
        apply_llama_tp(model, init_device_mesh("cpu", (2,)), sequence_parallel, loss_parallel)
        seen: list[torch.Size] = []
        model.layers["0"].register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randint(0, ARGS.vocab, (2, 16), generator=g) for _ in range(2))
        logits = model(x)
        split = isinstance(logits, DTensor)
        with loss_parallel_context() if split else contextlib.nullcontext():
            loss = lm_loss(logits, y)
            loss.backward()
        want_loss = lm_loss(whole(x), y)
        want_loss.backward()
        full = logits.full_tensor() if split else logits
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        grad = model.norm.weight.grad  # type: ignore[union-attr]
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
        result = {
            "between_blocks": tuple(seen[0]),
            "logits_here": tuple(logits.to_local().shape if split else logits.shape),
            "logits_diff": (full - whole(x)).abs().max().item(),
            "loss_diff": abs(loss.item() - want_loss.item()),
            "grad_diff": (grad - whole.norm.weight.grad).abs().max().item(),  # type: ignore[union-attr]
        }
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, sequence_parallel: bool, loss_parallel: bool = False) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"sp{int(sequence_parallel)}lp{int(loss_parallel)}")
    mp.spawn(_rank, args=(port, sequence_parallel, loss_parallel, out), nprocs=2)
    return [torch.load(f"{out}.{r}") for r in range(2)]


def _same_as_one_process(r: dict) -> None:
    assert r["logits_diff"] < 1e-5 and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


def test_the_residual_stream_holds_half_the_tokens_per_rank(tmp_path: Path) -> None:
    plain, split = _run(tmp_path, False), _run(tmp_path, True)
    for r in range(2):
        assert plain[r]["between_blocks"] == (2, 16, 32)  # tensor parallelism alone: every token
        assert split[r]["between_blocks"] == (2, 8, 32)  # sequence parallel: this rank's half
        assert plain[r]["logits_here"] == split[r]["logits_here"] == (2, 16, 64)  # gathered whole
        _same_as_one_process(plain[r])
        _same_as_one_process(split[r])


def test_loss_parallel_keeps_half_the_vocabulary_per_rank(tmp_path: Path) -> None:
    for r in _run(tmp_path, True, loss_parallel=True):
        assert r["logits_here"] == (2, 16, 32)  # this rank's half of the 64 logits of each token
        _same_as_one_process(r)
