"""Cambricon MLU: torch_mlu for the device; torch.compile through torch_mlu's Inductor support."""

from __future__ import annotations

from runtime.serving.compile.base import Backend, Compiled, CompileRequest, call_module


class MluBackend(Backend):
    name = "mlu"
    family = "mlu"

    def compile(self, req: CompileRequest) -> Compiled:
        import torch
        import torch_mlu  # noqa: F401  (registers the mlu device)

        if req.mode == "eager":
            return Compiled(call_module(req.module), self.name, "eager", "eager on mlu")
        fallbacks = []
        if req.mode == "aot":
            fallbacks.append("aot -> jit: no AOT package format for MLU; torch.compile at warm-up")
        compiled = torch.compile(req.module)
        return Compiled(
            call_module(compiled), self.name, "jit", "torch.compile(inductor on mlu)", fallbacks=fallbacks
        )
