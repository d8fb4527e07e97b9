"""CPU: torch.export + AOTInductor (C++ kernels), else torch.compile, else eager."""

from __future__ import annotations

from runtime.serving.compile.base import Backend, Compiled, CompileRequest
from runtime.serving.compile.inductor import inductor_compile


class CpuBackend(Backend):
    name = "cpu"
    family = "cpu"

    def compile(self, req: CompileRequest) -> Compiled:
        return inductor_compile(req, self.name, cudagraphs=False)
