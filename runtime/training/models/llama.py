"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), its tensor-parallel plan and its
pipeline split. Layers live in a ModuleDict keyed by their global index, so parameter names are the same in
every pipeline stage and every layout: a checkpoint taken with one layout loads into another.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crds.trainingjob import TrainingJobSpec
from runtime.training.protocol import ParallelContext, TrainTask


@dataclass(frozen=True)
class LlamaArgs:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 0  # 0: same as heads
    ffn_hidden: int = 0  # 0: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 16
    vocab: int = 256
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


CPU = torch.device("cpu")

PRESETS: dict[str, LlamaArgs] = {
    "tiny": LlamaArgs(),
    "small": LlamaArgs(dim=256, layers=4, heads=8, multiple_of=64),
    "125m": LlamaArgs(dim=768, layers=12, heads=12, multiple_of=256),
    "1b": LlamaArgs(dim=2048, layers=16, heads=16, multiple_of=256),
    "3b": LlamaArgs(dim=3072, layers=28, heads=24, kv_heads=8, ffn_hidden=8192),
    "8b": LlamaArgs(dim=4096, layers=32, heads=32, kv_heads=8, ffn_hidden=14336, rope_theta=500000.0),
}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, seq, heads, head_dim) with the half-split pairing."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = a.dim // a.heads
        self.wq = nn.Linear(a.dim, a.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.heads * self.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads / tp of them
        q = _rotate(self.wq(x).view(b, s, -1, self.head_dim), cos[:s], sin[:s]).transpose(1, 2)
        k = _rotate(self.wk(x).view(b, s, -1, self.head_dim), cos[:s], sin[:s]).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))  # type: ignore[no-any-return]


class FeedForward(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.hidden, bias=False)
        self.w2 = nn.Linear(a.hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))  # type: ignore[no-any-return]


