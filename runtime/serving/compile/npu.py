"""Huawei Ascend NPU: torch_npu for the device, torchair graph mode under torch.compile if present."""

from __future__ import annotations

from runtime.serving.compile.base import Backend, Compiled, CompileRequest, call_module
from runtime.serving.compile.inductor import batch_buckets


class NpuBackend(Backend):
    name = "npu"
    family = "npu"

    def compile(self, req: CompileRequest) -> Compiled:
        import torch
        import torch_npu  # noqa: F401  (registers the npu device)

        if req.mode == "eager":
            return Compiled(call_module(req.module), self.name, "eager", "eager on npu")
        fallbacks = []
        if req.mode == "aot":
            fallbacks.append("aot -> jit: Ascend graphs are built by torchair at warm-up")
        try:
            import torchair
        except ImportError:
            fallbacks.append("jit -> eager: the Python package torchair is not installed")
            return Compiled(call_module(req.module), self.name, "eager", "eager on npu", fallbacks=fallbacks)
        npu_backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        compiled = torch.compile(req.module, backend=npu_backend, dynamic=False)
        return Compiled(
            call_module(compiled),
            self.name,
            "jit",
            "torch.compile(torchair)",
            fallbacks=fallbacks,
            batch_buckets=batch_buckets(req.max_batch_size, req.batch_sizes),
        )
