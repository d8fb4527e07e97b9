"""Compile a model for the hardware found: pick a backend, compile or load from the cache, warm up, and
check the compiled outputs against eager before anything is served.

Every fallback (aot → jit → eager) is recorded in `Compiled.fallbacks`, which the server logs, exports as a
metric and reports in its readiness metadata.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.serving.compile.base import (
    Backend,
    BackendUnavailable,
    Compiled,
    CompileRequest,
    call_module,
    eval_mode,
)
from runtime.serving.compile.cache import CacheEntry
from runtime.serving.compile.cpu import CpuBackend
from runtime.serving.compile.cuda import CudaBackend, TensorRTBackend
from runtime.serving.compile.eager import EagerBackend
from runtime.serving.compile.inductor import example_inputs
from runtime.serving.compile.mlu import MluBackend
from runtime.serving.compile.npu import NpuBackend
from runtime.serving.compile.rocm import RocmBackend
from runtime.serving.detect import Hardware
from runtime.serving.protocol import datatypes
from runtime.serving.signature import Signature

__all__ = ["BACKENDS", "BackendUnavailable", "Build", "Compiled", "build", "select_backend"]

log = logging.getLogger(__name__)

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        CudaBackend(),
        TensorRTBackend(),
        RocmBackend(),
        NpuBackend(),
        MluBackend(),
        CpuBackend(),
        EagerBackend(),
    )
}
_AUTO = {"cuda": "cuda", "rocm": "rocm", "npu": "npu", "mlu": "mlu", "cpu": "cpu"}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_backend(requested: str, hw: Hardware) -> tuple[Backend, str]:
    """The backend to use and why; BackendUnavailable naming what is missing for an explicit request."""
    if requested == "auto":
        backend = BACKENDS[_AUTO[hw.family]]
        others = "; ".join(f"{f}: {why}" for f, why in sorted(hw.missing.items()))
        if hw.family == "cpu":
            reason = f"auto chose cpu: no accelerator usable ({others})"
        else:
            reason = f"auto chose {backend.name}: found {hw.best.name}"
            if hw.family == "cuda" and hw.extras.get("tensorrt"):
                reason += " (torch_tensorrt is installed too: ask for backend tensorrt to use it)"
        return backend, reason
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[requested]
    why = backend.missing(hw)
    if why:
        raise BackendUnavailable(f"backend {requested!r} was asked for but is not available here: {why}")
    return backend, f"{requested} requested explicitly"


class _Cast(torch.nn.Module):
    """Runs the model in a lower precision: floating inputs cast down, floating outputs cast back."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype, out_dtypes: Sequence[torch.dtype]) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.out_dtypes = list(out_dtypes)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from runtime.serving.compile.base import as_tuple

        out = as_tuple(self.inner(*[x.to(self.dtype) if x.is_floating_point() else x for x in xs]))
        return tuple(
            o.to(self.out_dtypes[i] if i < len(self.out_dtypes) else torch.float32)
            if o.is_floating_point()
            else o
            for i, o in enumerate(out)
        )


@dataclass
class Build:
    """The outcome of `build`: what runs, how it was chosen, and how long it took."""

    compiled: Compiled
    device: str
    hardware: str
    requested: str
    reason: str
    compile_seconds: float
    cache_key: str | None
    eager: torch.nn.Module
    max_rel_error: float


def _tolerance(precision: torch.dtype | None, dtype: torch.dtype) -> float:
    """Largest relative L2 error (|compiled - eager| / |eager|) accepted for an output."""
    if precision in (torch.float16, torch.bfloat16) or dtype in (torch.float16, torch.bfloat16):
        return 3e-2  # different fusions round differently in 8-bit mantissas
    return 1e-3  # fp32: reordered reductions, TF32 convolutions on GPUs


class Mismatch(AssertionError):
    """The compiled model's outputs differ from eager's (verify)."""


def describe(e: BaseException) -> str:
    """An exception for a log line or a fallback reason: its type and message, or, without a message (a bare
    `assert` deep in a compiler), where it was raised."""
    text = str(e).strip()
    if text:
        return f"{type(e).__name__}: {text}"
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__} (no message){where}"