def rope(a: LlamaArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin tables, (max_seq_len, head_dim / 2)."""
    hd = a.dim // a.heads
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(torch.arange(a.max_seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def init_tensor(
    a: LlamaArgs, seed: int, name: str, shape: torch.Size, device: torch.device = CPU
) -> torch.Tensor:
    """The initial full value of the parameter or buffer ``name``, made on ``device``: norms 1, the output
    layer N(0, dim^-1/2), every other weight N(0, 0.02), each drawn from its own generator (seed and name) on
    that device, so that a rank can fill one tensor without drawing the others first (parallel.materialize).
    The values depend on the device type's generator: CPU ranks agree with each other, GPU ranks too. One
    CPU thread draws ~263 M a second (bench/train_init_memory.py): a GPU rank draws on its device instead."""
    if name in ("rope_cos", "rope_sin"):
        return rope(a)[name == "rope_sin"].to(device)
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = a.dim**-0.5 if name.startswith("output") else 0.02
    return torch.empty(shape, device=device).normal_(0.0, std, generator=g)


class Transformer(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab). A pipeline stage is a Transformer with some
    layers
    deleted and, except on the first / last stage, no embedding / no norm and output."""

    def __init__(self, a: LlamaArgs, seed: int = 0) -> None:
        super().__init__()
        self.args = a
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleDict({str(i): Block(a) for i in range(a.layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.output: nn.Linear | None = nn.Linear(a.dim, a.vocab, bias=False)
        cos, sin = rope(a)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.rope_cos.is_meta:  # on the meta device, parallel.materialize fills it from init_tensor
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Every parameter from ``init_tensor``: the same values whatever the layout or device."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_tensor(self.args, seed, name, p.shape, p.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def llama_args(spec: TrainingJobSpec) -> LlamaArgs:
    preset = spec.model.preset
    if preset not in PRESETS:
        raise ValueError(
            f"spec.model.preset {preset!r} is not a llama preset; choose one of {sorted(PRESETS)}"
        )
    a = PRESETS[preset]
    vocab = 256 if str(spec.data.builtin) == "text-file" else spec.data.vocab_size
    a = replace(a, vocab=vocab, max_seq_len=max(a.max_seq_len, spec.data.sequence_length))
    opts: dict[str, Any] = dict(spec.model.options or {})
    known = {f.name for f in fields(LlamaArgs)}
    bad = sorted(set(opts) - known)
    if bad:
        raise ValueError(f"spec.model.options {bad} unknown for llama; known: {sorted(known)}")
    a = replace(a, **opts)
    if a.dim % a.heads or (a.dim // a.heads) % 2:
        raise ValueError(f"llama dim {a.dim} must be a multiple of heads {a.heads} with an even head size")
    if a.heads % a.n_kv_heads:
        raise ValueError(f"llama heads {a.heads} must be a multiple of kv_heads {a.n_kv_heads}")
    return a


def check_layout(a: LlamaArgs, tp: int, num_stages: int, sequence_parallel_len: int = 0) -> None:
    """`sequence_parallel_len`: the sequence length split over tp ranks (0: no sequence parallelism)."""
    for what, n in (("heads", a.n_kv_heads), ("ffn hidden size", a.hidden), ("vocabulary", a.vocab)):
        if n % tp:
            raise ValueError(f"llama {what} ({n}) must be divisible by parallelism.tensor ({tp})")
    if sequence_parallel_len % tp:
        raise ValueError(
            f"parallelism.sequenceParallel splits data.sequenceLength ({sequence_parallel_len}) over "
            f"parallelism.tensor ({tp}): make the sequence length a multiple of it, or turn it off"
        )
    if a.layers < num_stages:
        raise ValueError(
            f"llama has {a.layers} layers, fewer than the {num_stages} pipeline stages "
            "(pipeline x stagesPerRank); add layers or reduce parallelism.pipeline"
        )


def flops_per_token(a: LlamaArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as torchtitan counts them: 6 N + 12 L H Q T."""
    per_layer = (
        a.dim * (a.heads + 2 * a.n_kv_heads) * (a.dim // a.heads) + a.dim * a.dim + 3 * a.dim * a.hidden
    )
    n = (
        a.layers * (per_layer + 2 * a.dim) + a.dim + a.dim * a.vocab
    )  # output layer counts, embedding does not
    return 6.0 * n + 12.0 * a.layers * a.heads * (a.dim // a.heads) * seq_len


def parallelize_llama(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """torchtitan's order: tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 / DDP."""
    from runtime.training.parallel import data_parallel, tensor_parallel

    assert isinstance(model, Transformer)
    if ctx.dims.tp_enabled:
        tensor_parallel.apply_llama_tp(model, ctx.mesh["tp"], ctx.sequence_parallel, ctx.loss_parallel)
    if ctx.activation_checkpointing != "none":
        data_parallel.apply_ac(model.layers, ctx.activation_checkpointing)
    if ctx.compile:
        for block in model.layers.values():
            block.compile(fullgraph=True)
    return data_parallel.apply_data_parallel(model, ctx, units=list(model.layers.values()))


def split_llama(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[nn.Module]:
    """Copies of ``model`` holding only the layers of each stage in ``stage_ids`` (even split, extra layers
    to the first stages)."""
    assert isinstance(model, Transformer)
    n = len(model.layers)
    per, extra = divmod(n, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + per + (1 if s < extra else 0))
    parts: list[nn.Module] = []
    for s in stage_ids:
        part = copy.deepcopy(model)
        for i in range(n):
            if not bounds[s] <= i < bounds[s + 1]:
                del part.layers[str(i)]
        if s != 0:
            part.tok_embeddings = None
        if s != num_stages - 1:
            part.norm = None
            part.output = None
        parts.append(part)
    return parts


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def build_task(spec: TrainingJobSpec) -> TrainTask:
    from runtime.training.data import ByteText, SyntheticTokens

    a = llama_args(spec)
    seq = spec.data.sequence_length
    data = str(spec.data.builtin)
    if data == "digits":
        raise ValueError(
            "model llama needs token data: set spec.data.builtin to synthetic-tokens or text-file"
        )
    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]
    if data == "text-file":
        if not spec.data.path:
            raise ValueError("spec.data.builtin text-file needs spec.data.path")
        dataset = ByteText(spec.data.path, seq, spec.optimizer.seed)
    else:
        dataset = SyntheticTokens(a.vocab, seq, spec.optimizer.seed)
    seed = spec.optimizer.seed
    with torch.device("meta"):  # storage comes once it is sharded (parallel.materialize)
        model = Transformer(a)
    return TrainTask(
        model=model,
        init_weights=lambda name, shape, device: init_tensor(a, seed, name, shape, device),
        dataset=dataset,
        loss_fn=lm_loss,
        parallelize=parallelize_llama,
        tensor_parallel=True,
        split_pipeline=split_llama,
        flops_per_sample=flops_per_token(a, seq) * seq,
        tokens_per_sample=seq,
        example_input=dataset[0][0].unsqueeze(0),
        name=f"llama-{spec.model.preset}",
        params={f"model.{k}": v for k, v in a.__dict__.items()},
    )
