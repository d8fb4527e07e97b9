"""AMD ROCm: Inductor generating Triton kernels for HIP (the torch device is still "cuda")."""

from __future__ import annotations

from runtime.serving.compile.base import Backend, Compiled, CompileRequest
from runtime.serving.compile.inductor import inductor_compile


class RocmBackend(Backend):
    name = "rocm"
    family = "rocm"

    def compile(self, req: CompileRequest) -> Compiled:
        # torch.cuda.graph captures HIP graphs on ROCm: the same path as CUDA
        return inductor_compile(req, self.name, cudagraphs=True)