def verify(
    compiled: Compiled,
    eager: torch.nn.Module,
    sig: Signature,
    device: str,
    sizes: Sequence[int],
    precision: torch.dtype | None = None,
) -> float:
    """Run each warm-up size through both; Mismatch on the first mismatch; return the worst error.

    Floating outputs are compared by relative L2 error; integer and boolean outputs must be equal.
    """
    ref = call_module(eager)
    worst = 0.0
    for b in sizes:
        xs = example_inputs(sig, b, device)
        got, want = compiled.run(xs), ref(xs)
        if len(got) != len(want):
            raise Mismatch(f"batch {b}: compiled returned {len(got)} outputs, eager {len(want)}")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g.shape != w.shape or g.dtype != w.dtype:
                raise Mismatch(
                    f"batch {b} output {i}: compiled {g.dtype}{list(g.shape)} "
                    f"vs eager {w.dtype}{list(w.shape)}"
                )
            if w.is_floating_point():
                gf, wf = g.double(), w.double()
                if not bool(torch.isfinite(gf).eq(torch.isfinite(wf)).all()):
                    raise Mismatch(f"batch {b} output {i}: compiled and eager disagree on non-finite values")
                gf, wf = torch.nan_to_num(gf), torch.nan_to_num(wf)
                err = ((gf - wf).norm() / wf.norm().clamp_min(1e-12)).item() if w.numel() else 0.0
                worst = max(worst, err)
                if err > _tolerance(precision, w.dtype):
                    raise Mismatch(f"batch {b} output {i}: relative error |compiled - eager| = {err:.3g}")
            elif not torch.equal(g, w):
                raise Mismatch(f"batch {b} output {i}: compiled and eager differ")
    return worst


def build(
    module: torch.nn.Module,
    sig: Signature,
    *,
    hw: Hardware,
    requested: str = "auto",
    mode: str = "aot",
    warmup_batch_sizes: Sequence[int] = (1, 8),
    max_batch_size: int = 32,
    cache_dir: Path | None = None,
    model_name: str = "model",
    identity: str = "",
    precision: str = "fp32",
    strict: bool = False,
) -> Build:
    """Select, compile (or load from the cache), warm up and verify.

    `module` is handed over: it is moved to the chosen device and put in eval mode in place (a copy would
    hold the weights twice while compiling; pass a copy to keep the original where it is). `strict` turns a
    failed check into an error instead of a fallback to eager."""
    t0 = time.perf_counter()
    if requested == "eager":
        mode = "eager"
    backend, reason = select_backend(requested, hw)
    device = hw.best if backend.name == "eager" else hw.devices[backend.family]
    log.info("backend selected", extra={"backend": backend.name, "reason": reason, "device": device.device})
    dtype = PRECISIONS[precision]
    eager: torch.nn.Module = eval_mode(module.to(device.device))
    if dtype is not None:
        outs = [datatypes.lookup(o.datatype).torch for o in sig.outputs]
        eager = _Cast(eager, dtype, outs)
    sizes = sorted({min(b, max_batch_size) for b in warmup_batch_sizes} if sig.batched else {1})
    entry = None
    if cache_dir is not None and mode != "eager":
        parts = {
            "model": identity,
            "backend": backend.name,
            "mode": mode,
            "hardware": device.fingerprint,
            "torch": torch.__version__,
            "inputs": [s.to_json() for s in sig.inputs],
            "max_batch_size": max_batch_size,
            "warmup": sizes,
            "precision": precision,
        }
        entry = CacheEntry.open(cache_dir, model_name, parts)
    req = CompileRequest(eager, sig, mode, device, tuple(sizes), max_batch_size, entry, dtype)
    compiled = backend.compile(req)
    warm = sorted(set(sizes) | set(compiled.batch_buckets or ()))
    try:
        worst = verify(compiled, eager, sig, device.device, warm, dtype)
        if compiled.after_warmup is not None:
            compiled.after_warmup()
    except Exception as e:
        if strict or compiled.mode == "eager":
            raise
        if isinstance(e, Mismatch):
            why = f"{compiled.mode} -> eager: compiled model failed the check against eager: {e}"
        else:  # the compiled model (or its warm-up) raised: say what and where, not "failed the check"
            why = (
                f"{compiled.mode} -> eager: compiled model raised while checked against eager: {describe(e)}"
            )
        log.warning("compiled model rejected", extra={"reason": why})
        compiled = Compiled(
            call_module(eager),
            backend.name,
            "eager",
            f"eager on {device.device}",
            fallbacks=[*compiled.fallbacks, why[:500]],
        )
        worst = 0.0
    for fb in compiled.fallbacks:
        log.warning("compile fallback", extra={"backend": backend.name, "fallback": fb})
    seconds = time.perf_counter() - t0
    log.info(
        "model compiled",
        extra={
            "backend": backend.name,
            "mode": compiled.mode,
            "path": compiled.path,
            "cache_hit": compiled.cache_hit,
            "seconds": round(seconds, 2),
            "max_rel_error": worst,
            "warmup_batch_sizes": warm,
        },
    )
    return Build(
        compiled,
        device.device,
        device.name,
        requested,
        reason,
        seconds,
        entry.key if entry else None,
        eager,
        worst,
    )
