"""No compiler: the eager module on the best device found (the reference for checks)."""

from __future__ import annotations

from runtime.serving.compile.base import Backend, Compiled, CompileRequest, call_module
from runtime.serving.detect import Hardware


class EagerBackend(Backend):
    name = "eager"
    family = "cpu"  # runs wherever detect_hardware's best device is; see compile.select_backend

    def missing(self, hw: Hardware) -> str | None:
        return None

    def compile(self, req: CompileRequest) -> Compiled:
        return Compiled(call_module(req.module), self.name, "eager", f"eager on {req.device.device}")
