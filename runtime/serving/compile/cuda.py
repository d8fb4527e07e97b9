"""NVIDIA CUDA: AOTInductor packages where loading them is safe, else torch.compile with CUDA graphs (one
static graph and one CUDA graph per batch bucket; torch.compile's reduce-overhead mode when sequence lengths
vary); Torch-TensorRT as its own backend when installed."""

from __future__ import annotations

import logging

from runtime.serving.compile.base import Backend, Compiled, CompileRequest, call_module
from runtime.serving.compile.inductor import batch_buckets, inductor_compile
from runtime.serving.detect import Hardware

log = logging.getLogger(__name__)


class CudaBackend(Backend):
    name = "cuda"
    family = "cuda"

    def compile(self, req: CompileRequest) -> Compiled:
        return inductor_compile(req, self.name, cudagraphs=True)


class TensorRTBackend(Backend):
    name = "tensorrt"
    family = "cuda"

    def missing(self, hw: Hardware) -> str | None:
        if not hw.usable("cuda"):
            return hw.missing.get("tensorrt") or hw.missing.get("cuda", "no NVIDIA GPU")
        if not hw.extras.get("tensorrt"):
            return hw.missing.get("tensorrt", "the Python package torch_tensorrt is not installed")
        return None

    def compile(self, req: CompileRequest) -> Compiled:
        import torch
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" torch.compile backend)

        if req.mode == "eager":
            return Compiled(call_module(req.module), self.name, "eager", "eager")
        fallbacks = []
        if req.mode == "aot":
            fallbacks.append("aot -> jit: Torch-TensorRT engines are built by torch.compile at warm-up")
        compiled = torch.compile(req.module, backend="tensorrt", dynamic=False)
        return Compiled(
            call_module(compiled),
            self.name,
            "jit",
            "torch.compile(tensorrt)",
            fallbacks=fallbacks,
            batch_buckets=batch_buckets(req.max_batch_size, req.batch_sizes),
        )
